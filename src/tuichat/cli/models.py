"""`tuichat models` (the local models, as a table), `pull` / `rm` (hub downloads) and `quantize` (W4A16 AWQ).

`pull` fetches a repository into the hub's own cache (see tuichat.models.pull), then prints the model's facts, the fit
estimate on this machine's roomiest GPU and offers a launch profile; `rm` removes a cached model or a folder under a
models root after saying what it frees, and refuses while a server tuichat started reads from it.

`quantize` prints one progress line per change (rewritten in place on a terminal), keeps lmdeploy's whole output
in a log file, and on Ctrl+C stops every process of the job and removes the partial output before exiting 130.
Calibration comes from local text (--calib-file), the user's saved conversations (--calib-history), a set
lmdeploy downloads (--calib-dataset) or nothing (--calib-samples 0). A job left behind by a tuichat that died is
offered for clean-up first. On success it prints the weights' size before and after, the fit estimate of both,
and the new profile's TOML, and saves the profile into config.toml.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from tuichat import paths
from tuichat.durations import format_duration
from tuichat.errors import TuichatError
from tuichat.models.discovery import (
    DiscoveryResult,
    ModelInfo,
    discover,
    free_profile_name,
    hf_cache_dir,
    inspect_model,
    modelscope_cache_dir,
    profile_name_for,
    profile_notes,
)
from tuichat.models.fit import model_facts
from tuichat.models.quantize import (
    CALIB_DATASETS,
    DEFAULT_CALIB_DATASET,
    JobStatus,
    QuantizeJob,
    QuantizeOptions,
    default_command,
    find_orphan_jobs,
    format_elapsed,
)
from tuichat.server.gpu import GpuSnapshot, format_bytes
from tuichat.server.profiles import Profile, profile_for_model

if TYPE_CHECKING:
    from tuichat.models.pull import ProgressPrinter


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models",
        help="list local models",
        description="List model folders (with a config.json) under the model roots ([models] roots in "
        "config.toml, and --root), the Hugging Face cache and the ModelScope cache.",
    )
    p.add_argument("--root", action="append", default=[], metavar="DIR", help="also look in DIR (repeatable)")
    p.add_argument("--no-caches", action="store_true", help="skip the Hugging Face and ModelScope caches")
    p.set_defaults(model_command="models")

    g = subparsers.add_parser(
        "pull",
        help="download a model from the Hugging Face hub or ModelScope",
        description="Download REPO (owner/name) into the hub's standard cache, where lmdeploy and transformers find "
        "it too: progress per file and overall, free disk checked first, every file's hash checked after. A dropped "
        "connection resumes by itself; after Ctrl+C run the same command again (finished files are kept). Mirrors: "
        "HF_ENDPOINT (ModelScope: MODELSCOPE_DOMAIN); tokens: HF_TOKEN or `hf auth login`. Then it shows the "
        "model's facts and fit, and offers a launch profile.",
    )
    g.add_argument("repo", help="hub id, for example internlm/internlm2-chat-1_8b")
    g.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main; ModelScope: master)")
    g.add_argument("--source", choices=["hf", "modelscope"], default="hf", help="which hub (default hf)")
    g.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only files matching this shell pattern, e.g. '*.json' (repeatable; default: every file)",
    )
    prof = g.add_mutually_exclusive_group()
    prof.add_argument("--profile", metavar="NAME", help="add a launch profile NAME for the model without asking")
    prof.add_argument("--no-profile", action="store_true", help="do not offer a launch profile")
    g.set_defaults(model_command="pull")

    r = subparsers.add_parser(
        "rm",
        help="remove a downloaded model",
        description="Remove MODEL (a hub id, or a name or path from `tuichat models`) from the Hugging Face or "
        "ModelScope cache, or a model folder under a models root, after saying how much it frees. Refused while a "
        "server tuichat started uses it.",
    )
    r.add_argument("model", help="hub id, name or path as `tuichat models` lists it")
    r.add_argument("--root", action="append", default=[], metavar="DIR", help="also look in DIR (repeatable)")
    r.add_argument("--yes", action="store_true", help="remove without asking")
    r.set_defaults(model_command="rm")

    q = subparsers.add_parser(
        "quantize",
        help="W4A16 AWQ quantization with lmdeploy lite auto_awq",
        description="Quantize MODEL's weights to 4 bits with lmdeploy's AWQ (lmdeploy lite auto_awq) into DIR, "
        "then add a launch profile for the result. Calibration data, best first: --calib-file (local text), "
        "--calib-history (your saved conversations), --calib-dataset (downloaded from the Hugging Face hub), or "
        "--calib-samples 0 (data-free, lower quality). The first two and data-free need no internet. "
        "Ctrl+C cancels and leaves nothing behind.",
    )
    q.add_argument("model", help="a model folder, or a hub id such as internlm/internlm2-chat-1_8b")
    q.add_argument("--out", required=True, metavar="DIR", help="folder for the quantized model")
    q.add_argument("--w-bits", type=int, default=4, help="weight bits (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="weights per quantization group (default 128)")
    calib = q.add_mutually_exclusive_group()
    calib.add_argument(
        "--calib-file",
        metavar="PATH",
        help="calibrate on local text: a .txt, .md or .jsonl file, or a folder of them (offline)",
    )
    calib.add_argument(
        "--calib-history",
        action="store_true",
        help="calibrate on your saved conversations (user and assistant turns; offline)",
    )
    calib.add_argument(
        "--calib-dataset",
        metavar="NAME",
        help=f"calibration set downloaded from the Hugging Face hub: {', '.join(CALIB_DATASETS)} "
        f"(default {DEFAULT_CALIB_DATASET} when no other source is given)",
    )
    q.add_argument("--calib-samples", type=int, default=128, help="calibration samples; 0: data-free (default 128)")
    q.add_argument("--calib-seqlen", type=int, default=1024, help="tokens per calibration sample (default 1024)")
    q.add_argument("--dtype", choices=["auto", "float16", "bfloat16"], help="float16 for GPUs without bfloat16")
    q.add_argument(
        "--trust-remote-code", action="store_true", help="let the model's own code run (lmdeploy's flag of that name)"
    )
    q.add_argument(
        "--yes",
        action="store_true",
        help="replace an existing output folder or profile, and clean up jobs a dead tuichat left, without asking",
    )
    q.add_argument("--profile-name", metavar="NAME", help="name of the profile to add (default: from DIR)")
    q.add_argument("--no-profile", action="store_true", help="do not add a profile to config.toml")
    q.add_argument("--log", metavar="FILE", help="where to keep lmdeploy's output (default: under the state dir)")
    q.add_argument(
        "--lmdeploy",
        metavar="CMD",
        help="the command that runs lmdeploy (default: this Python's `-m lmdeploy`)",
    )
    q.set_defaults(model_command="quantize")


def run(args: argparse.Namespace) -> int:
    if args.model_command == "models":
        return run_models(args)
    if args.model_command == "pull":
        return run_pull(args)
    if args.model_command == "rm":
        return run_rm(args)
    return run_quantize(args)


# ---------------------------------------------------------------- models


def _configured_roots() -> list[Path]:
    from tuichat.config import load_config

    return [Path(r).expanduser() for r in load_config().model_roots]


def run_models(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    roots = [*_configured_roots(), *(Path(r).expanduser() for r in args.root)]
    for root in args.root:
        if not Path(root).expanduser().is_dir():
            err.write(f"tuichat: --root {root} is not a folder; it is skipped.\n")
    result = discover(roots, include_caches=not args.no_caches)
    out.write(format_table(result))
    out.write(format_locations(result, hf_cache_dir(), modelscope_cache_dir()))
    for problem in result.problems:
        err.write(f"tuichat: {problem}\n")
    return 0


def format_table(result: DiscoveryResult) -> str:
    if not result.models:
        return (
            "No local models found. Add folders to [models] roots in config.toml or pass --root DIR; "
            "models downloaded to the Hugging Face or ModelScope cache are found on their own.\n"
        )
    header = ("NAME", "ARCH", "PARAMS", "DTYPE", "QUANT", "SIZE", "VLM", "PATH")
    rows = [header, *(_row(m) for m in result.models)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def location(m: ModelInfo, hf_cache: Path, ms_cache: Path) -> str:
    """Where a listed model lives: 'hf cache', 'modelscope cache' or 'folder'."""
    path = m.path.absolute()
    if path.is_relative_to(hf_cache.absolute()):
        return "hf cache"
    if path.is_relative_to(ms_cache.absolute()):
        return "modelscope cache"
    return "folder"


def format_locations(result: DiscoveryResult, hf_cache: Path, ms_cache: Path) -> str:
    """The size on disk of everything listed, split by where it lives (printed under the table)."""
    if not result.models:
        return ""
    groups: dict[str, list[ModelInfo]] = {}
    for m in result.models:
        groups.setdefault(location(m, hf_cache, ms_cache), []).append(m)
    titles = {
        "hf cache": f"Hugging Face cache {hf_cache}",
        "modelscope cache": f"ModelScope cache {ms_cache}",
        "folder": "model folders (see PATH)",
    }
    total = sum(m.size_bytes for m in result.models)
    lines = [f"{_models_word(len(result.models))}, {format_bytes(total)} on disk:"]
    for key, title in titles.items():
        if key in groups:
            size = sum(m.size_bytes for m in groups[key])
            lines.append(f"  {title}: {_models_word(len(groups[key]))}, {format_bytes(size)}")
    return "\n".join(lines) + "\n"


def _models_word(n: int) -> str:
    return f"{n} model" if n == 1 else f"{n} models"


def _row(m: ModelInfo) -> tuple[str, ...]:
    return (
        m.name,
        m.architecture,
        m.params_text,
        m.dtype or "?",
        m.quant_text,
        format_bytes(m.size_bytes),
        "yes" if m.is_vlm else "-",
        str(m.path),
    )


# ---------------------------------------------------------------- pull / rm


def run_pull(
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    free_probe: Callable[[Path], int] | None = None,
    progress: ProgressPrinter | None = None,
) -> int:
    from tuichat.models import pull

    out = out or sys.stdout
    err = err or sys.stderr
    profile_name = _settle_pull_profile(args.profile) if args.profile else None
    plan = pull.make_plan(args.repo, source=args.source, revision=args.revision, include=args.include)
    progress = progress or pull.default_progress(out)
    try:
        result = pull.pull(plan, progress, free_probe=free_probe or pull.disk_free)
    except pull.Interrupted as exc:
        err.write(f"\ntuichat: {exc}\n")
        err.write(f"tuichat: to go on, run the same command again: {_pull_command(args)}\n")
        return 130
    got = (
        f"{format_bytes(result.downloaded_bytes)} in {format_duration(result.elapsed_s)}"
        if result.downloaded_files
        else "nothing new to download"
    )
    out.write(f"done: {plan.repo_id} ({got}), every file checked against the hub's hashes.\n")
    out.write(f"model folder: {result.path}\n")
    try:
        info = inspect_model(result.path, hub_id=plan.repo_id)
    except TuichatError as exc:
        err.write(f"tuichat: {exc}\n")
        err.write("tuichat: so no facts, fit or profile for it (did --include leave out config.json?).\n")
        return 0
    for line in model_facts(info, _gpu_snapshot()):
        out.write(f"{line}\n")
    if not args.no_profile:
        _offer_pull_profile(info, profile_name, plan.repo_id, out, err)
    return 0


def _pull_command(args: argparse.Namespace) -> str:
    words = ["tuichat", "pull", args.repo]
    if args.revision:
        words += ["--revision", args.revision]
    if args.source != "hf":
        words += ["--source", args.source]
    for pattern in args.include:
        words += ["--include", pattern]
    return shlex.join(words)


def _settle_pull_profile(name: str) -> str:
    """Check an asked-for profile name before the download, so a clash cannot spoil the end."""
    from tuichat.config import load_config
    from tuichat.server.profiles import validate_name

    name = validate_name(name)
    if name in load_config().profiles:
        raise TuichatError(
            f"A profile called '{name}' already exists: choose another --profile name (`tuichat profiles` lists them)."
        )
    return name


def _offer_pull_profile(info: ModelInfo, name: str | None, repo_id: str, out: TextIO, err: TextIO) -> None:

    from tuichat.config import load_config

    if name is None:
        suggested = free_profile_name(profile_name_for(info), set(load_config().profiles))
        if not sys.stdin.isatty():
            out.write(
                f"to add a launch profile for it: tuichat pull {repo_id} --profile {suggested} "
                "(the files are in the cache, nothing downloads again)\n"
            )
            return
        if not _confirm(f"Add a launch profile '{suggested}' for it to config.toml?"):
            return
        name = suggested
    profile_name, profile = profile_for_model(info, name)
    _write_profile(profile_name, profile, profile_notes(info), out, err)


def run_rm(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from tuichat.models.pull import find_removable, remove, uses
    from tuichat.server.launcher import ServerManager

    out = out or sys.stdout
    err = err or sys.stderr
    roots = [*_configured_roots(), *(Path(r).expanduser() for r in args.root)]
    target = find_removable(args.model, roots)
    manager = ServerManager()
    try:
        users = [
            f"'{s.name}' (pid {s.pid})" for s in manager.running() if uses(target, str(s.record.profile.get("model")))
        ]
    finally:
        manager.close()
    if users:
        names = " and ".join(users)
        first = users[0].split("'")[1]
        raise TuichatError(
            f"{target.name} is in use by the running server {names}: stop it first (tuichat stop {first}), "
            "then remove the model."
        )
    frees = (
        "frees nothing: the files stay where the link points"
        if target.kind == "link"
        else f"frees {format_bytes(target.frees)}"
    )
    out.write(f"{target.name}: {target.path} in {target.where}; removing it {frees}.\n")
    out.flush()
    if not args.yes:
        if not sys.stdin.isatty():
            raise TuichatError("Nothing was removed: add --yes to remove it without a question.")
        if not _confirm(f"Remove {target.name}?"):
            out.write("kept.\n")
            return 1
    remove(target)
    out.write(f"removed {target.name}" + (f", {format_bytes(target.frees)} freed.\n" if target.frees else ".\n"))
    return 0


# ---------------------------------------------------------------- quantize


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def run_quantize(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    _offer_orphan_cleanup(args.yes, out, err)
    command = shlex.split(args.lmdeploy) if args.lmdeploy else default_command()
    opts = QuantizeOptions(
        model=args.model,
        out=Path(args.out).expanduser(),
        w_bits=args.w_bits,
        group_size=args.group_size,
        calib_dataset=args.calib_dataset or DEFAULT_CALIB_DATASET,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        command=command,
        dtype=args.dtype,
        calib_file=Path(args.calib_file).expanduser() if args.calib_file else None,
        calib_history=args.calib_history,
        trust_remote_code=args.trust_remote_code,
    )

    # Settle the profile name before hours of work, so a clash cannot spoil the end.
    profile_name: str | None = None
    if not args.no_profile:
        from tuichat.config import load_config
        from tuichat.server.profiles import validate_name

        taken = set(load_config().profiles)
        if args.profile_name:
            profile_name = validate_name(args.profile_name)
            if profile_name in taken and not args.yes:
                raise TuichatError(
                    f"A profile called '{profile_name}' already exists: choose another --profile-name, "
                    "or add --yes to replace it."
                )
        else:
            profile_name = free_profile_name(profile_name_for(opts.out.absolute().name), taken)

    overwrite = False
    target = opts.out.absolute()
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        overwrite = args.yes or _confirm(f"{target} already exists and is not empty. Replace it?")
        if not overwrite:
            raise TuichatError(
                f"The output folder {target} already exists and is not empty: choose another --out, "
                "or add --yes to replace it."
            )

    log_path = Path(args.log).expanduser() if args.log else _default_log(target)
    job = QuantizeJob.start(opts, log_path, overwrite=overwrite)
    out.write(f"quantizing {opts.model} into {job.out} (pid {job.pid}); log: {job.log_path}\n")
    out.write(f"calibration: {opts.calib_words}\n")
    for note in job.notes:
        out.write(f"note: {note}\n")
    out.write("Ctrl+C cancels and removes the partial output.\n")
    out.flush()

    status = _follow(job, out)
    if status.state == "cancelled":
        err.write(f"tuichat: {status.message}.\n")
        if status.hint:
            err.write(f"tuichat: {status.hint}\n")
        return 130
    if status.state == "failed":
        err.write(f"tuichat: {status.message}\n")
        if status.hint:
            err.write(f"tuichat: hint: {status.hint}\n")
        err.write(f"tuichat: full log: {job.log_path}\n")
        return 1

    out.write(f"done in {format_elapsed(status.elapsed_s)}: {job.out}\n")
    for line in job.summary(_gpu_snapshot()):
        out.write(f"{line}\n")
    if profile_name is not None:
        _save_profile(job, profile_name, out, err)
    return 0


def _gpu_snapshot() -> GpuSnapshot | None:
    from tuichat.models import quantize

    return quantize.DEFAULT_PROBES.gpu_snapshot()


def _offer_orphan_cleanup(yes: bool, out: TextIO, err: TextIO) -> None:
    """Jobs a tuichat left running or half-written when it died: clean up on yes, else say how."""
    for orphan in find_orphan_jobs():
        err.write(f"tuichat: {orphan.describe()}\n")
        if yes or _confirm("Stop it (if it runs) and remove its partial output?"):
            out.write(f"{orphan.clean_up()}\n")
        else:
            err.write("tuichat: left as it is; run `tuichat quantize` again with --yes to clean it up.\n")
    out.flush()


def _default_log(target: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return paths.state_dir() / "quantize" / f"{target.name}-{stamp}.log"


def _follow(job: QuantizeJob, out: TextIO) -> JobStatus:
    """Print progress until the job ends; the first Ctrl+C cancels it (the job's own group never sees it)."""
    interrupted = False

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True

    tty = out.isatty()
    previous = signal.signal(signal.SIGINT, on_sigint)
    last = ""
    try:
        while True:
            if interrupted:
                if tty:
                    out.write("\n")
                out.write("cancelling: stopping every lmdeploy process...\n")
                out.flush()
                job.cancel()
                return job.poll()
            status = job.poll()
            if status.finished:
                if tty and last:
                    out.write("\n")
                return status
            text = status.message
            if text != last:
                line = status.line()
                out.write(f"\r\x1b[2K{line}" if tty else f"{line}\n")
                out.flush()
                last = text
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, previous)


def _save_profile(job: QuantizeJob, name: str, out: TextIO, err: TextIO) -> None:
    profile_name, profile = job.make_profile(name)
    _write_profile(profile_name, profile, profile_notes(inspect_model(job.out)), out, err)


def _write_profile(profile_name: str, profile: Profile, notes: list[str], out: TextIO, err: TextIO) -> None:
    """Show a new profile as TOML with its notes, then save it to config.toml (keeping the user's comments)."""
    import tomli_w

    from tuichat.config import save_profile
    from tuichat.server.profiles import profile_to_table

    out.write("\nnew profile:\n\n")
    out.write(tomli_w.dumps({"profiles": {profile_name: profile_to_table(profile)}}))
    for note in notes:
        out.write(f"# {note}\n")
    try:
        path = save_profile(profile_name, profile)
    except TuichatError as exc:
        err.write(f"tuichat: the profile was not saved: {exc}\n")
        return
    out.write(f"\nadded profile '{profile_name}' to {path}; start it with: tuichat serve {profile_name}\n")
