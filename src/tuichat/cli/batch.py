"""`tuichat batch PROMPTS --out OUT.jsonl`: the command around tuichat.chat.batch (the runner, which prints
nothing): its arguments, the progress bar with live tok/s, the summaries, `--compare A B`, `--sweep 1,4,16,64` with
its table and plots, and how the requests spread over a fleet's nodes.

Files, next to OUT (say `o.jsonl`):
- `o.jsonl`: one row per prompt, in input order (a plain run). With `--compare A B` the two sides write `o.A.jsonl`
  and `o.B.jsonl`; with `--sweep` each concurrency writes its own (`o.c4.jsonl`, `o.A.c4.jsonl`), since each
  level asks every prompt again. Each of those resumes on its own when the command is run again.
- `o.summary.json`: `{"runs": [...]}`, the figures of every run (target, concurrency, prompts, errors, tokens,
  throughput, TTFT p50/p95, wall, and `nodes`, the requests each node served, behind a proxy). A sweep run again
  reuses the figures of the levels an earlier run finished, and runs the rest.
- `o.sweep.svg` (or `--plot FILE.svg`): throughput and TTFT p95 against concurrency, one line per target.

`Endpoint`, `resolve_endpoint` and `endpoint_from_spec` (a profile name, fleet name or URL to what to talk to) live
in tuichat.chat.batch and are re-exported here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from tuichat.chat.batch import (
    MAX_CONCURRENCY,
    PENDING_SUFFIX,
    BatchItem,
    BatchSummary,
    Endpoint,
    NodeCounts,
    Progress,
    ResultWriter,
    endpoint_from_spec,
    load_summaries,
    looks_like_url,
    proxy_nodes,
    read_node_counts,
    read_prompts,
    resolve_endpoint,
    run_batch,
    save_summaries,
    settle_counts,
)
from tuichat.chat.plot import svg_plot, sweep_panels, terminal_plot
from tuichat.chat.sampling import Sampling, SamplingError, check_value
from tuichat.durations import format_clock
from tuichat.errors import TuichatError

__all__ = [
    "MAX_CONCURRENCY",
    "PENDING_SUFFIX",
    "Endpoint",
    "add_subcommands",
    "endpoint_from_spec",
    "looks_like_url",
    "main",
    "resolve_endpoint",
    "run",
]


# -- the plan: which runs, into which files ------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One run of the whole batch: a target (side "A"/"B", or None without --compare) at one concurrency."""

    side: str | None
    endpoint: Endpoint
    concurrency: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.side}: {self.endpoint.label}" if self.side else self.endpoint.label


def out_path(out: Path, side: str | None, concurrency: int | None) -> Path:
    """OUT with the side and the concurrency put before its suffix: o.jsonl -> o.A.c16.jsonl."""
    parts = [p for p in (side, f"c{concurrency}" if concurrency is not None else None) if p]
    if not parts:
        return out
    suffix = out.suffix or ".jsonl"
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(".".join([stem, *parts]) + suffix)


def side_file(out: Path, what: str) -> Path:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.{what}")


