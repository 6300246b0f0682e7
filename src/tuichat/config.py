"""tuichat's config file: read with tomllib, strictly validated, edited in place with tomlkit.

The file lives at `paths.config_file()` (`$TUICHAT_HOME/config.toml` when set). Every error names the file and
the dotted key and says what is allowed, so a typo never turns into a silent default. The user writes this file
by hand, so a save (`update_config`, `set_value`, `set_sampling`, `save_profile`, `add_profile`,
`remove_profile`, `add_fleet`, `remove_fleet`, `save_config`) changes only the keys it is about and keeps
comments, blank lines and key order; it never writes a file that would fail validation.
The file may hold an API key, so it is written atomically and 0600.

    default_profile = "internlm2-w4"
    [server]    url, api_key, model                       (what to attach to when no profile is launched)
    [sampling]  system_prompt, temperature, top_p, ...     (applied to every request; unset = server default)
    [ui]        on_quit, theme, stall_timeout, ...
    [keys]      binding id = "key[,key...]"               (the user keymap)
    [models]    roots = ["/data/models"]
    [profiles.NAME]  model, backend, ...                   (validated by tuichat.server.profiles)
    [fleets.NAME]    nodes = ["tiny", "tiny"], proxy_port, routing_strategy, ...   (validated by tuichat.server.fleet)
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuichat import paths
from tuichat.chat.sampling import Sampling, SamplingError, sampling_from_table
from tuichat.errors import ConfigError
from tuichat.keymap import check_keys

if TYPE_CHECKING:
    from tomlkit import TOMLDocument

    from tuichat.server.fleet import FleetSpec
    from tuichat.server.profiles import Profile

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


class Profiles(Mapping[str, "Profile"]):
    """Every profile: the built-ins, then the file's own over them. The built-ins (and the profiles module, with
    the GPU and fit code it imports: ~10 ms) load on first use, which attaching to a server never makes, so a
    plain start does not wait for them. The file's own profiles are parsed, and so checked, when it is read."""

    def __init__(self, own: Mapping[str, Profile] | None = None) -> None:
        self._own = dict(own or {})
        self._all: dict[str, Profile] | None = None

    def _every(self) -> dict[str, Profile]:
        if self._all is None:
            from tuichat.server.profiles import BUILTIN_PROFILES

            self._all = {**BUILTIN_PROFILES, **self._own}
        return self._all

    def __getitem__(self, name: str) -> Profile:
        return self._every()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._every())

    def __len__(self) -> int:
        return len(self._every())

    def __repr__(self) -> str:
        return f"Profiles({sorted(self._own)} over the built-ins)"


@dataclass(frozen=True)
class Config:
    path: Path
    default_profile: str | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    sampling: Sampling = field(default_factory=Sampling)
    ui: UISettings = field(default_factory=UISettings)
    keys: Mapping[str, str] = field(default_factory=dict)
    model_roots: tuple[str, ...] = ()
    # every profile, built-in or the user's, in its one typed form
    profiles: Mapping[str, Profile] = field(default_factory=Profiles)
    # which of `profiles` the file defines (the rest are built-ins it left alone)
    user_profiles: frozenset[str] = frozenset()
    # [fleets.NAME] as written, and validated
    fleet_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fleets: Mapping[str, FleetSpec] = field(default_factory=dict)
    # Every setting as the file said when loaded: `save_config` writes only what differs from it, so a value
    # edited by hand while tuichat ran is not overwritten by a save about something else.
    baseline: Mapping[tuple[str, ...], object] | None = field(default=None, compare=False, repr=False)

    def profile_table(self, name: str) -> dict[str, object]:
        """The user's profile `name` as config.toml holds it: its shortest table, derived from the Profile."""
        from tuichat.server.profiles import profile_to_table

        return profile_to_table(self.profiles[name])


