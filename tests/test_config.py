"""config.toml: strict validation with file and key in every error, saves that keep the user's comments and
layout, atomic 0600 writes, TUICHAT_HOME."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import replace
from pathlib import Path

import pytest

import tuichat.config as config
from tuichat import paths
from tuichat.chat.sampling import Sampling
from tuichat.config import Config, add_profile, load_config, remove_profile, save_config
from tuichat.errors import ConfigError


def write(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(text)
    return path


def test_tuichat_home_holds_config_data_and_state(hermetic_home: Path) -> None:
    assert paths.config_file() == hermetic_home / "config.toml"
    assert paths.data_dir() == hermetic_home / "data"
    assert paths.state_dir() == hermetic_home / "state"


def test_missing_file_gives_defaults_and_builtin_profiles(hermetic_home: Path) -> None:
    cfg = load_config()
    assert cfg.path == hermetic_home / "config.toml"
    assert cfg.sampling == Sampling()
    assert len(cfg.profiles) >= 3
    assert cfg.user_profiles == set()


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[sampling]\ntemperature = 5\n", "sampling.temperature", "in [0, 2]"),
        ("[sampling]\ntemprature = 1\n", "sampling.temprature", "not a sampling parameter"),
        ("[ui]\non_quit = 'maybe'\n", "ui.on_quit", "ask, stop, keep"),
        ("[ui]\nstal_timeout = 3\n", "ui.stal_timeout", "did you mean 'stall_timeout'"),
        ("[ui]\nstall_timeout = -1\n", "ui.stall_timeout", "greater than 0"),
        ("[server]\nurl = 'ftp://x'\n", "server.url", "http://"),
        ("colour = 1\n", "colour", "unknown key"),
        ("default_profile = 'nope'\n", "default_profile", "no profile is called 'nope'"),
        ("[models]\nroots = '/x'\n", "models.roots", "list of folders"),
    ],
)
def test_errors_name_file_and_key(hermetic_home: Path, text: str, key: str, fragment: str) -> None:
    path = write(hermetic_home, text)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert info.value.file == str(path)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_toml_names_the_file(hermetic_home: Path) -> None:
    path = write(hermetic_home, "[sampling\n")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)


def test_save_is_private_and_round_trips(hermetic_home: Path) -> None:
    cfg = load_config()
    cfg = Config(path=cfg.path, sampling=Sampling(temperature=0.3, max_tokens=99), profiles=cfg.profiles)
    save_config(cfg)
    mode = stat.S_IMODE(cfg.path.stat().st_mode)
    assert mode == 0o600
    again = load_config()
    assert again.sampling.temperature == 0.3
    assert again.sampling.max_tokens == 99
    assert not list(hermetic_home.glob(".*.tmp"))


def test_add_profile_keeps_other_settings(hermetic_home: Path) -> None:
    write(hermetic_home, "[sampling]\ntop_k = 5\n")
    add_profile("mine", {"model": "/models/x", "backend": "pytorch"})
    cfg = load_config()
    assert cfg.sampling.top_k == 5
    assert "mine" in cfg.user_profiles
    assert cfg.profiles["mine"].model == "/models/x"


def test_bad_profile_is_reported_with_profile_and_key(hermetic_home: Path) -> None:
    write(hermetic_home, "[profiles.p]\nmodel = 'x/y'\ntp = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert info.value.key == "profiles.p.tp"


# -- saves keep what the user wrote -------------------------------------------------------------------------

# A hand-written file: comments at the top, above and inside tables and after values, blank lines, indented
# keys, single quotes, and an order of its own (profiles before [ui], keys not in tuichat's order).
HAND_WRITTEN = """\
# tuichat settings (kept in my dotfiles)
# see `tuichat profiles`

default_profile = "mine"   # the one I use

# my own models
[profiles.mine]
# an AWQ build
model = "/models/mine-awq"  # local copy
tp = 1

# the remote one
[profiles.other]
model = 'owner/other'
backend = "pytorch"  # turbomind cannot load it

[sampling]
top_k = 40
  temperature = 0.7 # warm, not creative

