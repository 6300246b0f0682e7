"""`tuichat batch PROMPTS --out OUT.jsonl`: run a file of prompts through a server, N at a time (the tutorial's
`pipeline(prompts)`), on the conversation engine.

PROMPTS is JSONL (`{"prompt": ...}` or `{"messages": [...]}` per line, with optional sampling, either under
`"sampling"` or as top-level keys such as `"max_tokens"`) or plain text, one prompt per line. Each input gives one
JSON object in OUT, in input order: the input, `line`, `text`, `finish_reason`, `prompt_tokens`,
`completion_tokens`, `ttft_s`, `seconds`, and `error` where that prompt failed (a failed prompt never stops the
batch).

Nothing finished is ever lost: OUT receives rows as soon as every earlier row is there too, and rows that finished
ahead of an earlier one wait in `OUT.pending` (appended and flushed the moment they finish). Running the same
command again resumes: rows already in OUT or OUT.pending without an error are kept and not asked again; failed
ones are asked again. Ctrl+C stops cleanly after writing every finished row.

Also here: `Endpoint` and `resolve_endpoint`, which turn a profile name or a URL into what to talk to (a
compare view will use them too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tuichat.chat.client import ChatClient, ChatError
from tuichat.chat.conversation import Conversation, Event, ReplyDelta, ReplyFailed, ReplyFinished
from tuichat.chat.sampling import FIELD_BY_NAME, Sampling, SamplingError, check_value, sampling_from_table
from tuichat.chat.turns import ChatSession, Turn
from tuichat.errors import TuichatError

PENDING_SUFFIX = ".pending"
MAX_CONCURRENCY = 512


# -- what to talk to -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A server to send to: its URL, key, model (None: the first it lists) and how to name it to the user."""

    url: str
    api_key: str | None = field(repr=False)
    model: str | None
    label: str
    profile: str | None = None
    lmdeploy_version: str | None = None


def looks_like_url(spec: str) -> bool:
    return "://" in spec or (":" in spec and spec.rsplit(":", 1)[1].isdigit())


def resolve_endpoint(
    *, url: str | None = None, api_key: str | None = None, profile: str | None = None, model: str | None = None
) -> Endpoint:
    """A URL (with `api_key`, as for `--url`), or a launch profile that tuichat started and that is running."""
    if profile is not None:
        from tuichat.server.launcher import ServerManager

        manager = ServerManager()
        try:
            server = manager.find(profile)
            if server is None:
                from tuichat.config import load_config

                known = load_config().profiles
                if profile not in known:
                    names = ", ".join(sorted(known)) or "none"
                    raise TuichatError(
                        f"no profile called '{profile}' (known: {names}); see `tuichat profiles`, or pass a URL."
                    )
                raise TuichatError(
                    f"profile '{profile}' is not running: start it with `tuichat serve {profile} --detach` "
                    "(see `tuichat ps` for the running ones), or pass --url."
                )
            return Endpoint(
                server.url,
                server.api_key,
                model or server.model_name,
                profile,
                profile=profile,
                lmdeploy_version=server.record.lmdeploy_version,
            )
        finally:
            manager.close()
    from tuichat.chat.target import normalise_url

    checked = normalise_url(url or "", "--url")
    return Endpoint(checked, api_key or None, model, checked)


def endpoint_from_spec(spec: str, api_key: str | None = None, model: str | None = None) -> Endpoint:
    """One side of a comparison (A or B): a URL or the name of a running profile."""
    if looks_like_url(spec):
        return resolve_endpoint(url=spec, api_key=api_key, model=model)
    return resolve_endpoint(profile=spec, model=model)


# -- the prompts ---------------------------------------------------------------------------------------------


@dataclass
class BatchItem:
    """One input: its line in PROMPTS, the input as written to OUT, and what to send (or why it cannot go)."""

    line: int
    source: dict[str, Any]
    history: list[Turn] = field(default_factory=list)
    message: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    error: str | None = None


