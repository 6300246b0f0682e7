"""Helper for tests that need a second tuichat process on the same history database.

`python store_writer.py DB_PATH` (test_store's kill -9 test) streams a reply: it prints
`READY <conversation id> <reply id>` once the user message and a first piece of the reply are committed, then
keeps growing the reply as tuichat does while tokens arrive, until the test kills it.

`python store_writer.py DB_PATH --hold CONV_ID` (test_claims) claims a conversation as a tuichat opening it
does and prints `HELD <pid>` (or `BUSY <pid of the holder>`). Then each line read from stdin is a command:
`release` releases the claim and prints `RELEASED`; `add TEXT` adds a user message and prints `ADDED` (or
`REFUSED <sentence>`). At end of input it closes the store and exits; the test may kill it at any point.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tuichat.chat.holders import HeldBy
from tuichat.chat.store import Store
from tuichat.errors import TuichatError

USER_TEXT = "Tell me a long story about a lighthouse"


def hold(store: Store, conv_id: int) -> None:
    claim = store.claim(conv_id)
    if isinstance(claim, HeldBy):
        print(f"BUSY {claim.pid}", flush=True)
        return
    print(f"HELD {os.getpid()}", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "release":
            claim.release()
            print("RELEASED", flush=True)
        elif command == "add":
            try:
                store.add_message(conv_id, "user", arg)
            except TuichatError as exc:
                print(f"REFUSED {exc}", flush=True)
            else:
                print("ADDED", flush=True)
    store.close()


def main() -> None:
    store = Store.open(Path(sys.argv[1]))
    if sys.argv[2:3] == ["--hold"]:
        hold(store, int(sys.argv[3]))
        return
    conv_id = store.create_conversation(model="stand-in")
    store.add_message(conv_id, "user", USER_TEXT)
    reply_id = store.begin_reply(conv_id, sampling={"temperature": 0.7})
    text = "word0"
    store.update_reply(reply_id, text)
    print(f"READY {conv_id} {reply_id}", flush=True)
    count = 1
    while True:
        text += f" word{count}"
        count += 1
        store.update_reply(reply_id, text)
        time.sleep(0.005)  # paces the loop like streamed tokens; the test never waits on it


if __name__ == "__main__":
    main()
