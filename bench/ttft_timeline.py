"""An in-process timeline of the first word's path, for `BENCH_TUICHAT_PRELUDE` (issue 15).

    BENCH_TUICHAT_PRELUDE="exec(open('bench/ttft_timeline.py').read())" python bench/run.py --scenarios stream ...
    python bench/ttft_timeline.py show [DIR]      # one line per run: when each step began, in ms from Enter
    python bench/ttft_timeline.py join REPORT.json [DIR]   # the bench's own stamps beside each run's timeline

It marks, on tuichat's own clock: the Enter key's bytes, the send, the engine's events, the request's headers
out and the response read, the held echo's release, each flush and write, each screen update and layout, the
frame with the first word handed to the terminal writer and written, the status pane's polls, every collection,
every message that took over 1 ms, and what makes a frame come (layout and update requests posted to the screen,
its idle, its update timer resumed). Each tuichat process writes `tl-PID.txt` into TTFT_TIMELINE_DIR (default
/tmp/tuichat-timeline; the bench passes no environment through, so the folder is fixed). The instrumentation
costs a little itself: read the order and the gaps, not the last millisecond.
"""

from __future__ import annotations

import sys

TIMELINE_DIR = "/tmp/tuichat-timeline"


def install() -> None:
    import functools
    import gc
    import inspect
    import os
    import threading
    import time

    marks: list[tuple[float, str]] = []
    mark = lambda text: marks.append((time.monotonic(), text))  # noqa: E731

    def wrap(cls: type, name: str, label: str, with_arg: bool = False) -> None:
        original = getattr(cls, name)
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def awrapped(*args: object, **kwargs: object) -> object:
                mark("> " + label + (f" {type(args[1]).__name__}" if with_arg and len(args) > 1 else ""))
                try:
                    return await original(*args, **kwargs)
                finally:
                    mark("< " + label)

            setattr(cls, name, awrapped)
        else:

            @functools.wraps(original)
            def wrapped(*args: object, **kwargs: object) -> object:
                mark("> " + label + (f" {type(args[1]).__name__}" if with_arg and len(args) > 1 else ""))
                try:
                    return original(*args, **kwargs)
                finally:
                    mark("< " + label)

            setattr(cls, name, wrapped)

    import httpcore._async.http11 as h11
    import textual._xterm_parser as xterm
    import textual.app as textual_app
    import textual.screen as textual_screen
    from textual.message_pump import MessagePump

    import tuichat.ui.screens.chat as chat
    import tuichat.ui.screens.chat_base as chat_base
    import tuichat.ui.status_watch as status_watch
    import tuichat.ui.terminal_writer as terminal_writer
    import tuichat.ui.widgets.reply_message as reply_message

    feed = xterm.XTermParser.feed

    def feed_marked(self: object, data: str) -> object:
        if "\r" in data:
            mark("ENTER")
        return feed(self, data)

    xterm.XTermParser.feed = feed_marked  # type: ignore[method-assign]

    def has_w1(text: str) -> bool:
        return "w1 " in text or "w1\x1b" in text

    writer_write = terminal_writer.PromptWriter.write

    def write_marked(self: terminal_writer.PromptWriter, text: str) -> None:
        first = has_w1(text)
        if first:
            mark(f"W1 handed over ({len(text)} bytes, direct={self.direct}, queued={self._queued})")
        writer_write(self, text)
        if first:
            mark("W1 write returned")

    terminal_writer.PromptWriter.write = write_marked  # type: ignore[method-assign]
    wrap(chat.ChatScreen, "send", "send")
    wrap(chat.ChatScreen, "_show_event", "event", with_arg=True)
    wrap(chat.ChatScreen, "_flush", "flush")
    wrap(chat_base.ChatBase, "_release_echo", "release echo")
    wrap(reply_message.ReplyMessage, "write", "reply.write")
    wrap(textual_screen.Screen, "_on_timer_update", "screen update")
    wrap(textual_screen.Screen, "_refresh_layout", "layout")
    wrap(textual_app.App, "_display", "display")
    wrap(h11.AsyncHTTP11Connection, "_send_request_headers", "headers out")
    wrap(h11.AsyncHTTP11Connection, "_receive_event", "http read")
    wrap(status_watch.StatusWatch, "poll", "status poll")
    wrap(status_watch.StatusWatch, "_read_gpu", "gpu read (thread)")
    wrap(status_watch.StatusWatch, "_read_metrics", "metrics read")

    # what makes a frame come: the widgets' requests to the screen, the screen's idle, its update timer resumed
    import textual.timer as textual_timer

    resume = textual_timer.Timer.resume

    def resume_marked(self: textual_timer.Timer) -> None:
        if self.name == "screen_update":
            mark("screen timer resumed")
        resume(self)

    textual_timer.Timer.resume = resume_marked  # type: ignore[method-assign]
    post = MessagePump.post_message

    def post_marked(self: MessagePump, message: object) -> bool:
        name = type(message).__name__
        if name in ("Layout", "Update", "UpdateScroll") and isinstance(self, textual_screen.Screen):
            mark(f"post {name} {type(getattr(message, 'widget', None)).__name__}")
        return post(self, message)  # type: ignore[arg-type]

    MessagePump.post_message = post_marked  # type: ignore[method-assign]
    wrap(textual_screen.Screen, "_on_idle", "screen idle")
    dispatch = MessagePump._dispatch_message

    async def dispatch_timed(self: MessagePump, message: object) -> object:
        started = time.monotonic()
        try:
            return await dispatch(self, message)  # type: ignore[arg-type]
        finally:
            took = time.monotonic() - started
            if took > 0.001:
                marks.append(
                    (started, f"message {type(message).__name__} -> {type(self).__name__} {took * 1e3:.1f} ms")
                )

    MessagePump._dispatch_message = dispatch_timed  # type: ignore[method-assign]
    collecting = [0.0]

    def collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[0] = time.monotonic()
        else:
            took = (time.monotonic() - collecting[0]) * 1e3
            marks.append((collecting[0], f"gc gen{info['generation']} {took:.2f} ms"))

    gc.callbacks.append(collection)
    folder = os.environ.get("TTFT_TIMELINE_DIR", TIMELINE_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"tl-{os.getpid()}.txt")

    def keep() -> None:  # the bench stops tuichat without an exit hook: write what there is, often
        written = 0
        while True:
            time.sleep(0.1)
            if len(marks) != written:
                written = len(marks)
                with open(path, "w") as out:
                    out.writelines(f"{t:.6f} {text}\n" for t, text in list(marks))

    threading.Thread(target=keep, daemon=True, name="timeline").start()


