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

Calibration comes from local text (`calib_file`, or the user's saved conversations written to a private temp
file), from a set lmdeploy downloads (`calib_dataset`), or from nothing (`calib_samples = 0`, data-free). Local
text runs through tuichat's own entry (`python -m tuichat.models.calib_entry`, see that module) in the job's process
group, so nothing needs the hub. `preflight` refuses before any GPU work what cannot work (an architecture
lmdeploy cannot quantize, sizes the group size does not divide, a full disk or GPU, a named set on a machine
without `datasets` or the hub, too little text).

Each running job has a record (state dir, `quantize/jobs/`) naming its process group, its owner (this tuichat)
and its staging folder. A tuichat that died mid-job leaves the record behind; `find_orphan_jobs` finds it on the
next start and `OrphanJob.clean_up` stops the group if it still runs and removes the staging folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from subprocess import Popen
from typing import Literal

from tuichat import paths
from tuichat.durations import format_clock
from tuichat.errors import TuichatError
from tuichat.models import calib_entry
from tuichat.models.discovery import ModelInfo, config_section, hf_cache_dir, inspect_model, looks_like_hub_id
from tuichat.models.fit import AWQ_CACHE_SHARE, fit_estimate, roomiest_gpu
from tuichat.server.gpu import GpuSnapshot, format_bytes
from tuichat.server.logfollow import LogFollower, collapse_cr
from tuichat.server.procgroup import StopResult, group_pids, pid_alive, process_start_ticks, spawn_group, stop_group
from tuichat.server.profiles import Profile, profile_for_model

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

# lmdeploy 0.18's lite/apis/calibrate.py LAYER_TYPE_MAP: the model classes auto_awq knows how to walk
QUANTIZABLE_ARCHITECTURES = (
    "InternLM2ForCausalLM",
    "InternLM3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
    "LlamaForCausalLM",
    "LlavaLlamaForCausalLM",
    "MGMLlamaForCausalLM",
    "InternS2PreviewForConditionalGeneration",
    "Phi3ForCausalLM",
    "ChatGLMForConditionalGeneration",
    "MixtralForCausalLM",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "MistralForCausalLM",
)
CalibSource = Literal["file", "history", "dataset", "none"]
CALIB_SOURCE_WORDS: dict[str, str] = {
    "file": "local text",
    "history": "your saved conversations",
    "dataset": "a downloaded set",
    "none": "no data (data-free, lower quality)",
}
_OFFLINE_ROUTES = (
    "--calib-file PATH (a local .txt, .md or .jsonl file, or a folder of them), --calib-history (your saved "
    "conversations), or --calib-samples 0 (data-free, at some cost in quality)"
)

JobState = Literal["running", "done", "failed", "cancelled"]
PHASES = ("starting", "loading", "calibrating", "smoothing", "quantizing", "saving")
_LAYER_PHASES = ("calibrating", "smoothing", "quantizing")
LINES_KEPT = 2000  # log lines a job holds for its view between two reads


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
    calib_file: Path | None = None  # local text (a file or a folder): calibrated by tuichat's entry, offline
    calib_history: bool = False  # the user's saved conversations, written to a private temp file
    trust_remote_code: bool = False  # passed to lmdeploy and the tokenizer, as lmdeploy's own flag
    python: str | None = None  # the Python that runs tuichat's entry; None: the one `command` uses

    @property
    def calib_source(self) -> CalibSource:
        if self.calib_samples == 0:
            return "none"
        if self.calib_file is not None:
            return "file"
        if self.calib_history:
            return "history"
        return "dataset"

    @property
    def calib_words(self) -> str:
        """Where the calibration data comes from, in words."""
        source = self.calib_source
        if source == "file" and self.calib_file is not None:
            return f"local text ({self.calib_file})"
        if source == "dataset":
            return f"the {self.calib_dataset} set (downloaded from the Hugging Face hub)"
        return CALIB_SOURCE_WORDS[source]


