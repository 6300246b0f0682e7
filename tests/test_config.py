"""config.toml: strict validation with file and key in every error, atomic 0600 saves, TUICHAT_HOME."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tuichat import paths
from tuichat.config import Config, add_profile, load_config, save_config
from tuichat.errors import ConfigError
from tuichat.sampling import Sampling


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
