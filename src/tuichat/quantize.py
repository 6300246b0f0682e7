"""W4A16 quantization (`lmdeploy lite auto_awq`) as a managed job: progress, log, clean cancel, clean failure.

The job runs in its own process group (procgroup), so cancelling stops every process it spawned. lmdeploy writes
into a hidden staging folder beside the output (`.OUT.partial-…`); only a finished run is renamed to OUT, so a
failed or cancelled run leaves nothing behind and an existing OUT is never touched unless the user confirmed
replacing it, and even then only once the new model is complete.

Progress comes from what lmdeploy 0.18 prints (read from its source and seen on an H200):
    Move model.layers.0 to CPU.                              once per decoder layer, before calibration
    Loading calibrate dataset ...                            then the dataset download (Hugging Face hub)
    model.layers.0, samples: 128, max gpu memory: 1.2 GB     calibration, one per layer
    model.layers.0 smooth weight done. max gpu memory: ...   smoothing, one per layer
    model.layers.0.mlp.up_proj weight packed.                quantization, one per linear layer
    Writing model shards: 100%|...                           saving (tqdm, carriage returns)
Lines are matched by their fixed words anywhere in a line, with any layer path (`language_model.model.layers.3`),
so prefixes such as timestamps and other model families keep working.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Literal

from tuichat.errors import TuichatError
from tuichat.models import inspect_model, looks_like_hub_id, profile_for
from tuichat.procgroup import StopResult, group_pids, spawn_group, stop_group

# lmdeploy 0.18 dropped 'ptb' (the tutorial's choice): `--calib-dataset ptb` exits 2 with "invalid choice".
DEFAULT_CALIB_DATASET = "wikitext2"
CALIB_DATASETS = ("wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus", "openwebtext")
# where each set comes from, for the download hint
_DATASET_REPOS = {
    "wikitext2": "wikitext",
    "c4": "allenai/c4",
    "pileval": "mit-han-lab/pile-val-backup",
    "gsm8k": "openai/gsm8k",
    "neuralmagic_calibration": "neuralmagic/calibration",
    "open-platypus": "garage-bAInd/Open-Platypus",
    "openwebtext": "Skylion007/openwebtext",
}

JobState = Literal["running", "done", "failed", "cancelled"]
PHASES = ("starting", "loading", "calibrating", "smoothing", "quantizing", "saving")
_LAYER_PHASES = ("calibrating", "smoothing", "quantizing")


def default_command() -> list[str]:
    return [sys.executable, "-m", "lmdeploy"]


@dataclass(frozen=True)
class QuantizeOptions:
    """One `lmdeploy lite auto_awq` run. `command` is the prefix that runs lmdeploy."""

    model: str
    out: Path
    w_bits: int = 4
    group_size: int = 128
    calib_dataset: str = DEFAULT_CALIB_DATASET
    calib_samples: int = 128  # 0: data-free quantization (no download, lower quality)
    calib_seqlen: int = 1024
    command: list[str] = field(default_factory=default_command)
    dtype: str | None = None  # 'float16' for GPUs without bfloat16


def validate_options(opts: QuantizeOptions) -> None:
    """Raise a TuichatError sentence for a value lmdeploy would reject or that cannot work."""
    if not opts.command:
        raise TuichatError("The lmdeploy command is empty: leave it unset to use this Python's lmdeploy.")
    if not 2 <= opts.w_bits <= 8:
        raise TuichatError(f"--w-bits must be between 2 and 8 (got {opts.w_bits}); 4 is what lmdeploy serves.")
    if opts.group_size < 1 or opts.group_size & (opts.group_size - 1):
        raise TuichatError(f"--group-size must be a power of two such as 64 or 128 (got {opts.group_size}).")
    if opts.calib_samples < 0:
        raise TuichatError(f"--calib-samples must be 0 or more (got {opts.calib_samples}).")
    if opts.calib_seqlen < 1:
        raise TuichatError(f"--calib-seqlen must be 1 or more (got {opts.calib_seqlen}).")
    if opts.dtype not in (None, "auto", "float16", "bfloat16"):
        raise TuichatError(f"--dtype must be auto, float16 or bfloat16 (got {opts.dtype}).")
    if not opts.calib_dataset or any(ch.isspace() for ch in opts.calib_dataset):
        raise TuichatError(f"--calib-dataset must be a name such as {DEFAULT_CALIB_DATASET}.")


def build_argv(opts: QuantizeOptions, work_dir: Path | None = None) -> list[str]:
    """The argv of the run; lmdeploy writes into `work_dir` (the job's staging folder), by default `opts.out`."""
    argv = [*opts.command, "lite", "auto_awq", opts.model]
    argv += ["--calib-dataset", opts.calib_dataset]
    argv += ["--calib-samples", str(opts.calib_samples), "--calib-seqlen", str(opts.calib_seqlen)]
    argv += ["--w-bits", str(opts.w_bits), "--w-group-size", str(opts.group_size)]
    argv += ["--work-dir", str(work_dir if work_dir is not None else opts.out)]
    if opts.dtype is not None:
        argv += ["--dtype", opts.dtype]
    return argv


# ---------------------------------------------------------------- progress

_MOVE_CPU = re.compile(r"\bMove (\S+) to CPU\.")
_CALIB = re.compile(r"(\S+), samples: \d+")
_SMOOTH = re.compile(r"(\S+) smooth weight done")
_PACK = re.compile(r"(\S+) weight (?:packed|skipped)\.")
_LAYER_KEY = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _layer_key(name: str) -> str | None:
    """`model.layers.3.mlp.experts.7.up_proj` -> `model.layers.3`; None for names without a layer index."""
    m = _LAYER_KEY.match(name)
    return m.group(1) if m else None


class AwqProgress:
    """Follows auto_awq's output: the phase, and how many decoder layers that phase has finished."""

    def __init__(self, layers_hint: int | None = None) -> None:
        self.phase = "starting"
        self._hint = layers_hint
        self._layers: set[str] = set()
        self._done: dict[str, set[str]] = {p: set() for p in _LAYER_PHASES}
        self.saw_dataset_loading = False

    def _advance(self, phase: str) -> None:
        if PHASES.index(phase) > PHASES.index(self.phase):
            self.phase = phase

    def feed_line(self, line: str) -> None:
        if m := _MOVE_CPU.search(line):
            self._advance("loading")
            key = _layer_key(m.group(1))
            if key is not None and key == m.group(1):
                self._layers.add(key)
        elif "Loading calibrate dataset" in line:
            self.saw_dataset_loading = True
            self._advance("calibrating")
        elif m := _CALIB.search(line):
            self._record("calibrating", m.group(1))
        elif m := _SMOOTH.search(line):
            self._record("smoothing", m.group(1))
        elif m := _PACK.search(line):
            self._record("quantizing", m.group(1))
        elif "Writing model shards" in line or "Saving" in line:
            self._advance("saving")
        elif "Loading weights" in line or "Loading checkpoint shards" in line:
            self._advance("loading")

    def _record(self, phase: str, name: str) -> None:
        self._advance(phase)
        key = _layer_key(name)
        if key is not None:
            self._done[phase].add(key)

    @property
    def layers_total(self) -> int | None:
        return len(self._layers) or self._hint

    @property
    def layers_done(self) -> int:
        if self.phase not in _LAYER_PHASES:
            return 0
        done = len(self._done[self.phase])
        # packing reports each linear layer: the newest decoder layer is still in progress
        return max(0, done - 1) if self.phase == "quantizing" else done

    @property
    def fraction(self) -> float | None:
        """The whole run as 0..1 (three passes over the layers), or None before the layer count is known."""
        total = self.layers_total
        if not total:
            return None
        if self.phase == "saving":
            return 1.0
        if self.phase not in _LAYER_PHASES:
            return 0.0
        index = _LAYER_PHASES.index(self.phase)
        return min(1.0, (index * total + min(self.layers_done, total)) / (3 * total))


# ---------------------------------------------------------------- failure reasons

_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)\b:?.*$")
_ARGPARSE = re.compile(r"^\S.*?: error: (.+)$")
_BAD_DATASET = re.compile(r"argument --calib-dataset: invalid choice: '?([^'\s]*)'? \(choose from (.+)\)")
_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|CUDA error: out of memory")
_NO_GPU = re.compile(
    r"No CUDA GPUs are available|Found no NVIDIA driver|Torch not compiled with CUDA enabled|"
    r"CUDA driver initialization failed|no CUDA-capable device|NVIDIA driver on your system is too old|"
    r"CUDA is not available|device does not support bfloat16"
)
_NETWORK = re.compile(
    r"ConnectionError|ConnectError|MaxRetryError|Couldn't reach|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|LocalEntryNotFoundError|OfflineModeIsEnabled|"
    r"Connection refused|Read timed out|ConnectTimeout|check your internet connection",
    re.IGNORECASE,
)
_UNKNOWN_MODEL = re.compile(
    r"HFValidationError|Repo id must be in the form|RepositoryNotFoundError|404 Client Error|"
    r"is not a local folder and is not a valid model identifier"
)


