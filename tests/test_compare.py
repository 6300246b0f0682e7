"""`tuichat compare`: one prompt to two servers (two stand-ins, real subprocesses), both columns streaming at once,
per-side figures, the faster side marked, stop/retry/undo on both, two linked conversations in the history; and SVG
snapshots at 80x24 and 120x40 (fixed turns and figures, so timings never change the picture)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from apphelpers import wait_for
from standin.harness import Standin, run_standin
from textual.pilot import Pilot

from tuichat.batchcli import Endpoint
from tuichat.chat import ChatSession, Turn
from tuichat.client import ChatClient
from tuichat.conversation import Conversation, Meta
from tuichat.sampling import Sampling
from tuichat.store import Store, default_path
from tuichat.ui.compare_app import CompareApp, make_compare_app, make_side
from tuichat.ui.compare_screen import ComparePane, CompareScreen, Side
from tuichat.ui.widgets import PromptArea

SIZES = [(80, 24), (120, 40)]
ONE = ("--fake-tokens-per-chunk", "1")


@pytest.fixture
def servers() -> Iterator[tuple[Standin, Standin]]:
    # B is four times slower, so which side is faster is never in doubt
    with run_standin("--fake-rate", "60", *ONE) as a, run_standin("--fake-rate", "25", *ONE) as b:
        yield a, b


def app_for(a: Standin, b: Standin, store: Store | None = None) -> CompareApp:
    first = make_side(Endpoint(a.url, a.api_key, None, "bf16", profile="bf16"), store, Sampling())
    second = make_side(Endpoint(b.url, b.api_key, None, "w4a16", profile="w4a16"), store, Sampling())
    return CompareApp(first, second, store)


def screen_of(app: CompareApp) -> CompareScreen:
    return app.compare


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


async def test_one_message_streams_on_both_sides_at_once_and_the_faster_is_marked(
    servers: tuple[Standin, Standin],
) -> None:
    a, b = servers
    store = Store.open(default_path())
    app = app_for(a, b, store)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = screen_of(app)
        await send(pilot, "hi [[reply:" + " ".join(f"w{i}" for i in range(60)) + "]]")
        await wait_for(pilot, lambda: idle(screen), 15)
        await screen.settled()
        left, right = screen.panes
        # both streamed at once: B's first token came long before A had finished (one after the other, B would
        # have waited for all of A)
        stats = [side.conversation.last_stats or {} for side in screen.sides]
        assert stats[1]["ttft_s"] < stats[0]["total_s"] / 2
        assert left.faster and not right.faster
        await wait_for(pilot, lambda: "◆ faster" in pane_text(left))
        assert "◆ faster" not in pane_text(right)
        for pane in (left, right):
            await wait_for(pilot, lambda p=pane: "w57 w58 w59" in pane_text(p) and "TTFT" in pane_text(p))
            assert "tok/s" in pane_text(pane) and "60 tokens" in pane_text(pane)
        assert "bf16 · tiny-chat · " + a.url in pane_text(left)
        assert "w4a16 · tiny-chat · " + b.url in pane_text(right)
    store = Store.open(default_path())
    convs = store.list_conversations()
    assert len(convs) == 2
    titles = sorted(c.title for c in convs)
    assert any("⇄ #" in t and "B w4a16" in t for t in titles) and any("A bf16" in t for t in titles)
    for conv in convs:
        assert [m.role for m in store.messages(conv.id)] == ["user", "assistant"]
    store.close()


async def test_stop_retry_and_undo_act_on_both_sides(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    app = app_for(a, b)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = screen_of(app)
        for server in servers:
            server.configure(words=400)
        await send(pilot, "tell me a long story")
        await wait_for(pilot, lambda: all(len(s.conversation.chat.turns) == 2 for s in screen.sides))
        await wait_for(pilot, lambda: all(s.conversation.chat.turns[-1].content for s in screen.sides))
        await pilot.press("escape")
        await wait_for(pilot, lambda: idle(screen))
        assert [s.conversation.chat.turns[-1].state for s in screen.sides] == ["stopped", "stopped"]
        await screen.settled()
        assert all("stopped by you" in pane_text(p) for p in screen.panes)

        for server in servers:
            server.configure(words=5)  # the retried replies are short
        await pilot.press("ctrl+r")
        await wait_for(
            pilot, lambda: all(s.conversation.chat.turns[-1].content == "w1 w2 w3 w4 w5" for s in screen.sides)
        )
        await wait_for(pilot, lambda: idle(screen))
        assert [s.conversation.chat.turns[-1].state for s in screen.sides] == ["done", "done"]
        assert all(len(s.conversation.chat.turns) == 2 for s in screen.sides)

        await pilot.press("f6")
        await wait_for(pilot, lambda: all(not s.conversation.chat.turns for s in screen.sides))
        assert screen.query_one(PromptArea).text == "tell me a long story"
        await screen.settled()
        assert all("story" not in pane_text(p) and "w1 w2" not in pane_text(p) for p in screen.panes)


async def test_a_side_that_fails_shows_why_and_the_other_side_still_answers(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    first = make_side(Endpoint(a.url, a.api_key, None, "bf16", profile="bf16"), None, Sampling())
    second = make_side(Endpoint(b.url, "wrong-key", "tiny-chat", b.url), None, Sampling())
    app = CompareApp(first, second)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = screen_of(app)
        await send(pilot, "hello [[reply:fine]]")
        await wait_for(pilot, lambda: idle(screen) and first.conversation.last_stats is not None)
        await screen.settled()
        left, right = screen.panes
        assert "fine" in pane_text(left)
        assert "401" in pane_text(right) and "--api-key" in pane_text(right)
        assert not left.faster and not right.faster  # no race with only one runner
        # the message went back to the prompt only once, though one side kept it
        assert screen.query_one(PromptArea).text == "hello [[reply:fine]]"


async def test_a_narrow_terminal_shows_one_side_at_a_time_and_a_key_switches(servers: tuple[Standin, Standin]) -> None:
    a, b = servers
    app = app_for(a, b)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = screen_of(app)
        left, right = screen.panes
        assert left.display and not right.display
        assert screen.query_one("#scoreboard").display
        await pilot.press("f4")
        await wait_for(pilot, lambda: right.display and not left.display)
        await pilot.resize_terminal(140, 40)
        await wait_for(pilot, lambda: left.display and right.display)
        assert not screen.query_one("#scoreboard").display


def test_compare_of_a_profile_that_is_not_running_is_a_sentence() -> None:
    from tuichat.errors import TuichatError

    with pytest.raises(TuichatError, match="tuichat serve internlm2-pytorch --detach"):
        make_compare_app(["internlm2-pytorch", "http://127.0.0.1:23334"])  # a built-in profile, not started


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
    first = fixed_side("bf16", 23333, REPLY, STATS_A)
    second = fixed_side("w4a16", 23334, REPLY.replace("short", "brief"), STATS_B)
    return CompareApp(first, second)


async def settle_fixed(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, CompareApp)
    screen = app.compare
    await wait_for(pilot, lambda: all(len(p.messages.children) == 2 for p in screen.panes))
    screen._round_stats = [STATS_A, STATS_B]
    screen._end_round(0)
    screen._refresh_scoreboard()
    screen.query_one(PromptArea).text = "And which one is faster?"
    await pilot.pause(0.1)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_compare_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(fixed_app(), terminal_size=size, run_before=settle_fixed)


def test_tuichat_compare_from_the_cli_names_a_profile_that_is_not_running(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tuichat import cli

    assert cli.main(["compare", "http://127.0.0.1:9", "internlm2-pytorch"]) == 1  # a built-in, not started
    err = capsys.readouterr().err
    assert "profile 'internlm2-pytorch' is not running: start it with `tuichat serve internlm2-pytorch --detach`" in err
    assert "Traceback" not in err


def test_tuichat_compare_names_an_unknown_profile_as_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    from tuichat import cli

    assert cli.main(["compare", "http://127.0.0.1:9", "nosuchprofile"]) == 1
    err = capsys.readouterr().err
    assert "no profile called 'nosuchprofile' (known: " in err and "is not running" not in err
