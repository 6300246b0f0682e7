"""Shared fixtures: every test gets its own TUICHAT_HOME, a clean OpenAI environment and a fake hub cache."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

# The hub ids the suite's stand-in profiles name: the launch preflight finds them "downloaded" in the fake cache,
# as on a box where the user pulled them, so those launches go ahead without the network.
STANDIN_HUB_IDS = ("org/tiny-chat", "internlm/internlm2-chat-1_8b", "a/b")
# nothing listens on the discard port of the loopback: a probe of the "hub" is refused at once, never sent out
UNREACHABLE_HUB = "http://127.0.0.1:9"


class FakeHubCache:
    """A Hugging Face hub cache in tmp_path (HF_HOME points at its parent), laid out as huggingface_hub writes it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
        owner, name = repo_id.split("/", 1)
        entry = self.root / f"models--{owner}--{name}"
        snapshot = entry / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text('{"architectures": ["InternLM2ForCausalLM"]}\n', encoding="utf-8")
        (entry / "refs").mkdir(exist_ok=True)
        (entry / "refs" / "main").write_text(revision, encoding="utf-8")
        return snapshot


class EagerTasks(asyncio.DefaultEventLoopPolicy):
    """Loops whose tasks start eagerly where Python has that (3.12+), as Textual's App.run makes them: a task's
    first step then runs inside the call that creates it. `run_test` does not do that, and the chat's sent
    message went unseen on Python 3.12 (the GPU machine's) while every test passed."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        eager = getattr(asyncio, "eager_task_factory", None)
        if eager is not None:
            loop.set_task_factory(eager)
        return loop


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    return EagerTasks()


@pytest.fixture(autouse=True)
def hermetic_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "tuichat-home"
    monkeypatch.setenv("TUICHAT_HOME", str(home))
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "TMUX", "STY", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHubCache:
    """HF_HOME in tmp_path holding the stand-in profiles' hub ids, and a hub endpoint that refuses at once.

    Tests that look at the caches themselves set HF_HOME (or HF_HUB_CACHE) again and see only their own.
    """
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-default"))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_HUB)
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "LMDEPLOY_USE_MODELSCOPE"):
        monkeypatch.delenv(name, raising=False)
    cache = FakeHubCache(tmp_path / "hf-default" / "hub")
    for repo_id in STANDIN_HUB_IDS:
        cache.add(repo_id)
    return cache