_TOP_KEYS = ("default_profile", "server", "sampling", "ui", "keys", "models", "profiles", "fleets")
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
        keys = check_keys(_table(file, "keys", raw["keys"]), file)

    roots: tuple[str, ...] = ()
    if "models" in raw:
        table = _table(file, "models", raw["models"])
        for key, value in table.items():
            if key != "roots":
                raise _unknown(file, "models", key, ("roots",))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(file, "models.roots", 'must be a list of folders, e.g. ["/data/models"]')
            roots = tuple(value)

    own: dict[str, Profile] = {}
    if "profiles" in raw:
        from tuichat.server import profiles as profiles_mod

        for name, table in _table(file, "profiles", raw["profiles"]).items():
            if not isinstance(table, dict):
                raise ConfigError(file, f"profiles.{name}", "must be a table, e.g. [profiles." + name + "]")
            own[name] = profiles_mod.parse_profile(name, table, file)
    user_profiles = set(own)
    merged = Profiles(own)

    fleet_tables: dict[str, dict[str, Any]] = {}
    fleets: dict[str, FleetSpec] = {}
    if "fleets" in raw:
        from tuichat.server import fleet as fleet_mod

        for name, table in _table(file, "fleets", raw["fleets"]).items():
            if not isinstance(table, dict):
                raise ConfigError(file, f"fleets.{name}", "must be a table, e.g. [fleets." + name + "]")
            fleets[name] = fleet_mod.parse_fleet(name, table, file, merged)
            fleet_tables[name] = table

    default = raw.get("default_profile")
    if default is not None:
        _str(file, "default_profile", default)
        if default not in merged:
            close = difflib.get_close_matches(default, list(merged), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see `tuichat profiles`)"
            raise ConfigError(file, "default_profile", f"no profile is called '{default}'{hint}")

    cfg = Config(
        path=file,
        default_profile=default,
        server=server,
        sampling=sampling,
        ui=ui,
        keys=keys,
        model_roots=roots,
        profiles=merged,
        user_profiles=frozenset(user_profiles),
        fleet_tables=fleet_tables,
        fleets=fleets,
    )
    return replace(cfg, baseline=_leaves(cfg))


def load_config(path: Path | None = None) -> Config:
    """Read and validate the config file; a missing file gives the defaults and built-in profiles."""
    file = path or paths.config_file()
    raw = _read_toml(_read_text(file), file)
    return parse_config(raw, file)


# -- saving ---------------------------------------------------------------------------------------------------
#
# config.toml is a file the user writes by hand, so a save edits only the keys that changed (tomlkit keeps the
# text around them: comments, blank lines, key order, quoting). Before anything is written the new text is checked
# twice: it must read back as exactly the old settings plus the edit (a key tomlkit put in the wrong table would
# otherwise pass unnoticed), and it must pass the strict validator above, so a save never leaves a file that the
# next start would refuse.

ConfigKey = tuple[str, ...]  # a key path, e.g. ("ui", "on_quit") or ("profiles", "mine")


def to_document(cfg: Config) -> dict[str, Any]:
    """The TOML document for a Config: only what differs from the defaults (for a file written from scratch)."""
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
    if cfg.user_profiles:
        doc["profiles"] = {name: cfg.profile_table(name) for name in sorted(cfg.user_profiles)}
    if cfg.fleet_tables:
        doc["fleets"] = {name: dict(table) for name, table in cfg.fleet_tables.items()}
    return doc