[ui]
theme = "nord"
# what quitting does to a server I launched
on_quit = "ask"  # ask every time

# end of my settings
"""


def hand_written(home: Path) -> Path:
    path = write(home, HAND_WRITTEN)
    path.chmod(0o644)  # as an editor leaves it: the first save must still make it private
    return path


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def test_on_quit_choice_changes_that_value_only(hermetic_home: Path) -> None:
    """The quit screen's "always stop": the file keeps every comment, blank line and key order."""
    path = hand_written(hermetic_home)
    cfg = load_config()
    save_config(replace(cfg, ui=replace(cfg.ui, on_quit="stop")))
    assert path.read_text() == HAND_WRITTEN.replace('on_quit = "ask"  #', 'on_quit = "stop"  #')
    assert private(path)
    assert load_config().ui.on_quit == "stop"


def test_sampling_save_edits_only_changed_values(hermetic_home: Path) -> None:
    """The sampling pane's save: a changed value keeps its line (and comment), a cleared one goes, a new one
    joins its table after the last value, not after the comment that introduces the next table."""
    path = hand_written(hermetic_home)
    cfg = load_config()
    sampling = replace(cfg.sampling, temperature=0.3, top_k=None, top_p=0.9)
    save_config(replace(cfg, sampling=sampling))
    expected = HAND_WRITTEN.replace("top_k = 40\n", "").replace(
        "  temperature = 0.7 # warm, not creative\n", "  temperature = 0.3 # warm, not creative\n  top_p = 0.9\n"
    )
    assert path.read_text() == expected
    assert private(path)
    again = load_config()
    assert (again.sampling.temperature, again.sampling.top_p, again.sampling.top_k) == (0.3, 0.9, None)


def test_set_sampling_leaves_equal_values_as_typed(hermetic_home: Path) -> None:
    path = write(hermetic_home, "[sampling]\ntemperature = 1  # typed as an integer\nmax_tokens = 512\n")
    config.set_sampling(replace(load_config().sampling, max_tokens=256))
    assert path.read_text() == "[sampling]\ntemperature = 1  # typed as an integer\nmax_tokens = 256\n"


def test_new_profile_is_added_without_touching_the_rest(hermetic_home: Path) -> None:
    """As the profile editor, the models screen and `tuichat quantize` save one."""
    path = hand_written(hermetic_home)
    add_profile("quantized", {"model": "/models/q-awq", "model_format": "awq"})
    new = '[profiles.quantized]\nmodel = "/models/q-awq"\nmodel_format = "awq"\n\n'
    assert path.read_text() == HAND_WRITTEN.replace("[sampling]\n", new + "[sampling]\n")  # with the other profiles
    assert private(path)
    assert load_config().profiles["quantized"].model == "/models/q-awq"


def test_changed_profile_keeps_its_comments_and_order(hermetic_home: Path) -> None:
    path = hand_written(hermetic_home)
    add_profile("mine", {"tp": 2, "model": "/models/mine-awq", "cache_max_entry_count": 0.5})
    expected = HAND_WRITTEN.replace(
        'model = "/models/mine-awq"  # local copy\ntp = 1\n',
        'model = "/models/mine-awq"  # local copy\ntp = 2\ncache_max_entry_count = 0.5\n',
    )
    assert path.read_text() == expected
    assert private(path)


def test_removed_profile_takes_only_its_own_lines(hermetic_home: Path) -> None:
    """A profile goes with the comment right above its header; the comments of everything else stay."""
    path = hand_written(hermetic_home)
    remove_profile("other")
    assert path.read_text() == HAND_WRITTEN.replace(
        "# the remote one\n[profiles.other]\nmodel = 'owner/other'\n"
        'backend = "pytorch"  # turbomind cannot load it\n\n',
        "",
    )
    remove_profile("mine")
    top = "# tuichat settings (kept in my dotfiles)\n# see `tuichat profiles`\n\n"
    assert path.read_text() == top + HAND_WRITTEN[HAND_WRITTEN.index("[sampling]") :]
    assert private(path)
    cfg = load_config()  # default_profile named the removed profile: it went too, so the file still loads
    assert cfg.default_profile is None
    assert cfg.user_profiles == set()