def show(folder: str) -> None:
    import glob
    import os

    steps = [
        ("send", "> send"),
        ("headers", "< headers out"),
        ("opened", "> event ReplyOpened"),
        ("echo", "> release echo"),
        ("delta1", "> event ReplyDelta"),
        ("flush", "> flush"),
        ("layout", "> layout"),
        ("W1", "W1 handed over"),
        ("out", "W1 write returned"),
    ]
    for path in sorted(glob.glob(os.path.join(folder, "tl-*.txt"))):
        with open(path) as lines:
            marks = sorted((float(t), text.strip()) for t, text in (line.split(" ", 1) for line in lines))
        enter = next((t for t, text in marks if text == "ENTER"), None)
        if enter is None:
            continue
        line = []
        for name, prefix in steps:
            at = next(((t - enter) * 1e3 for t, text in marks if t >= enter and text.startswith(prefix)), None)
            line.append(f"{name} {at:6.1f}" if at is not None else f"{name}    –")
        w1 = next((t for t, text in marks if text.startswith("W1 write returned")), enter + 1)
        notes = [
            text
            for t, text in marks
            if enter <= t <= w1 and text.startswith(("gc gen2", "status", "gpu", "metrics", "message"))
        ]
        print(os.path.basename(path), " | ".join(line), "|", "; ".join(notes)[:300])


def join(report_path: str, folder: str) -> None:
    """Each tuichat run of a bench report beside its timeline, on the one monotonic clock: where the first word's
    time went between the harness, tuichat and the tap."""
    import json
    import os
    from statistics import median

    with open(report_path) as file:
        report = json.load(file)
    legs = ["key in", "to tap", "tap->read", "read->W1", "W1->seen", "total"]
    rows: list[list[float]] = []
    print(f"{'pid':>8} " + " ".join(f"{leg:>9}" for leg in legs) + "   (ms)")
    for trial in report.get("stream", []):
        pid = trial.get("pid")
        path = os.path.join(folder, f"tl-{pid}.txt")
        if pid is None or trial.get("seen1_at") is None or not os.path.exists(path):
            continue
        with open(path) as lines:
            marks = sorted((float(t), text.strip()) for t, text in (line.split(" ", 1) for line in lines))
        enter, received, sent1, seen1 = (trial[k] for k in ("enter_at", "received_at", "sent1_at", "seen1_at"))
        key = next((t for t, text in marks if text == "ENTER" and t >= enter - 0.001), None)
        headers = next((t for t, text in marks if key and t >= key and text == "< headers out"), None)
        delta = next((t for t, text in marks if t >= sent1 and text == "> event ReplyDelta"), None)
        w1 = next((t for t, text in marks if t >= sent1 and text.startswith("W1 write returned")), None)
        if None in (key, headers, delta, w1):
            continue
        assert key is not None and delta is not None and w1 is not None
        # "to tap": tuichat's key to the request reaching the tap; "tap->read": the tap's write of chunk 1 to
        # tuichat's engine having it as an event (kernel, event loop and httpx); "W1->seen": tuichat's write of
        # the frame to the harness's read of it (the pty and the harness)
        row = [key - enter, received - key, delta - sent1, w1 - delta, seen1 - w1, seen1 - enter - (sent1 - received)]
        rows.append([x * 1e3 for x in row])
        print(f"{pid:>8} " + " ".join(f"{x * 1e3:9.1f}" for x in row))
    if rows:
        print(f"{'median':>8} " + " ".join(f"{median(col):9.1f}" for col in zip(*rows, strict=True)))


if sys.argv[0] != "-c":  # run as a script; as the bench's prelude (python -c) it installs the marks
    if sys.argv[1:2] == ["show"]:
        show(sys.argv[2] if len(sys.argv) > 2 else TIMELINE_DIR)
    elif sys.argv[1:2] == ["join"]:
        join(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else TIMELINE_DIR)
    else:
        print(__doc__)
else:
    install()