def _plain(value: object) -> object:
    """Tuples as lists and mappings as dicts: the shapes TOML (and a tomllib read-back) has."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _leaves(cfg: Config) -> dict[ConfigKey, object]:
    """Every setting of `cfg` by key path (a profile as one whole table); an unset one is absent."""
    out: dict[ConfigKey, object] = {}
    if cfg.default_profile is not None:
        out[("default_profile",)] = cfg.default_profile
    for name, value in vars(cfg.server).items():
        if value is not None:
            out[("server", name)] = value
    for name, value in cfg.sampling.to_table().items():
        out[("sampling", name)] = _plain(value)
    for name, value in vars(cfg.ui).items():
        if value is not None:
            out[("ui", name)] = value
    for name, value in cfg.keys.items():
        out[("keys", name)] = value
    if cfg.model_roots:
        out[("models", "roots")] = list(cfg.model_roots)
    for name in sorted(cfg.user_profiles):
        out[("profiles", name)] = _plain(cfg.profile_table(name))
    for name, table in cfg.fleet_tables.items():
        out[("fleets", name)] = _plain(table)
    return out


def _same(current: object, value: object) -> bool:
    """Whether the file already says `value` (1 and 1.0 alike, true and 1 not), so its text can stay as written."""
    unwrap = getattr(current, "unwrap", None)
    plain = unwrap() if callable(unwrap) else current
    return isinstance(plain, bool) == isinstance(value, bool) and _plain(plain) == value


def _read_text(file: Path) -> str:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ConfigError(file, "", f"cannot be read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(file, "", "is not UTF-8 text") from None


def _read_toml(text: str, file: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"is not valid TOML: {exc}") from None


def _expect(raw: dict[str, Any], key: ConfigKey, value: object) -> None:
    """Apply one change to the plain document: what the edited text must read back as."""
    *parents, name = key
    node = raw
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            if value is None:
                return
            child = node[part] = {}
        node = child
    if value is None:
        node.pop(name, None)
    else:
        node[name] = value


def _header(line: str) -> ConfigKey | None:
    """The key path of a `[table]` header line, or None for any other line."""
    stripped = line.strip()
    if not stripped.startswith("[") or stripped.startswith("[["):
        return None
    try:
        node: object = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None
    key: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        name, node = next(iter(node.items()))
        key.append(name)
    return tuple(key) if node == {} else None


def _is_blank(line: str) -> bool:
    return not line.strip()


def _cut_table(text: str, key: ConfigKey) -> str | None:
    """`text` without the table `key` (its header, its keys, the comment lines right above its header); None
    where the table has no header line of its own, for tomlkit to remove.

    Comment lines after the table's last key stay: they introduce what follows (or close the file). The caller
    checks the result reads back as the old document minus this table, so a header-like line inside a
    multi-line string cannot go unnoticed.
    """
    lines = text.splitlines(keepends=True)
    heads = [(i, path) for i, line in enumerate(lines) if (path := _header(line)) is not None]
    starts = [i for i, path in heads if path == key]
    if len(starts) != 1:
        return None
    start = starts[0]
    end = next((i for i, path in heads if i > start and path[: len(key)] != key), len(lines))
    last = max(i for i in range(start, end) if not _is_blank(lines[i]) and not lines[i].lstrip().startswith("#"))
    lead = start
    while lead > 0 and lines[lead - 1].lstrip().startswith("#"):
        lead -= 1
    if lead == 0:
        lead = start  # comments that open the file are about the file, not this table
    left, right = lines[:lead], lines[last + 1 : end] + lines[end:]
    # One blank line where the table was, not two; none at either end of the file.
    if not left or _is_blank(left[-1]):
        while right and _is_blank(right[0]):
            right.pop(0)
    if not right:
        while left and _is_blank(left[-1]):
            left.pop()
    return "".join(left + right)


def _pruned(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The document without empty tables: removing a table's last key may leave its header, which means nothing."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            value = _pruned(value)
            if not value:
                continue
        out[key] = value
    return out


def update_config(changes: Mapping[ConfigKey, object], *, path: Path | None = None) -> Path:
    """Change only the given keys of the config file, keeping its comments, blank lines and key order.

    `changes` maps a key path to its new value: None removes the key, a mapping replaces a table key by key (a
    profile, say). Nothing is written unless the result passes the strict validation `load_config` applies; then a
    ConfigError names the key. The write is atomic and 0600; a config.toml that is a symlink stays one.
    """
    file = path or paths.config_file()
    target = file.resolve() if file.is_symlink() else file
    paths.ensure_private_dir(target.parent)
    with paths.locked(target.parent):
        text = _read_text(file)
        expected = _read_toml(text, file)
        import tomlkit  # lazy: only saving needs the round-trip library

        try:
            doc = tomlkit.parse(text)
        except tomlkit.exceptions.ParseError as exc:
            raise ConfigError(file, "", f"cannot be edited ({exc}); change it by hand") from None
        new_text = text
        for key, value in changes.items():
            plain = _plain(value)
            _expect(expected, key, plain)
            cut = _cut_table(new_text, key) if plain is None else None
            if cut is None:
                _Editor(doc).apply(key, plain, file)
                cut = doc.as_string()
            new_text = cut
            doc = tomlkit.parse(new_text)
        if "\r\n" in text and "\n" not in text.replace("\r\n", ""):
            new_text = re.sub(r"(?<!\r)\n", "\r\n", new_text)  # new lines end as the user's lines do
        if new_text == text:
            return file
        got = _read_toml(new_text, file)
        if _pruned(got) != _pruned(expected):
            where = ".".join(next(iter(changes), ()))
            raise ConfigError(
                file,
                where,
                "could not be changed without disturbing the rest of the file; nothing was written: change it by hand",
            )
        parse_config(got, file)
        paths.write_private(target, new_text)
    return file


def set_value(key: ConfigKey, value: object, *, path: Path | None = None) -> Path:
    """Set one setting, e.g. `set_value(("ui", "on_quit"), "stop")`; None removes it (back to the default)."""
    return update_config({key: value}, path=path)


def set_sampling(sampling: Sampling, *, path: Path | None = None) -> Path:
    """Save the sampling values: set ones are written, unset ones removed, unchanged ones left as typed."""
    from dataclasses import fields

    table = sampling.to_table()
    return update_config({("sampling", f.name): _plain(table.get(f.name)) for f in fields(Sampling)}, path=path)


def save_config(cfg: Config) -> Path:
    """Save what `cfg` changed since it was loaded (for a Config built in code: what differs from the file).

    Only those keys are edited, so the rest of the file (comments included, and anything edited by hand while
    tuichat ran) stays as it is.
    """
    base = cfg.baseline if cfg.baseline is not None else _leaves(load_config(cfg.path))
    new = _leaves(cfg)
    order = [*new, *(key for key in base if key not in new)]
    changes = {key: new.get(key) for key in order if base.get(key) != new.get(key)}
    if changes:
        update_config(changes, path=cfg.path)
    return cfg.path


def save_profile(name: str, profile: Profile, *, path: Path | None = None) -> Path:
    """The one way a profile reaches config.toml: `profile` as profile `name`, in its shortest table (defaults
    left out), replacing one of that name. Whether to replace is the caller's question (`overwrite_question`)."""
    from tuichat.server import profiles as profiles_mod

    file = path or paths.config_file()
    table = profiles_mod.profile_to_table(profile)
    # a Profile built in code skipped the file's checks: it must read back as the same profile
    if profiles_mod.parse_profile(name, table, file) != profile:
        raise ConfigError(file, f"profiles.{name}", "does not read back as the profile being saved")
    return update_config({("profiles", name): table}, path=file)