def test_save_keeps_what_was_edited_by_hand_meanwhile(hermetic_home: Path) -> None:
    """tuichat holds the config it loaded at start; a save about one setting must not undo the user's edits."""
    path = hand_written(hermetic_home)
    cfg = load_config()
    edited = HAND_WRITTEN.replace('theme = "nord"', 'theme = "gruvbox"') + '\n[profiles.new]\nmodel = "a/b"\n'
    path.write_text(edited)
    save_config(replace(cfg, ui=replace(cfg.ui, on_quit="keep")))
    assert path.read_text() == edited.replace('on_quit = "ask"  #', 'on_quit = "keep"  #')


@pytest.mark.parametrize(
    ("text", "changes", "expected"),
    [
        # dotted keys, an inline table and tables out of order are TOML too
        ('ui.theme = "nord"  # dotted\n', {("ui", "on_quit"): "stop"}, {"ui": {"theme": "nord", "on_quit": "stop"}}),
        (
            'server = { url = "http://127.0.0.1:23333" }  # inline\n',
            {("server", "model"): "m"},
            {"server": {"url": "http://127.0.0.1:23333", "model": "m"}},
        ),
        (
            "[profiles.a]\nmodel = 'x/a'\n\n[ui]\ntheme = 'nord'\n\n[profiles.b]\nmodel = 'x/b'  # b\n",
            {("profiles", "c"): {"model": "x/c"}, ("profiles", "b"): {"model": "x/bb"}, ("profiles", "a"): None},
            {"ui": {"theme": "nord"}, "profiles": {"b": {"model": "x/bb"}, "c": {"model": "x/c"}}},
        ),
        ("# only a comment\n", {("sampling", "seed"): 7}, {"sampling": {"seed": 7}}),
        ("", {("default_profile",): "internlm2-w4"}, {"default_profile": "internlm2-w4"}),
    ],
)
def test_edits_of_any_layout_load_back(
    hermetic_home: Path, text: str, changes: dict[tuple[str, ...], object], expected: dict[str, object]
) -> None:
    import tomllib

    path = write(hermetic_home, text)
    config.update_config(changes)
    after = path.read_text()
    assert tomllib.loads(after) == expected
    load_config()  # passes the strict validation
    for line in text.splitlines():
        if "#" in line:
            assert line[line.index("#") :] in after


def test_a_save_never_writes_a_file_tuichat_would_refuse(hermetic_home: Path) -> None:
    path = hand_written(hermetic_home)
    cfg = load_config()
    with pytest.raises(ConfigError) as info:
        save_config(replace(cfg, ui=replace(cfg.ui, on_quit="maybe")))
    assert info.value.key == "ui.on_quit"
    with pytest.raises(ConfigError) as info:
        config.set_value(("sampling", "temperature"), 9)
    assert info.value.key == "sampling.temperature"
    assert path.read_text() == HAND_WRITTEN


def test_a_save_refuses_while_the_file_has_a_mistake(hermetic_home: Path) -> None:
    """A typo made by hand while tuichat ran is reported, not saved over (nor kept in a file that will not load)."""
    path = hand_written(hermetic_home)
    cfg = load_config()
    broken = HAND_WRITTEN.replace('theme = "nord"', 'them = "nord"')
    path.write_text(broken)
    with pytest.raises(ConfigError) as info:
        save_config(replace(cfg, ui=replace(cfg.ui, on_quit="stop")))
    assert info.value.key == "ui.them"
    assert path.read_text() == broken


