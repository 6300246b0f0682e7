"""tuichat in a real terminal (a pty read through pyte, and tmux): kill -9 and SIGHUP lose nothing, a server it
launched survives an SSH drop and is re-attached, and the screen works in 16 colours."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ptyterm import PtyApp
from standin.harness import STANDIN_COMMAND, free_port, run_standin, wait_for

from tuichat.chat.store import Store
from tuichat.config import add_profile
from tuichat.server.launcher import ServerManager

TUICHAT = [sys.executable, "-m", "tuichat"]


def term_env(home: Path, term: str = "xterm-256color") -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TUICHAT_HOME": str(home / "tuichat-home"),
        "TERM": term,
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        # the fake Hugging Face cache (conftest's hub_cache) holding the stand-in profiles' hub ids
        **{k: os.environ[k] for k in ("HF_HOME", "HF_ENDPOINT") if k in os.environ},
    }


def saved_words(db: Path) -> int:
    """Words of the newest saved reply, read the way a second process would (the app keeps writing)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        row = conn.execute("SELECT content FROM messages WHERE role = 'assistant' ORDER BY id DESC LIMIT 1").fetchone()
    return len(row[0].split()) if row else 0


@pytest.fixture
def pty_apps() -> Iterator[list[PtyApp]]:
    apps: list[PtyApp] = []
    yield apps
    for app in apps:
        app.close()


def test_kill_9_mid_reply_keeps_every_finished_turn_and_the_partial_reply(
    hermetic_home: Path, pty_apps: list[PtyApp]
) -> None:
    with run_standin("--fake-words", "400", "--fake-rate", "40", "--fake-tokens-per-chunk", "1") as server:
        env = term_env(hermetic_home.parent)
        app = PtyApp([*TUICHAT, "--url", server.url, "--api-key", server.api_key or ""], env)
        pty_apps.append(app)
        app.wait_for("ready")
        server.configure(words=3)
        app.type("first question\r")
        app.wait_for("w3")
        wait_for(lambda: server.stats()["completed"] == 1, 10, message="first reply did not finish")
        server.configure(words=400)
        app.type("second question\r")
        app.wait_for("w20")
        db = Path(env["TUICHAT_HOME"]) / "data" / "history.sqlite3"
        # Kill only once the partial reply is on disk (saves come every SAVE_EVERY): the screen runs ahead.
        wait_for(lambda: saved_words(db) >= 10, 10, message="ten words of the reply saved")
        app.signal(signal.SIGKILL)
        app.wait_exit()
    store = Store.open(Path(env["TUICHAT_HOME"]) / "data" / "history.sqlite3")
    conv = store.last_conversation()
    assert conv is not None
    msgs = store.messages(conv.id)
    store.close()
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0].content == "first question" and msgs[1].content == "w1 w2 w3" and msgs[1].state == "done"
    assert msgs[2].content == "second question"
    assert msgs[3].state == "interrupted"  # the writer died: marked on the next open
    assert msgs[3].content.startswith("w1 w2 w3")
    assert len(msgs[3].content.split()) >= 10


def test_sighup_keeps_the_launched_server_and_the_next_tuichat_reattaches(
    hermetic_home: Path, pty_apps: list[PtyApp]
) -> None:
    env = term_env(hermetic_home.parent)
    os.environ["TUICHAT_HOME"] = env["TUICHAT_HOME"]  # add_profile and ServerManager here use the same home
    add_profile(
        "fake",
        {
            "model": "org/tiny-chat",
            "command": STANDIN_COMMAND,
            "extra_args": ["--fake-reply", "pong"],
            "port": free_port(),
        },
    )
    manager = ServerManager()
    try:
        app = PtyApp([*TUICHAT, "fake"], env)
        pty_apps.append(app)
        app.wait_for("ready", timeout=30)
        running = manager.running()
        assert [s.name for s in running] == ["fake"]
        pid = running[0].pid
        app.signal(signal.SIGHUP)  # what an SSH drop does to the session's foreground program
        app.wait_exit()
        assert [s.pid for s in manager.running()] == [pid]  # the server lives on

        again = PtyApp([*TUICHAT], env)
        pty_apps.append(again)
        again.wait_for("Attached to fake", timeout=30)
        again.wait_for("ready")
        again.type("ping\r")
        again.wait_for("pong")
    finally:
        for server in manager.running():
            manager.stop(server, timeout=2)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_in_tmux_at_80x24_with_16_colours(hermetic_home: Path) -> None:
    with run_standin("--fake-reply", "**bold** reply") as server:
        env = term_env(hermetic_home.parent, term="screen")
        session = f"tuichat-test-{os.getpid()}"
        socket = str(hermetic_home.parent / "tmux.sock")
        cmd = " ".join([*TUICHAT, "--url", server.url, "--api-key", server.api_key or ""])
        tmux = ["tmux", "-S", socket, "-f", "/dev/null"]
        subprocess.run(
            [*tmux, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", f"env TERM=screen {cmd}"],
            env=env,
            check=True,
        )
        try:

            def pane(*flags: str) -> str:
                return subprocess.run(
                    [*tmux, "capture-pane", "-p", *flags, "-t", session], env=env, capture_output=True, text=True
                ).stdout

            deadline = time.monotonic() + 20
            while "ready" not in pane():
                assert time.monotonic() < deadline, pane()
                time.sleep(0.1)
            subprocess.run([*tmux, "send-keys", "-t", session, "hello", "Enter"], env=env, check=True)
            deadline = time.monotonic() + 20
            while "bold reply" not in pane():
                assert time.monotonic() < deadline, pane()
                time.sleep(0.1)
            lines = pane().splitlines()
            assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
            coloured = pane("-e")
            assert "38;2;" not in coloured and "48;2;" not in coloured  # no 24-bit colour in a 16-colour terminal
            assert server.api_key not in pane()
        finally:
            subprocess.run([*tmux, "kill-server"], env=env, check=False)