def add_profile(name: str, table: Mapping[str, object], *, path: Path | None = None) -> Path:
    """Validate `table` as profile `name` and save it through `save_profile` (replacing one of that name)."""
    from tuichat.server import profiles as profiles_mod

    file = path or paths.config_file()
    return save_profile(name, profiles_mod.parse_profile(name, table, file), path=file)


def overwrite_question(cfg: Config, name: str) -> str | None:
    """The question to ask before a save as `name` replaces a profile (the user's own or a built-in), or None
    when the name is free. `cfg` is the config as the asking screen or command last loaded it."""
    from tuichat.server import profiles as profiles_mod

    if name in cfg.user_profiles:
        return f"A profile called {name} is already in config.toml: replace it?"
    if name in profiles_mod.BUILTIN_PROFILES:
        return (
            f"{name} is a built-in profile: save yours under that name? It takes the built-in's place "
            "(remove it from config.toml to get the built-in back)."
        )
    return None


def remove_profile(name: str, *, path: Path | None = None) -> Path:
    """Remove the user's profile `name` (and `default_profile`, where it named a profile that no longer exists)."""
    from tuichat.server import profiles as profiles_mod

    cfg = load_config(path)
    if name not in cfg.user_profiles:
        raise ConfigError(cfg.path, f"profiles.{name}", "is not a profile of this file (built-ins stay)")
    changes: dict[ConfigKey, object] = {("profiles", name): None}
    if cfg.default_profile == name and name not in profiles_mod.BUILTIN_PROFILES:
        changes[("default_profile",)] = None
    return update_config(changes, path=cfg.path)


def add_fleet(name: str, table: Mapping[str, object], *, path: Path | None = None) -> Path:
    """Validate `table` as fleet `name` against the file's profiles and save it (replacing one of that name)."""
    from tuichat.server import fleet as fleet_mod

    cfg = load_config(path)
    fleet_mod.parse_fleet(name, table, cfg.path, cfg.profiles)
    return update_config({("fleets", name): dict(table)}, path=cfg.path)


def remove_fleet(name: str, *, path: Path | None = None) -> Path:
    """Remove fleet `name` from the config file."""
    cfg = load_config(path)
    if name not in cfg.fleet_tables:
        raise ConfigError(cfg.path, f"fleets.{name}", "is not a fleet of this file")
    return update_config({("fleets", name): None}, path=cfg.path)


def _body(container: Any) -> list[tuple[Any, Any]]:
    """The (key, item) list tomlkit renders a table or document from; empty for an inline table."""
    from tomlkit.items import InlineTable, Table

    if isinstance(container, InlineTable):
        return []
    if isinstance(container, Table):
        return container.value.body
    body = getattr(container, "body", [])
    return body if isinstance(body, list) else []


