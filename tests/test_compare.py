"""`tuichat compare`: one prompt to two servers (two stand-ins, real subprocesses), both columns streaming at once,
per-side figures (TTFT, tok/s, tokens, GPU memory from a fake NVML reader, KV usage from /metrics), the faster and
the lighter side marked, every key of the screen, two linked conversations in the history; the CLI with URLs,
profiles started or attached, and unknown ones; and SVG snapshots at 80x24 and 120x40.

No test can wait forever: each Pilot test runs under `deadline()` (asyncio.timeout), every wait has its own
timeout, and the stand-ins are killed by their fixtures whatever happens (run_standin's finally)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from apphelpers import settled, wait_for
from fakegpu import FakeGpuReader
from standin.harness import STANDIN_COMMAND, Standin, free_port, pid_alive, run_standin
from textual.pilot import Pilot

from tuichat.chat.client import ChatClient
from tuichat.chat.conversation import Conversation, Meta, ReplyStarted
from tuichat.chat.sampling import Sampling
from tuichat.chat.store import Store, default_path
from tuichat.chat.turns import ChatSession, Turn
from tuichat.cli.batch import Endpoint
from tuichat.errors import TuichatError
from tuichat.server import launcher
from tuichat.server.gpu import GpuInfo, GpuProcess
from tuichat.server.launcher import ServerManager
from tuichat.ui.compare_app import CompareApp, listening_pids, make_compare_app, make_side, stop_started
from tuichat.ui.screens.compare import ComparePane, CompareScreen, Side
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.reply_message import ReplyMessage
from tuichat.ui.widgets.sampling_pane import SamplingPane

GIB = 1024**3
SIZES = [(80, 24), (120, 40)]
ONE = ("--fake-tokens-per-chunk", "1")
DEADLINE = 60.0  # seconds a whole Pilot test may take, even on a loaded machine


@pytest.fixture
def servers() -> Iterator[tuple[Standin, Standin]]:
    # B is slower, so which side is faster is never in doubt
    with run_standin("--fake-rate", "80", *ONE) as a, run_standin("--fake-rate", "25", *ONE) as b:
        yield a, b


def gpu_for(a: Standin, b: Standin) -> FakeGpuReader:
    """One GPU on which A's server holds 3 GiB and B's 1.5 GiB: B is the lighter."""
    processes = (GpuProcess(a.proc.pid, 3 * GIB), GpuProcess(b.proc.pid, 3 * GIB // 2))
    return FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=5 * GIB, mem_total=140 * GIB, processes=processes)])


def app_for(a: Standin, b: Standin, store: Store | None = None, gpu: FakeGpuReader | None = None) -> CompareApp:
    first = make_side(
        Endpoint(a.url, a.api_key, None, "bf16", profile="bf16"), store, Sampling(), pids=lambda: {a.proc.pid}
    )
    second = make_side(
        Endpoint(b.url, b.api_key, None, "w4a16", profile="w4a16"), store, Sampling(), pids=lambda: {b.proc.pid}
    )
    return CompareApp(first, second, store, gpu_reader=gpu, poll_every=0.2)


@contextlib.asynccontextmanager
async def running(app: CompareApp, size: tuple[int, int] = (120, 40)) -> AsyncIterator[Pilot[Any]]:
    """The app under Pilot, within DEADLINE; afterwards neither conversation is left streaming."""
    async with asyncio.timeout(DEADLINE), app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and len(app.compare.panes) == 2)
        yield pilot
    assert not any(side.conversation.streaming for side in app.sides)


def pane_text(pane: ComparePane) -> str:
    """What the user reads in one column: the screen's text inside the pane's region."""
    strips = pane.app.screen._compositor.render_strips()
    r = pane.region
    return "\n".join(strip.text[r.x : r.right] for strip in strips[r.y : r.bottom])


async def send(pilot: Pilot[Any], text: str) -> None:
    prompt = pilot.app.screen.query_one(PromptArea)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")


def idle(screen: CompareScreen) -> bool:
    return not screen.streaming and all(p.live is None for p in screen.panes)


async def test_one_message_streams_on_both_sides_with_figures_and_the_faster_and_lighter_marked(
    servers: tuple[Standin, Standin],
) -> None:
    a, b = servers
    store = Store.open(default_path())
    app = app_for(a, b, store, gpu_for(a, b))
    async with running(app) as pilot:
        screen = app.compare
        await send(pilot, "hi [[reply:" + " ".join(f"w{i}" for i in range(60)) + "]]")
        await wait_for(pilot, lambda: idle(screen), 20)
        await screen.settled()
        left, right = screen.panes
        # both streamed at once: B's first token came before A had finished (one after the other, B would have
        # waited for all of A)
        stats = [side.conversation.last_stats or {} for side in screen.sides]
        assert stats[1]["ttft_s"] < stats[0]["total_s"]
        assert left.faster and not right.faster
        await wait_for(pilot, lambda: right.lighter and not left.lighter)
        for pane in (left, right):
            await wait_for(pilot, lambda p=pane: "w57 w58 w59" in pane_text(p) and "TTFT" in pane_text(p))
            assert "tok/s" in pane_text(pane) and "60 tokens" in pane_text(pane)
            assert "KV " in pane_text(pane) and "KV –" not in pane_text(pane)
        assert "◆ faster" in pane_text(left) and "◆ faster" not in pane_text(right)
        assert "◇ lighter" in pane_text(right) and "◇ lighter" not in pane_text(left)
        assert "GPU 3.2 GB" in pane_text(left) and "GPU 1.6 GB" in pane_text(right)
        assert "A ◆ faster · bf16 · tiny-chat · " + a.url in pane_text(left)
        assert "B ◇ lighter · w4a16 · tiny-chat · " + b.url in pane_text(right)
    store = Store.open(default_path())
    convs = {c.id: c for c in store.list_conversations()}
    assert len(convs) == 2
    first, second = sorted(convs.values(), key=lambda c: c.compare_side or "")
    assert (first.compare_side, first.compare_label, first.partner_id) == ("A", "bf16", second.id)
    assert (second.compare_side, second.compare_label, second.partner_id) == ("B", "w4a16", first.id)
    for conv in convs.values():
        assert [m.role for m in store.messages(conv.id)] == ["user", "assistant"]
    store.close()


async def test_escape_stops_ctrl_r_retries_and_f6_undoes_on_both_sides(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    app = app_for(a, b)
    async with running(app) as pilot:
        screen = app.compare
        for server in servers:
            server.configure(words=400)
        await send(pilot, "tell me a long story")
        await wait_for(pilot, lambda: all(len(s.conversation.chat.turns) == 2 for s in screen.sides))
        await wait_for(pilot, lambda: all(s.conversation.chat.turns[-1].content for s in screen.sides))
        await pilot.press("escape")
        await wait_for(pilot, lambda: idle(screen))
        assert [s.conversation.chat.turns[-1].state for s in screen.sides] == ["stopped", "stopped"]
        await screen.settled()
        # (what the panes show is the last frame drawn: the mark is in the one after the reply's rebuild)
        await wait_for(pilot, lambda: all("stopped by you" in pane_text(p) for p in screen.panes))

        for server in servers:
            server.configure(words=5)  # the retried replies are short
        await pilot.press("ctrl+r")
        await wait_for(
            pilot, lambda: all(s.conversation.chat.turns[-1].content == "w1 w2 w3 w4 w5" for s in screen.sides), 20
        )
        await wait_for(pilot, lambda: idle(screen))
        assert [s.conversation.chat.turns[-1].state for s in screen.sides] == ["done", "done"]
        assert all(len(s.conversation.chat.turns) == 2 for s in screen.sides)

        await pilot.press("f6")
        await wait_for(pilot, lambda: all(not s.conversation.chat.turns for s in screen.sides))
        assert screen.query_one(PromptArea).text == "tell me a long story"
        await screen.settled()
        await wait_for(
            pilot, lambda: all("story" not in pane_text(p) and "w1 w2" not in pane_text(p) for p in screen.panes)
        )


async def test_a_reply_already_streaming_when_its_start_is_drawn_shows_once(
    servers: tuple[Standin, Standin], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under load the screen may draw a reply's start after its first words came: the pane's rebuild then found the
    # streaming turn among the finished ones and showed its first words twice (once frozen, once live)
    original = CompareScreen._on_event

    async def late_start(self: CompareScreen, index: int, event: Any) -> None:
        if isinstance(event, ReplyStarted):
            turns = self.sides[index].conversation.chat.turns
            while not (len(turns) == 2 and "w3" in turns[-1].content):
                await asyncio.sleep(0.01)
        await original(self, index, event)

    monkeypatch.setattr(CompareScreen, "_on_event", late_start)
    a, b = servers
    app = app_for(a, b)
    async with running(app) as pilot:
        screen = app.compare
        for server in servers:
            server.configure(words=400)  # still streaming when the checks below are done
        await send(pilot, "count")
        await wait_for(pilot, lambda: all(p.live is not None and "w2 w3" in pane_text(p) for p in screen.panes))
        assert all(pane_text(p).count("w1 w2 w3") == 1 for p in screen.panes)
        assert all(not p.messages.query(ReplyMessage) for p in screen.panes)
        await pilot.press("escape")
        await wait_for(pilot, lambda: idle(screen), 20)


async def test_ctrl_l_clears_both_sides_after_asking(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    app = app_for(a, b)
    async with running(app) as pilot:
        screen = app.compare
        await send(pilot, "hello [[reply:first answer]]")
        await wait_for(pilot, lambda: idle(screen) and all(s.conversation.last_stats for s in screen.sides), 20)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is screen)
        assert all(len(s.conversation.chat.turns) == 2 for s in screen.sides)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: all(not s.conversation.chat.turns for s in screen.sides))
        await screen.settled()
        await wait_for(pilot, lambda: all("first answer" not in pane_text(p) for p in screen.panes))


async def test_a_side_that_fails_shows_why_and_the_other_side_still_answers(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    first = make_side(Endpoint(a.url, a.api_key, None, "bf16", profile="bf16"), None, Sampling())
    second = make_side(Endpoint(b.url, "wrong-key", "tiny-chat", b.url), None, Sampling())
    app = CompareApp(first, second)
    async with running(app) as pilot:
        screen = app.compare
        await send(pilot, "hello [[reply:fine]]")
        await wait_for(pilot, lambda: idle(screen) and first.conversation.last_stats is not None, 20)
        await screen.settled()
        left, right = screen.panes
        await wait_for(pilot, lambda: "fine" in pane_text(left) and "401" in pane_text(right))
        assert "--api-key" in pane_text(right)
        assert not left.faster and not right.faster  # no race with only one runner
        # the message went back to the prompt only once, though one side kept it
        assert screen.query_one(PromptArea).text == "hello [[reply:fine]]"


async def test_f4_switches_the_side_shown_at_80x24_and_wide_shows_both(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    app = app_for(a, b)
    async with running(app, (80, 24)) as pilot:
        screen = app.compare
        left, right = screen.panes
        assert left.display and not right.display
        assert screen.query_one("#scoreboard").display
        await pilot.press("f4")
        await wait_for(pilot, lambda: right.display and not left.display)
        await pilot.resize_terminal(140, 40)
        await wait_for(pilot, lambda: left.display and right.display)
        assert not screen.query_one("#scoreboard").display


async def test_sampling_is_shared_by_default_and_f3_sets_it_for_one_side(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    app = app_for(a, b)
    async with running(app) as pilot:
        screen = app.compare
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen.query_one("#sampling").display)
        screen.query_one(SamplingPane).set_value("temperature", "0.3")
        await wait_for(pilot, lambda: all(s.conversation.sampling.temperature == 0.3 for s in screen.sides))
        await pilot.press("f3")  # A only
        await wait_for(pilot, lambda: "side A only" in str(screen.query_one("#sampling-target").render()))
        screen.query_one(SamplingPane).set_value("temperature", "1.1")
        await wait_for(pilot, lambda: screen.sides[0].conversation.sampling.temperature == 1.1)
        assert screen.sides[1].conversation.sampling.temperature == 0.3
        await wait_for(pilot, lambda: all(p.own_sampling for p in screen.panes))
        await send(pilot, "hello [[reply:ok]]")
        await wait_for(pilot, lambda: idle(screen) and all(s.conversation.last_stats for s in screen.sides), 20)
        assert a.stats()["last_request"]["temperature"] == 1.1
        assert b.stats()["last_request"]["temperature"] == 0.3
        await pilot.press("f3")
        await wait_for(pilot, lambda: "side B only" in str(screen.query_one("#sampling-target").render()))
        assert screen.query_one(SamplingPane).sampling.temperature == 0.3  # the pane shows B's values now
        await pilot.press("f3")
        await wait_for(pilot, lambda: "both sides" in str(screen.query_one("#sampling-target").render()))


async def test_ctrl_q_while_both_stream_stops_them_saved_as_interrupted(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    for server in servers:
        server.configure(words=2000)
    store = Store.open(default_path())
    app = app_for(a, b, store)
    async with running(app) as pilot:
        screen = app.compare
        await send(pilot, "a very long story")
        await wait_for(pilot, lambda: all(s.conversation.chat.turns[-1].content for s in screen.sides), 20)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, 20)
    assert [s.conversation.chat.turns[-1].state for s in app.sides] == ["interrupted", "interrupted"]
    with Store.open(default_path()) as saved:
        states = [saved.messages(c.id)[-1].state for c in saved.list_conversations()]
    assert states == ["interrupted", "interrupted"]


# -- the CLI -------------------------------------------------------------------------------------------------


@pytest.fixture
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerManager]:
    """Two launch profiles whose command is the stand-in; every server they start is stopped afterwards."""
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path))
    monkeypatch.setattr(launcher, "make_gpu_reader", lambda: FakeGpuReader())
    config = {
        "profiles": {
            name: {"model": "internlm/internlm2-chat-1_8b", "command": STANDIN_COMMAND, "port": free_port()}
            for name in ("bf16", "w4a16")
        }
    }
    (tmp_path / "config.toml").write_text(tomli_w.dumps(config))
    manager = ServerManager()
    try:
        yield manager
    finally:
        for server in manager.running():
            manager.stop(server, timeout=2.0)
        manager.close()


def test_compare_starts_a_profile_that_is_not_running_and_attaches_to_one_that_is(
    profiles: ServerManager,
) -> None:
    already = profiles.start("w4a16", _profile("w4a16"))
    assert already.wait_ready(20).state == "ready"
    said: list[str] = []
    app = make_compare_app(["bf16", "w4a16"], profiles, said.append, start_timeout=20)
    first, second = app.sides
    assert first.started_here and not second.started_here
    assert any("Starting bf16" in line for line in said) and any("Attached to w4a16" in line for line in said)
    assert first.endpoint.profile == "bf16" and first.server is not None and first.server.is_alive()
    assert first.pids is not None and first.server.pid in set(first.pids())
    group = first.server.pids()
    assert [line for line in stop_started(app, profiles) if "bf16" in line or "stopped" in line.lower()]
    assert not any(pid_alive(pid) for pid in group)  # only the one compare started is stopped
    assert already.is_alive()
    if app.store is not None:
        app.store.close()


def _profile(name: str) -> Any:
    from tuichat.config import load_config

    return load_config().profiles[name]


def test_compare_of_two_urls_talks_to_each_with_its_key(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    app = make_compare_app([a.url, b.url, "--key-a", "ka", "--key-b", "kb"], say=lambda _: None)
    first, second = app.sides
    assert (first.endpoint.url, first.endpoint.api_key, first.started_here) == (a.url, "ka", False)
    assert (second.endpoint.url, second.endpoint.api_key) == (b.url, "kb")
    # a server on this machine: its GPU memory is read from the process listening on its port
    assert first.pids is not None and a.proc.pid in set(first.pids())
    if app.store is not None:
        app.store.close()


def test_listening_pids_finds_the_server_behind_a_port(servers: tuple[Standin, Standin]) -> None:
    a, _ = servers
    assert a.proc.pid in listening_pids(a.port)
    assert listening_pids(free_port()) == set()


def test_tuichat_compare_names_an_unknown_profile_as_unknown(
    profiles: ServerManager, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuichat.cli.main import main

    assert main(["compare", "http://127.0.0.1:9", "nosuchprofile"]) == 1
    err = capsys.readouterr().err
    assert "no profile called 'nosuchprofile' (known: bf16, " in err and "w4a16" in err
    assert "Traceback" not in err
    assert profiles.running() == []


def test_compare_of_a_side_with_itself_is_refused() -> None:
    with pytest.raises(TuichatError, match="same server"):
        make_compare_app(["http://127.0.0.1:9", "http://127.0.0.1:9"], say=lambda _: None)


# -- snapshots -----------------------------------------------------------------------------------------------

STATS_A = {"ttft_s": 0.08, "decode_tokens_per_s": 212.4, "total_s": 0.6, "prompt_tokens": 21, "completion_tokens": 110}
STATS_B = {"ttft_s": 0.19, "decode_tokens_per_s": 148.9, "total_s": 0.9, "prompt_tokens": 21, "completion_tokens": 104}
REPLY = """Here is a **short** answer:

