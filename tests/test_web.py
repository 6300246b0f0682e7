"""`tuichat web`: the TUI served to a browser on loopback behind a token, one tuichat per tab, nothing left after stop.

The web server runs as a real `tuichat web` subprocess against the LMDeploy stand-in. The browser test drives the
system Chromium (Debian's `chromium`) through Playwright; the terminal in the page is drawn on a canvas, so what
the tab received is read from its websocket (tapped by a script injected before the page's own) and a screenshot
is kept (`TUICHAT_WEB_SCREENSHOT=screenshots/web.png` writes it there too).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from standin.harness import Standin, pid_alive, run_standin, wait_for

from tuichat import web
from tuichat.cli import main as cli

KEY = "sk-web-SECRET-4f1c9a"
REPLY = "Hello from the stand-in, now in a **browser**."
CHROMIUM = "/usr/bin/chromium"
ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


# -- argument handling (in process) -------------------------------------------------------------------------------


def test_a_host_other_than_loopback_needs_allow_remote(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["web", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--allow-remote" in err and "ssh -L" in err
    assert web.check_host("127.0.0.1", False) is None
    assert web.check_host("::1", False) is None
    assert web.check_host("localhost", False) is None
    warning = web.check_host("0.0.0.0", True)
    assert warning is not None and "unencrypted" in warning


def test_an_unknown_profile_is_one_sentence_before_anything_is_served(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["web", "nosuch", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no profile called 'nosuch'" in err and "Traceback" not in err


def test_the_api_key_goes_to_each_tab_in_the_environment_not_on_its_command_line() -> None:
    args = cli.sub_parser("web").parse_args(
        ["web", "--port", "9001", "--url", "http://127.0.0.1:23333", f"--api-key={KEY}", "--model", "m", "--continue"]
    )
    plan = web.plan_tabs(args, environ={})
    assert KEY not in " ".join(plan.argv)
    assert plan.argv[1:] == ("-m", "tuichat", "--url", "http://127.0.0.1:23333", "--model", "m", "--continue")
    assert plan.env == {web.WEB_API_KEY_ENV: KEY}
    assert KEY in plan.secrets


def test_a_tab_takes_its_key_out_of_the_environment_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_tui(args: Any, web_api_key: str | None = None) -> int:
        seen["key"] = web_api_key
        seen["env"] = os.environ.get(web.WEB_API_KEY_ENV)
        return 0

    monkeypatch.setattr(cli, "run_tui", fake_tui)
    monkeypatch.setenv(web.WEB_API_KEY_ENV, KEY)
    assert cli.main(["--url", "http://127.0.0.1:1"]) == 0
    assert seen == {"key": KEY, "env": None}  # lmdeploy or a tool the tab starts never inherits it
    assert web.WEB_API_KEY_ENV not in os.environ


def test_importing_the_web_server_loads_neither_textual_nor_rich() -> None:
    code = (
        "import sys, tuichat.web as w; w._tab_class(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- a real `tuichat web` ------------------------------------------------------------------------------------------


@dataclass
class WebRun:
    proc: subprocess.Popen[str]
    url: str  # the address it printed, token included
    standin: Standin
    first_lines: str

    @property
    def port(self) -> int:
        return int(self.url.split(":")[2].split("/")[0])

    @property
    def token(self) -> str:
        return self.url.split("token=", 1)[1]

    @property
    def cookie(self) -> str:
        return f"tuichat_web_{self.port}={self.token}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def tab_pids(self) -> set[int]:
        """Live children of the web server: one tuichat per open tab."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
                    if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                        found.add(int(entry.name))
        return found

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, self.first_lines + out


@contextlib.contextmanager
def tuichat_web(*extra: str, openai_env: bool = False) -> Iterator[WebRun]:
    """`tuichat web --url STANDIN EXTRA...`, or with `openai_env` the stand-in in OPENAI_BASE_URL/OPENAI_API_KEY."""
    with run_standin("--fake-reply", REPLY, api_key=KEY) as standin:
        argv = [sys.executable, "-m", "tuichat", "web", "--port", "0", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if openai_env:
            env.update(OPENAI_BASE_URL=f"{standin.url}/v1", OPENAI_API_KEY=KEY)
        else:
            argv += ["--url", standin.url]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # a stray Ctrl+C of the test run must not reach it; the test signals it
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            match = re.search(r"http://\S+", first)
            assert match, f"tuichat web printed no address: {first!r}{proc.stdout.read() if proc.poll() else ''}"
            yield WebRun(proc, match.group(0), standin, first)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].rsplit(":", 1)
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    found.add(address)
    return found


def test_the_page_is_on_loopback_behind_the_token_and_never_shows_the_key() -> None:
    with tuichat_web(f"--api-key={KEY}") as run:
        assert run.url.startswith(f"http://127.0.0.1:{run.port}/?token=")
        assert len(run.token) >= 40
        assert listening_addresses(run.port) == {"0100007F"}  # 127.0.0.1 only

        status, _, body = run.get("/")
        assert status == 401 and "token" in body
        assert run.get("/?token=not-the-token")[0] == 403
        assert run.get("/", {"Cookie": f"tuichat_web_{run.port}=not-the-token"})[0] == 403
        assert run.get("/static/js/textual.js")[0] == 401

        status, headers, _ = run.get(f"/?token={run.token}&fontsize=18")
        assert status == 303 and headers["location"] == "/?fontsize=18"  # the token leaves the address bar
        cookie = headers["set-cookie"]
        assert cookie.startswith(run.cookie + ";") and "HttpOnly" in cookie and "SameSite=Strict" in cookie

        # ssh -L 9000:127.0.0.1:PORT: the page's websocket follows the address the browser used
        status, headers, page = run.get("/?fontsize=18", {"Cookie": run.cookie, "Host": "localhost:9000"})
        assert status == 200 and 'data-session-websocket-url="ws://localhost:9000/ws"' in page
        assert headers["referrer-policy"] == "no-referrer"
        assert "fonts.googleapis.com" not in page  # the font comes from this server, not a third party
        status, _, script = run.get("/static/js/textual.js", {"Cookie": run.cookie})
        assert status == 200 and "WebSocket" in script
        assert run.get("/static/fonts/RobotoMono-VariableFont_wght.ttf", {"Cookie": run.cookie})[0] == 200
        for text in (page, script):
            assert KEY not in text and sys.executable not in text and "--url" not in text

        code, output = run.stop()
        assert code == 0
        assert KEY not in output


