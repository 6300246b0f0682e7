"""Every advertised key through a real tmux with its default settings, and fast keys written into it.

One tmux server (its own socket, `-f /dev/null`: no user config) runs tuichat at 80x24 against the stand-in
server; the keys go in with `send-keys` one after another and each is checked on the screen with
`capture-pane`. The list of chat keys comes from `tuichat.keymap`, and the test fails if one is left unchecked,
so a new binding cannot ship without proving that it reaches the program through tmux.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from standin.harness import Standin, run_standin

from tuichat.chat.store import Store
from tuichat.keymap import BINDINGS

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

# Keys that need the terminal to report them apart from another key; a legacy terminal (and tmux without
# extended-keys) sends Shift+Enter as Enter. The help says so.
CONDITIONAL = {"shift+enter"}


def tmux_key(name: str) -> str:
    """A Textual key name as tmux's send-keys writes it: ctrl+r -> C-r, alt+up -> M-Up, shift+f8 -> S-F8."""
    *mods, base = name.split("+")
    named = {"escape": "Escape", "enter": "Enter", "up": "Up", "down": "Down", "tab": "Tab"}
    key = named.get(base) or (base.upper() if re.fullmatch(r"f\d+", base) else base)
    prefix = "".join({"ctrl": "C-", "alt": "M-", "shift": "S-"}[m] for m in mods)
    return prefix + key


class Tmux:
    """One detached tmux session of its own server."""

    def __init__(self, socket: Path, env: dict[str, str], command: str) -> None:
        self.base = ["tmux", "-S", str(socket), "-f", "/dev/null"]
        self.env = env
        subprocess.run(
            [*self.base, "new-session", "-d", "-s", "keys", "-x", "80", "-y", "24", command], env=env, check=True
        )

    def send(self, *keys: str, literal: bool = False) -> None:
        flags = ["-l"] if literal else []
        subprocess.run([*self.base, "send-keys", "-t", "keys", *flags, *keys], env=self.env, check=True)

    def screen(self) -> str:
        done = subprocess.run(
            [*self.base, "capture-pane", "-p", "-t", "keys"], env=self.env, capture_output=True, text=True
        )
        return done.stdout

    def wait(self, condition: Callable[[str], bool] | str, what: str = "", timeout: float = 15.0) -> str:
        """Wait until `condition(screen)` holds, or until the text is on screen or in a toast (toasts wrap)."""
        check = (
            (lambda text: condition in text or condition in toasts(text)) if isinstance(condition, str) else condition
        )
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if check(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or condition!r} not on screen within {timeout} s:\n{text}")
            time.sleep(0.05)

    def alive(self) -> bool:
        done = subprocess.run([*self.base, "has-session", "-t", "keys"], env=self.env, capture_output=True)
        return done.returncode == 0

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], env=self.env, capture_output=True)


def tmux_env(hermetic_home: Path, tmp_path: Path) -> dict[str, str]:
    """Nothing of the user's environment but PATH; this test run's tuichat and a home of its own."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TUICHAT_HOME": str(hermetic_home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }


def tuichat_in_tmux(hermetic_home: Path, tmp_path: Path, standin: Standin, *args: str) -> Tmux:
    """tuichat against the stand-in in a tmux of its own, with nothing of the user's environment but PATH."""
    env = tmux_env(hermetic_home, tmp_path)
    flags = " ".join([*args, "--url", standin.url, "--api-key", str(standin.api_key)])
    return Tmux(tmp_path / "tmux.sock", env, f"env TERM=screen {sys.executable} -m tuichat {flags}")


def toasts(screen: str) -> str:
    """The text of the notifications at the right, their wrapped lines joined again."""
    parts = [line.split("▌", 1)[1] for line in screen.splitlines() if "▌" in line]
    text = re.sub(r"[\u2500-\u259f]", " ", " ".join(parts))  # box and scrollbar glyphs at the edge
    return " ".join(text.split())


def prompt_text(screen: str) -> str:
    """What the prompt box holds (its left part: toasts may cover the right), lines joined with '/'."""
    lines = screen.splitlines()
    # none while the box is not (or not yet wholly) on screen, e.g. mid-way through a redraw after `fg`
    bottom = max((i for i, line in enumerate(lines) if line.startswith("╰")), default=None)
    top = max((i for i, line in enumerate(lines[:bottom]) if line.startswith("╭")), default=None) if bottom else None
    if bottom is None or top is None:
        return ""
    inner = [line[1:].split("▌")[0].rstrip(" │") for line in lines[top + 1 : bottom]]
    return "/".join(part.strip() for part in inner if part.strip())


