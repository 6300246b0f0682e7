"""`tuichat compare A B`: a small App around the compare screen, so comparing needs nothing of the chat app.

A and B are URLs (keys as for `--url`: `--api-key` for both, `--key-a` / `--key-b` for one side) or the names of
running launch profiles. Both conversations are saved to the history, each title naming its partner.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from textual.app import App
from textual.binding import Binding

from tuichat.batchcli import Endpoint, endpoint_from_spec
from tuichat.client import ChatClient
from tuichat.config import load_config
from tuichat.conversation import Conversation, Meta
from tuichat.sampling import Sampling
from tuichat.store import Store
from tuichat.ui.compare_screen import CompareScreen, Side


def make_side(endpoint: Endpoint, store: Store | None, sampling: Sampling, stall_timeout: float = 120.0) -> Side:
    client = ChatClient(endpoint.url, endpoint.api_key, stall_timeout=stall_timeout)
    meta = Meta(server_url=endpoint.url, profile=endpoint.profile, lmdeploy_version=endpoint.lmdeploy_version)
    conv = Conversation(client, model=endpoint.model, sampling=sampling, store=store, meta=meta)
    return Side(endpoint, conv)


class CompareApp(App[int]):
    """Runs one CompareScreen; closes both conversations (stopping any reply, saved as interrupted) on quit."""

    TITLE = "tuichat compare"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(self, first: Side, second: Side, store: Store | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sides = (first, second)
        self.store = store
        self.compare = CompareScreen(first, second, store=store)

    def on_mount(self) -> None:
        self.push_screen(self.compare)

    async def on_unmount(self) -> None:
        for side in self.sides:
            await side.conversation.aclose()
        if self.store is not None:
            self.store.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuichat compare", description="Send each message to two servers at once.")
    p.add_argument("a", help="a URL or a running launch profile")
    p.add_argument("b", help="a URL or a running launch profile")
    p.add_argument("--api-key", help="the API key for both URLs")
    p.add_argument("--key-a", help="the API key for A (a URL)")
    p.add_argument("--key-b", help="the API key for B (a URL)")
    p.add_argument("--model-a", help="model id on A (default: the first it lists)")
    p.add_argument("--model-b", help="model id on B (default: the first it lists)")
    return p


def make_compare_app(argv: Sequence[str]) -> CompareApp:
    args = parser().parse_args(list(argv))
    first = endpoint_from_spec(args.a, args.key_a or args.api_key, args.model_a)
    second = endpoint_from_spec(args.b, args.key_b or args.api_key, args.model_b)
    config = load_config()
    store = Store.open()
    return CompareApp(
        make_side(first, store, config.sampling, config.ui.stall_timeout),
        make_side(second, store, config.sampling, config.ui.stall_timeout),
        store,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`tuichat compare A B ...` (argv without the word `compare`); a TuichatError goes to the CLI, which prints it."""
    app = make_compare_app(sys.argv[1:] if argv is None else argv)
    app.run()
    return int(app.return_code or 0)
