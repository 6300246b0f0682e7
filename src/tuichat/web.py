"""`tuichat web`: the full tuichat screen in a browser, one tuichat process per tab, behind a random token.

textual-serve's `AppService` speaks the protocol of Textual's web driver (a tab's keys and size go to the app's
stdin, its screen comes back on stdout) and the page's script is textual-serve's own; the web server around them is
ours, because textual-serve's `Server` has no authentication, runs each tab through a shell in the server's own
process group, prints the command it runs, and puts an absolute `http://host:port` into the page that breaks behind
`ssh -L` to another local port. Importing `textual_serve.server` would also pull in Rich, which this domain module
must not (only `textual_serve.app_service`, which is plain asyncio, is used).

Security model: the server listens on loopback unless told otherwise; every request needs the token, first as
`?token=` (answered with an HttpOnly, SameSite=Strict cookie and a redirect that takes the token out of the address
bar), then through that cookie, which the page's own static files and websocket send. A missing token is a 401, a
wrong one a 403 (compared with `hmac.compare_digest`). A server's API key is never on a tab's command line (any
user may read /proc/PID/cmdline): it travels in the environment, which `tuichat.cli.main` removes at once, and it is
redacted from whatever the tabs write to this server's output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from tuichat.cli.main import WEB_API_KEY_ENV  # each tab's tuichat reads its key from there and deletes it at once
from tuichat.errors import TuichatError

if TYPE_CHECKING:
    from aiohttp import web
    from textual_serve.app_service import AppService

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
TOKEN_PARAM = "token"
# A quit request lets a tab's tuichat save its chat and leave; SIGTERM (which Textual's web driver also turns into
# a clean exit) follows, then SIGKILL, so a stuck tab can never keep `tuichat web` from stopping.
QUIT_GRACE_S = 4.0
TERM_GRACE_S = 3.0
INSTALL_HINT = "`tuichat web` needs textual-serve, which installing tuichat brings: pip install textual-serve"


class UsageError(TuichatError):
    """The command line asks for something `tuichat web` will not do as written (exit code 2)."""


def add_subcommands(subparsers: Any) -> None:
    """Register `web` on an argparse subparsers object; it also takes every argument plain `tuichat` takes."""
    from tuichat.cli.main import add_chat_arguments

    p = subparsers.add_parser(
        "web",
        help="serve the tuichat screen to a browser (one tuichat per tab), behind a token",
        description="Serve the full tuichat screen to a browser: every tab runs its own tuichat with the same "
        "config and history. Listens on 127.0.0.1 and prints an address with a fresh token; from another machine "
        "use `ssh -L 8000:127.0.0.1:8000 THIS-HOST` and open the same address there. Ctrl+C stops the web server "
        "and every tab's tuichat.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT}; 0: any)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that is not loopback (plain http: the token and the chat cross the network unencrypted)",
    )
    add_chat_arguments(p)
    p.set_defaults(web_command="web")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit code. User errors become one sentence on stderr."""
    try:
        warning = check_host(args.host, args.allow_remote)
        if not 0 <= args.port < 65536:
            raise UsageError(f"--port {args.port} is not a port: use a number from 1 to 65535 (0 picks a free one)")
        plan = plan_tabs(args)
    except UsageError as exc:
        say(f"tuichat web: {exc}", err=True)
        return 2
    if warning:
        say(f"tuichat web: warning: {warning}", err=True)
    try:
        import aiohttp  # noqa: F401
        import textual_serve.app_service  # noqa: F401
    except ImportError:
        raise TuichatError(INSTALL_HINT) from None
    server = WebServer(plan, args.host, args.port)
    with _redacted_output(plan.secrets):
        return asyncio.run(server.serve_until_signalled())