def read_prompts(path: Path, base: Sampling) -> list[BatchItem]:
    """The inputs of PROMPTS; a line that cannot be used becomes an item with an error, not a failure of all."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuichatError(f"no file {path}: give a JSONL or text file of prompts") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TuichatError(f"cannot read {path}: {exc}") from None
    lines = [(n, raw) for n, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    if not lines:
        raise TuichatError(f"{path} holds no prompts: write one per line, as text or JSONL")
    jsonl = lines[0][1].lstrip().startswith("{")
    items = []
    for n, raw in lines:
        items.append(_parse_line(n, raw, base) if jsonl else _item(n, {"prompt": raw}, raw, [], base))
    return items


def _item(n: int, source: dict[str, Any], message: str, history: list[Turn], sampling: Sampling) -> BatchItem:
    return BatchItem(n, source, history, message, sampling)


def _parse_line(n: int, raw: str, base: Sampling) -> BatchItem:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return BatchItem(n, {"input": raw}, error=f"line {n} is not valid JSON ({exc}); fix it or make it plain text")
    if not isinstance(data, dict):
        return BatchItem(n, {"input": data}, error=f'line {n} must be a JSON object with "prompt" or "messages"')
    try:
        sampling = _line_sampling(data, base)
    except SamplingError as exc:
        return BatchItem(n, data, error=f"line {n}: {exc}")
    if isinstance(data.get("prompt"), str):
        return _item(n, data, data["prompt"], [], sampling)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return BatchItem(n, data, error=f'line {n} has neither a "prompt" string nor a "messages" list')
    history: list[Turn] = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return BatchItem(n, data, error=f"line {n}: each message needs a role of system, user or assistant")
        if not isinstance(m.get("content"), str):
            return BatchItem(n, data, error=f"line {n}: message content must be text (images are not batched)")
        if m["role"] == "system":
            sampling = sampling.with_value("system_prompt", m["content"])
        else:
            history.append(Turn(m["role"], m["content"]))
    if not history or history[-1].role != "user":
        return BatchItem(n, data, error=f"line {n}: the last message must be the user's")
    last = history.pop()
    return _item(n, data, last.content, history, sampling)


def _line_sampling(data: Mapping[str, Any], base: Sampling) -> Sampling:
    sampling = base
    table = data.get("sampling")
    if table is not None:
        if not isinstance(table, dict):
            raise SamplingError("sampling", "must be an object of sampling values")
        for key, value in sampling_from_table(table).to_table().items():
            sampling = sampling.with_value(key, tuple(value) if isinstance(value, list) else value)
    for key, value in data.items():
        if key in FIELD_BY_NAME:
            sampling = sampling.with_value(key, check_value(key, value))
    return sampling


# -- the results ---------------------------------------------------------------------------------------------


class ResultWriter:
    """Writes rows to OUT in input order as soon as they can go; rows that finished early wait in OUT.pending."""

    def __init__(self, out: Path, items: Sequence[BatchItem]) -> None:
        self.out = out
        self.pending = out.with_name(out.name + PENDING_SUFFIX)
        self.order = [item.line for item in items]
        by_line = {item.line: item for item in items}
        self.done: dict[int, dict[str, Any]] = {}
        for row in _read_rows(self.out) + _read_rows(self.pending):
            line = row.get("line")
            item = by_line.get(line) if isinstance(line, int) else None
            if item is None or _input_of(row) != item.source:
                raise TuichatError(
                    f"{out} holds results for other prompts (line {line} differs): choose another --out, "
                    "or delete it to start again."
                )
            if not row.get("error"):
                self.done[item.line] = row
        self.resumed = len(self.done)
        self.written = 0
        # Start OUT again from what is safely there: the contiguous run of finished rows; the rest stay pending.
        self._advance()
        _write_atomic(self.out, "".join(_dump(self.done[line]) for line in self.order[: self.written]))
        rest = [self.done[line] for line in self.order[self.written :] if line in self.done]
        _write_atomic(self.pending, "".join(_dump(r) for r in rest))
        self._out: IO[str] = open(self.out, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
        self._pending: IO[str] = open(self.pending, "a", encoding="utf-8")  # noqa: SIM115

    def _advance(self) -> list[int]:
        moved = []
        while self.written < len(self.order) and self.order[self.written] in self.done:
            moved.append(self.order[self.written])
            self.written += 1
        return moved

    def add(self, row: dict[str, Any]) -> None:
        line = int(row["line"])
        self.done[line] = row
        moved = self._advance()
        if line not in moved:
            self._pending.write(_dump(row))
            _flush(self._pending)
        if moved:
            self._out.write("".join(_dump(self.done[m]) for m in moved))
            _flush(self._out)

    def close(self, complete: bool) -> None:
        self._out.close()
        self._pending.close()
        if complete:
            self.pending.unlink(missing_ok=True)


def _input_of(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in RESULT_KEYS}


RESULT_KEYS = frozenset(
    {"line", "text", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_s", "seconds", "error"}
)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise TuichatError(f"cannot read {path}: {exc}") from None
    rows = []
    for raw in text.splitlines():
        try:
            row = json.loads(raw)
        except ValueError:
            continue  # a row cut by a crash mid-write: that prompt is simply asked again
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _dump(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _flush(fh: IO[str]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TuichatError(f"cannot write {path}: {exc}") from None


# -- running -------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    total: int
    done: int = 0
    errors: int = 0
    in_flight: int = 0
    tokens: int = 0  # completion tokens of this run (chunks while a reply streams, the usage figure once done)
    prompt_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def line(self, width: int = 24) -> str:
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        errs = f" · {self.errors} error{'s' if self.errors != 1 else ''}" if self.errors else ""
        return (
            f"[{bar}] {self.done}/{self.total}{errs} · {self.in_flight} in flight · {self.rate():,.0f} tok/s"
            f" · {_duration(time.monotonic() - self.started)}"
        )


async def run_item(client: ChatClient, model: str, item: BatchItem, progress: Progress) -> dict[str, Any]:
    """One prompt through a fresh Conversation; returns its row (with `error` if it failed)."""
    row: dict[str, Any] = {"line": item.line, **item.source}
    if item.error is not None:
        row["error"] = item.error
        return row
    finished: list[ReplyFinished] = []
    failed: list[ReplyFailed] = []
    counted = 0

    def on_event(event: Event) -> None:
        nonlocal counted
        if isinstance(event, ReplyDelta):
            counted += 1
            progress.tokens += 1
        elif isinstance(event, ReplyFinished):
            finished.append(event)
        elif isinstance(event, ReplyFailed):
            failed.append(event)

    conv = Conversation(
        client, model=model, sampling=item.sampling, session=ChatSession(list(item.history)), on_event=on_event
    )
    started = time.monotonic()
    try:
        conv.send(item.message)
        await conv.wait()
    except asyncio.CancelledError:
        await conv.stop()
        raise
    stats = finished[0].stats if finished else {}
    tokens = stats.get("completion_tokens")
    if isinstance(tokens, int):
        progress.tokens += tokens - counted  # the live chunk count, corrected to the server's token count
    row.update(
        text=finished[0].reply.content if finished else "",
        finish_reason=stats.get("finish_reason"),
        prompt_tokens=stats.get("prompt_tokens"),
        completion_tokens=tokens,
        ttft_s=stats.get("ttft_s"),
        seconds=round(stats.get("total_s") or (time.monotonic() - started), 4),
    )
    if failed:
        row["error"] = failed[0].error
    elif not finished:
        row["error"] = "the reply was stopped before its first token"
    return row


async def run_batch(
    endpoint: Endpoint,
    items: Sequence[BatchItem],
    writer: ResultWriter,
    *,
    concurrency: int,
    progress_out: IO[str] | None = None,
    stall_timeout: float = 120.0,
) -> tuple[Progress, bool]:
    """Run every item not already done; returns the progress and whether it ran to the end (not stopped)."""
    todo = [item for item in items if item.line not in writer.done]
    progress = Progress(total=len(todo))
    clients = [ChatClient(endpoint.url, endpoint.api_key, stall_timeout=stall_timeout) for _ in range(concurrency)]
    try:
        model = endpoint.model or await _first_model(clients[0])
        queue: asyncio.Queue[BatchItem] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)

        async def worker(client: ChatClient) -> None:
            while not queue.empty():
                item = queue.get_nowait()
                progress.in_flight += 1
                try:
                    row = await run_item(client, model, item, progress)
                finally:
                    progress.in_flight -= 1
                progress.done += 1
                if row.get("error"):
                    progress.errors += 1
                else:
                    if isinstance(row.get("ttft_s"), float | int):
                        progress.ttfts.append(float(row["ttft_s"]))
                    progress.prompt_tokens += row.get("prompt_tokens") or 0
                writer.add(row)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
        workers = [asyncio.create_task(worker(c)) for c in clients[: max(1, min(concurrency, len(todo)))]]
        shower = asyncio.create_task(_show_progress(progress, progress_out)) if progress_out else None
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([*workers, stopper], return_when=asyncio.FIRST_COMPLETED)
            while not stop.is_set() and not all(w.done() for w in workers):
                await asyncio.wait([*workers, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
            for task in [*workers, stopper]:
                task.cancel()
            await asyncio.gather(*workers, stopper, return_exceptions=True)
            if shower is not None:
                shower.cancel()
                await asyncio.gather(shower, return_exceptions=True)
                _progress_line(progress, progress_out, final=True)
        for w in workers:
            exc = None if w.cancelled() else w.exception()
            if exc is not None:
                raise exc
        return progress, not stop.is_set()
    finally:
        for client in clients:
            await client.aclose()


async def _first_model(client: ChatClient) -> str:
    try:
        models = await client.list_models()
    except ChatError as exc:
        raise TuichatError(exc.message) from None
    if not models:
        raise TuichatError("the server lists no model under /v1/models: check how it was started, or pass --model.")
    return models[0]


async def _show_progress(progress: Progress, out: IO[str] | None) -> None:
    tty = out is not None and out.isatty()
    while True:
        await asyncio.sleep(0.2 if tty else 5.0)
        _progress_line(progress, out)


def _progress_line(progress: Progress, out: IO[str] | None, final: bool = False) -> None:
    if out is None:
        return
    if out.isatty():
        out.write("\r\x1b[K" + progress.line() + ("\n" if final else ""))
    else:
        out.write(progress.line() + "\n")
    out.flush()


def summary(progress: Progress, resumed: int, wall: float) -> str:
    ttfts = sorted(progress.ttfts)
    p50 = statistics.median(ttfts) if ttfts else None
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))] if ttfts else None
    rate = progress.tokens / wall if wall > 0 else 0.0
    parts = [
        ("prompts", f"{progress.done}" + (f" (+{resumed} from an earlier run)" if resumed else "")),
        ("errors", str(progress.errors)),
        ("tokens", f"{progress.prompt_tokens:,} prompt, {progress.tokens:,} generated"),
        ("throughput", f"{rate:,.1f} tok/s"),
        ("TTFT p50/p95", f"{_secs(p50)} / {_secs(p95)}"),
        ("wall time", _duration(wall)),
    ]
    return "\n".join(f"{name:>13}: {value}" for name, value in parts)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


# -- the command ---------------------------------------------------------------------------------------------


def add_subcommands(subparsers: Any) -> None:
    batch = subparsers.add_parser(
        "batch",
        help="run a file of prompts through a server, N at a time, into a JSONL file",
        description="Run PROMPTS (JSONL with prompt or messages per line, or text with one prompt per line) "
        "through a server and write one JSON object per input to OUT, in input order. Run it again to resume.",
    )
    batch.add_argument("prompts", type=Path, help="JSONL or plain-text file of prompts")
    where = batch.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the server, e.g. http://127.0.0.1:23333")
    where.add_argument("--profile", help="a running launch profile (see `tuichat ps`)")
    batch.add_argument("--api-key", help="the server's API key (with --url)")
    batch.add_argument("--model", help="model id (default: the server's first)")
    batch.add_argument("-c", "--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    batch.add_argument("--out", type=Path, required=True, help="where the results go (JSONL)")
    batch.add_argument("--max-tokens", type=int, help="longest reply, for lines that do not set max_tokens")
    batch.add_argument("--temperature", type=float, help="for lines that do not set temperature")
    batch.add_argument("--stall-timeout", type=float, default=120.0, help="seconds of silence before giving up")


def main(argv: Sequence[str] | None = None) -> int:
    """`tuichat batch ...` without the rest of the CLI (also `python -m tuichat.cli.batch batch ...`)."""
    parser = argparse.ArgumentParser(prog="tuichat")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except TuichatError as exc:
        print(f"tuichat: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise TuichatError(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if args.api_key and args.profile:
        raise TuichatError("--api-key goes with --url; a profile's key is read from its own record")
    base = Sampling()
    try:
        if args.max_tokens is not None:
            base = base.with_value("max_tokens", check_value("max_tokens", args.max_tokens))
        if args.temperature is not None:
            base = base.with_value("temperature", check_value("temperature", args.temperature))
    except SamplingError as exc:
        raise TuichatError(f"--{exc.name.replace('_', '-')}: {exc.message}") from None
    endpoint = resolve_endpoint(url=args.url, api_key=args.api_key, profile=args.profile, model=args.model)
    items = read_prompts(args.prompts, base)
    writer = ResultWriter(args.out, items)
    complete = False
    started = time.monotonic()
    try:
        if writer.resumed:
            print(f"resuming: {writer.resumed} of {len(items)} already done in {args.out}", file=sys.stderr)
        progress, ran_out = asyncio.run(
            run_batch(
                endpoint,
                items,
                writer,
                concurrency=args.concurrency,
                progress_out=sys.stderr,
                stall_timeout=args.stall_timeout,
            )
        )
        complete = ran_out and len(writer.done) == len(items)
    finally:
        writer.close(complete)
    print(summary(progress, writer.resumed, time.monotonic() - started))
    if not ran_out:
        print(
            f"stopped: {len(writer.done)} of {len(items)} prompts done and kept ({args.out}); "
            "run the same command again to do the rest.",
            file=sys.stderr,
        )
        return 130
    if progress.errors:
        print(
            f"{progress.errors} prompt(s) failed: see their error field in {args.out}; run the same command again "
            "to ask them again.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