@pytest.fixture
def standin() -> Iterator[Standin]:
    with run_standin("--fake-words", "3") as server:
        yield server


def test_every_advertised_key_works_through_tmux(hermetic_home: Path, tmp_path: Path, standin: Standin) -> None:
    store = Store.open(hermetic_home / "data" / "history.sqlite3")
    conv = store.create_conversation(title="long chat")
    for i in range(12):  # 24 turns: four stay hidden behind the "earlier messages" line
        store.add_message(conv, "user", f"old question {i}")
        store.add_message(conv, "assistant", f"old answer {i}")
    store.close()
    tmux = tuichat_in_tmux(hermetic_home, tmp_path, standin, "--continue")
    checked: set[str] = set()

    def press(binding_id: str, key: str) -> None:
        assert key in keys[binding_id]
        tmux.send(tmux_key(key))
        checked.add(key)

    keys = {b.id: [k for k in b.key_list if k not in CONDITIONAL] for b in BINDINGS if b.scope in ("chat", "app")}
    try:
        tmux.wait(lambda s: "● ready" in s and "old answer 11" in s, "the restored chat, ready")

        # ctrl+t: the four hidden turns come in and the view goes to them
        press("load_earlier", "ctrl+t")
        tmux.wait("old question 0")

        # help: F1 opens, Esc (its own key) closes
        for key in keys["help"]:
            press("help", key)
            tmux.wait("tuichat keys")
            tmux.send("Escape")
            tmux.wait(lambda s: "tuichat keys" not in s, "help closed")

        press("toggle_sampling", "f2")
        tmux.wait("Sampling · next request")
        tmux.send("F2")
        tmux.wait(lambda s: "Sampling · next request" not in s, "sampling pane hidden")
        press("toggle_status", "f3")
        tmux.wait("This chat")
        tmux.send("F3")
        tmux.wait(lambda s: "This chat" not in s, "status pane hidden")

        # the screens: each opens on its key and Esc brings the chat back
        for binding_id, key, sign in (
            ("history", "f4", "long chat"),
            ("server", "f5", "Restart"),
            ("attach_image", "f8", "Attach an image"),
            ("models", "f9", "Rescan"),
        ):
            chat = tmux.screen()
            press(binding_id, key)
            tmux.wait(lambda s, sign=sign, chat=chat: sign in s and s != chat, f"the {binding_id} screen")
            tmux.send("Escape")
            tmux.wait(lambda s: "● ready" in s and "^r Retry" in s, "back on the chat")

        press("clear_attachments", "shift+f8")
        tmux.wait("No image is attached.")

        # the fleet screen's keys: against a plain api_server they say what the screen is for
        for key in keys["fleet"]:
            shown = tmux.screen().count("not an lmdeploy")  # each press adds one more toast
            press("fleet", key)
            tmux.wait(lambda s, shown=shown: s.count("not an lmdeploy") > shown, f"the fleet answer to {key}")

        # a fresh exchange, then retry, undo (both keys), send again
        standin.configure(reply="here:\n\n```python\nprint(42)\n```\n")
        tmux.send("hello", "Enter")
        tmux.wait("print(42)")
        before = standin.stats()["completed"]
        press("retry", "ctrl+r")
        tmux.wait(lambda s: standin.stats()["completed"] == before + 1 and "● ready" in s, "the retried reply")
        for key in keys["undo"]:
            press("undo", key)
            tmux.wait("Removed the last exchange.")
            text = tmux.wait(lambda s: prompt_text(s) == "hello", "the message back in the prompt, nothing typed")
            assert "u" not in prompt_text(text).replace("hello", "")
            tmux.send("Enter")
            tmux.wait(lambda s: "print(42)" in s and prompt_text(s) == "", "the exchange sent again")

        press("copy_code", "ctrl+g")
        tmux.wait("Copied code block 1 of 1")
        press("copy_reply", "ctrl+o")
        tmux.wait("Copied the last reply")

        # select earlier / later, then the copy key copies the selection; Esc unselects. Each round has texts
        # of other lengths, so a toast of an earlier round cannot pass for this one's.
        for i, (up, down) in enumerate(zip(keys["select_previous"], keys["select_next"], strict=True)):
            message, reply = f"round {i}" + "?" * (3 * i + 1), "answer " + "!" * (5 * i + 2)
            standin.configure(reply=reply)
            tmux.send(message, "Enter")
            tmux.wait(reply)
            press("select_previous", up)
            press("select_previous", up)
            tmux.send("C-o")
            tmux.wait(f"Copied the selected message ({len(message)} characters)")
            press("select_next", down)
            tmux.send("C-o")
            tmux.wait(f"Copied the selected reply ({len(reply)} characters)")
            press("stop", "escape")  # with a selection, Esc unselects: the copy key is back to the last reply
            tmux.send("C-o")
            tmux.wait(f"Copied the last reply ({len(reply)} characters)")

        # a new line in the prompt, then select-all and delete clears it
        tmux.send("line one")
        press("newline", "ctrl+j")
        tmux.send("line two")
        tmux.wait(lambda s: prompt_text(s) == "line one/line two", "two lines in the prompt")
        tmux.send("F7", "BSpace")
        tmux.wait(lambda s: prompt_text(s) == "", "the prompt emptied")

        # Esc stops a streaming reply
        standin.configure(words=400, rate=40)
        tmux.send("long one", "Enter")
        tmux.wait("w5 ")
        tmux.send("Escape")
        tmux.wait("stopped by you")

        # clear asks first: n keeps the chat, y clears it
        press("clear", "ctrl+l")
        tmux.wait("Clear the")
        tmux.send("n")
        tmux.wait(lambda s: "Clear the" not in s and "long one" in s, "the chat kept")
        tmux.send("C-l")
        tmux.wait("Clear the")
        tmux.send("y")
        tmux.wait(lambda s: "long one" not in s and "old answer" not in s, "the chat cleared")

        press("new_chat", "ctrl+n")
        tmux.wait("New chat: the previous one stays in the history.")

        tmux.send("C-p")
        tmux.wait("Search for commands")
        tmux.send("Escape")
        tmux.wait(lambda s: "Search for commands" not in s, "palette closed")

        press("quit", "ctrl+q")
        deadline = time.monotonic() + 10
        while tmux.alive():
            assert time.monotonic() < deadline, "ctrl+q did not quit:\n" + tmux.screen()
            time.sleep(0.05)
    finally:
        tmux.kill()
    expected = {k for ks in keys.values() for k in ks}
    assert checked == expected, f"keys advertised but not checked through tmux: {expected - checked}"


