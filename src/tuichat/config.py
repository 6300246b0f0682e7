"""tuichat's config file: read with tomllib, strictly validated, written atomically with tomli_w.

The file lives at `paths.config_file()` (`$TUICHAT_HOME/config.toml` when set). Every error names the file and
the dotted key and says what is allowed, so a typo never turns into a silent default. The file may hold an API
key, so it is written 0600.

    default_profile = "internlm2-w4"
    [server]    url, api_key, model                       (what to attach to when no profile is launched)
    [sampling]  system_prompt, temperature, top_p, ...     (applied to every request; unset = server default)
    [ui]        on_quit, theme, stall_timeout, ...
    [keys]      binding id = "key[,key...]"               (the user keymap)
    [models]    roots = ["/data/models"]
    [profiles.NAME]  model, backend, ...                   (validated by tuichat.profiles)
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuichat import paths
from tuichat.errors import ConfigError
from tuichat.sampling import Sampling, SamplingError, sampling_from_table

if TYPE_CHECKING:
    from tuichat.profiles import Profile

ON_QUIT_CHOICES = ("ask", "stop", "keep")


@dataclass(frozen=True)
class ServerSettings:
    """The server to attach to when none is given on the command line."""

    url: str | None = None
    api_key: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class UISettings:
    on_quit: str = "ask"  # what quitting does to a server tuichat launched: ask | stop | keep
    theme: str = "textual-dark"
    stall_timeout: float = 120.0  # seconds without a byte before a reply counts as stalled
    connect_timeout: float = 5.0
    show_sampling: bool | None = None  # None: shown when the terminal is wide enough
    show_status: bool | None = None
    max_image_side: int = 1344  # longest side of an attached image after downscaling, in pixels


@dataclass(frozen=True)
class Config:
    path: Path
    default_profile: str | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    sampling: Sampling = field(default_factory=Sampling)
    ui: UISettings = field(default_factory=UISettings)
    keys: Mapping[str, str] = field(default_factory=dict)
    model_roots: tuple[str, ...] = ()
    # The user's own profile tables, kept as written so that saving does not rewrite them.
    profile_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    profiles: Mapping[str, Profile] = field(default_factory=dict)

    @property
    def user_profiles(self) -> set[str]:
        return set(self.profile_tables)


_TOP_KEYS = ("default_profile", "server", "sampling", "ui", "keys", "models", "profiles")
_SERVER_KEYS = ("url", "api_key", "model")
_UI_KEYS = (
    "on_quit",
    "theme",
    "stall_timeout",
    "connect_timeout",
    "show_sampling",
    "show_status",
    "max_image_side",
)


def _unknown(file: Path, where: str, key: str, known: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    dotted = f"{where}.{key}" if where else key
    return ConfigError(file, dotted, f"unknown key{hint}")


def _table(file: Path, key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(file, key, "must be a table, e.g. [" + key + "]")
    return value


def _str(file: Path, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(file, key, "must be a string in quotes")
    return value


def _positive(file: Path, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(file, key, "must be a number greater than 0")
    return float(value)


def _opt_bool(file: Path, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(file, key, "must be true or false")
    return value


def parse_config(raw: Mapping[str, Any], file: Path) -> Config:
    """Validate a parsed TOML document into a Config; raises ConfigError naming file and key."""
    for key in raw:
        if key not in _TOP_KEYS:
            raise _unknown(file, "", key, _TOP_KEYS)

    server = ServerSettings()
    if "server" in raw:
        table = _table(file, "server", raw["server"])
        for key, value in table.items():
            if key not in _SERVER_KEYS:
                raise _unknown(file, "server", key, _SERVER_KEYS)
            _str(file, f"server.{key}", value)
        url = table.get("url")
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(file, "server.url", f"'{url}' must start with http:// or https://")
        server = ServerSettings(url=url, api_key=table.get("api_key"), model=table.get("model"))

    sampling = Sampling()
    if "sampling" in raw:
        table = _table(file, "sampling", raw["sampling"])
        try:
            sampling = sampling_from_table(table)
        except SamplingError as exc:
            raise ConfigError(file, f"sampling.{exc.name}", exc.message) from None

    ui = UISettings()
    if "ui" in raw:
        table = _table(file, "ui", raw["ui"])
        values: dict[str, Any] = {}
        for key, value in table.items():
            dotted = f"ui.{key}"
            if key not in _UI_KEYS:
                raise _unknown(file, "ui", key, _UI_KEYS)
            if key == "on_quit":
                if value not in ON_QUIT_CHOICES:
                    raise ConfigError(file, dotted, "must be one of " + ", ".join(ON_QUIT_CHOICES))
                values[key] = value
            elif key == "theme":
                values[key] = _str(file, dotted, value)
            elif key in ("stall_timeout", "connect_timeout"):
                values[key] = _positive(file, dotted, value)
            elif key in ("show_sampling", "show_status"):
                values[key] = _opt_bool(file, dotted, value)
            elif key == "max_image_side":
                if isinstance(value, bool) or not isinstance(value, int) or not 64 <= value <= 8192:
                    raise ConfigError(file, dotted, "must be a whole number of pixels from 64 to 8192")
                values[key] = value
        ui = replace(ui, **values)

    keys: dict[str, str] = {}
    if "keys" in raw:
        for key, value in _table(file, "keys", raw["keys"]).items():
            keys[key] = _str(file, f"keys.{key}", value)

    roots: tuple[str, ...] = ()
    if "models" in raw:
        table = _table(file, "models", raw["models"])
        for key, value in table.items():
            if key != "roots":
                raise _unknown(file, "models", key, ("roots",))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(file, "models.roots", 'must be a list of folders, e.g. ["/data/models"]')
            roots = tuple(value)

    from tuichat import profiles as profiles_mod

    profile_tables: dict[str, dict[str, Any]] = {}
    merged: dict[str, Profile] = dict(profiles_mod.BUILTIN_PROFILES)
    if "profiles" in raw:
        for name, table in _table(file, "profiles", raw["profiles"]).items():
            if not isinstance(table, dict):
                raise ConfigError(file, f"profiles.{name}", "must be a table, e.g. [profiles." + name + "]")
            merged[name] = profiles_mod.parse_profile(name, table, file)
            profile_tables[name] = table

    default = raw.get("default_profile")
    if default is not None:
        _str(file, "default_profile", default)
        if default not in merged:
            close = difflib.get_close_matches(default, list(merged), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see `tuichat profiles`)"
            raise ConfigError(file, "default_profile", f"no profile is called '{default}'{hint}")

    return Config(
        path=file,
        default_profile=default,
        server=server,
        sampling=sampling,
        ui=ui,
        keys=keys,
        model_roots=roots,
        profile_tables=profile_tables,
        profiles=merged,
    )


def load_config(path: Path | None = None) -> Config:
    """Read and validate the config file; a missing file gives the defaults and built-in profiles."""
    file = path or paths.config_file()
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return parse_config({}, file)
    except OSError as exc:
        raise ConfigError(file, "", f"cannot be read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, "", "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"is not valid TOML: {exc}") from None
    return parse_config(raw, file)


def to_document(cfg: Config) -> dict[str, Any]:
    """The TOML document for a Config: only what differs from the defaults."""
    doc: dict[str, Any] = {}
    if cfg.default_profile:
        doc["default_profile"] = cfg.default_profile
    server = {k: v for k, v in vars(cfg.server).items() if v is not None}
    if server:
        doc["server"] = server
    sampling = cfg.sampling.to_table()
    if sampling:
        doc["sampling"] = sampling
    defaults = UISettings()
    ui = {k: v for k, v in vars(cfg.ui).items() if v != getattr(defaults, k) and v is not None}
    if ui:
        doc["ui"] = ui
    if cfg.keys:
        doc["keys"] = dict(cfg.keys)
    if cfg.model_roots:
        doc["models"] = {"roots": list(cfg.model_roots)}
    if cfg.profile_tables:
        doc["profiles"] = {name: dict(table) for name, table in cfg.profile_tables.items()}
    return doc


def save_config(cfg: Config) -> Path:
    """Write the config atomically (0600: it may hold an API key); returns the path."""
    import tomli_w  # lazy: only saving needs the writer

    text = tomli_w.dumps(to_document(cfg))
    paths.write_private(cfg.path, text)
    return cfg.path


def add_profile(name: str, table: Mapping[str, object], *, path: Path | None = None) -> Path:
    """Validate `table` as profile `name` and save it into the config file (replacing one of that name)."""
    cfg = load_config(path)
    from tuichat import profiles as profiles_mod

    profile = profiles_mod.parse_profile(name, table, cfg.path)
    tables = {**cfg.profile_tables, name: dict(table)}
    merged = {**cfg.profiles, name: profile}
    return save_config(replace(cfg, profile_tables=tables, profiles=merged))


def remove_profile(name: str, *, path: Path | None = None) -> Path:
    cfg = load_config(path)
    if name not in cfg.profile_tables:
        raise ConfigError(cfg.path, f"profiles.{name}", "is not a profile of this file (built-ins stay)")
    tables = {k: v for k, v in cfg.profile_tables.items() if k != name}
    from tuichat import profiles as profiles_mod

    merged = dict(profiles_mod.BUILTIN_PROFILES)
    for key, table in tables.items():
        merged[key] = profiles_mod.parse_profile(key, table, cfg.path)
    default = cfg.default_profile if cfg.default_profile in merged else None
    return save_config(replace(cfg, profile_tables=tables, profiles=merged, default_profile=default))