def check_dataset_name(name: str) -> None:
    """Refuse a set lmdeploy 0.18 does not offer, naming those it does."""
    if name in CALIB_DATASETS:
        return
    valid = ", ".join(CALIB_DATASETS)
    dropped = " (lmdeploy 0.18 dropped the tutorial's ptb)" if name.strip().lower() == "ptb" else ""
    raise TuichatError(
        f"'{name}' is not a calibration set lmdeploy offers{dropped}: use one of {valid}, or calibrate offline "
        f"with {_OFFLINE_ROUTES}."
    )


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
    if opts.calib_file is not None and opts.calib_history:
        raise TuichatError("Give either --calib-file or --calib-history, not both: each is a whole calibration set.")
    if opts.calib_samples == 0 and (opts.calib_file is not None or opts.calib_history):
        raise TuichatError(
            "--calib-samples 0 quantizes without calibration data, so the calibration text would go unused: "
            "give a number of samples (e.g. 64), or drop --calib-file / --calib-history."
        )
    if opts.calib_source == "dataset":
        check_dataset_name(opts.calib_dataset)


def job_python(opts: QuantizeOptions) -> str:
    """The Python that has lmdeploy: `opts.python`, else the one `opts.command` runs, else this one."""
    if opts.python:
        return opts.python
    command = opts.command
    if len(command) >= 2 and (command[1] == "-m" or command[1].endswith(".py")):
        return command[0]
    if command:
        exe = shutil.which(command[0]) or command[0]
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(exe, encoding="utf-8") as fh:
                first = fh.readline().strip()
            if first.startswith("#!") and "python" in first:
                parts = first[2:].split()
                # `#!/usr/bin/env python3` names the interpreter second
                return parts[1] if Path(parts[0]).name == "env" and len(parts) > 1 else parts[0]
    return sys.executable


def _same_python(python: str) -> bool:
    found = shutil.which(python) or python
    with contextlib.suppress(OSError):
        return os.path.samefile(found, sys.executable)
    return False


def entry_prefix(python: str) -> list[str]:
    """How to run tuichat's calibration entry under `python`: as a module here, by its file elsewhere."""
    if _same_python(python):
        return [python, "-m", "tuichat.models.calib_entry"]
    return [python, calib_entry.__file__]


def build_argv(opts: QuantizeOptions, work_dir: Path | None = None, calib_path: Path | None = None) -> list[str]:
    """The argv of the run; lmdeploy writes into `work_dir` (the job's staging folder), by default `opts.out`.

    Local text (`calib_path`, by default `opts.calib_file`) runs tuichat's entry; a named set or data-free
    quantization runs `lmdeploy lite auto_awq` itself.
    """
    source = opts.calib_source
    local = calib_path if calib_path is not None else opts.calib_file
    if source in ("file", "history"):
        if local is None:
            raise TuichatError("The calibration text has not been written yet: start the job with QuantizeJob.start.")
        argv = [*entry_prefix(job_python(opts)), opts.model, "--calib-file", str(local)]
    else:
        argv = [*opts.command, "lite", "auto_awq", opts.model]
        argv += ["--calib-dataset", opts.calib_dataset]
    argv += ["--calib-samples", str(opts.calib_samples), "--calib-seqlen", str(opts.calib_seqlen)]
    argv += ["--w-bits", str(opts.w_bits), "--w-group-size", str(opts.group_size)]
    argv += ["--work-dir", str(work_dir if work_dir is not None else opts.out)]
    if opts.dtype is not None:
        argv += ["--dtype", opts.dtype]
    if opts.trust_remote_code:
        argv += ["--trust-remote-code"]
    return argv


# ---------------------------------------------------------------- calibration text


def history_text(store_path: Path | None = None) -> str:
    """The user and assistant turns of every saved conversation (oldest first), without control sequences."""
    from tuichat.chat import store as store_mod
    from tuichat.chat.sanitize import clean

    path = store_mod.default_path() if store_path is None else Path(store_path)
    if not path.is_file():
        return ""
    blocks: list[str] = []
    with store_mod.Store.open(path) as db:
        for conv in reversed(db.list_conversations()):
            for msg in db.messages(conv.id):
                if msg.role in ("user", "assistant"):
                    text = clean(msg.content).strip()
                    if text:
                        blocks.append(text)
    return "\n\n".join(blocks)


