"""The clients the harness runs side by side, each in its own pty, all against the same tap and server.

| name    | what                                                    | why it is there                              |
| ------- | ------------------------------------------------------- | -------------------------------------------- |
| floor   | an empty Textual app (`floor_app.py`)                   | Textual's own start-up floor                 |
| tuichat | this project, `python -m tuichat --url ... --model ...` | the client under test                        |
| oterm   | oterm from PyPI, in its own venv, OpenAI-compatible     | the closest peer (Textual, MarkdownStream)   |
| raw     | `raw_client.py`, a plain httpx streaming loop           | floor for first-token time and CPU           |
| curl    | `curl -N`, printing the raw SSE lines                   | floor with no Python at all                  |

Each `Client` knows how to lay out a private home for one run (config, a saved conversation of N messages), the
command line, what its screen shows once it is drawn and ready, and how to send the prompt. A peer that is not
installed reports why through `unavailable()`, and the harness prints "not installed" for it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pty_screen import PtyClient

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PROMPT = "Count for me please."
HISTORY_END = "zzhistoryend"  # the last words of a saved conversation: visible once the history is shown
# Where the peers' own venv may be; BENCH_PEERS_VENV names one explicitly (a missing folder: no peers).
PEER_VENVS = (
    [Path(os.environ["BENCH_PEERS_VENV"])]
    if os.environ.get("BENCH_PEERS_VENV")
    else [BENCH / ".venv-peers", Path("/tmp/bench-peers/venv")]
)


@dataclass(frozen=True)
class Server:
    url: str  # the tap, which every client talks to
    api_key: str
    model: str


def history_messages(count: int) -> list[tuple[str, str]]:
    """A plausible saved chat: short questions, Markdown answers with a list and a code block.

    The text never holds a `w` followed by a digit, which would read as a streamed word; the last message ends
    with HISTORY_END so the harness can tell when the restored history is on screen.
    """
    out: list[tuple[str, str]] = []
    for i in range(count):
        if i % 2 == 0:
            out.append(("user", f"Question {i // 2 + 1}: how do I read a file line by line, and why that way?"))
        else:
            out.append(
                (
                    "assistant",
                    f"## Answer {i // 2 + 1}\n\nOpen it in a `with` block and loop over the file object:\n\n"
                    "- it reads one line at a time, so memory stays flat;\n"
                    "- the file is closed even when the loop raises.\n\n"
                    "```python\nwith open(path, encoding='utf-8') as f:\n    for line in f:\n"
                    "        handle(line.rstrip())\n```\n\n"
                    "That is the usual idiom; `readlines()` loads the whole file first.",
                )
            )
    if out:
        role, text = out[-1]
        out[-1] = (role, text + f" {HISTORY_END}")
    return out


def _peer_python() -> Path | None:
    for venv in PEER_VENVS:
        if (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    return None


def _pkg_version(python: str | Path, dist: str) -> str | None:
    code = f"from importlib.metadata import version; print(version({dist!r}))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class Client:
    name = "?"
    tui = True  # a full-screen app (has a first frame worth timing)
    frame_text = ""  # on screen from the first frame on
    ready_text = ""  # on screen once the client can take a prompt
    join_rows_raw = False

    def unavailable(self) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        return {}

    def prepare(self, home: Path, server: Server, history: int = 0, status_pane: bool = False) -> None:
        """Lay out the client's private home for one run."""

    def argv(self, home: Path, server: Server, history: int = 0) -> list[str]:
        raise NotImplementedError

    def env(self, home: Path) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "USER", "LOGNAME", "SHELL", "TMPDIR", "PYTHONPATH")
        }
        env.update(HOME=str(home), TERM="xterm-256color", COLORTERM="truecolor")
        env.setdefault("LANG", "C.UTF-8")
        return env

    def send(self, pty: PtyClient, prompt: str = PROMPT, timeout: float = 10.0) -> float:
        """Type the prompt, wait until it shows, press Enter; returns when Enter was written."""
        pty.write(prompt.encode())
        if pty.wait_for_text(prompt, timeout) is None:
            raise RuntimeError(f"{self.name}: the prompt did not show on screen")
        return pty.write(b"\r")


class FloorClient(Client):
    name = "floor"
    frame_text = "floor ready"
    ready_text = "floor ready"

    def versions(self) -> dict[str, str]:
        return {"textual": _pkg_version(sys.executable, "textual") or "?"}

    def argv(self, home: Path, server: Server, history: int = 0) -> list[str]:
        return [sys.executable, str(BENCH / "floor_app.py")]