def test_a_failed_write_leaves_the_old_file(hermetic_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dying mid-write is the same as the write failing there: the old file is all there is."""
    path = hand_written(hermetic_home)
    cfg = load_config()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_config(replace(cfg, ui=replace(cfg.ui, on_quit="stop")))
    assert path.read_text() == HAND_WRITTEN
    assert sorted(p.name for p in hermetic_home.iterdir()) == ["config.toml"]


def test_a_symlinked_config_stays_a_link(hermetic_home: Path, tmp_path: Path) -> None:
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    real = dotfiles / "tuichat.toml"
    real.write_text(HAND_WRITTEN)
    hermetic_home.mkdir()
    (hermetic_home / "config.toml").symlink_to(real)
    config.set_value(("ui", "on_quit"), "stop")
    assert (hermetic_home / "config.toml").is_symlink()
    assert real.read_text() == HAND_WRITTEN.replace('on_quit = "ask"  #', 'on_quit = "stop"  #')
    assert private(real)


def test_edits_from_two_processes_take_turns(hermetic_home: Path) -> None:
    """Another tuichat on the same home is mid-edit (holds the lock): this save waits, then keeps its change."""
    path = hand_written(hermetic_home)
    done = threading.Event()

    def save() -> None:
        config.set_value(("ui", "on_quit"), "stop")
        done.set()

    with paths.locked(hermetic_home):
        worker = threading.Thread(target=save)
        worker.start()
        assert not done.wait(0.3)  # still waiting for the lock
        path.write_text(HAND_WRITTEN.replace('theme = "nord"', 'theme = "gruvbox"'))  # the other one's edit
    worker.join(timeout=10)
    assert done.is_set()
    text = path.read_text()
    assert 'theme = "gruvbox"' in text
    assert 'on_quit = "stop"  # ask every time' in text


def test_windows_line_endings_stay(hermetic_home: Path) -> None:
    path = hermetic_home / "config.toml"
    hermetic_home.mkdir()
    path.write_bytes(b"# written on Windows\r\n[ui]\r\ntheme = 'nord'\r\n")
    config.set_value(("ui", "on_quit"), "stop")
    config.set_value(("sampling", "seed"), 1)
    data = path.read_bytes()
    assert data.startswith(b"# written on Windows\r\n[ui]\r\ntheme = 'nord'\r\non_quit = \"stop\"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert load_config().sampling.seed == 1


def test_save_profile_writes_the_shortest_table_and_keeps_the_rest_of_the_file(hermetic_home: Path) -> None:
    from tuichat.config import save_profile
    from tuichat.server.profiles import Profile

    path = hermetic_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('# my settings\n[ui]\ntheme = "nord"  # dark\n', encoding="utf-8")
    save_profile("mine", Profile(model="/models/mine", port="auto", tp=2, stop_timeout=30.0))
    text = path.read_text(encoding="utf-8")
    assert '# my settings\n[ui]\ntheme = "nord"  # dark\n' in text
    assert "port" not in text and "stop_timeout" not in text  # defaults stay out of the file
    cfg = load_config()
    assert cfg.profiles["mine"] == Profile(model="/models/mine", tp=2)
    assert "mine" in cfg.user_profiles and cfg.profile_table("mine") == {"model": "/models/mine", "tp": 2}


def test_overwrite_question_for_own_and_built_in_profiles_only(hermetic_home: Path) -> None:
    from tuichat.config import overwrite_question

    add_profile("mine", {"model": "/models/x"})
    cfg = load_config()
    assert "already in config.toml" in (overwrite_question(cfg, "mine") or "")
    assert "built-in profile" in (overwrite_question(cfg, "internlm2-pytorch") or "")
    assert overwrite_question(cfg, "free-name") is None


def test_a_key_added_to_an_indented_profile_at_the_end_keeps_its_indent(hermetic_home: Path) -> None:
    """The last profile, indented under its parent table and last in the file: the new key lines up with the
    others (the table's own append added its indent on top, and the file was visibly reformatted)."""
    path = hermetic_home / "config.toml"
    hermetic_home.mkdir(parents=True, exist_ok=True)
    path.write_text('[profiles]\n  [profiles.mine]\n  model = "/models/mine"\n')
    add_profile("mine", {"model": "/models/mine", "tp": 2})
    assert path.read_text() == '[profiles]\n  [profiles.mine]\n  model = "/models/mine"\n  tp = 2\n'