def write_private_temp(text: str, folder: Path) -> Path:
    """`text` in a new 0600 file under `folder` (0700): conversations are private."""
    paths.ensure_private_dir(folder)
    fd, name = tempfile.mkstemp(prefix="calib-history-", suffix=".txt", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def local_text(opts: QuantizeOptions, store_path: Path | None = None) -> str:
    """The calibration text of a local source; a TuichatError sentence when there is none or too little."""
    if opts.calib_source == "history":
        text = history_text(store_path)
        if not text.strip():
            raise TuichatError(
                "There are no saved conversations to calibrate on: chat a while first, or use " + _OFFLINE_ROUTES + "."
            )
        what = "Your saved conversations"
    else:
        assert opts.calib_file is not None
        try:
            text = calib_entry.read_text(opts.calib_file)
        except calib_entry.CalibrationError as exc:
            raise TuichatError(str(exc)) from None
        what = "The calibration text"
    # A token is at least one byte in byte-level BPE and SentencePiece alike: fewer bytes can never be enough.
    size = len(text.encode("utf-8"))
    if size < opts.calib_samples * opts.calib_seqlen:
        raise TuichatError(
            calib_entry.too_little_text(size, opts.calib_samples, opts.calib_seqlen, what).replace(
                f"has {size} tokens", f"has {size} bytes, so at most {size} tokens"
            )
        )
    return text


# ---------------------------------------------------------------- preflight


def _has_module(python: str, name: str) -> bool:
    if _same_python(python):
        return importlib.util.find_spec(name) is not None
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 1)"
    try:
        return subprocess.run([python, "-c", code, name], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in (
        "",
        "0",
    ):
        return False
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        return httpx.head(endpoint, timeout=4.0, follow_redirects=False).status_code < 500
    except httpx.HTTPError:
        return False


def _dataset_cached(name: str) -> bool:
    """True if the set's hub files are in the Hugging Face cache (datasets can then load them offline)."""
    repo = _DATASET_REPOS.get(name, name)
    hub = hf_cache_dir()
    home = hub.parent
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
    candidates = [hub / f"datasets--{repo.replace('/', '--')}", datasets_cache / repo.replace("/", "___")]
    return any(c.is_dir() for c in candidates)


def _gpu_snapshot() -> GpuSnapshot | None:
    from tuichat.server.gpu import NvmlReader

    reader = NvmlReader()
    try:
        return reader.read()
    except Exception:  # no NVML at all: nothing to check against
        return None
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def _disk_free(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage("/").free


@dataclass(frozen=True)
class Probes:
    """What preflight asks of the machine; tests give fakes (no hub, no GPU, no network)."""

    has_module: Callable[[str, str], bool] = _has_module
    hub_reachable: Callable[[], bool] = _hub_reachable
    dataset_cached: Callable[[str], bool] = _dataset_cached
    gpu_snapshot: Callable[[], GpuSnapshot | None] = _gpu_snapshot
    disk_free: Callable[[Path], int] = _disk_free


DEFAULT_PROBES = Probes()  # looked up at each preflight, so a test can swap it for the whole CLI


def _model_config(model: str) -> dict[str, object] | None:
    path = Path(model).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _architectures(config: Mapping[str, object]) -> list[str]:
    names: list[str] = []
    for cfg in (config, config_section(config)):
        archs = cfg.get("architectures")
        if isinstance(archs, list):
            names += [a for a in archs if isinstance(a, str) and a not in names]
    return names


def _positive_int(cfg: Mapping[str, object], key: str) -> int | None:
    value = cfg.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _largest_group(sizes: Sequence[int], limit: int) -> int:
    group = limit
    while group > 1 and any(size % group for size in sizes):
        group //= 2
    return group


def check_architecture(model: str, config: Mapping[str, object], group_size: int) -> None:
    """The architecture is one auto_awq can walk, and the group size divides the layers' widths."""
    archs = _architectures(config)
    if not any(a in QUANTIZABLE_ARCHITECTURES for a in archs):
        named = ", ".join(archs) or str(config.get("model_type") or "an unnamed architecture")
        raise TuichatError(
            f"lmdeploy 0.18 cannot AWQ-quantize {model}: its architecture ({named}) is not one it knows "
            f"({', '.join(QUANTIZABLE_ARCHITECTURES)}). Use a model of one of those families, or an AWQ model "
            "someone has published."
        )
    text = config_section(config)
    sizes = {
        k: v for k in ("hidden_size", "intermediate_size", "moe_intermediate_size") if (v := _positive_int(text, k))
    }
    bad = {k: v for k, v in sizes.items() if v % group_size}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        fit = _largest_group(list(sizes.values()), group_size)
        raise TuichatError(
            f"The group size {group_size} does not divide the model's {what}, so its weights cannot be grouped: "
            f"use --group-size {fit} (the largest power of two that divides them all)."
        )


def _layer_shapes(config: Mapping[str, object]) -> tuple[int, int, int, int, int] | None:
    """(hidden, layers, vocab, linear params per layer, intermediate) from a config, or None."""
    cfg = config_section(config)
    hidden = _positive_int(cfg, "hidden_size")
    layers = _positive_int(cfg, "num_hidden_layers")
    vocab = _positive_int(cfg, "vocab_size")
    if not hidden or not layers or not vocab:
        return None
    heads = _positive_int(cfg, "num_attention_heads") or max(1, hidden // 128)
    kv_heads = _positive_int(cfg, "num_key_value_heads") or heads
    head_dim = _positive_int(cfg, "head_dim") or hidden // heads
    inter = _positive_int(cfg, "intermediate_size") or 4 * hidden
    experts = _positive_int(cfg, "num_local_experts") or _positive_int(cfg, "num_experts") or 1
    expert_inter = _positive_int(cfg, "moe_intermediate_size") or inter
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * (expert_inter * experts if experts > 1 else inter)
    return hidden, layers, vocab, attn + mlp, inter


def estimate_output_bytes(info: ModelInfo, config: Mapping[str, object], w_bits: int, group_size: int) -> int:
    """About how big the AWQ model will be: packed linear layers, everything else in 16 bits, plus the rest."""
    other_files = max(0, info.size_bytes - info.weights_bytes)
    shapes = _layer_shapes(config)
    if shapes is None or not info.params_estimate:
        return info.weights_bytes + other_files
    _, layers, _, linear_per_layer, _ = shapes
    linear = min(layers * linear_per_layer, info.params_estimate)
    rest = info.params_estimate - linear
    packed = linear * w_bits // 8 + (linear // group_size) * 4  # fp16 scale + packed zero point per group
    return rest * 2 + packed + other_files


def estimate_gpu_bytes(config: Mapping[str, object], opts: QuantizeOptions) -> int | None:
    """About the GPU memory auto_awq needs: embeddings, one layer at a time, every sample's activations."""
    shapes = _layer_shapes(config)
    if shapes is None:
        return None
    hidden, _, vocab, linear_per_layer, inter = shapes
    weights = (vocab * hidden + linear_per_layer) * 2
    samples = opts.calib_samples
    # each sample's input and output of the layer being calibrated stay on the GPU, plus one batch's MLP
    acts = samples * opts.calib_seqlen * hidden * 2 * 2 + opts.calib_seqlen * inter * 2 * 4 if samples else 0
    return weights + acts + 1_000_000_000


def preflight(
    opts: QuantizeOptions,
    out: Path,
    probes: Probes | None = None,
) -> list[str]:
    """Refuse (TuichatError) what cannot work before any GPU work; returns notes for the user.

    An output folder being replaced is freed only once the new model is complete, so it never counts as room.
    """
    probes = probes or DEFAULT_PROBES
    notes: list[str] = []
    config = _model_config(opts.model)
    local = Path(opts.model).expanduser().is_dir()
    info: ModelInfo | None = inspect_model(Path(opts.model).expanduser()) if local and config is not None else None
    if config is not None:
        check_architecture(opts.model, config, opts.group_size)
    elif not local:
        notes.append(f"{opts.model} is downloaded first, so its architecture is checked only then.")

    if info is not None and config is not None:
        need = int(estimate_output_bytes(info, config, opts.w_bits, opts.group_size) * 1.1) + 50_000_000
        free = probes.disk_free(out.parent)
        if free < need:
            raise TuichatError(
                f"The quantized model needs about {format_bytes(need)} of disk, but {out.parent} has "
                f"{format_bytes(free)} free: free some space, or give --out on a disk with more room."
            )
        gpu_need = estimate_gpu_bytes(config, opts)
        snapshot = probes.gpu_snapshot()
        gpu = roomiest_gpu(snapshot) if snapshot is not None and snapshot.error is None else None
        if gpu is not None and gpu.mem_total is not None and gpu.mem_used is not None and gpu_need is not None:
            gpu_free = gpu.mem_total - gpu.mem_used
            if gpu_free < gpu_need:
                lower = " or lower --calib-samples / --calib-seqlen" if opts.calib_samples else ""
                raise TuichatError(
                    f"Quantizing needs about {format_bytes(gpu_need)} of GPU memory, but GPU {gpu.index} "
                    f"({gpu.name}), the emptiest, has {format_bytes(gpu_free)} free: stop what holds it "
                    f"(a running server?){lower}."
                )
        elif gpu_need is not None:
            notes.append("GPU memory could not be read, so it was not checked.")

    source = opts.calib_source
    if source == "none":
        notes.append(
            "Data-free quantization (--calib-samples 0): the weights are rounded without calibration, "
            "so the model loses more quality than with calibration text."
        )
    elif source == "dataset":
        python = job_python(opts)
        if not probes.has_module(python, "datasets"):
            raise TuichatError(
                f"lmdeploy loads the {opts.calib_dataset} set with the 'datasets' package, which {python} does "
                f"not have: install it (pip install datasets) where the hub is reachable, or calibrate offline "
                f"with {_OFFLINE_ROUTES}."
            )
        if not probes.hub_reachable():
            if not probes.dataset_cached(opts.calib_dataset):
                raise TuichatError(
                    f"The {opts.calib_dataset} calibration set is downloaded from the Hugging Face hub, which this "
                    f"machine cannot reach (and it is not in the cache): calibrate offline with {_OFFLINE_ROUTES}."
                )
            notes.append(f"The hub is unreachable; the cached copy of {opts.calib_dataset} is used.")
    return notes


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
    for line in reversed(lines):
        # tuichat's own entry says what went wrong in a sentence that already says what to do
        if line.startswith(calib_entry.ERROR_PREFIX):
            return f"quantization failed: {line[len(calib_entry.ERROR_PREFIX) :].strip()}", None
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


# the job's counter is the project's one clock format; the old name stays for the callers that import it
format_elapsed = format_clock


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
        *,
        notes: Sequence[str] = (),
        calib_temp: Path | None = None,
        record_path: Path | None = None,
        source_weights: int = 0,
    ) -> None:
        self.options = opts
        self.out = out
        self.staging = staging
        self.log_path = log_path
        self.proc = proc
        self.notes = list(notes)  # preflight's sentences (data-free quality, a cached set, an unread GPU)
        self.source_weights = source_weights  # the original model's weight files, for the before/after
        self._created_parent = created_parent
        # parse only this run's output, not earlier runs in the same log
        self._follower = LogFollower(log_path, offset=log_offset)
        self._tail: deque[str] = deque(maxlen=400)
        self._fed = 0  # redraws of the unfinished last line already fed to the progress
        self._fresh: deque[str] = deque(maxlen=LINES_KEPT)  # lines not yet taken by `new_lines`
        self._progress = AwqProgress(layers_hint)
        self._replace_existing = replace_existing
        self._calib_temp = calib_temp
        self._record_path = record_path
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
        probes: Probes | None = None,
        store_path: Path | None = None,
        record_dir: Path | None = None,
    ) -> QuantizeJob:
        """Check everything that can be checked, then start the job; raises a TuichatError sentence if it cannot.

        `store_path` is the conversation store `calib_history` reads (default: tuichat's own); `record_dir`
        where the job's record goes (default: the state dir's `quantize/jobs`).
        """
        validate_options(opts)
        layers_hint = _check_model(opts.model)
        out = Path(opts.out).expanduser().absolute()
        _check_out(out, opts.model, overwrite)
        source = opts.calib_source
        text = local_text(opts, store_path) if source in ("file", "history") else None
        notes = preflight(opts, out, probes)
        local_model = Path(opts.model).expanduser()
        source_weights = inspect_model(local_model).weights_bytes if local_model.is_dir() else 0

        calib_temp: Path | None = None
        calib_path: Path | None = None
        if source == "file" and opts.calib_file is not None:
            calib_path = Path(opts.calib_file).expanduser().absolute()
        elif source == "history" and text is not None:
            try:
                calib_temp = calib_path = write_private_temp(text, paths.state_dir() / "quantize")
            except OSError as exc:
                raise TuichatError(
                    f"Cannot write the conversations for calibration: {exc.strerror or exc}. "
                    "Check that tuichat's state folder is writable."
                ) from None

        created_parent = _first_missing(out.parent)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o755)
        except OSError as exc:
            _remove_file(calib_temp)
            raise TuichatError(f"Cannot create the output folder {out}: {exc.strerror}.") from None

        argv = build_argv(opts, staging, calib_path)
        log_path = Path(log_path)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(f"=== tuichat quantize {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
                fh.write(f"=== output {out} (written to {staging.name} until it is complete)\n")
                fh.write(f"=== calibration: {opts.calib_words}\n")
            offset = log_path.stat().st_size  # parse only this run's output, not earlier runs in the same log
            proc = spawn_group(argv, log_path, env=env)
        except OSError as exc:
            _remove_tree(staging)
            _remove_empty_parents(created_parent, out.parent)
            _remove_file(calib_temp)
            what = exc.strerror or str(exc)
            raise TuichatError(
                f"Cannot start {argv[0]}: {what}. Check the lmdeploy command (it is run as '{' '.join(argv[:3])} ...')."
            ) from None
        record = _write_record(
            record_dir or default_record_dir(),
            proc.pid,
            {"staging": str(staging), "out": str(out), "log": str(log_path), "model": opts.model},
            calib_temp,
        )
        return cls(
            opts,
            out,
            staging,
            created_parent,
            log_path,
            offset,
            proc,
            layers_hint,
            overwrite,
            notes=notes,
            calib_temp=calib_temp,
            record_path=record,
            source_weights=source_weights,
        )

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the job's process group id."""
        return self.proc.pid

    # ------------------------------------------------------------ progress

    def _read_log(self, final: bool = False) -> None:
        while True:
            before = self._follower.offset
            lines, partial = self._follower.read()
            for line in lines:
                self._take_line(line)
            self._feed_partial(partial)
            if self._follower.offset == before:
                break
        if final:
            self._take_line(self._follower.flush())

    def _feed(self, segments: list[str]) -> None:
        for segment in segments:
            if segment.strip():
                self._tail.append(segment)
                self._progress.feed_line(segment)

    def _feed_partial(self, partial: str) -> None:
        # a tqdm bar redraws with carriage returns and ends its line only when done: its finished redraws are
        # progress now, not when the line ends
        done = partial.split("\r")[:-1]
        if len(done) < self._fed:
            self._fed = 0  # the follower cut an endless line
        self._feed(done[self._fed :])
        self._fed = len(done)

    def _take_line(self, line: str) -> None:
        self._feed(line.split("\r")[self._fed :])
        self._fed = 0
        if collapse_cr(line).strip():
            self._fresh.append(line)

    def new_lines(self) -> list[str]:
        """The log lines (as written: `\r` redraws left in) read since the last call: the view shows them, so
        the log is read once, here. Reads the log first; at most the last `LINES_KEPT` are kept between calls."""
        with self._lock:
            if self._final is None:
                self._read_log()
            taken = list(self._fresh)
            self._fresh.clear()
            return taken

    def _running_status(self) -> JobStatus:
        p = self._progress
        total = p.layers_total
        if p.phase in _LAYER_PHASES:
            message = f"{p.phase}: {p.layers_done} of {total or '?'} layers"
            if p.phase == "calibrating" and not p.layers_done and self.options.calib_samples:
                message = {
                    "file": "calibrating: feeding the local text's samples",
                    "history": "calibrating: feeding your conversations' samples",
                }.get(
                    self.options.calib_source, f"calibrating: loading the {self.options.calib_dataset} calibration data"
                )
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
            self._forget()
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

    def _forget(self) -> None:
        """The job is over: its private calibration text and its record go."""
        _remove_file(self._calib_temp)
        _remove_file(self._record_path)

    # ------------------------------------------------------------ control

    def cancel(self, timeout: float = 10.0) -> StopResult:
        """Stop the whole process group (SIGINT, then SIGTERM, then SIGKILL) and remove the partial output."""
        with self._lock:
            if self._final is not None:
                return StopResult("none", 0.0, frozenset())
            result = stop_group(self.proc.pid, timeout=timeout, proc=self.proc)
            self._read_log(final=True)
            self._clean_up()
            self._forget()
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

    def make_profile(self, name: str | None = None) -> tuple[str, Profile]:
        """The profile for the finished model: model_format 'awq' and AWQ's KV-cache share."""
        status = self.poll()
        if status.state != "done":
            raise TuichatError("The quantize job has not finished successfully, so there is no model to profile.")
        profile_name, base = profile_for_model(inspect_model(self.out), name)
        return profile_name, replace(base, model_format="awq", cache_max_entry_count=AWQ_CACHE_SHARE)

    def summary(self, snapshot: GpuSnapshot | None, cache_share: float = AWQ_CACHE_SHARE) -> list[str]:
        """Sentences for a finished job: calibration, weights before and after, the fit of both, how to serve."""
        status = self.poll()
        if status.state != "done":
            return []
        opts = self.options
        after = inspect_model(self.out)
        lines: list[str] = []
        if opts.calib_source == "none":
            lines.append("Quantized data-free (no calibration): expect lower quality than with calibration text.")
        else:
            lines.append(
                f"Calibrated on {opts.calib_words}: {opts.calib_samples} samples of {opts.calib_seqlen} tokens."
            )
        before = self.source_weights
        if before > 0:
            lines.append(
                f"Weights: {format_bytes(before)} before, {format_bytes(after.weights_bytes)} after "
                f"({after.weights_bytes * 100 // before}% of the original)."
            )
        else:
            lines.append(f"Weights after quantization: {format_bytes(after.weights_bytes)}.")
        lines += fit_lines(before, after.weights_bytes, snapshot, cache_share)
        lines.append(
            'Serve it with model_format = "awq" (the profile has it). TurboMind needs its CUDA 12 build; where it '
            'cannot load, set backend = "pytorch" in the profile: the PyTorch backend serves AWQ weights too.'
        )
        return lines


def fit_lines(before: int, after: int, snapshot: GpuSnapshot | None, cache_share: float) -> list[str]:
    """The fit estimate of the original and of the quantized weights on the emptiest GPU, at one KV share."""
    gpu = roomiest_gpu(snapshot) if snapshot is not None and snapshot.error is None else None
    if gpu is None or gpu.mem_total is None or gpu.mem_used is None:
        return ["Fit: no estimate, GPU memory cannot be read here."]
    free = gpu.mem_total - gpu.mem_used
    lines = []
    for label, size in (("original", before), ("quantized", after)):
        if size > 0:
            lines.append(
                f"Fit of the {label} model on GPU {gpu.index}: "
                + fit_estimate(size, free, gpu.mem_total, cache_share).sentence
            )
    return lines


# ---------------------------------------------------------------- job records and orphans


def default_record_dir() -> Path:
    return paths.state_dir() / "quantize" / "jobs"


def _write_record(folder: Path, pid: int, fields: Mapping[str, str], calib_temp: Path | None) -> Path | None:
    """A record of a started job, so that a tuichat that dies mid-job leaves a trace the next start finds."""
    record = {
        "pid": pid,
        "start_ticks": process_start_ticks(pid),
        "owner_pid": os.getpid(),
        "owner_ticks": process_start_ticks(os.getpid()),
        "started": time.time(),
        "calib_temp": str(calib_temp) if calib_temp is not None else None,
        **fields,
    }
    path = folder / f"job-{pid}-{secrets.token_hex(3)}.json"
    try:
        paths.write_private(path, json.dumps(record, indent=2) + "\n")
    except OSError:
        return None  # the job still runs; only a crash of this tuichat would go unnoticed
    return path


def _same_process(pid: object, ticks: object) -> bool:
    """True if `pid` is alive and is the process that had `ticks` as its start time (not a reused pid)."""
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    now = process_start_ticks(pid)
    return ticks is None or now is None or now == ticks


@dataclass(frozen=True)
class OrphanJob:
    """A quantize job whose tuichat ended without finishing it: maybe still running, maybe a staging folder."""

    record: Path
    pid: int
    start_ticks: int | None
    staging: Path
    out: Path
    model: str
    started: float
    log: Path | None = None
    calib_temp: Path | None = None

    @property
    def running(self) -> bool:
        if pid_alive(self.pid):
            return _same_process(self.pid, self.start_ticks)
        # the leader is gone but its workers may not be; the kernel never reuses a pid still naming a group
        return bool(group_pids(self.pid))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started))
        state = f"is still running (process group {self.pid})" if self.running else "has stopped"
        left = f", and its partial output {self.staging} is still there" if self.staging.exists() else ""
        return (
            f"A quantize job of {self.model} into {self.out}, started {when} by a tuichat that has ended, "
            f"{state}{left}."
        )

    def clean_up(self, timeout: float = 10.0) -> str:
        """Stop the job's group if it runs, remove the staging folder and the record; one sentence on how it went."""
        survivors: frozenset[int] = frozenset()
        stopped = ""
        if self.running:
            result = stop_group(self.pid, timeout=timeout)
            survivors = result.survivors
            stopped = f"stopped the job ({result.signal_used}); "
        _remove_tree(self.staging)
        _remove_file(self.calib_temp)
        if survivors:
            pids = ", ".join(str(p) for p in sorted(survivors))
            return (
                f"The old job's processes {pids} would not stop: end them with `kill -9 {pids}`; they may hold "
                "GPU memory. Its partial output is removed."
            )
        _remove_file(self.record)
        return f"Cleaned up: {stopped}removed {self.staging.name}."