# -- what runs in each tab ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TabPlan:
    """How every tab's tuichat is started: its argv (never a secret), the environment added, what to redact."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()


def plan_tabs(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TabPlan:
    """The per-tab command from the tuichat arguments given to `tuichat web`, with --api-key moved to the environment.

    The arguments are checked here once (unknown profile, bad URL), so a mistake is one sentence in the terminal
    rather than a "Session ended" page in every tab.
    """
    from tuichat.chat.target import normalise_url
    from tuichat.config import load_config

    environ = os.environ if environ is None else environ
    cfg = load_config()
    if args.profile and args.profile not in cfg.profiles:
        known = ", ".join(sorted(cfg.profiles)) or "none"
        raise UsageError(f"no profile called '{args.profile}' (known: {known}); see `tuichat profiles`")
    if args.url:
        normalise_url(args.url)
    argv = [sys.executable, "-m", "tuichat"]
    if args.profile:
        argv.append(args.profile)
    if args.url:
        argv += ["--url", args.url]
    if args.model:
        argv += ["--model", args.model]
    if args.continue_last:
        argv.append("--continue")
    if args.conversation is not None:
        argv += ["--conversation", str(args.conversation)]
    env: dict[str, str] = {}
    if args.api_key:
        env[WEB_API_KEY_ENV] = args.api_key
    known_keys = {args.api_key, environ.get("OPENAI_API_KEY"), cfg.server.api_key}
    known_keys |= {p.api_key for p in cfg.profiles.values()}
    return TabPlan(tuple(argv), env, frozenset(k for k in known_keys if k))


def check_host(host: str, allow_remote: bool) -> str | None:
    """None for a loopback address; a warning for another one with --allow-remote; UsageError without it."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise UsageError(
            f"--host {host} is not a loopback address, so anyone who can reach this machine could try the token; "
            "reach it through `ssh -L 8000:127.0.0.1:8000 THIS-HOST` instead, or add --allow-remote if you mean it"
        )
    return (
        f"listening on {host}, which is not loopback: the page is plain http, so the token and every chat cross "
        "the network unencrypted; prefer `ssh -L` to the default 127.0.0.1"
    )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


# -- the web server ---------------------------------------------------------------------------------------------------