class _Editor:
    """Targeted edits of a tomlkit document that leave the text around them alone."""

    def __init__(self, doc: TOMLDocument) -> None:
        self.doc = doc

    def apply(self, key: ConfigKey, value: object, file: Path) -> None:
        *parents, name = key
        container: Any = self.doc
        for depth, part in enumerate(parents):
            if part not in container:
                if value is None:
                    return
                # A table that only holds tables stays header-less: [profiles.mine], no empty [profiles].
                bare = isinstance(value, dict) or depth < len(parents) - 1
                self._add_table(container, part, {}, super_table=bare)
            container = container[part]
            if not isinstance(container, Mapping):
                raise ConfigError(file, ".".join(key[: depth + 1]), "must be a table, e.g. [" + part + "]")
        if value is None:
            self._remove(container, name)
        elif isinstance(value, dict):
            self._set_table(container, name, value)
        else:
            self._set(container, name, value)

    def _set(self, container: Any, name: str, value: object) -> None:
        from tomlkit.items import Comment, Table, item

        if name in container:
            if not _same(container[name], value):
                container[name] = value  # tomlkit keeps the line's indent and its trailing comment
            return
        new = item(value)
        if isinstance(container, Table) and not container.is_super_table():
            body = container.value.body
            kv = [i for i, (k, it) in enumerate(body) if k is not None and not isinstance(it, Table)]
            if kv:
                # After the table's last key, not at its end: comments after that key introduce what follows.
                # (By position: tomlkit 0.15.3 has no _insert_after, and the GPU machine's kit has 0.15.3.)
                last = kv[-1]
                new.trivia.indent = body[last][1].trivia.indent
                if last + 1 < len(body):
                    container.value._insert_at(last + 1, name, new)
                else:  # (the table's own append would add the table's indent to the key's)
                    container.value.append(name, new)
                dict.__setitem__(container, name, new)
                return
            # An empty table: after the comment lines right under its header (they often explain this key).
            at = 0
            while at < len(body) and isinstance(body[at][1], Comment):
                at += 1
            if at < len(body):
                container.value._insert_at(at, name, new)
                dict.__setitem__(container, name, new)
                return
        container[name] = new

    def _set_table(self, container: Any, name: str, table: dict[str, Any]) -> None:
        from tomlkit.items import InlineTable, Table

        current = container.get(name)
        if not isinstance(current, Table | InlineTable):
            if current is not None:
                del container[name]
            self._add_table(container, name, table)
            return
        for key in [k for k in current if k not in table]:
            self._remove(current, key)
        for key, value in table.items():
            if isinstance(value, dict):
                self._set_table(current, key, value)
            else:
                self._set(current, key, value)

    def _add_table(self, container: Any, name: str, table: dict[str, Any], *, super_table: bool = False) -> None:
        import tomlkit
        from tomlkit.items import InlineTable

        if isinstance(container, InlineTable):
            container[name] = table
            return
        new = tomlkit.table(is_super_table=super_table)
        for key, value in table.items():
            new.add(key, value)
        container[name] = new
        added = container[name]
        order = self._tables()
        if not super_table and order and order[-1] is not added and any(t is added for t in order):
            # Placed among other tables: keep a blank line before the next header, as the others have.
            added.add(tomlkit.nl())

    def _remove(self, container: Any, name: str) -> None:
        from tomlkit.items import Null, Table, Whitespace

        if name not in container:
            return
        current = container[name]
        if not isinstance(current, Table):
            body = _body(container)
            at = next((i for i, (k, _) in enumerate(body) if k is not None and k.key == name), None)
            del container[name]
            if at is None:
                return
            # A key that stood alone between blank lines: keep one blank line there, not two.
            rest = [it for _, it in body[:at] if not isinstance(it, Null)]
            after = next((i for i in range(at + 1, len(body)) if not isinstance(body[i][1], Null)), None)
            blank_before = not rest or (isinstance(rest[-1], Whitespace) and not rest[-1].s.strip("\n"))
            if after is not None and blank_before:
                following = body[after][1]
                if isinstance(following, Whitespace) and not following.s.strip("\n"):
                    body[after] = (None, Null())
            return
        del container[name]

    def _tables(self) -> list[Any]:
        """The tables that print a [header], in the order they appear in the text."""
        from tomlkit.items import AoT, Table

        out: list[Any] = []

        def walk(body: list[tuple[Any, Any]]) -> None:
            for key, it in body:
                if isinstance(it, Table) and key is not None and not key.is_dotted():
                    if not it.is_super_table():
                        out.append(it)
                    walk(it.value.body)
                elif isinstance(it, AoT):
                    for element in it.body:
                        out.append(element)
                        walk(element.value.body)

        walk(self.doc.body)
        return out
