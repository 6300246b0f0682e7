"""The batch runner behind `tuichat batch` (the tutorial's `pipeline(prompts)`), without any printing: read a file
of prompts, send them N at a time through the conversation engine, write one row per input in input order
(resumable), and measure the run (throughput, TTFT percentiles, and, behind an lmdeploy proxy, how the requests
spread over its nodes).

PROMPTS is JSONL (`{"prompt": ...}` or `{"messages": [...]}` per line, with optional sampling, either under
`"sampling"` or as top-level keys such as `"max_tokens"`) or plain text, one prompt per line. Each input gives one
JSON object in OUT, in input order: the input, `line`, `text`, `finish_reason`, `prompt_tokens`,
`completion_tokens`, `ttft_s`, `seconds`, and `error` where that prompt failed (a failed prompt never stops the
batch).

Nothing finished is ever lost: OUT receives rows as soon as every earlier row is there too, and rows that finished
ahead of an earlier one wait in `OUT.pending` (appended and flushed the moment they finish; a row that has moved on
to OUT is taken out of OUT.pending when the run ends, so the two files together hold each finished row once).
Running again resumes: rows already in OUT or OUT.pending without an error are kept and not asked again; failed
ones are asked again.

The command around it (arguments, progress bar, summaries, --compare, --sweep, plots) is tuichat.cli.batch.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from tuichat.chat.client import ChatClient, ChatError
from tuichat.chat.conversation import Conversation, Event, ReplyDelta, ReplyFailed, ReplyFinished
from tuichat.chat.sampling import FIELD_BY_NAME, Sampling, SamplingError, check_value, sampling_from_table
from tuichat.chat.turns import ChatSession, Turn
from tuichat.errors import TuichatError
from tuichat.server.attribution import read_counters
from tuichat.server.metrics import MetricsError

PENDING_SUFFIX = ".pending"
MAX_CONCURRENCY = 512


# -- what to talk to -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A server to send to: its URL, key, model (None: the first it lists) and how to name it to the user.

    `proxy` is set when the URL is an `lmdeploy serve proxy` (a fleet tuichat launched, or any proxy found by its
    `/nodes/status`); `node_keys` then gives the key of each node tuichat knows, for reading its own /metrics.
    """

    url: str
    api_key: str | None = field(repr=False)
    model: str | None
    label: str
    profile: str | None = None
    lmdeploy_version: str | None = None
    proxy: bool = False
    fleet: str | None = None
    node_keys: Mapping[str, str] = field(default_factory=dict, repr=False)


def looks_like_url(spec: str) -> bool:
    return "://" in spec or (":" in spec and spec.rsplit(":", 1)[1].isdigit())