class TuichatClient(Client):
    name = "tuichat"
    # The status line and the prompt box are both in the first frame; "ready" once /health answered.
    frame_text = "╭"
    ready_text = "● ready"

    def versions(self) -> dict[str, str]:
        # from the source it runs (the GPU machine runs it from src/, not installed)
        src = str(tuichat_source())
        code = f"import sys; sys.path.insert(0, {src!r}); import tuichat; print(tuichat.__version__)"
        try:
            found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
            version = found.stdout.strip() if found.returncode == 0 else "?"
        except (OSError, subprocess.TimeoutExpired):
            version = "?"
        out = {"tuichat": f"{version} ({source_state()})"}
        for dist in ("textual", "rich", "httpx", "httpx-sse"):
            out[dist] = _pkg_version(sys.executable, dist) or "?"
        return out

    def prepare(self, home: Path, server: Server, history: int = 0, status_pane: bool = False) -> None:
        home.mkdir(parents=True, exist_ok=True)
        if status_pane:
            (home / "config.toml").write_text("[ui]\nshow_status = true\n")
        target = home / "data" / "history.sqlite3"
        if history and not target.exists():  # a home started in again keeps its history (and its WAL) as it is
            (home / "data").mkdir(mode=0o700, exist_ok=True)
            shutil.copyfile(tuichat_history_template(history, server), target)

    def argv(self, home: Path, server: Server, history: int = 0) -> list[str]:
        # BENCH_TUICHAT_PRELUDE: Python run before tuichat's main(), to A/B a change without editing src/
        # (e.g. "import tuichat.ui.app as a; a.FLUSH_EVERY = 0.02").
        prelude = os.environ.get("BENCH_TUICHAT_PRELUDE")
        if prelude:
            code = f"{prelude}\nimport sys\nfrom tuichat.cli.main import main\nsys.exit(main())"
            argv = [sys.executable, "-c", code]
        else:
            argv = [sys.executable, "-m", "tuichat"]
        argv += ["--url", server.url, "--api-key", server.api_key]
        argv += ["--model", server.model]
        if history:
            argv.append("--continue")
        return argv

    def env(self, home: Path) -> dict[str, str]:
        env = super().env(home)
        env["TUICHAT_HOME"] = str(home)
        src = str(tuichat_source())
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env


_TEMPLATES: dict[tuple[str, int], Path] = {}
_TEMPLATE_DIR: list[Path] = []
_SRC: list[Path] = [ROOT / "src"]


def use_source(src: Path) -> None:
    """Run tuichat from this copy of src/ (the harness snapshots the tree, so edits made while a long run goes on
    cannot mix two versions of the code into one table)."""
    _SRC[:] = [src]


def tuichat_source() -> Path:
    return _SRC[0]