- BF16 keeps full precision
- W4A16 stores weights in 4 bits

```python
print("hello")
```
"""


def fixed_side(label: str, port: int, reply: str, stats: dict[str, Any]) -> Side:
    url = f"http://127.0.0.1:{port}"
    session = ChatSession(
        [Turn("user", "Compare the two formats in two bullets."), Turn("assistant", reply, stats=stats)]
    )
    conv = Conversation(ChatClient(url), model="tiny-chat", session=session, meta=Meta(server_url=url, profile=label))
    conv.last_stats = stats
    return Side(Endpoint(url, None, "tiny-chat", label, profile=label), conv)


def fixed_app() -> CompareApp:
    first = fixed_side("bf16", 9, REPLY, STATS_A)
    second = fixed_side("w4a16", 9, REPLY.replace("short", "brief"), STATS_B)
    return CompareApp(first, second, poll_every=3600)


async def settle_fixed(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, CompareApp)
    screen = app.compare
    await wait_for(pilot, lambda: all(len(p.messages.children) == 2 for p in screen.panes))
    await screen.settled()
    poller = screen._poller
    assert poller is not None
    poller.cancel()  # no poll after this: the figures below stay
    await asyncio.wait([poller])
    (first, second) = screen.sides
    first.gpu_bytes, first.kv_usage = 18 * GIB, 0.12
    second.gpu_bytes, second.kv_usage = 7 * GIB, 0.05
    screen._round_stats = [STATS_A, STATS_B]
    screen._round_open = [True, True]
    screen._end_round(0)
    screen._end_round(1)
    screen._refresh_all()
    prompt = screen.query_one(PromptArea)
    prompt.cursor_blink = False  # a blinking cursor would make the picture depend on the moment it is taken
    prompt.text = "And which one is faster?"
    await settled(pilot)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_compare_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(fixed_app(), terminal_size=size, run_before=settle_fixed)


async def test_compare_with_from_the_chat_palette_puts_another_profile_beside_this_chat(
    profiles: ServerManager, servers: tuple[Standin, Standin]
) -> None:
    # The chat is attached to a server by URL; "Compare with…" offers the profiles, starts the one picked, and
    # one prompt then goes to both; F12 goes back to the chat.
    from apphelpers import app_for, screen_text

    from tuichat.config import load_config
    from tuichat.ui.screens.dialogs import ChoiceScreen

    here, _ = servers
    app = app_for(url=here.url, api_key=here.api_key, config=load_config(), gpu_reader=FakeGpuReader())
    app.server_link.manager = profiles  # the fixture's manager stops what the test started
    async with asyncio.timeout(60):
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: "ready" in screen_text(app))  # type: ignore[arg-type]
            await pilot.press("ctrl+p")
            await pilot.press(*"Compare with")
            await wait_for(pilot, lambda: "Compare with…" in screen_text(app))  # type: ignore[arg-type]
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen))
            assert "starts it" in screen_text(app)  # type: ignore[arg-type]
            await pilot.press("enter")  # the first profile: bf16
            await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), timeout=30)
            screen = app.screen
            assert isinstance(screen, CompareScreen)
            assert [s.endpoint.label for s in screen.sides] == [here.url, "bf16"]
            assert profiles.find("bf16") is not None  # started through the launcher, as `tuichat compare` does
            await wait_for(pilot, lambda: bool(screen.query(PromptArea)) and screen.query_one(PromptArea).has_focus)
            await pilot.press(*"hello both", "enter")
            await wait_for(pilot, lambda: all(s.conversation.last_stats for s in screen.sides), timeout=20)
            await pilot.press("f12")
            await wait_for(pilot, lambda: app.screen is app.chat_screen)
            assert not any(s.conversation.streaming for s in screen.sides)
