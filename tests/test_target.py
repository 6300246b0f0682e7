"""Which server tuichat talks to, and refusing an address that is not one (issue 16, defect 9): `--url "not a url"`,
`ftp://x` or `:8000` must stop tuichat with a sentence naming the flag (or OPENAI_BASE_URL, or the config key),
before anything connects or opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuichat.chat.target import UrlError, normalise_url, resolve_target
from tuichat.cli import main as cli
from tuichat.config import load_config
from tuichat.errors import TuichatError

REFUSED = [
    # given, a fragment of the reason, a suggestion the message must carry
    ("not a url", "spaces", "http://127.0.0.1:23333"),
    ("ftp://x", "not ftp://", "http://127.0.0.1:23333"),
    (":8000", "no host", "http://127.0.0.1:8000"),
    ("http://:8000", "no host", "http://127.0.0.1:8000"),
    ("http://", "no host", "http://127.0.0.1:23333"),
    ("8000", "port alone", "http://127.0.0.1:8000"),
    ("host:port", "port must be a number", "http://127.0.0.1:23333"),
    ("http://box:0", "port 0 is out of range", "http://127.0.0.1:23333"),
    ("http://box:99999", "port 99999 is out of range", "http://127.0.0.1:23333"),
    ("http:/box:8000", "lacks the //", "http://box:8000"),
    ("https//box", "lacks the :", "https://box"),
    ("http://box:8000/?x=1", "no ?query", "http://127.0.0.1:23333"),
    ("http://-box", "not a host name", "http://127.0.0.1:23333"),
    ("http://box\x1b]52;c;x\x07", "control characters", "http://127.0.0.1:23333"),
    ("", "empty", "http://127.0.0.1:23333"),
    ("http://[::1:8000", "Invalid IPv6", "http://127.0.0.1:23333"),  # the closing bracket is missing
    ("http://[fe80::zz]:8000", "not appear to be an IPv4 or IPv6 address", "http://127.0.0.1:23333"),
]


@pytest.mark.parametrize(("given", "why", "suggestion"), REFUSED, ids=[repr(r[0]) for r in REFUSED])
def test_an_address_that_is_not_one_is_refused_with_what_to_write(given: str, why: str, suggestion: str) -> None:
    with pytest.raises(UrlError) as info:
        normalise_url(given, "--url")
    message = str(info.value)
    assert message.startswith(f"--url {given!r} is not a server address: ")
    assert why in message
    assert suggestion in message
    assert isinstance(info.value, TuichatError)
    assert "\x1b" not in message  # the address is quoted, never written raw to the terminal


ACCEPTED = [
    ("localhost:8000", "http://localhost:8000"),  # a bare host:port means http://
    ("127.0.0.1", "http://127.0.0.1"),
    ("http://127.0.0.1:23333/v1/", "http://127.0.0.1:23333"),  # OpenAI-style base URLs end in /v1
    ("HTTPS://Box.example:8443", "https://Box.example:8443"),
    ("[::1]:8000", "http://[::1]:8000"),
    ("my_engine:23333", "http://my_engine:23333"),  # compose/container service names
    ("http://gateway/lmdeploy/v1", "http://gateway/lmdeploy"),  # behind a reverse proxy's path
    ("  http://box:1/  ", "http://box:1"),
]


@pytest.mark.parametrize(("given", "expected"), ACCEPTED)
def test_a_usable_address_is_normalised(given: str, expected: str) -> None:
    assert normalise_url(given) == expected


def test_openai_base_url_is_checked_the_same_way_and_named() -> None:
    cfg = load_config()
    with pytest.raises(UrlError) as info:
        resolve_target(cfg, {"OPENAI_BASE_URL": "not a url"})
    message = str(info.value)
    assert message.startswith("OPENAI_BASE_URL 'not a url' is not a server address")
    assert "unset OPENAI_BASE_URL" in message
    good = resolve_target(cfg, {"OPENAI_BASE_URL": "http://127.0.0.1:8000/v1", "OPENAI_API_KEY": "sk-1"})
    assert (good.url, good.api_key, good.source) == ("http://127.0.0.1:8000", "sk-1", "OPENAI_BASE_URL")


def test_the_config_url_is_checked_and_the_file_and_key_named(hermetic_home: Path) -> None:
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text('[server]\nurl = "http://not a url"\n')
    cfg = load_config()
    with pytest.raises(UrlError) as info:
        resolve_target(cfg, {})
    assert str(info.value).startswith(f"{cfg.path}: server.url 'http://not a url' is not a server address")


def test_an_empty_url_flag_is_refused_rather_than_falling_back_to_another_server() -> None:
    with pytest.raises(UrlError, match="--url '' is not a server address: it is empty"):
        resolve_target(load_config(), {"OPENAI_BASE_URL": "http://elsewhere:1"}, url="")


@pytest.mark.parametrize("given", ["not a url", "ftp://x", ":8000"])
def test_the_command_refuses_a_bad_url_before_anything_else(
    given: str, hermetic_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuichat.ui.app import TuichatApp

    started: list[str] = []
    monkeypatch.setattr(TuichatApp, "run", lambda self, *a, **k: started.append(self.client.base_url))
    assert cli.main(["--url", given]) == 1
    assert started == []  # the app never started
    err = capsys.readouterr().err
    assert err.startswith(f"tuichat: --url {given!r} is not a server address")
    assert "Traceback" not in err
    # nothing was opened or written: no history database, no state
    assert not hermetic_home.exists() or not any(hermetic_home.rglob("*"))