def _reason(lines: Sequence[str]) -> str | None:
    """The last exception line (Python prints the final one last), or argparse's error."""
    for line in reversed(lines):
        text = line.strip()
        if m := _ARGPARSE.match(text):
            return m.group(1)
        if _EXC_LINE.match(text) and not text.startswith("Traceback"):
            return text
    return None


def diagnose(
    lines: Sequence[str], returncode: int | None, opts: QuantizeOptions, *, saw_dataset_loading: bool = False
) -> tuple[str, str | None]:
    """The failure as (message, hint) from the log's last lines and the exit code."""
    text = "\n".join(lines)
    reason = _reason(lines)
    if reason is None:
        if returncode is not None and returncode < 0:
            reason = f"lmdeploy was killed by signal {-returncode}"
        else:
            reason = f"lmdeploy exited with code {returncode}"
    if len(reason) > 300:
        reason = reason[:297] + "..."
    message = f"quantization failed: {reason}"
    hint: str | None = None
    if m := _BAD_DATASET.search(text):
        choices = ", ".join(c.strip(" '\"") for c in m.group(2).split(","))
        hint = (
            f"this lmdeploy does not offer the calibration set '{m.group(1)}' (0.18 dropped the tutorial's ptb): "
            f"pick one of {choices}, e.g. --calib-dataset {DEFAULT_CALIB_DATASET}."
        )
    elif "unrecognized arguments" in text or "invalid choice" in text:
        hint = "this lmdeploy does not understand the options tuichat passed: upgrade lmdeploy to 0.18 or later."
    elif "No module named 'lmdeploy'" in text or "No module named lmdeploy" in text:
        hint = (
            f"lmdeploy is not installed for {opts.command[0]}: install it (pip install lmdeploy) or give the "
            "command of an environment that has it."
        )
    elif "No module named 'datasets'" in text:
        hint = (
            "lmdeploy loads calibration data with the 'datasets' package, which is missing: pip install datasets "
            "(or use --calib-samples 0 for data-free quantization, at some cost in quality)."
        )
    elif _OOM.search(text):
        hint = (
            "the GPU ran out of memory: lower --calib-samples (e.g. 64) or --calib-seqlen (e.g. 512), "
            "or stop what else holds the GPU (a running server?)."
        )
    elif _NO_GPU.search(text):
        hint = (
            "no usable GPU: AWQ quantization needs an NVIDIA GPU with CUDA; check nvidia-smi and CUDA_VISIBLE_DEVICES"
        )
        if "bfloat16" in text:
            hint += ", and on an older GPU without bfloat16 pass --dtype float16"
        hint += "."
    elif _NETWORK.search(text):
        if saw_dataset_loading:
            repo = _DATASET_REPOS.get(opts.calib_dataset, opts.calib_dataset)
            hint = (
                f"the calibration data ({opts.calib_dataset}) must be downloaded from the Hugging Face hub; "
                "this machine cannot reach it: run it where the hub is reachable, or pre-download the dataset "
                f"into the HF cache (hub dataset '{repo}'); --calib-samples 0 quantizes without data, at some "
                "cost in quality."
            )
        else:
            hint = (
                f"'{opts.model}' is not a local folder, so lmdeploy tried to download it from the hub, which this "
                "machine cannot reach: download the model where the hub is reachable and give its folder."
            )
    elif _UNKNOWN_MODEL.search(text):
        hint = f"'{opts.model}' is neither a model folder nor a hub id that exists: check the path or the spelling."
    elif "are not supported" in text and "quantification" in text:
        hint = "lmdeploy cannot AWQ-quantize this architecture; the message lists the ones it can."
    elif "No space left on device" in text:
        hint = "the disk is full: free some space, or give --out on a disk with room for the new model."
    elif returncode == -9:
        hint = "the quantizer was killed (often the system ran out of CPU memory): close other programs and retry."
    return message, hint


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class JobStatus:
    """Where a quantize job stands. `layers_done` counts the current phase's finished layers."""

    state: JobState
    layers_done: int
    layers_total: int | None
    elapsed_s: float
    message: str
    hint: str | None = None
    phase: str = "starting"
    fraction: float | None = None
    returncode: int | None = None
    out: Path | None = None  # the finished model, once done

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def line(self) -> str:
        """One progress line: `[01:23] calibrating: 3 of 24 layers`."""
        return f"[{format_elapsed(self.elapsed_s)}] {self.message}"


