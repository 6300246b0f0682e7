"""Server profiles: the saved ways to launch `lmdeploy serve api_server`.

A profile is one `[profiles.NAME]` table of config.toml. This module validates such a table strictly (unknown
keys and bad values name the file, the profile and the key, and say what is allowed), turns a profile back
into the smallest table that round-trips, holds the built-in profiles a fresh install offers (the tutorial's
InternLM2-chat-1.8B on TurboMind and PyTorch, and its W4A16 variant, which the user makes with `tuichat
quantize`), and builds the argv that launches one.

The API key never goes on the command line where it can be helped: a command that is a Python program (the
default `python -m lmdeploy`, `python SCRIPT`, or a console script such as `.../bin/lmdeploy`) is run through
`serve_entry.py`, which gets the key through a pipe. Only other commands (a shell wrapper, `conda run`, ...)
get `--api-keys KEY` in their argv, and the launcher warns about it.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from tuichat.errors import ConfigError

# the KV-cache shares live once, beside the fit estimate that uses them; re-exported for profile builders
from tuichat.models.fit import AWQ_CACHE_SHARE as AWQ_CACHE_SHARE
from tuichat.models.fit import LMDEPLOY_CACHE_SHARE as LMDEPLOY_CACHE_SHARE

DEFAULT_SERVER_NAME = "127.0.0.1"
DEFAULT_STOP_TIMEOUT = 30.0
# Long enough for a hub download of a mid-sized model plus CUDA-graph warm-up; a start-up that takes longer is
# taken for hung (lmdeploy's mp executor can hang with tp > 1) and its whole group is stopped.
DEFAULT_START_TIMEOUT = 1800.0

BACKENDS = ("turbomind", "pytorch")
# lmdeploy 0.18's --model-format choices (cli/utils.py)
MODEL_FORMATS = ("hf", "awq", "gptq", "compressed-tensors", "fp8", "mxfp4")
QUANT_POLICIES = (0, 4, 8)
DTYPES = ("auto", "float16", "bfloat16")
# lmdeploy 0.18's --distributed-executor-backend choices (cli/utils.py); PyTorch backend only
EXECUTOR_BACKENDS = ("mp", "ray", "uni")
# NVLink multicast (NVLS) hangs or fails NCCL set-up on some hosts; off unless the user's environment says otherwise
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TM_COMM_NVLS_ENABLE": "0"}
LOG_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")

# the key travels to the server through a pipe written before the server starts: it must fit the pipe's buffer
MAX_API_KEY_LENGTH = 1000

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
    # None: "mp" for tp > 1 on the PyTorch backend (lmdeploy's own default there, ray, is rarely installed)
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT

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

    @property
    def model_arg(self) -> str:
        """The model as lmdeploy gets it: a leading `~` expanded (no shell does it for us)."""
        return os.path.expanduser(self.model) if self.model.startswith("~") else self.model

    @property
    def executor_backend(self) -> str | None:
        """The PyTorch executor this profile runs with: the one it names, else "mp" for tp > 1; None where the
        setting does not apply (TurboMind, or tp = 1 with nothing named: lmdeploy uses its single-process one)."""
        if self.backend == "turbomind":
            return None
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "mp" if (self.tp or 1) > 1 else None

    def served_model_name(self) -> str:
        """The id lmdeploy will list under /v1/models: --model-name, or the model as passed."""
        return self.model_name or self.model_arg


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
        case "start_timeout":
            value = c.number(key, raw)
            if not 0.0 < value <= 86400.0:
                raise c.fail(key, f"must be a number of seconds, more than 0 and at most 86400 (got {raw})")
            return value
        case "distributed_executor_backend":
            return c.choice(key, raw, EXECUTOR_BACKENDS)
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
            if len(text) > MAX_API_KEY_LENGTH:
                raise c.fail(key, f"must be at most {MAX_API_KEY_LENGTH} characters (got {len(text)})")
            return text
        case "chat_template" | "model_name":
            return c.string(key, raw)
    raise c.fail(key, "is not a profile setting")  # unreachable: keys were checked by the caller


# ---------------------------------------------------------------- writing back

_DEFAULTS = Profile(model="")
_WHOLE_SECONDS = ("stop_timeout", "start_timeout")


def _settings(p: Profile, *, keep_defaults: bool) -> dict[str, object]:
    """The one loop over a profile's fields that every table form of it is cut from."""
    table: dict[str, object] = {}
    for f in fields(Profile):
        value = getattr(p, f.name)
        if value is None or (not keep_defaults and f.name != "model" and value == getattr(_DEFAULTS, f.name)):
            continue
        if isinstance(value, tuple):
            value = list(value)
        elif f.name in _WHOLE_SECONDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        table[f.name] = value
    return table


