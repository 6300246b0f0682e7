"""Server profiles: the saved ways to launch `lmdeploy serve api_server`.

A profile is one `[profiles.NAME]` table of config.toml. This module validates such a table strictly (unknown
keys and bad values name the file, the profile and the key, and say what is allowed), turns a profile back
into the smallest table that round-trips, holds the built-in profiles a fresh install offers (the tutorial's
InternLM2-chat-1.8B on TurboMind and PyTorch, and its W4A16 variant), and builds the argv that launches one.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from tuichat.errors import ConfigError

DEFAULT_SERVER_NAME = "127.0.0.1"
DEFAULT_STOP_TIMEOUT = 30.0

BACKENDS = ("turbomind", "pytorch")
# lmdeploy 0.18's --model-format choices (cli/utils.py)
MODEL_FORMATS = ("hf", "awq", "gptq", "compressed-tensors", "fp8", "mxfp4")
QUANT_POLICIES = (0, 4, 8)
DTYPES = ("auto", "float16", "bfloat16")
LOG_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Profile:
    """How to launch one server. `None` leaves the setting to lmdeploy's own default."""

    model: str
    backend: Literal["turbomind", "pytorch"] | None = None
    model_format: str | None = None
    tp: int | None = None
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float | None = None
    quant_policy: int | None = None
    port: int | Literal["auto"] = "auto"
    # None means [sys.executable, "-m", "lmdeploy"]: the server runs from tuichat's own environment
    command: tuple[str, ...] | None = None
    extra_args: tuple[str, ...] = ()
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    max_prefill_token_num: int | None = None
    enable_prefix_caching: bool = False
    chat_template: str | None = None
    model_name: str | None = None
    log_level: str | None = None
    dtype: str | None = None
    server_name: str = DEFAULT_SERVER_NAME
    api_key: str | None = None

    @property
    def argv_prefix(self) -> list[str]:
        """The command that runs lmdeploy: the profile's own, or this interpreter's `-m lmdeploy`."""
        return list(self.command) if self.command else default_command()

    @property
    def uses_default_command(self) -> bool:
        return not self.command

    @property
    def binds_loopback_only(self) -> bool:
        return self.server_name in ("127.0.0.1", "localhost", "::1")

    def served_model_name(self) -> str:
        """The id lmdeploy will list under /v1/models: --model-name, or the model as typed."""
        return self.model_name or self.model


def default_command() -> list[str]:
    return [sys.executable, "-m", "lmdeploy"]


PROFILE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Profile))