def format_elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _dir_is_empty(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


class QuantizeJob:
    """A running (or finished) auto_awq job. Use `start`; then `poll`, `wait` or `cancel`. Thread-safe."""

    def __init__(
        self,
        opts: QuantizeOptions,
        out: Path,
        staging: Path,
        created_parent: Path | None,
        log_path: Path,
        log_offset: int,
        proc: Popen[bytes],
        layers_hint: int | None,
        replace_existing: bool,
    ) -> None:
        self.options = opts
        self.out = out
        self.staging = staging
        self.log_path = log_path
        self.proc = proc
        self._created_parent = created_parent
        self._offset = log_offset
        self._pending = ""
        self._tail: deque[str] = deque(maxlen=400)
        self._progress = AwqProgress(layers_hint)
        self._replace_existing = replace_existing
        self._started = time.monotonic()
        self._final: JobStatus | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        opts: QuantizeOptions,
        log_path: Path,
        *,
        overwrite: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> QuantizeJob:
        """Check the model and output folder, then start lmdeploy; raises a TuichatError sentence if it cannot."""
        validate_options(opts)
        layers_hint = _check_model(opts.model)
        out = Path(opts.out).expanduser().absolute()
        _check_out(out, opts.model, overwrite)

        created_parent = _first_missing(out.parent)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o755)
        except OSError as exc:
            raise TuichatError(f"Cannot create the output folder {out}: {exc.strerror}.") from None

        argv = build_argv(opts, staging)
        log_path = Path(log_path)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(f"=== tuichat quantize {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
                fh.write(f"=== output {out} (written to {staging.name} until it is complete)\n")
            offset = log_path.stat().st_size  # parse only this run's output, not earlier runs in the same log
            proc = spawn_group(argv, log_path, env=env)
        except OSError as exc:
            _remove_tree(staging)
            _remove_empty_parents(created_parent, out.parent)
            what = exc.strerror or str(exc)
            raise TuichatError(
                f"Cannot start {opts.command[0]}: {what}. Check the lmdeploy command (it is run as "
                f"'{' '.join(opts.command)} lite auto_awq ...')."
            ) from None
        return cls(opts, out, staging, created_parent, log_path, offset, proc, layers_hint, overwrite)

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the job's process group id."""
        return self.proc.pid

    # ------------------------------------------------------------ progress

    def _read_log(self, final: bool = False) -> None:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return
        self._offset += len(data)
        text = self._pending + data.decode("utf-8", errors="replace")
        parts = re.split(r"\r\n|\r|\n", text)
        self._pending = "" if final else parts.pop()
        for line in parts:
            if line.strip():
                self._tail.append(line)
                self._progress.feed_line(line)

    def _running_status(self) -> JobStatus:
        p = self._progress
        total = p.layers_total
        if p.phase in _LAYER_PHASES:
            message = f"{p.phase}: {p.layers_done} of {total or '?'} layers"
            if p.phase == "calibrating" and not p.layers_done and self.options.calib_samples:
                message = f"calibrating: loading the {self.options.calib_dataset} calibration data"
        else:
            message = {
                "starting": "starting lmdeploy",
                "loading": "loading the model",
                "saving": "saving the quantized model",
            }[p.phase]
        return JobStatus(
            state="running",
            layers_done=p.layers_done,
            layers_total=total,
            elapsed_s=time.monotonic() - self._started,
            message=message,
            phase=p.phase,
            fraction=p.fraction,
        )

    def poll(self) -> JobStatus:
        """Read new log output and report; when lmdeploy has exited, finish the job (rename or clean up) once."""
        with self._lock:
            if self._final is not None:
                return self._final
            self._read_log()
            rc = self.proc.poll()
            if rc is None:
                return self._running_status()
            # The leader is gone; workers it left behind must not outlive the job.
            if group_pids(self.proc.pid):
                stop_group(self.proc.pid, timeout=5.0, proc=self.proc)
            self._read_log(final=True)
            self._final = self._finish(rc)
            return self._final

    def _finish(self, rc: int) -> JobStatus:
        p = self._progress
        elapsed = time.monotonic() - self._started
        if rc == 0 and (self.staging / "config.json").is_file():
            try:
                self._move_into_place()
            except OSError as exc:
                self._clean_up()
                return JobStatus(
                    "failed",
                    p.layers_done,
                    p.layers_total,
                    elapsed,
                    f"quantization finished, but the result could not be moved to {self.out}: {exc.strerror}",
                    "check the permissions of the output folder and run it again.",
                    phase=p.phase,
                    returncode=rc,
                )
            total = p.layers_total
            return JobStatus(
                "done",
                total or 0,
                total,
                elapsed,
                f"quantized model written to {self.out}",
                phase="saving",
                fraction=1.0,
                returncode=rc,
                out=self.out,
            )
        self._clean_up()
        if rc == 0:
            message, hint = "quantization failed: lmdeploy exited without writing a model", None
        else:
            message, hint = diagnose(list(self._tail), rc, self.options, saw_dataset_loading=p.saw_dataset_loading)
        return JobStatus(
            "failed",
            p.layers_done,
            p.layers_total,
            elapsed,
            message,
            hint or f"see the log: {self.log_path}",
            phase=p.phase,
            fraction=p.fraction,
            returncode=rc,
        )

    def _move_into_place(self) -> None:
        out = self.out
        if out.is_dir() and _dir_is_empty(out):
            out.rmdir()
        if out.exists():
            # the user confirmed replacing it (start refused otherwise); swap, then delete the old one
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            out.rename(old)
            try:
                self.staging.rename(out)
            except OSError:
                old.rename(out)
                raise
            _remove_tree(old)
        else:
            self.staging.rename(out)

    def _clean_up(self) -> None:
        _remove_tree(self.staging)
        _remove_empty_parents(self._created_parent, self.out.parent)

    # ------------------------------------------------------------ control

    def cancel(self, timeout: float = 10.0) -> StopResult:
        """Stop the whole process group (SIGINT, then SIGTERM, then SIGKILL) and remove the partial output."""
        with self._lock:
            if self._final is not None:
                return StopResult("none", 0.0, frozenset())
            result = stop_group(self.proc.pid, timeout=timeout, proc=self.proc)
            self._read_log(final=True)
            self._clean_up()
            p = self._progress
            if result.clean:
                message = "cancelled: every lmdeploy process has stopped and the partial output is removed"
                hint = None
            else:
                pids = ", ".join(str(pid) for pid in sorted(result.survivors))
                message = "cancelled, but some lmdeploy processes would not stop"
                hint = f"end them by hand (kill -9 {pids}); they may still hold GPU memory."
            self._final = JobStatus(
                "cancelled",
                p.layers_done,
                p.layers_total,
                time.monotonic() - self._started,
                message,
                hint,
                phase=p.phase,
                fraction=p.fraction,
                returncode=self.proc.returncode,
            )
            return result

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> JobStatus:
        """Poll until the job has finished or `timeout` seconds passed; returns the latest status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.poll()
            if status.finished or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(interval)

    def profile(self, name: str | None = None) -> tuple[str, dict[str, object]]:
        """The profile for the finished model: model_format 'awq' and a KV-cache share of 0.4."""
        status = self.poll()
        if status.state != "done":
            raise TuichatError("The quantize job has not finished successfully, so there is no model to profile.")
        profile_name, table = profile_for(inspect_model(self.out), name)
        table["model_format"] = "awq"
        table["cache_max_entry_count"] = 0.4
        return profile_name, table


# ---------------------------------------------------------------- checks and tidying


def _check_model(model: str) -> int | None:
    """Refuse what cannot work before starting; returns the layer count from config.json when known."""
    local = Path(model).expanduser()
    if local.exists():
        info = inspect_model(local)  # raises a sentence for a folder without a usable config.json
        if info.quantization is not None:
            raise TuichatError(
                f"{model} is already quantized ({info.quant_text}): quantize the original model instead."
            )
        try:
            config = json.loads((local / "config.json").read_text(encoding="utf-8"))
            for sub in ("text_config", "llm_config", "language_config"):
                if isinstance(config.get(sub), dict):
                    config = config[sub]
                    break
            layers = config.get("num_hidden_layers") or config.get("num_layers")
            return int(layers) if isinstance(layers, int) else None
        except (OSError, ValueError):
            return None
    if looks_like_hub_id(model):
        return None  # lmdeploy downloads it first
    raise TuichatError(
        f"There is no model folder at {model}, and it is not a hub id such as 'internlm/internlm2-chat-1_8b': "
        "check the path."
    )


def _check_out(out: Path, model: str, overwrite: bool) -> None:
    if out.is_symlink():
        raise TuichatError(f"The output {out} is a symbolic link: give the folder it points to, or a new name.")
    if out.exists() and not out.is_dir():
        raise TuichatError(f"The output {out} exists and is not a folder: choose another --out.")
    local = Path(model).expanduser()
    if local.exists():
        real_model = local.resolve()
        real_out = out.resolve()
        if real_out == real_model or real_model in real_out.parents:
            raise TuichatError(f"The output {out} is inside the model folder: choose a folder outside {model}.")
        if real_out in real_model.parents:
            raise TuichatError(f"The output {out} holds the model itself: choose another --out.")
    if out.is_dir() and not _dir_is_empty(out) and not overwrite:
        raise TuichatError(
            f"The output folder {out} already exists and is not empty: choose another --out, "
            "or confirm replacing it (--yes on the command line)."
        )


def _first_missing(folder: Path) -> Path | None:
    """The topmost ancestor of `folder` (or itself) that does not exist yet: what mkdir(parents) will create."""
    missing: Path | None = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_empty_parents(created: Path | None, folder: Path) -> None:
    """Remove the folders the job created for the output's parent, if they are still empty."""
    if created is None:
        return
    current = folder
    while True:
        try:
            current.rmdir()
        except OSError:
            return
        if current == created:
            return
        current = current.parent


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):  # a file or link at that name
        with contextlib.suppress(OSError):
            path.unlink()