def find_orphan_jobs(record_dir: Path | None = None) -> list[OrphanJob]:
    """Jobs whose tuichat has ended while they ran. Records with nothing left to clean are dropped quietly."""
    folder = record_dir or default_record_dir()
    found: list[OrphanJob] = []
    try:
        records = sorted(folder.glob("job-*.json"))
    except OSError:
        return found
    for path in records:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            orphan = OrphanJob(
                record=path,
                pid=int(data["pid"]),
                start_ticks=data.get("start_ticks"),
                staging=Path(data["staging"]),
                out=Path(data["out"]),
                model=str(data.get("model", "?")),
                started=float(data.get("started", 0.0)),
                log=Path(data["log"]) if data.get("log") else None,
                calib_temp=Path(data["calib_temp"]) if data.get("calib_temp") else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            _remove_file(path)  # not ours to understand: a broken record cannot be acted on
            continue
        if _same_process(data.get("owner_pid"), data.get("owner_ticks")):
            continue  # a live tuichat follows it
        if not orphan.running and not orphan.staging.exists():
            _remove_file(orphan.calib_temp)
            _remove_file(path)
            continue
        found.append(orphan)
    return found


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


def _remove_file(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):  # a file or link at that name
        with contextlib.suppress(OSError):
            path.unlink()