def profile_to_table(p: Profile) -> dict[str, object]:
    """The TOML table for `p`: `model` plus every key that differs from the default, in a stable order."""
    return _settings(p, keep_defaults=False)


def profile_from_table(name: str, table: Mapping[str, object], file: Path | str = "") -> Profile:
    """A table from anywhere (a form, a job, a record) as a checked Profile; the same rules as the config file."""
    return parse_profile(name, table, file)


def cache_share(p: Profile) -> float:
    """The KV-cache share the server will really use: the profile's, or lmdeploy's default."""
    return p.cache_max_entry_count if p.cache_max_entry_count is not None else LMDEPLOY_CACHE_SHARE


def awq_profile(model: str, *, model_name: str | None = None) -> Profile:
    """The profile of a 4-bit AWQ model: TurboMind reads the format from the flag, and the smaller KV-cache share."""
    return Profile(model=model, model_format="awq", cache_max_entry_count=AWQ_CACHE_SHARE, model_name=model_name)


def profile_for_model(model: object, name: str | None = None) -> tuple[str, Profile]:
    """A profile name and the checked Profile that suits `model` (a `ModelInfo`, a model folder or a hub id).

    The builder screens and commands call: it wraps the model inspection's settings (format, AWQ's cache share,
    a VLM's session length) in a Profile, so no caller handles a raw table.
    """
    from tuichat.models.discovery import ModelInfo, profile_for

    if not isinstance(model, ModelInfo | str):
        raise TypeError(f"profile_for_model takes a ModelInfo or a str, not {type(model).__name__}")
    chosen, table = profile_for(model, name)
    return chosen, parse_profile(chosen, table, "")


# ---------------------------------------------------------------- launching


def server_args(p: Profile, *, port: int) -> list[str]:
    """`serve api_server MODEL --flag value ...`: what follows the command, without the API key."""
    argv = ["serve", "api_server", p.model_arg]
    argv += ["--server-name", p.server_name, "--server-port", str(port)]
    if p.backend is not None:
        argv += ["--backend", p.backend]
    if p.model_format is not None:
        argv += ["--model-format", p.model_format]
    if p.tp is not None:
        argv += ["--tp", str(p.tp)]
    executor = p.executor_backend
    # backend unset means TurboMind, which may fall back to PyTorch: that case gets the executor through
    # LMDEPLOY_EXECUTOR_BACKEND (see server_env), since the fallback drops the flag's value
    if p.backend == "pytorch" and executor is not None and "--distributed-executor-backend" not in p.extra_args:
        argv += ["--distributed-executor-backend", executor]
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
    return argv


