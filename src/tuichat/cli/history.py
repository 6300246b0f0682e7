"""`tuichat history`, `tuichat export ID` and `tuichat import FILE`: the saved chats from the shell.

The two conversations of one `tuichat compare` run are listed next to each other, each title led by "⇄" and its
side (A or B) with that side's profile or URL.

Everything printed is cleaned of terminal control sequences whether or not stdout is a terminal: a file or a
pipe written today is `cat` to a terminal tomorrow. The store cleans too; this is the last gate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuichat.chat.sanitize import clean, clean_line
from tuichat.errors import TuichatError

if TYPE_CHECKING:
    from tuichat.chat.store import Conversation


def add_subcommands(subparsers: Any) -> None:
    history = subparsers.add_parser("history", help="list saved conversations (id first)")
    history.add_argument("-n", "--limit", type=int, default=50, help="how many, newest first (default 50)")
    history.add_argument("--search", metavar="TEXT", help="full-text search across all messages")
    export = subparsers.add_parser("export", help="print a saved conversation")
    export.add_argument("id", type=int, help="conversation id (see `tuichat history`)")
    export.add_argument("--format", choices=("md", "json"), default="md")
    imp = subparsers.add_parser("import", help="read an exported JSON conversation back")
    imp.add_argument("file", help="a file written by `tuichat export ID --format json` (- for stdin)")


def _ago(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def pair_mark(conv: Conversation) -> str:
    """How a side of a compare run leads its title ("⇄ A bf16 · "); "" for a plain chat."""
    if conv.partner_id is None:
        return ""
    label = clean_line(conv.compare_label or "")
    return f"⇄ {conv.compare_side or '?'}{' ' + label if label else ''} · "


def paired_order(convs: list[Conversation]) -> list[Conversation]:
    """Newest first, but each side of a compare run right after its partner when both are in the list."""
    listed = {c.id for c in convs}
    placed: set[int] = set()
    ordered: list[Conversation] = []
    by_id = {c.id: c for c in convs}
    for conv in convs:
        if conv.id in placed:
            continue
        pair = [conv]
        if conv.partner_id is not None and conv.partner_id in listed and conv.partner_id not in placed:
            pair.append(by_id[conv.partner_id])
            pair.sort(key=lambda c: c.compare_side or "")
        for c in pair:
            placed.add(c.id)
            ordered.append(c)
    return ordered


def run(args: argparse.Namespace) -> int:
    from tuichat.chat.store import Store
    from tuichat.chat.transfer import export_conversation, import_conversation

    try:
        with Store.open() as store:
            if args.command == "history":
                if args.search:
                    hits = store.search(args.search, limit=args.limit)
                    if not hits:
                        print(f"nothing matches '{clean_line(args.search)}'", file=sys.stderr)
                        return 1
                    print(f"{'id':>5}  {'message':>7}  {'title':<30}  snippet")
                    for hit in hits:
                        title = clean_line(hit.title)[:30]
                        snippet = clean_line(hit.snippet)
                        print(f"{hit.conversation_id:>5}  {hit.message_id:>7}  {title:<30}  {snippet}")
                    return 0
                convs = store.list_conversations(limit=args.limit)
                if not convs:
                    print("no saved conversations yet")
                    return 0
                print(f"{'id':>5}  {'title':<40}  {'updated':<16}  {'messages':>8}")
                for c in paired_order(convs):
                    title = (pair_mark(c) + clean_line(c.title))[:40]
                    print(f"{c.id:>5}  {title:<40}  {_ago(c.updated):<16}  {c.message_count:>8}")
                if any(c.partner_id is not None for c in convs):
                    print("⇄ = the two sides (A, B) of one `tuichat compare` run, listed together")
                return 0
            if args.command == "export":
                if store.get_conversation(args.id) is None:
                    raise TuichatError(f"no conversation {args.id}: see `tuichat history` for the ids")
                text = export_conversation(store, args.id, args.format)
                # JSON escapes C0 controls but not C1 or bidi ones; cleaning JSON text keeps it valid JSON.
                sys.stdout.write(clean(text))
                return 0
            if args.command == "import":
                text = sys.stdin.read() if args.file == "-" else _read(Path(args.file))
                new_id = import_conversation(store, text)
                print(f"imported as conversation {new_id}")
                return 0
    except TuichatError as exc:
        print(f"tuichat: {exc}", file=sys.stderr)
        return 1
    return 2


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuichatError(f"no file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TuichatError(f"cannot read {path}: {exc}") from None