def source_state() -> str:
    """The commit the working tree is on, and whether src/ differs from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return f"git {commit}" + (f" + {len(dirty.splitlines())} changed file(s) in src/" if dirty else "")


def use_template_dir(folder: Path) -> None:
    """Where saved-history templates are made for this run (the harness's temporary folder)."""
    _TEMPLATE_DIR[:] = [folder]
    _TEMPLATES.clear()
    _OTERM_TEMPLATE.clear()


def _template_dir() -> Path:
    if not _TEMPLATE_DIR:
        raise RuntimeError("use_template_dir() first")
    return _TEMPLATE_DIR[0]


def tuichat_history_template(count: int, server: Server) -> Path:
    """A history.sqlite3 holding one conversation of `count` messages, made once per run of the harness."""
    key = ("tuichat", count)
    if key in _TEMPLATES:
        return _TEMPLATES[key]
    sys.path.insert(0, str(tuichat_source()))
    from tuichat.chat.store import Store

    folder = _template_dir() / f"tuichat-{count}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "history.sqlite3"
    with Store.open(path) as store:
        conv = store.create_conversation(model=server.model, server_url=server.url)
        for role, text in history_messages(count):
            store.add_message(conv, role, text)
    _TEMPLATES[key] = path
    return path


class OtermClient(Client):
    name = "oterm"
    frame_text = "model: "  # the chat's header line, drawn with the prompt
    ready_text = "model: "

    def _python(self) -> Path | None:
        python = _peer_python()
        if python is None or not (python.parent / "oterm").exists():
            return None
        return python

    def unavailable(self) -> str | None:
        return None if self._python() else "not installed"

    def versions(self) -> dict[str, str]:
        python = self._python()
        if python is None:
            return {}
        out = {}
        for dist in ("oterm", "textual", "pydantic-ai-slim", "openai", "httpx"):
            out[f"oterm venv: {dist}"] = _pkg_version(python, dist) or "?"
        return out

    def prepare(self, home: Path, server: Server, history: int = 0, status_pane: bool = False) -> None:
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(oterm_store_template(self._python_or_fail()), home / "store.db")
        config = {
            "theme": "textual-dark",
            "splash-screen": False,
            "openaiCompatible": {"bench": {"base_url": server.url + "/v1", "api_key": server.api_key}},
        }
        (home / "config.json").write_text(json.dumps(config))
        db = sqlite3.connect(home / "store.db")
        with db:
            cur = db.execute(
                "INSERT INTO chat (name, model, system, provider, parameters, tools, thinking) "
                "VALUES (?, ?, NULL, ?, '{}', '[]', 0)",
                ("bench", server.model, "openai-compat/bench"),
            )
            chat_id = cur.lastrowid
            db.executemany(
                "INSERT INTO message (chat_id, author, text, images) VALUES (?, ?, ?, '[]')",
                [(chat_id, role, text) for role, text in history_messages(history)],
            )
        db.close()

    def _python_or_fail(self) -> Path:
        python = self._python()
        if python is None:
            raise RuntimeError("oterm is not installed")
        return python

    def argv(self, home: Path, server: Server, history: int = 0) -> list[str]:
        return [str(self._python_or_fail().parent / "oterm")]

    def env(self, home: Path) -> dict[str, str]:
        env = super().env(home)
        env["OTERM_DATA_DIR"] = str(home)
        # oterm asks pypi.org for a newer version at start; the benchmark stays on this machine, so that one
        # request is pointed at a closed local port and fails at once (oterm ignores the failure).
        env.update(HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost")
        return env


_OTERM_TEMPLATE: list[Path] = []


def oterm_store_template(python: Path) -> Path:
    """An empty store.db made by oterm itself (`oterm --upgrade`), so its schema and version mark are its own."""
    if _OTERM_TEMPLATE:
        return _OTERM_TEMPLATE[0]
    folder = _template_dir() / "oterm"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(os.environ, OTERM_DATA_DIR=str(folder), HOME=str(folder))
    subprocess.run([str(python.parent / "oterm"), "--upgrade"], env=env, check=True, capture_output=True, timeout=120)
    _OTERM_TEMPLATE.append(folder / "store.db")
    return folder / "store.db"


class RawClient(Client):
    name = "raw httpx"
    tui = False
    ready_text = "READY"
    join_rows_raw = True

    def versions(self) -> dict[str, str]:
        return {"httpx": _pkg_version(sys.executable, "httpx") or "?"}

    def argv(self, home: Path, server: Server, history: int = 0) -> list[str]:
        return [sys.executable, str(BENCH / "raw_client.py"), server.url, server.api_key, server.model, PROMPT]

    def send(self, pty: PtyClient, prompt: str = PROMPT, timeout: float = 10.0) -> float:
        return pty.write(b"\r")


class CurlClient(Client):
    name = "curl -N"
    tui = False
    ready_text = "READY"
    join_rows_raw = True

    def unavailable(self) -> str | None:
        return None if shutil.which("curl") else "not installed"

    def versions(self) -> dict[str, str]:
        try:
            out = subprocess.run(["curl", "--version"], capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return {}
        return {"curl": out.split()[1] if out else "?"}

    def argv(self, home: Path, server: Server, history: int = 0) -> list[str]:
        body = json.dumps({"model": server.model, "messages": [{"role": "user", "content": PROMPT}], "stream": True})
        curl = (
            f"curl -sN -H 'Authorization: Bearer {server.api_key}' -H 'Content-Type: application/json' "
            f"--data '{body}' {server.url}/v1/chat/completions"
        )
        # The shell stays until the harness stops it, so curl's CPU time (added to the shell's once curl exits)
        # can still be read.
        return ["sh", "-c", f"echo READY; read line; {curl}; echo; echo '[done]'; read line"]

    def send(self, pty: PtyClient, prompt: str = PROMPT, timeout: float = 10.0) -> float:
        return pty.write(b"\r")


ALL_CLIENTS: dict[str, Client] = {
    c.name: c for c in (FloorClient(), TuichatClient(), OtermClient(), RawClient(), CurlClient())
}