def test_fast_keys_during_a_reply_act_or_are_refused_and_never_type(
    hermetic_home: Path, tmp_path: Path, standin: Standin
) -> None:
    tmux = tuichat_in_tmux(hermetic_home, tmp_path, standin)
    try:
        tmux.wait("● ready")
        standin.configure(words=600, rate=60)
        tmux.send("question", "Enter")
        tmux.wait("w5 ")
        # A burst while the reply streams: every key acts or is refused out loud; none is typed.
        tmux.send("M-u", "M-u", "C-r", "M-u", "Enter", "Enter", "C-r", "M-u", "C-l", "C-n")
        text = tmux.wait("A reply is still streaming")
        assert "● streaming" in text and prompt_text(text) == ""
        # Esc followed at once by Ctrl+R (the bytes ESC ^R in one write, as tmux sends them): stop, then retry.
        requests = standin.stats()["requests"]
        tmux.send("-H", "1b", "12")
        tmux.wait(lambda s: standin.stats()["requests"] == requests + 1, "the retry after the stop", timeout=10)
        assert standin.stats()["aborted"] >= 1
        text = tmux.wait("w5 ")
        assert prompt_text(text) == ""
        # Alt+U, Alt+U and Esc, Ctrl+R written back to back: before the fix, "^u^u^" landed in the prompt.
        tmux.send("-H", "1b", "75", "1b", "75", "1b", "12")
        tmux.wait(lambda s: standin.stats()["requests"] == requests + 2, "the second retry", timeout=10)
        text = tmux.wait("w5 ")
        assert prompt_text(text) == "", text
    finally:
        tmux.kill()