async def ws_status(port: int, cookie: str | None, origin: str | None = None) -> int:
    """The HTTP status the websocket handshake gets (101 when it is accepted; the socket is closed again)."""
    import aiohttp

    headers = {"Cookie": cookie} if cookie else {}
    if origin:
        headers["Origin"] = origin
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(f"ws://127.0.0.1:{port}/ws?width=100&height=30", headers=headers) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_the_websocket_needs_the_token_and_sigint_ends_every_tab() -> None:
    import aiohttp

    with tuichat_web(f"--api-key={KEY}") as run:
        assert await ws_status(run.port, None) == 401
        assert await ws_status(run.port, f"tuichat_web_{run.port}=wrong") == 403
        assert await ws_status(run.port, run.cookie, origin="http://evil.example") == 403
        assert run.tab_pids() == set()  # no refused connection started a tuichat

        async with aiohttp.ClientSession() as session:
            url = f"ws://127.0.0.1:{run.port}/ws?width=120&height=40"
            headers = {"Cookie": run.cookie}
            async with session.ws_connect(url, headers=headers) as one, session.ws_connect(url, headers=headers) as two:
                tabs = await asyncio.to_thread(wait_for, lambda: len(run.tab_pids()) == 2 and run.tab_pids())
                for ws in (one, two):  # each tab draws its own tuichat screen
                    await wait_screen(ws, "ready")
                for pid in tabs:
                    line = cmdline(pid)
                    assert "-m tuichat --url" in line and KEY not in line
                groups = {os.getpgid(pid) for pid in tabs}
                code, output = await asyncio.to_thread(run.stop)
        assert code == 0
        assert "no tab process is left running" in output and KEY not in output
        assert not any(pid_alive(pid) for pid in tabs)
        for pgid in groups:
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)


async def wait_screen(ws: Any, text: str, timeout: float = 20.0) -> str:
    """Read the tab's output until `text` is on its screen; returns what was read (escape sequences removed)."""
    import aiohttp

    seen = ""
    deadline = time.monotonic() + timeout
    while text not in ANSI.sub("", seen):
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never appeared; the tab drew: {ANSI.sub('', seen)[-500:]!r}"
        message = await ws.receive(timeout=left)
        if message.type == aiohttp.WSMsgType.BINARY:
            seen += message.data.decode("utf-8", "replace")
        elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            raise AssertionError(f"the tab closed before {text!r} appeared: {ANSI.sub('', seen)[-500:]!r}")
    return ANSI.sub("", seen)


# -- a real browser --------------------------------------------------------------------------------------------------

# Before the page's own script runs: keep a copy of everything the tab's websocket delivers to the terminal.
TAP_WEBSOCKET = """
(() => {
  const Original = window.WebSocket;
  const decoder = new TextDecoder();
  window.__tabOutput = "";
  window.WebSocket = function (url, protocols) {
    const socket = new Original(url, protocols);
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") {
        window.__tabOutput += decoder.decode(new Uint8Array(event.data), { stream: true });
      }
    });
    return socket;
  };
  window.WebSocket.prototype = Original.prototype;
})();
"""


def browser_or_skip() -> Any:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright, in the test extra)")
    return sync_playwright


def test_a_prompt_typed_in_the_browser_reaches_the_server_and_its_reply_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sync_playwright = browser_or_skip()
    executable = CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium"))
    with tuichat_web(openai_env=True) as run, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.add_init_script(TAP_WEBSOCKET)
            page.goto(run.url)

            def screen() -> str:
                return ANSI.sub("", page.evaluate("window.__tabOutput"))

            wait_for(lambda: "ready" in screen() and "Sampling" in screen(), 30, 0.1, "the chat screen")
            assert "-first-byte" in page.evaluate("document.body.className")  # the landing dialog is gone
            assert page.url == f"http://127.0.0.1:{run.port}/"  # no token left in the address bar

            page.focus(".xterm-helper-textarea")  # xterm.js takes keys through this textarea
            page.keyboard.type("hello from a browser")
            page.keyboard.press("Enter")
            wait_for(lambda: "now in a browser" in screen() and "TTFT" in screen(), 30, 0.1, "the reply")
            page.wait_for_timeout(300)  # let the last frame paint before the picture is taken
            shot = tmp_path / "web.png"
            page.screenshot(path=str(shot))
            if target := os.environ.get("TUICHAT_WEB_SCREENSHOT"):
                shutil.copyfile(shot, target)
            assert KEY not in page.content()
        finally:
            browser.close()
        last = run.standin.stats()["last_request"]
        assert last["messages"][-1] == {"role": "user", "content": "hello from a browser"}
        code, output = run.stop(signal.SIGTERM)
        assert code == 0 and KEY not in output
    # the tab's tuichat kept the chat in the same history as the terminal one
    assert cli.main(["history"]) == 0
    assert "hello from a browser" in capsys.readouterr().out