def resolve_endpoint(
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
    fleet: str | None = None,
    model: str | None = None,
) -> Endpoint:
    """A URL (with `api_key`, as for `--url`), a launch profile that tuichat started and that is running, or a
    fleet (its proxy) that tuichat started and that is running."""
    if fleet is not None:
        return _fleet_endpoint(fleet, model)
    if profile is not None:
        from tuichat.server.launcher import ServerManager

        manager = ServerManager()
        try:
            server = manager.find(profile)
            if server is None:
                from tuichat.config import load_config

                config = load_config()
                if profile in config.fleets:
                    return _fleet_endpoint(profile, model)
                known = config.profiles
                if profile not in known:
                    names = ", ".join(sorted([*known, *config.fleets])) or "none"
                    raise TuichatError(
                        f"no profile or fleet called '{profile}' (known: {names}); see `tuichat profiles`, "
                        "or pass a URL."
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
    from tuichat.server.fleet import probe_proxy

    checked = normalise_url(url or "", "--url")
    # A proxy has no /metrics of its own: knowing it is one is what lets the summary count each node's requests.
    return Endpoint(checked, api_key or None, model, checked, proxy=probe_proxy(checked))


def _fleet_endpoint(name: str, model: str | None) -> Endpoint:
    from tuichat.config import load_config
    from tuichat.server.fleet import find_fleet
    from tuichat.server.launcher import ServerManager

    manager = ServerManager()
    try:
        running = find_fleet(manager, name)
        if running is None or running.url is None:
            known = sorted(load_config().fleets)
            if name not in known:
                names = ", ".join(known) or "none"
                raise TuichatError(f"no fleet called '{name}' (known: {names}); see [fleets.NAME] in the config.")
            raise TuichatError(
                f"fleet '{name}' is not running: start it with `tuichat serve {name} --detach`, or pass its proxy's "
                "URL with --url."
            )
        first = running.nodes[0].model_name if running.nodes else None
        return Endpoint(
            running.url,
            running.api_key,
            model or first,
            name,
            proxy=True,
            fleet=name,
            node_keys=running.node_keys(),
        )
    finally:
        manager.close()


def endpoint_from_spec(spec: str, api_key: str | None = None, model: str | None = None) -> Endpoint:
    """One side of a comparison (A or B): a URL, or the name of a running profile or fleet."""
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
        else:
            # A row that finished early and later moved on to OUT is still in OUT.pending: take it out, so that
            # the two files together hold each finished row exactly once (what a user merging them expects).
            rest = [self.done[line] for line in self.order[self.written :] if line in self.done]
            _write_atomic(self.pending, "".join(_dump(r) for r in rest))


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
    """A run as it goes: read it from another task to draw a progress bar (it is only ever written by the runner)."""

    total: int
    done: int = 0
    errors: int = 0
    in_flight: int = 0
    tokens: int = 0  # completion tokens of this run (chunks while a reply streams, the usage figure once done)
    prompt_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.tokens / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class BatchRun:
    """What `run_batch` did: its progress at the end, and whether it ran to the end (False: stopped)."""

    progress: Progress
    finished: bool


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
    if failed and failed[0].kind == "empty":
        row["finish_reason"] = failed[0].finish  # the model ended at once: an empty result, not an error
    elif failed:
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
    stop: asyncio.Event | None = None,
    on_row: Callable[[dict[str, Any], Progress], None] | None = None,
    on_start: Callable[[Progress], None] | None = None,
    stall_timeout: float = 120.0,
) -> BatchRun:
    """Run every item not already done, `concurrency` at a time, each row into `writer` as it finishes.

    `on_start` gets the live Progress once the model is known (to draw it from another task); `on_row` each row
    as it finishes; setting `stop` ends the run cleanly: requests in flight are stopped, every finished row kept.
    """
    todo = [item for item in items if item.line not in writer.done]
    progress = Progress(total=len(todo))
    stop = stop if stop is not None else asyncio.Event()
    clients = [ChatClient(endpoint.url, endpoint.api_key, stall_timeout=stall_timeout) for _ in range(concurrency)]
    try:
        model = endpoint.model or await _first_model(clients[0])
        queue: asyncio.Queue[BatchItem] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        progress.started = time.monotonic()  # the model lookup is not part of the batch's wall time
        if on_start is not None:
            on_start(progress)

        async def worker(client: ChatClient) -> None:
            while not queue.empty() and not stop.is_set():
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
                if on_row is not None:
                    on_row(row, progress)

        workers = [asyncio.create_task(worker(c)) for c in clients[: max(1, min(concurrency, len(todo)))]]
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([*workers, stopper], return_when=asyncio.FIRST_COMPLETED)
            while not stop.is_set() and not all(w.done() for w in workers):
                await asyncio.wait([*workers, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*workers, stopper]:
                task.cancel()
            await asyncio.gather(*workers, stopper, return_exceptions=True)
        for w in workers:
            exc = None if w.cancelled() else w.exception()
            if exc is not None:
                raise exc
        return BatchRun(progress, not stop.is_set())
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


# -- the figures of a run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSummary:
    """The figures of one run against one target at one concurrency (what the summary, tables and plots show).

    Throughput is the completion tokens of this run over its wall time; TTFT percentiles are over the prompts of
    this run that got a first token. `nodes` (behind a proxy) is the requests each node served during the run,
    None for a node whose counters could not be read.
    """

    target: str
    url: str
    concurrency: int
    prompts: int
    resumed: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    finished: bool
    out: str = ""
    nodes: Mapping[str, int | None] | None = None

    @property
    def throughput(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def of(
        cls, endpoint: Endpoint, concurrency: int, run: BatchRun, *, resumed: int, out: Path | str = ""
    ) -> BatchSummary:
        p = run.progress
        return cls(
            target=endpoint.label,
            url=endpoint.url,
            concurrency=concurrency,
            prompts=p.done,
            resumed=resumed,
            errors=p.errors,
            prompt_tokens=p.prompt_tokens,
            completion_tokens=p.tokens,
            wall_s=round(p.elapsed(), 4),
            ttft_p50_s=percentile(p.ttfts, 50),
            ttft_p95_s=percentile(p.ttfts, 95),
            finished=run.finished,
            out=str(out),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target": self.target,
            "url": self.url,
            "concurrency": self.concurrency,
            "prompts": self.prompts,
            "resumed": self.resumed,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "throughput_tok_s": round(self.throughput, 3),
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p95_s": self.ttft_p95_s,
            "wall_s": self.wall_s,
            "finished": self.finished,
            "out": self.out,
        }
        if self.nodes is not None:
            data["nodes"] = dict(self.nodes)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchSummary:
        nodes = data.get("nodes")
        return cls(
            target=str(data["target"]),
            url=str(data["url"]),
            concurrency=int(data["concurrency"]),
            prompts=int(data["prompts"]),
            resumed=int(data.get("resumed") or 0),
            errors=int(data["errors"]),
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            wall_s=float(data["wall_s"]),
            ttft_p50_s=_float_or_none(data.get("ttft_p50_s")),
            ttft_p95_s=_float_or_none(data.get("ttft_p95_s")),
            finished=bool(data.get("finished")),
            out=str(data.get("out") or ""),
            nodes={str(k): (int(v) if isinstance(v, int) else None) for k, v in nodes.items()}
            if isinstance(nodes, dict)
            else None,
        )


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The nearest-rank percentile (p50 is the median); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if pct == 50:
        return round(statistics.median(ordered), 4)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1], 4)