def message_area(screen: str) -> str:
    """The rows above the prompt box: what the chat shows, without the prompt's own text."""
    lines = screen.splitlines()
    top = max(i for i, line in enumerate(lines) if line.startswith("╭"))
    return "\n".join(lines[:top])


def test_a_short_chat_leaves_no_trace_of_what_went(hermetic_home: Path, tmp_path: Path, standin: Standin) -> None:
    # In a chat shorter than the screen, rows that a message leaves are blank below the rest; the message list
    # repaints only the regions that changed (not all of itself at each mount or removal), so this reads the
    # terminal itself after retry, undo and clear: every word that went must be gone from it.
    tmux = tuichat_in_tmux(hermetic_home, tmp_path, standin)
    try:
        tmux.wait("● ready")
        standin.configure(reply="alpha reply\n\nwith a second paragraph of several words")
        tmux.send("first question", "Enter")
        tmux.wait(lambda s: "second paragraph" in s and "● ready" in s, "the first reply")
        standin.configure(reply="beta")
        tmux.send("C-r")  # the retried reply is one row where the first had three
        text = tmux.wait(lambda s: "beta" in message_area(s) and "● ready" in s, "the retried reply")
        assert "alpha" not in text and "second paragraph" not in text, text
        tmux.send("M-u")
        text = tmux.wait(lambda s: prompt_text(s) == "first question", "the exchange undone")
        assert "first question" not in message_area(text) and "beta" not in text, text
        tmux.send("Enter")
        tmux.wait(lambda s: "beta" in message_area(s) and "● ready" in s, "sent again")
        tmux.send("C-l")
        tmux.wait("Clear the")
        tmux.send("y")
        text = tmux.wait(lambda s: "beta" not in s and "Clear the" not in s, "the chat cleared")
        assert "first question" not in text, text
    finally:
        tmux.kill()


