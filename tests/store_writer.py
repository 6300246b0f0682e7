"""Helper for test_store's kill -9 test: streams a reply into a history database until it is killed.

Run as `python store_writer.py DB_PATH`. Prints `READY <conversation id> <reply id>` once the user message
and a first piece of the reply are committed, then keeps growing the reply as tuichat does while tokens
arrive, until the test kills it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tuichat.store import Store

USER_TEXT = "Tell me a long story about a lighthouse"


def main() -> None:
    store = Store.open(Path(sys.argv[1]))
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