def validate_name(name: str) -> str:
    """Check a profile name: it becomes a file name under the state dir and a TOML key. Returns it."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            "",
            f"profiles.{name}",
            "a profile name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return name


# ---------------------------------------------------------------- parsing


class _Checker:
    """Holds the context (file, profile) so each check can raise a ConfigError naming the key."""

    def __init__(self, name: str, file: Path | str) -> None:
        self.name = name
        self.file = file

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, f"profiles.{self.name}.{key}", message)

    def string(self, key: str, value: object, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string (got {_describe(value)})")
        if not allow_empty and not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def choice(self, key: str, value: object, allowed: tuple[str, ...], *, fold_case: bool = False) -> str:
        text = self.string(key, value)
        probe = text.upper() if fold_case else text.lower()
        for option in allowed:
            if probe == (option.upper() if fold_case else option.lower()):
                return option
        raise self.fail(key, f"must be one of {_or_list(allowed)} (got {text!r})")

    def integer(self, key: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
        # bool is an int in Python, but `tp = true` is surely a mistake
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be a whole number (got {_describe(value)})")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise self.fail(key, f"must be {bound} (got {value})")
        return value

    def number(self, key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number (got {_describe(value)})")
        return float(value)

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false (got {_describe(value)})")
        return value

    def string_list(self, key: str, value: object, *, allow_empty: bool = True) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise self.fail(key, f'must be a list of strings, like ["--flag", "value"] (got {_describe(value)})')
        if not all(isinstance(item, str) for item in value):
            raise self.fail(key, "must be a list of strings; every item needs quotes")
        if not allow_empty and not value:
            raise self.fail(key, "must not be an empty list")
        return tuple(value)


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _or_list(options: tuple[object, ...]) -> str:
    shown = [repr(o) if isinstance(o, str) else str(o) for o in options]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts)


def parse_profile(name: str, table: Mapping[str, object], file: Path | str) -> Profile:
    """Validate one `[profiles.NAME]` table and build the Profile; raises ConfigError naming file and key."""
    try:
        validate_name(name)
    except ConfigError as err:
        raise ConfigError(file, err.key, err.message) from None
    c = _Checker(name, file)
    if not isinstance(table, Mapping):
        raise ConfigError(file, f"profiles.{name}", f"must be a table of settings (got {_describe(table)})")
    for key in table:
        if key not in PROFILE_KEYS:
            close = difflib.get_close_matches(str(key), PROFILE_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(PROFILE_KEYS)}"
            raise c.fail(str(key), f"is not a profile setting{hint}")
    if "model" not in table:
        raise c.fail("model", "is required: a local model folder or a hub id such as 'internlm/internlm2-chat-1_8b'")

    values: dict[str, object] = {"model": c.string("model", table["model"])}
    for key, raw in table.items():
        if key == "model":
            continue
        values[key] = _parse_value(c, key, raw)
    return Profile(**values)  # type: ignore[arg-type]  # keys and types checked above


def _parse_value(c: _Checker, key: str, raw: object) -> object:
    match key:
        case "backend":
            return c.choice(key, raw, BACKENDS)
        case "model_format":
            return c.choice(key, raw, MODEL_FORMATS)
        case "tp":
            return c.integer(key, raw, minimum=1, maximum=64)
        case "session_len" | "max_batch_size" | "max_prefill_token_num":
            return c.integer(key, raw, minimum=1)
        case "cache_max_entry_count":
            value = c.number(key, raw)
            if not 0.0 < value <= 1.0:
                raise c.fail(
                    key,
                    f"must be more than 0 and at most 1: the share of free GPU memory for the KV cache (got {raw})",
                )
            return value
        case "quant_policy":
            if isinstance(raw, bool) or raw not in QUANT_POLICIES:
                raise c.fail(key, f"must be 0 (none), 4 (KV int4) or 8 (KV int8) (got {_describe(raw)})")
            return raw
        case "port":
            if raw == "auto":
                return "auto"
            if isinstance(raw, str):
                raise c.fail(key, f'must be "auto" or a port number between 1 and 65535 (got {raw!r})')
            return c.integer(key, raw, minimum=1, maximum=65535)
        case "command":
            return c.string_list(key, raw, allow_empty=False)
        case "extra_args":
            return c.string_list(key, raw)
        case "stop_timeout":
            value = c.number(key, raw)
            if not 0.0 < value <= 3600.0:
                raise c.fail(key, f"must be a number of seconds, more than 0 and at most 3600 (got {raw})")
            return value
        case "enable_prefix_caching":
            return c.boolean(key, raw)
        case "log_level":
            return c.choice(key, raw, LOG_LEVELS, fold_case=True)
        case "dtype":
            return c.choice(key, raw, DTYPES)
        case "server_name":
            text = c.string(key, raw)
            if any(ch.isspace() for ch in text):
                raise c.fail(key, f"must be a host name or address without spaces (got {text!r})")
            return text
        case "api_key":
            text = c.string(key, raw)
            if any(ch.isspace() for ch in text) or text.startswith("-"):
                raise c.fail(key, "must not contain spaces or start with '-' (lmdeploy would read it as a flag)")
            return text
        case "chat_template" | "model_name":
            return c.string(key, raw)
    raise c.fail(key, "is not a profile setting")  # unreachable: keys were checked by the caller


# ---------------------------------------------------------------- writing back

_DEFAULTS = Profile(model="")


def profile_to_table(p: Profile) -> dict[str, object]:
    """The TOML table for `p`: `model` plus every key that differs from the default, in a stable order."""
    table: dict[str, object] = {}
    for f in fields(Profile):
        value = getattr(p, f.name)
        if f.name != "model" and value == getattr(_DEFAULTS, f.name):
            continue
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        elif f.name == "stop_timeout" and isinstance(value, float) and value.is_integer():
            value = int(value)
        table[f.name] = value
    return table


# ---------------------------------------------------------------- launching


def build_argv(p: Profile, *, port: int, api_key: str) -> list[str]:
    """The full argv for `lmdeploy serve api_server`; `api_key` is the key the server must require."""
    argv = [*p.argv_prefix, "serve", "api_server", p.model]
    argv += ["--server-name", p.server_name, "--server-port", str(port)]
    if p.backend is not None:
        argv += ["--backend", p.backend]
    if p.model_format is not None:
        argv += ["--model-format", p.model_format]
    if p.tp is not None:
        argv += ["--tp", str(p.tp)]
    if p.session_len is not None:
        argv += ["--session-len", str(p.session_len)]
    if p.max_batch_size is not None:
        argv += ["--max-batch-size", str(p.max_batch_size)]
    if p.cache_max_entry_count is not None:
        argv += ["--cache-max-entry-count", _number(p.cache_max_entry_count)]
    if p.quant_policy is not None:
        argv += ["--quant-policy", str(p.quant_policy)]
    if p.max_prefill_token_num is not None:
        argv += ["--max-prefill-token-num", str(p.max_prefill_token_num)]
    if p.enable_prefix_caching:
        argv.append("--enable-prefix-caching")
    if p.chat_template is not None:
        argv += ["--chat-template", p.chat_template]
    if p.model_name is not None:
        argv += ["--model-name", p.model_name]
    if p.log_level is not None:
        argv += ["--log-level", p.log_level]
    if p.dtype is not None:
        argv += ["--dtype", p.dtype]
    argv += list(p.extra_args)
    # last, so that a log of the argv can be cut before it; --api-keys takes nargs="+"
    argv += ["--api-keys", api_key]
    return argv


def _number(value: float) -> str:
    return repr(value) if not value.is_integer() else str(int(value))


def with_overrides(p: Profile, **changes: object) -> Profile:
    """A copy of `p` with some fields replaced (used by launch forms)."""
    return replace(p, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- built-ins

_TUTORIAL_MODEL = "internlm/internlm2-chat-1_8b"

BUILTIN_PROFILES: dict[str, Profile] = {
    "internlm2-turbomind": Profile(model=_TUTORIAL_MODEL, backend="turbomind"),
    "internlm2-pytorch": Profile(model=_TUTORIAL_MODEL, backend="pytorch"),
    "internlm2-w4": Profile(
        model="internlm/internlm2-chat-1_8b-4bit",
        backend="turbomind",
        model_format="awq",
        cache_max_entry_count=0.4,
    ),
}

DEFAULT_PROFILE_NAME = "internlm2-w4"


def looks_like_hub_id(model: str) -> bool:
    """True for `owner/name` ids that lmdeploy would fetch from a model hub."""
    return _looks_like_hub_id(model)