def load_summaries(path: Path) -> list[BatchSummary]:
    """The runs recorded in a summary file (see `save_summaries`); none when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [BatchSummary.from_json(run) for run in data["runs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def save_summaries(path: Path, runs: Sequence[BatchSummary]) -> None:
    """Every run's figures as one JSON object `{"runs": [...]}`, for scripts and a README's tables."""
    _write_atomic(path, json.dumps({"runs": [r.to_json() for r in runs]}, indent=2, ensure_ascii=False) + "\n")


# -- how requests spread over a proxy's nodes ----------------------------------------------------------------


@dataclass(frozen=True)
class NodeCounts:
    """Each node's count of finished requests at one moment (None: its /metrics could not be read), and why not."""

    counts: Mapping[str, int | None]
    notes: Mapping[str, str] = field(default_factory=dict)


def proxy_nodes(proxy_url: str, *, timeout: float = 5.0) -> list[str]:
    """The node URLs a proxy lists under /nodes/status (no key needed there)."""
    base = proxy_url.rstrip("/").removesuffix("/v1")
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as http:
            data = http.get(f"{base}/nodes/status").json()
    except (httpx.HTTPError, ValueError):
        return []
    return (
        sorted(str(url) for url, status in data.items() if isinstance(status, dict)) if isinstance(data, dict) else []
    )


def read_node_counts(endpoint: Endpoint, nodes: Sequence[str], *, timeout: float = 5.0) -> NodeCounts:
    """Each node's finished requests, read from the node's own /metrics (the proxy has none): the count of its
    end-to-end latency histogram, with that node's key, else the proxy's key (tuichat's fleet nodes accept it)."""
    counts: dict[str, int | None] = {}
    notes: dict[str, str] = {}
    with httpx.Client(trust_env=False, timeout=timeout) as http:
        for url in nodes:
            keys: list[str | None] = [k for k in (endpoint.node_keys.get(url), endpoint.api_key) if k] or [None]
            counts[url] = None
            for key in dict.fromkeys(keys):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                try:
                    resp = http.get(f"{url.rstrip('/')}/metrics", headers=headers)
                except httpx.HTTPError as exc:
                    notes[url] = f"its /metrics did not answer ({type(exc).__name__})"
                    break
                if resp.status_code == 200:
                    counts[url] = finished_requests(resp.text)
                    if counts[url] is None:
                        notes[url] = "its /metrics has no request counter"
                    else:
                        notes.pop(url, None)
                    break
                notes[url] = (
                    "its /metrics needs its own key (unknown for a proxy tuichat did not launch)"
                    if resp.status_code == 401
                    else f"its /metrics answered HTTP {resp.status_code}"
                )
    return NodeCounts(counts, notes)


def finished_requests(metrics_text: str) -> int | None:
    """Requests a server has finished since it started, from its Prometheus text (the same counter the fleet
    screen attributes replies by: tuichat.server.attribution)."""
    try:
        requests = read_counters(metrics_text).requests
    except MetricsError:
        return None
    return None if requests is None else round(requests)


def spread(before: NodeCounts, after: NodeCounts) -> dict[str, int | None]:
    """Requests each node served between two readings (None where either reading is missing, or the node
    restarted in between)."""
    out: dict[str, int | None] = {}
    for url in sorted({*before.counts, *after.counts}):
        b, a = before.counts.get(url), after.counts.get(url)
        if url not in before.counts and a is not None:
            b = 0  # a node that joined during the run: all its requests since it started are this run's
        out[url] = a - b if a is not None and b is not None and a >= b else None
    return out


async def settle_counts(
    endpoint: Endpoint, before: NodeCounts, expected: int, *, deadline_s: float = 12.0
) -> tuple[dict[str, int | None], NodeCounts]:
    """Read the nodes again until their counts add up to `expected` requests (a server can count a request a
    moment after its reply ends) or `deadline_s` passes; (the spread, the last reading)."""
    deadline = time.monotonic() + deadline_s
    while True:
        nodes = sorted({*before.counts, *await asyncio.to_thread(proxy_nodes, endpoint.url)})
        after = await asyncio.to_thread(read_node_counts, endpoint, nodes)
        got = spread(before, after)
        if sum(v or 0 for v in got.values()) >= expected or time.monotonic() > deadline:
            return got, after
        await asyncio.sleep(0.3)
