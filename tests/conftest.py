"""Shared fixtures: every test gets its own TUICHAT_HOME and a clean OpenAI environment."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def hermetic_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "tuichat-home"
    monkeypatch.setenv("TUICHAT_HOME", str(home))
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "TMUX", "STY", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return home