class WebServer:
    """The aiohttp application: the page, textual-serve's static files, the per-tab websocket and downloads."""

    def __init__(self, plan: TabPlan, host: str, port: int, token: str | None = None) -> None:
        from textual_serve.download_manager import DownloadManager

        self.plan = plan
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(32)
        self.cookie_name = "tuichat_web"  # made per port once bound: browsers share cookies across ports
        self.tabs: set[TabProcess] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self.stopping = False
        self.download_manager = DownloadManager()
        self._static_dir = _textual_serve_dir() / "static"
        self._template: Callable[..., str] | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------

    async def serve_until_signalled(self, on_ready: Callable[[str], None] | None = None) -> int:
        from aiohttp import web

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=2.0)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise TuichatError(
                f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); pick another with --port"
            ) from None
        self.port = _bound_port(runner, self.port)
        self.cookie_name = f"tuichat_web_{self.port}"
        url = self.page_url()
        (on_ready or _announce)(url)
        await stop.wait()
        say("tuichat web: stopping every tab's tuichat ...")
        survivors = await self.shutdown()
        await runner.cleanup()
        if survivors:
            pids = ", ".join(str(p) for p in sorted(survivors))
            say(f"tuichat web: processes {pids} are still alive: end them with `kill -9 {pids}`.", err=True)
            return 1
        say("tuichat web: stopped; no tab process is left running.")
        return 0

    async def shutdown(self) -> set[int]:
        """End every tab's tuichat and close every websocket; returns the pids that would not die."""
        self.stopping = True
        tabs = list(self.tabs)
        results = await asyncio.gather(*(tab.finish() for tab in tabs), return_exceptions=True)
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        survivors: set[int] = set()
        for result in results:
            if isinstance(result, set):
                survivors |= result
        return survivors

    def page_url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}/?{TOKEN_PARAM}={self.token}"

    # -- the aiohttp application --------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        from aiohttp import web

        app = web.Application(middlewares=[self._guard])
        app.add_routes(
            [
                web.get("/", self.handle_index),
                web.get("/ws", self.handle_websocket),
                web.get("/download/{key}", self.handle_download),
                web.get("/favicon.ico", _no_content),
                web.static("/static", self._static_dir, show_index=False),
            ]
        )
        return app

    def check_token(self, request: web.Request) -> str | None:
        """None when the request carries the right token; else why not ("missing" or "wrong")."""
        supplied = request.query.get(TOKEN_PARAM) or request.cookies.get(self.cookie_name)
        if not supplied:
            return "missing"
        if not hmac.compare_digest(supplied.encode(), self.token.encode()):
            return "wrong"
        return None

    @property
    def _guard(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def guard(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
            problem = self.check_token(request)
            if problem == "missing":
                response: web.StreamResponse = web.Response(
                    status=401,
                    text="This tuichat page needs its token: open the address `tuichat web` printed "
                    "(it ends in ?token=...).\n",
                )
            elif problem == "wrong":
                response = web.Response(
                    status=403,
                    text="Wrong token: open the address the running `tuichat web` printed; "
                    "every start makes a new one.\n",
                )
            elif not _same_origin(request):
                response = web.Response(status=403, text="This page only answers requests from its own origin.\n")
            else:
                response = await handler(request)
            _harden(response)
            return response

        return guard

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        if TOKEN_PARAM in request.query:
            # Keep the token out of the address bar, the history and screen shares; the cookie carries it now.
            query = {k: v for k, v in request.query.items() if k != TOKEN_PARAM}
            location = request.rel_url.with_query(query)
            response = web.HTTPSeeOther(location=str(location))
            response.set_cookie(
                self.cookie_name, self.token, httponly=True, samesite="Strict", path="/", secure=request.secure
            )
            return response
        return web.Response(text=self.render_page(request), content_type="text/html")

    def render_page(self, request: web.Request) -> str:
        if self._template is None:
            import jinja2

            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(str(_textual_serve_dir() / "templates")), autoescape=True
            )
            self._template = env.get_template("app_index.html").render
        try:
            font_size = int(request.query.get("fontsize", "16"))
        except ValueError:
            font_size = 16
        # The websocket address follows the address the browser used, so `ssh -L 9000:127.0.0.1:8000` works too.
        scheme = "wss" if request.secure else "ws"
        html = self._template(
            font_size=max(6, min(font_size, 64)),
            app_websocket_url=f"{scheme}://{request.host}/ws",
            config={"static": {"url": "/static/"}},
            application={"name": "tuichat"},
            ping_url="",
        )
        # The page would fetch its font from Google: offline that stalls, and it tells a third party who is using
        # it. textual-serve ships the same font, so the page gets it from here.
        return _GOOGLE_FONT_LINK.sub(_LOCAL_FONT_STYLE, html)

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        if self.stopping:
            return web.Response(status=503, text="tuichat web is stopping.\n")
        width = _to_int(request.query.get("width"), 80)
        height = _to_int(request.query.get("height"), 24)
        ws = web.WebSocketResponse(heartbeat=15)
        await ws.prepare(request)
        self.sockets.add(ws)
        tab = TabProcess(self.plan, ws, self.download_manager)
        self.tabs.add(tab)
        try:
            await tab.start(width, height)
            await self._pump(ws, tab.service)
        except asyncio.CancelledError:
            pass
        finally:
            await tab.finish()
            self.tabs.discard(tab)
            self.sockets.discard(ws)
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    async def _pump(self, ws: web.WebSocketResponse, tab: AppService) -> None:
        """Browser -> app: keys, size, focus; pings are answered here."""
        from aiohttp import WSMsgType

        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                envelope = message.json()
                kind, data = envelope[0], envelope[1] if len(envelope) > 1 else None
            except (ValueError, TypeError, IndexError, KeyError):
                continue  # a malformed message from the page must not end the tab
            if kind == "stdin" and isinstance(data, str):
                await tab.send_bytes(data.encode("utf-8"))
            elif kind == "resize" and isinstance(data, dict):
                await tab.set_terminal_size(_to_int(data.get("width"), 80), _to_int(data.get("height"), 24))
            elif kind == "ping":
                await ws.send_json(["pong", data])
            elif kind == "blur":
                await tab.blur()
            elif kind == "focus":
                await tab.focus()

    async def handle_download(self, request: web.Request) -> web.StreamResponse:
        """A file the app hands to the browser (Textual's deliver_text/deliver_binary, e.g. a saved screenshot)."""
        from aiohttp import web

        key = request.match_info["key"]
        try:
            meta = await self.download_manager.get_download_metadata(key)
        except KeyError:
            raise web.HTTPNotFound(text="This download is no longer available.\n") from None
        response = web.StreamResponse()
        content_type = meta.mime_type + (f"; charset={meta.encoding}" if meta.encoding else "")
        response.headers["Content-Type"] = content_type
        disposition = "inline" if meta.open_method == "browser" else "attachment"
        safe_name = re.sub(r"[^\w.\- ]", "_", meta.file_name)
        response.headers["Content-Disposition"] = f'{disposition}; filename="{safe_name}"'
        await response.prepare(request)
        async for chunk in self.download_manager.download(key):
            await response.write(chunk)
        await response.write_eof()
        return response


def _tab_class() -> type[AppService]:
    """textual-serve's AppService, started without a shell, in its own session, with the plan's environment."""
    global _TAB_CLASS
    if _TAB_CLASS is not None:
        return _TAB_CLASS
    from textual_serve.app_service import AppService

    class _Tab(AppService):
        plan: TabPlan = TabPlan(())

        async def _open_app_process(self, width: int = 80, height: int = 24) -> asyncio.subprocess.Process:
            env = self._build_environment(width=width, height=height)
            env.update(self.plan.env)
            # Its own session: Ctrl+C in the terminal reaches only `tuichat web`, which then stops each tab in
            # order (quit, SIGTERM, SIGKILL) instead of every tab dying at once mid-save.
            process = await asyncio.create_subprocess_exec(
                *self.plan.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            self._process = process
            assert process.stdin is not None
            self._stdin = process.stdin
            return process

    _TAB_CLASS = _Tab
    return _Tab


_TAB_CLASS: type[AppService] | None = None


class TabProcess:
    """One browser tab's tuichat process, and how it is stopped (the tab's own exit and shutdown share it)."""

    def __init__(self, plan: TabPlan, ws: web.WebSocketResponse, downloads: Any) -> None:
        async def close() -> None:
            await ws.close()

        self.service = _tab_class()(
            " ".join(plan.argv),  # textual-serve's bookkeeping only: never run through a shell
            write_bytes=ws.send_bytes,
            write_str=ws.send_str,
            close=close,
            download_manager=downloads,
        )
        self.service.plan = plan  # type: ignore[attr-defined]
        self._finishing: asyncio.Task[set[int]] | None = None

    @property
    def pid(self) -> int | None:
        process = self.service._process
        return None if process is None else process.pid

    async def start(self, width: int, height: int) -> None:
        await self.service.start(width, height)

    def finish(self) -> asyncio.Future[set[int]]:
        """Stop the tab's process group; returns the pids that survived (none, normally). Idempotent."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._stop())
        return asyncio.shield(self._finishing)

    async def _stop(self) -> set[int]:
        process = self.service._process
        if process is None:
            return set()
        pgid = process.pid  # start_new_session: the tab leads its own group
        if process.returncode is None:
            with contextlib.suppress(Exception):
                await self.service.send_meta({"type": "quit"})
            steps: tuple[tuple[signal.Signals | None, float], ...] = (
                (None, QUIT_GRACE_S),
                (signal.SIGTERM, TERM_GRACE_S),
                (signal.SIGKILL, 5.0),
            )
            for sig, grace in steps:
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), grace)
                if process.returncode is not None:
                    break
        survivors = await _wait_group_empty(pgid, 2.0)
        if survivors:  # something the tab started in its own group outlived it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            survivors = await _wait_group_empty(pgid, 2.0)
        task = self.service._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 2.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            self.service._task = None
        return survivors


async def _wait_group_empty(pgid: int, timeout: float) -> set[int]:
    from tuichat.server.procgroup import group_pids

    deadline = time.monotonic() + timeout
    while True:
        left = group_pids(pgid)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


# -- helpers ----------------------------------------------------------------------------------------------------------

_GOOGLE_FONT_LINK = re.compile(r"<link[^>]*fonts\.googleapis\.com[^>]*>", re.IGNORECASE)
_LOCAL_FONT_STYLE = (
    '<link rel="preload" href="/static/fonts/RobotoMono-VariableFont_wght.ttf" as="font" type="font/ttf" '
    'crossorigin="anonymous" />\n'
    "    <style>\n"
    '      @font-face { font-family: "Roboto Mono"; font-style: normal; font-weight: 100 700; font-display: block;\n'
    '        src: url("/static/fonts/RobotoMono-VariableFont_wght.ttf") format("truetype"); }\n'
    '      @font-face { font-family: "Roboto Mono"; font-style: italic; font-weight: 100 700; font-display: block;\n'
    '        src: url("/static/fonts/RobotoMono-Italic-VariableFont_wght.ttf") format("truetype"); }\n'
    "    </style>"
)


async def _no_content(request: web.Request) -> web.StreamResponse:
    from aiohttp import web

    return web.Response(status=204)  # the browser asks for an icon; a 404 would litter its console


def _textual_serve_dir() -> Path:
    import textual_serve

    return Path(textual_serve.__file__).resolve().parent


def _bound_port(runner: Any, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


def _same_origin(request: web.Request) -> bool:
    """A request with an Origin header must come from this page (no other site may drive a tab)."""
    origin = request.headers.get("Origin")
    if not origin or (origin == "null" and request.path.startswith("/static/")):
        return True
    from urllib.parse import urlsplit

    return urlsplit(origin).netloc.lower() == request.host.lower()


def _harden(response: Any) -> None:
    headers = response.headers
    headers.setdefault("Referrer-Policy", "no-referrer")  # the first address carries the token
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
    headers.setdefault("Cache-Control", "no-store")


def _to_int(value: object, default: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        return default
    return number if 0 < number < 10_000 else default


def say(text: str, err: bool = False) -> None:
    """One line for the person at the terminal (flushed: a test or a pipe reads the address at once)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _announce(url: str) -> None:
    say(f"tuichat web: open {url}")
    say(
        "  Each browser tab runs its own tuichat with this machine's config and history. From a laptop:\n"
        "  ssh -L PORT:127.0.0.1:PORT THIS-HOST, then open the same address there. Ctrl+C stops everything."
    )


class _Redactor:
    """Wraps a text stream so that no known secret (an API key) is ever written through it."""

    def __init__(self, stream: TextIO, secrets_: Iterable[str]) -> None:
        self._stream = stream
        self._secrets = sorted(secrets_, key=len, reverse=True)

    def write(self, text: str) -> int:
        for secret in self._secrets:
            text = text.replace(secret, "[api key hidden]")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _redacted_output(secrets_: Iterable[str]) -> Any:
    """textual-serve copies a tab's stderr (where a crash's traceback lists local variables) to our stdout."""
    found = [s for s in secrets_ if s]
    if not found:
        yield
        return
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = cast(TextIO, _Redactor(old_out, found))
    sys.stderr = cast(TextIO, _Redactor(old_err, found))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old_out, old_err


__all__ = [
    "DEFAULT_PORT",
    "WEB_API_KEY_ENV",
    "TabPlan",
    "WebServer",
    "add_subcommands",
    "check_host",
    "is_loopback",
    "plan_tabs",
    "run",
]