def server_env(p: Profile, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a launch of `p` adds to `environ`: NVLink multicast off (unless `environ` sets it), and
    with the backend left to lmdeploy, the executor through LMDEPLOY_EXECUTOR_BACKEND (lmdeploy's
    TurboMind-to-PyTorch fallback drops a flag's value, not the variable's)."""
    added = {k: v for k, v in NVLS_OFF.items() if k not in environ}
    executor = p.executor_backend
    if (
        p.backend is None
        and executor is not None
        and "--distributed-executor-backend" not in p.extra_args
        and "LMDEPLOY_EXECUTOR_BACKEND" not in environ
    ):
        added["LMDEPLOY_EXECUTOR_BACKEND"] = executor
    return added


def build_argv(p: Profile, *, port: int, api_key: str, extra_keys: Sequence[str] = ()) -> list[str]:
    """The plain argv for `lmdeploy serve api_server`, with `--api-keys KEY` on it (visible in `ps`): only for
    a command that `build_hidden_key_argv` cannot run."""
    # last, so that a log of the argv can be cut before it; --api-keys takes nargs="+"
    return [*p.argv_prefix, *server_args(p, port=port), "--api-keys", api_key, *extra_keys]


def build_hidden_key_argv(p: Profile, *, port: int, key_fd: int = 0) -> list[str] | None:
    """The argv that runs the profile's command through `serve_entry.py`, which reads the key from `key_fd`;
    None when the command is not a Python program that can be run that way."""
    entry = entry_prefix(p.argv_prefix, key_fd=key_fd)
    return None if entry is None else [*entry, *server_args(p, port=port)]


ROUTING_STRATEGIES = ("min_expected_latency", "random", "min_observed_latency")


def proxy_args(*, port: int, routing_strategy: str, server_name: str = DEFAULT_SERVER_NAME) -> list[str]:
    """`serve proxy --server-name ... --disable-cache-status`: what follows the command, without the API key.

    `--disable-cache-status` because otherwise lmdeploy 0.18's proxy keeps its node list in `proxy_config.json`
    inside the installed package and brings back, at the next start, nodes of an earlier fleet long gone.
    """
    return [
        "serve",
        "proxy",
        "--server-name",
        server_name,
        "--server-port",
        str(port),
        "--routing-strategy",
        routing_strategy,
        "--disable-cache-status",
    ]


SERVE_ENTRY = Path(__file__).resolve().with_name("serve_entry.py")
_PYTHON_RE = re.compile(r"^python(\d+(\.\d+)?)?$")


def _is_python(program: str) -> bool:
    return program == sys.executable or bool(_PYTHON_RE.match(Path(program).name))


def entry_prefix(command: Sequence[str], *, key_fd: int = 0) -> list[str] | None:
    """`command` (a profile's argv prefix) rewritten to run through `serve_entry.py`, up to and including `--`;
    None when it is not `PYTHON -m MODULE ...`, `PYTHON SCRIPT ...` or a script with a Python `#!` line."""
    if not command:
        return None
    head = [str(SERVE_ENTRY), "--key-fd", str(key_fd)]
    program, rest = command[0], list(command[1:])
    if _is_python(program):
        options = _interpreter_options(rest)
        rest = rest[len(options) :]
        if len(rest) >= 2 and rest[0] == "-m":
            return [program, *options, *head, "--module", rest[1], "--", *rest[2:]]
        if rest and not rest[0].startswith("-"):
            return [program, *options, *head, "--script", rest[0], "--", *rest[1:]]
        return None
    script = _resolve(program)
    interpreter = _shebang_python(script) if script is not None else None
    if script is None or interpreter is None:
        return None
    return [*interpreter, *head, "--script", script, "--", *rest]


def _interpreter_options(args: list[str]) -> list[str]:
    """The leading options of a python command line that belong to the interpreter (-u, -O, -X dev, ...)."""
    taken: list[str] = []
    while len(taken) < len(args):
        token = args[len(taken)]
        if not token.startswith("-") or token in ("-", "-m", "-c") or token.startswith(("-m", "-c", "--")):
            break
        taken.append(token)
        if token in ("-X", "-W") and len(taken) < len(args):
            taken.append(args[len(taken)])
    return taken


def _resolve(program: str) -> str | None:
    if os.sep in program:
        path = Path(program).expanduser()
        return str(path) if path.is_file() else None
    return shutil.which(program)


def _shebang_python(script: str) -> list[str] | None:
    """The interpreter of a `#!` line naming Python directly or through `env` (as pip writes console scripts)."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    try:
        words = shlex.split(first[2:].decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if words and _is_python(words[0]):
        return words
    if len(words) == 2 and Path(words[0]).name == "env" and _is_python(words[1]):
        return words
    return None


def _number(value: float) -> str:
    return repr(value) if not value.is_integer() else str(int(value))


def with_overrides(p: Profile, **changes: object) -> Profile:
    """A copy of `p` with some fields replaced (used by launch forms)."""
    return replace(p, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- built-ins

_TUTORIAL_MODEL = "internlm/internlm2-chat-1_8b"
# No hub publishes a 4-bit InternLM2-chat-1.8B: the W4A16 profile serves what `tuichat quantize` makes here.
# A `~` path, not one under the data dir: it reads the same on every machine and in every TUICHAT_HOME.
W4_MODEL_DIR = "~/models/internlm2-chat-1_8b-w4a16"
W4_MODEL_NAME = "internlm2-chat-1_8b-w4a16"

BUILTIN_PROFILES: dict[str, Profile] = {
    # first: the default, and where a screen that picks "the first profile" starts
    "internlm2-turbomind": Profile(model=_TUTORIAL_MODEL, backend="turbomind"),
    "internlm2-pytorch": Profile(model=_TUTORIAL_MODEL, backend="pytorch"),
    "internlm2-w4": Profile(
        model=W4_MODEL_DIR,
        backend="turbomind",
        model_format="awq",
        cache_max_entry_count=AWQ_CACHE_SHARE,
        model_name=W4_MODEL_NAME,
    ),
}

DEFAULT_PROFILE_NAME = "internlm2-turbomind"

# Models that built-in profiles expect the user to make, and the command that makes each.
_MADE_BY_QUANTIZE = {
    W4_MODEL_DIR: f"tuichat quantize {_TUTORIAL_MODEL} --out {W4_MODEL_DIR} --no-profile",
}


def make_model_hint(model: str) -> str | None:
    """For a model that a built-in profile expects `tuichat quantize` to make: the command that makes it."""
    return _MADE_BY_QUANTIZE.get(model)


def looks_like_hub_id(model: str) -> bool:
    """True for `owner/name` ids that lmdeploy would fetch from a model hub."""
    return _looks_like_hub_id(model)