def input_thread_wakeups(pid: int) -> int:
    """Voluntary context switches (each a wake-up after a wait) of tuichat's input thread: the one thread besides
    the main one that waits in select(2) (the kernel's wait channel says so; the writer and workers wait on
    futexes, the main thread in epoll)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        if int(task.name) == pid:
            continue
        with contextlib.suppress(OSError):
            wchan = (task / "wchan").read_text()
            if "poll_schedule_timeout" in wchan or "select" in wchan:
                status = (task / "status").read_text()
                found += [int(m) for m in re.findall(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)]
    assert len(found) == 1, f"no single input thread found among the threads of {pid}"
    return found[0]


def test_an_idle_chat_has_no_thread_waking_up_and_esc_still_acts(
    hermetic_home: Path, tmp_path: Path, standin: Standin
) -> None:
    # Textual's input thread wakes ten times a second to look for a lone Esc's timeout; tuichat's sleeps until a
    # byte comes (or until the Esc delay is up): about half of an idle chat's CPU.
    tmux = tuichat_in_tmux(hermetic_home, tmp_path, standin)
    try:
        tmux.wait("● ready")
        shown = subprocess.run(
            [*tmux.base, "display", "-p", "-t", "keys", "#{pane_pid}"],
            env=tmux.env,
            capture_output=True,
            text=True,
            check=True,
        )
        pid = int(shown.stdout)
        tmux.send("idle", literal=True)  # keys: the input thread has read something, and waits again
        tmux.wait(lambda s: prompt_text(s) == "idle", "the typed word")
        before = input_thread_wakeups(pid)
        time.sleep(2.0)  # what is measured is wake-ups over a span of time
        woke = input_thread_wakeups(pid) - before
        assert woke <= 2, f"tuichat's input thread woke {woke} times in 2 s with no key pressed"
        tmux.send("F1")  # the help, closed by a lone Esc: the parser's timeout still ends the wait for more
        tmux.wait("tuichat keys")
        tmux.send("Escape")
        tmux.wait(lambda s: "tuichat keys" not in s and prompt_text(s) == "idle", "the help closed by Esc")
    finally:
        tmux.kill()


def test_stopped_and_resumed_from_the_shell_it_reads_keys_again(
    hermetic_home: Path, tmp_path: Path, standin: Standin
) -> None:
    # SIGTSTP (a job stopped from the shell) makes Textual close the driver and, at `fg`, start a new input
    # thread: the quiet input thread's wake-up pipe must outlive that close (it did not, and resuming crashed)
    env = tmux_env(hermetic_home, tmp_path)
    rc = tmp_path / "bashrc"
    rc.write_text("PS1='shell> '\n")
    tmux = Tmux(tmp_path / "tmux.sock", env, f"env TERM=screen bash --noprofile --rcfile {rc}")
    try:
        tmux.wait("shell>")
        tmux.send(f"{sys.executable} -m tuichat --url {standin.url} --api-key {standin.api_key}", "Enter")
        tmux.wait("● ready")
        shown = subprocess.run(
            ["pgrep", "-f", "-n", f"{sys.executable} -m tuichat --url {standin.url}"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.kill(int(shown.stdout.split()[0]), signal.SIGTSTP)
        tmux.wait("Stopped", "the job stopped")
        tmux.send("fg", "Enter")
        tmux.wait("● ready", "tuichat drawn again")
        tmux.send("back again", literal=True)
        tmux.wait(lambda s: prompt_text(s) == "back again", "keys read after the resume")
        tmux.send("C-q")
        tmux.wait(lambda s: s.rstrip().endswith("shell>"), "quit to the shell")
    finally:
        tmux.kill()


@pytest.mark.parametrize(
    ("data", "keys"),
    [
        ("\x1b\x12", [("escape", "\x1b"), ("ctrl+r", "\x12")]),  # Esc, then Ctrl+R within the escape delay
        ("\x1bu", [("alt+u", None)]),  # Alt+U: no character, so nothing types "u"
        ("\x1bu\x1bu", [("alt+u", None), ("alt+u", None)]),  # was "^", "u", alt+u
        ("\x1b\x12\x1b\x12", [("escape", "\x1b"), ("ctrl+r", "\x12")] * 2),  # was "^", ctrl+r, ctrl+r
        ("\x1b\r", [("escape", "\x1b"), ("enter", "\r")]),
        ("\x1bU", [("alt+shift+u", None)]),
        ("\x1b[17~", [("f6", None)]),  # sequences are still sequences
        ("\x1bOP", [("f1", None)]),
        ("\x1b[1;3A", [("alt+up", None)]),
        ("\x1b[19;2~", [("shift+f8", None)]),
        ("\x1b\x7f", [("ctrl+w", None)]),  # Alt+Backspace stays a word delete
        ("\x1b", [("escape", "\x1b")]),
    ],
)
def test_the_key_parser_reads_esc_and_alt_as_pressed(data: str, keys: list[tuple[str, str | None]]) -> None:
    from tuichat.ui.keyids import KeyParser

    parser = KeyParser()
    events = [*parser.feed(data), *parser.feed("")]
    assert [(e.key, e.character) for e in events] == keys


def test_the_drivers_use_the_key_parser() -> None:
    from textual.drivers import linux_driver

    from tuichat.ui.keyids import KeyParser, install_key_parser

    install_key_parser()
    install_key_parser()  # twice is harmless
    assert linux_driver.XTermParser is KeyParser


def fake_proc(root: Path, chain: list[tuple[int, str]]) -> Path:
    """A /proc with `chain` as (pid, name) from this process up to its oldest ancestor."""
    for (pid, name), (parent, _) in zip(chain, [*chain[1:], (1, "init")], strict=True):
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "stat").write_text(f"{pid} ({name}) S {parent} 0 0\n")
    return root


def test_the_mouse_is_off_only_where_gnu_screen_is_the_terminal(tmp_path: Path) -> None:
    from tuichat.ui.keyids import mouse_holds_escape

    me = os.getpid()
    screen_nearest = fake_proc(tmp_path / "a", [(me, "python"), (50, "bash"), (40, "screen"), (30, "tmux: server")])
    tmux_nearest = fake_proc(tmp_path / "b", [(me, "python"), (50, "bash"), (40, "tmux: server"), (30, "screen")])
    assert not mouse_holds_escape({})
    assert not mouse_holds_escape({"TMUX": "/tmp/tmux-0/default,1,0"})
    assert mouse_holds_escape({"STY": "123.pts-0.host"})
    both = {"STY": "123.pts-0.host", "TMUX": "/tmp/tmux-0/default,1,0"}
    assert mouse_holds_escape(both, proc=screen_nearest)  # screen inside tmux: screen is the terminal
    assert not mouse_holds_escape(both, proc=tmux_nearest)  # tmux inside screen: tmux is