def parse_sweep(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise TuichatError(
            f"--sweep takes concurrencies separated by commas, such as 1,4,16,64 (not {text!r})"
        ) from None
    if not levels:
        raise TuichatError("--sweep needs at least one concurrency, such as 1,4,16,64")
    for level in levels:
        if not 1 <= level <= MAX_CONCURRENCY:
            raise TuichatError(f"--sweep: each concurrency must be between 1 and {MAX_CONCURRENCY} (not {level})")
    return sorted(set(levels))


# -- showing a run -------------------------------------------------------------------------------------------


def progress_line(progress: Progress, prefix: str = "", width: int = 24) -> str:
    filled = int(width * progress.done / progress.total) if progress.total else width
    bar = "#" * filled + "." * (width - filled)
    errs = f" · {progress.errors} error{'s' if progress.errors != 1 else ''}" if progress.errors else ""
    return (
        f"{prefix}[{bar}] {progress.done}/{progress.total}{errs} · {progress.in_flight} in flight"
        f" · {progress.rate():,.0f} tok/s · {format_clock(progress.elapsed())}"
    )


async def _show_progress(progress: Progress, prefix: str, out: IO[str]) -> None:
    tty = out.isatty()
    while True:
        await asyncio.sleep(0.2 if tty else 5.0)
        _progress_line(progress, prefix, out)


def _progress_line(progress: Progress, prefix: str, out: IO[str], final: bool = False) -> None:
    if out.isatty():
        out.write("\r\x1b[K" + progress_line(progress, prefix) + ("\n" if final else ""))
    else:
        out.write(progress_line(progress, prefix) + "\n")
    out.flush()


def summary(s: BatchSummary) -> str:
    """One run's summary, a line per figure."""
    parts = [
        ("prompts", f"{s.prompts}" + (f" (+{s.resumed} from an earlier run)" if s.resumed else "")),
        ("errors", str(s.errors)),
        ("tokens", f"{s.prompt_tokens:,} prompt, {s.completion_tokens:,} generated"),
        ("throughput", f"{s.throughput:,.1f} tok/s"),
        ("TTFT p50/p95", f"{_secs(s.ttft_p50_s)} / {_secs(s.ttft_p95_s)}"),
        ("wall time", _wall(s.wall_s)),
    ]
    return "\n".join(f"{name:>13}: {value}" for name, value in parts)


def node_lines(s: BatchSummary, indent: str = "") -> list[str]:
    """ "node URL: N requests" for each node behind a proxy (nothing for a plain server)."""
    if s.nodes is None:
        return []
    if not s.nodes:
        return [f"{indent}nodes: the proxy listed no node"]
    lines = []
    for url, count in s.nodes.items():
        shown = (
            "? requests (its counters could not be read)"
            if count is None
            else f"{count} request" + ("s" if count != 1 else "")
        )
        lines.append(f"{indent}node {url}: {shown}")
    return lines


def side_by_side(a: BatchSummary, b: BatchSummary) -> str:
    """Two runs' summaries in columns, with the ratio B/A where a ratio means something."""
    rows: list[tuple[str, str, str, str]] = [
        ("", f"A: {a.target}", f"B: {b.target}", "B/A"),
        ("prompts", _prompts(a), _prompts(b), ""),
        ("errors", str(a.errors), str(b.errors), ""),
        (
            "tokens",
            f"{a.prompt_tokens:,} + {a.completion_tokens:,}",
            f"{b.prompt_tokens:,} + {b.completion_tokens:,}",
            _ratio(b.completion_tokens, a.completion_tokens),
        ),
        ("throughput", f"{a.throughput:,.1f} tok/s", f"{b.throughput:,.1f} tok/s", _ratio(b.throughput, a.throughput)),
        (
            "TTFT p50/p95",
            f"{_secs(a.ttft_p50_s)} / {_secs(a.ttft_p95_s)}",
            f"{_secs(b.ttft_p50_s)} / {_secs(b.ttft_p95_s)}",
            f"{_ratio(b.ttft_p50_s, a.ttft_p50_s)} / {_ratio(b.ttft_p95_s, a.ttft_p95_s)}",
        ),
        ("wall time", _wall(a.wall_s), _wall(b.wall_s), _ratio(b.wall_s, a.wall_s)),
    ]
    wa = max(len(r[1]) for r in rows)
    wb = max(len(r[2]) for r in rows)
    lines = [f"{r[0]:>13}  {r[1]:<{wa}}  {r[2]:<{wb}}  {r[3]}".rstrip() for r in rows]
    lines.insert(1, f"{'':>13}  {'(tokens: prompt + generated)':<{wa}}")
    return "\n".join(lines)


def sweep_table(runs: Sequence[BatchSummary], sides: Sequence[str | None]) -> str:
    """A row per run (target and concurrency), plus a B/A row after each concurrency of a comparison."""
    head = ("target", "concurrency", "prompts", "errors", "tok/s", "TTFT p50", "TTFT p95", "wall")
    rows: list[tuple[str, ...]] = [head]
    by_level: dict[int, list[tuple[str | None, BatchSummary]]] = {}
    for side, run in zip(sides, runs, strict=True):
        by_level.setdefault(run.concurrency, []).append((side, run))
    for level in sorted(by_level):
        pair = by_level[level]
        for side, run in pair:
            rows.append(
                (
                    f"{side}: {run.target}" if side else run.target,
                    str(level),
                    _prompts(run),
                    str(run.errors),
                    f"{run.throughput:,.1f}",
                    _secs(run.ttft_p50_s),
                    _secs(run.ttft_p95_s),
                    _wall(run.wall_s),
                )
            )
        if [s for s, _ in pair] == ["A", "B"]:
            a, b = pair[0][1], pair[1][1]
            rows.append(
                (
                    "B/A",
                    str(level),
                    "",
                    "",
                    _ratio(b.throughput, a.throughput),
                    _ratio(b.ttft_p50_s, a.ttft_p50_s),
                    _ratio(b.ttft_p95_s, a.ttft_p95_s),
                    _ratio(b.wall_s, a.wall_s),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


def _prompts(s: BatchSummary) -> str:
    return f"{s.prompts}" + (f" (+{s.resumed})" if s.resumed else "")


def _ratio(b: float | int | None, a: float | int | None) -> str:
    if a is None or b is None or a <= 0:
        return "-"
    return f"{b / a:.2f}x"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _wall(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else format_clock(seconds)


# -- the command ---------------------------------------------------------------------------------------------


def add_subcommands(subparsers: Any) -> None:
    batch = subparsers.add_parser(
        "batch",
        help="run a file of prompts through a server, N at a time, into a JSONL file",
        description="Run PROMPTS (JSONL with prompt or messages per line, or text with one prompt per line) "
        "through a server and write one JSON object per input to OUT, in input order. Run it again to resume. "
        "With --compare A B the batch runs against both (one after the other) and the summaries are shown side by "
        "side; with --sweep it runs at each concurrency and plots throughput and TTFT p95 against it. Against an "
        "lmdeploy proxy (a fleet) the summary says how many requests each node served.",
    )
    batch.add_argument("prompts", type=Path, help="JSONL or plain-text file of prompts")
    where = batch.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the server (or an lmdeploy proxy), e.g. http://127.0.0.1:23333")
    where.add_argument("--profile", help="a running launch profile or fleet (see `tuichat ps`)")
    where.add_argument("--fleet", help="a running fleet: the batch goes through its proxy")
    where.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="run against two targets, each a running profile or fleet or a URL, and compare them",
    )
    batch.add_argument("--api-key", help="the server's API key (with --url, or for URLs given to --compare)")
    batch.add_argument("--api-key-b", help="with --compare: B's key where it differs from --api-key")
    batch.add_argument("--model", help="model id (default: the server's first)")
    batch.add_argument("-c", "--concurrency", type=int, help="requests in flight at once (default 4)")
    batch.add_argument("--sweep", metavar="N,N,...", help="run at each of these concurrencies, e.g. 1,4,16,64")
    batch.add_argument("--plot", type=Path, help="with --sweep: where the SVG plot goes (default OUT's name.sweep.svg)")
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


def _base_sampling(args: argparse.Namespace) -> Sampling:
    base = Sampling()
    try:
        if args.max_tokens is not None:
            base = base.with_value("max_tokens", check_value("max_tokens", args.max_tokens))
        if args.temperature is not None:
            base = base.with_value("temperature", check_value("temperature", args.temperature))
    except SamplingError as exc:
        raise TuichatError(f"--{exc.name.replace('_', '-')}: {exc.message}") from None
    return base


def _targets(args: argparse.Namespace) -> list[tuple[str | None, Endpoint]]:
    if args.api_key and (args.profile or args.fleet):
        raise TuichatError("--api-key goes with --url; a profile's or fleet's key is read from its own record")
    if args.api_key_b and not args.compare:
        raise TuichatError("--api-key-b is B's key with --compare A B")
    if args.compare:
        a_spec, b_spec = args.compare
        a = endpoint_from_spec(a_spec, args.api_key, args.model)
        b = endpoint_from_spec(b_spec, args.api_key_b or args.api_key, args.model)
        if a.url == b.url and a.model == b.model:
            raise TuichatError(f"--compare: A and B are the same server ({a.url}); give two different targets")
        return [("A", a), ("B", b)]
    endpoint = resolve_endpoint(
        url=args.url, api_key=args.api_key, profile=args.profile, fleet=args.fleet, model=args.model
    )
    return [(None, endpoint)]


def _run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise TuichatError(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if args.sweep is not None and args.concurrency is not None:
        raise TuichatError("give either --concurrency or --sweep: a sweep sets the concurrency of each run")
    if args.plot is not None and args.sweep is None:
        raise TuichatError("--plot draws a sweep: add --sweep 1,4,16,64 (or the concurrencies you want)")
    if args.plot is not None and args.plot.suffix.lower() != ".svg":
        raise TuichatError(f"--plot writes SVG: give a file name ending in .svg (not {args.plot.name})")
    levels = parse_sweep(args.sweep) if args.sweep is not None else [args.concurrency or 4]
    base = _base_sampling(args)
    items = read_prompts(args.prompts, base)
    targets = _targets(args)
    sweep = args.sweep is not None
    jobs = [
        Job(side, endpoint, level, out_path(args.out, side, level if sweep else None))
        for side, endpoint in targets
        for level in levels
    ]
    summary_file = side_file(args.out, "summary.json")
    outcome = asyncio.run(_run_jobs(jobs, items, summary_file, args.stall_timeout, verbose=len(jobs) > 1))
    return _report(args, jobs, items, outcome, summary_file, sweep)


@dataclass
class Outcome:
    done: list[tuple[Job, BatchSummary]]
    stopped: bool = False


async def _run_jobs(
    jobs: Sequence[Job], items: Sequence[BatchItem], summary_file: Path, stall_timeout: float, *, verbose: bool
) -> Outcome:
    # One after the other, never both sides at once: A and B usually share a GPU (BF16 and W4A16 on one H200), and
    # runs at the same time would each slow the other down, so neither side's figures would be its own.
    earlier = {s.out: s for s in load_summaries(summary_file)}
    outcome = Outcome([])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        for job in jobs:
            if stop.is_set():
                outcome.stopped = True
                break
            result = await _run_job(job, items, earlier.get(str(job.out)), stop, stall_timeout, verbose=verbose)
            outcome.done.append((job, result))
            earlier[str(job.out)] = result
            save_summaries(summary_file, list(earlier.values()))
            if not result.finished:
                outcome.stopped = True
                break
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    return outcome


async def _run_job(
    job: Job,
    items: Sequence[BatchItem],
    earlier: BatchSummary | None,
    stop: asyncio.Event,
    stall_timeout: float,
    *,
    verbose: bool,
) -> BatchSummary:
    writer = ResultWriter(job.out, items)
    prefix = f"{job.name} · c={job.concurrency} " if verbose else ""
    complete = False
    try:
        if writer.resumed == len(items) and earlier is not None and earlier.finished:
            print(f"{prefix}all {len(items)} done in an earlier run ({job.out}): its figures are kept", file=sys.stderr)
            complete = True
            return earlier
        if writer.resumed:
            print(f"{prefix}resuming: {writer.resumed} of {len(items)} already done in {job.out}", file=sys.stderr)
        elif verbose:
            print(f"{prefix}{len(items)} prompts → {job.out}", file=sys.stderr)
        before: NodeCounts | None = None
        if job.endpoint.proxy:
            before = await asyncio.to_thread(read_node_counts, job.endpoint, proxy_nodes(job.endpoint.url))
        shower: list[asyncio.Task[None]] = []

        def on_start(progress: Progress) -> None:
            shower.append(asyncio.create_task(_show_progress(progress, prefix, sys.stderr)))

        try:
            result = await run_batch(
                job.endpoint,
                items,
                writer,
                concurrency=job.concurrency,
                stop=stop,
                on_start=on_start,
                stall_timeout=stall_timeout,
            )
        finally:
            for task in shower:
                task.cancel()
            await asyncio.gather(*shower, return_exceptions=True)
        _progress_line(result.progress, prefix, sys.stderr, final=True)
        complete = result.finished and len(writer.done) == len(items)
        figures = BatchSummary.of(job.endpoint, job.concurrency, result, resumed=writer.resumed, out=job.out)
        if before is not None:
            served = result.progress.done - result.progress.errors
            nodes, _after = await settle_counts(job.endpoint, before, served)
            figures = replace(figures, nodes=nodes)
        return replace(figures, finished=complete)
    finally:
        writer.close(complete)


def _report(
    args: argparse.Namespace,
    jobs: Sequence[Job],
    items: Sequence[BatchItem],
    outcome: Outcome,
    summary_file: Path,
    sweep: bool,
) -> int:
    runs = [s for _job, s in outcome.done]
    sides = [job.side for job, _s in outcome.done]
    if sweep:
        print(sweep_table(runs, sides))
        labels = {job.side: job.name for job in jobs}
        throughput: dict[str, list[tuple[int, float | None]]] = {}
        ttft: dict[str, list[tuple[int, float | None]]] = {}
        for side, s in zip(sides, runs, strict=True):
            name = labels[side]
            throughput.setdefault(name, []).append((s.concurrency, s.throughput))
            ttft.setdefault(name, []).append((s.concurrency, s.ttft_p95_s))
        panels = sweep_panels(throughput, ttft)
        if runs:
            print()
            print(terminal_plot(panels, colour=sys.stdout.isatty()))
            plot = args.plot or side_file(args.out, "sweep.svg")
            try:
                plot.write_text(svg_plot(panels, title=f"tuichat batch: {len(items)} prompts"), encoding="utf-8")
            except OSError as exc:
                raise TuichatError(f"cannot write the plot {plot}: {exc}") from None
            print(f"plot: {plot}", file=sys.stderr)
    elif len(runs) == 2:
        print(side_by_side(runs[0], runs[1]))
    elif len(runs) == 1:
        print(summary(runs[0]))
    elif runs:
        for s in runs:
            print(f"{s.target}:\n{summary(s)}")
    for job, s in outcome.done:
        lines = node_lines(s, "  " if (sweep or job.side) else "")
        if lines and (sweep or job.side):
            print(f"requests per node, {job.name} at concurrency {s.concurrency}:")
        for line in lines:
            print(line)
    if runs:
        print(f"figures: {summary_file}", file=sys.stderr)
    if outcome.stopped:
        left = len(jobs) - len(outcome.done)
        cut = [(job, s) for job, s in outcome.done if not s.finished]
        kept = "; ".join(
            f"{s.resumed + s.prompts - s.errors} of {len(items)} prompts done and kept in {job.out}" for job, s in cut
        )
        more = f"; {left} run(s) not started" if left else ""
        print(
            f"stopped: {kept or 'every finished row is kept'}{more}; run the same command again to do the rest.",
            file=sys.stderr,
        )
        return 130
    failed = [(job, s) for job, s in outcome.done if s.errors]
    if failed:
        total = sum(s.errors for _job, s in failed)
        files = ", ".join(str(job.out) for job, _s in failed)
        print(
            f"{total} prompt(s) failed: see their error field in {files}; run the same command again "
            "to ask them again.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
