"""Local model discovery, a model folder's facts, and the profile a chosen model gets (the fit lives in `fit`).

A model is a folder with a `config.json` (Hugging Face layout). They are found under the configured model roots
(a root may itself be a model, hold models, or hold `org/model` folders; symlinked folders count, as the
tutorial made one), in the Hugging Face cache (`models--org--name/snapshots/REV/`) and in the ModelScope cache
(`org/name/`, newer versions `models/org/name/`). A broken `config.json` skips the folder and becomes a
problem sentence rather than an exception, so one bad download cannot hide every other model.

Parameter counts come from the safetensors headers when there are any (exact, and cheap: only the header is
read), else from the config's shape numbers (an estimate). Byte counts are decimal (see `gpu.format_bytes`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tuichat.errors import TuichatError
from tuichat.models.fit import AWQ_CACHE_SHARE

# tests/test_models.py still imports the fit estimate from here; it lives in tuichat.models.fit
from tuichat.models.fit import fit_estimate as fit_estimate

# Weight files: what the GPU has to hold. Calibration statistics (lmdeploy's *_stats.pth) are not weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_WEIGHTS = re.compile(r"(^|_)(inputs|outputs|key|value)_stats\.pth$|^training_args\.bin$|optimizer")

# Architectures that take images, beyond the ones recognisable from a vision block in their config.
_VLM_ARCH = re.compile(
    r"llava|vl(?:chat)?(?:moe)?for|vlm|vision|internvl|minicpmv|cogvlm|molmo|phi3v|multimodality|"
    r"idefics|paligemma|pixtral|mllama|gemma3forconditional|llama4forconditional|glm4v|interns1",
    re.IGNORECASE,
)
_VISION_KEYS = ("vision_config", "vision_tower", "mm_vision_tower", "visual", "vit_config", "image_token_index")

_SAFETENSORS_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "int8": 1}
# Quantization side tensors: scales and zero points are not parameters of the model.
_QUANT_SIDE = re.compile(r"\.(qzeros|scales|g_idx|weight_scale(_inv)?|input_scale|weight_zero_point)$")

_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True)
class ModelInfo:
    """What tuichat knows about one local model folder. `path` is as found (a symlink stays a symlink)."""

    path: Path
    name: str
    architecture: str
    params_estimate: int | None
    dtype: str | None
    quantization: str | None  # 'awq', 'gptq', 'lmdeploy-awq', 'fp8', ... (lower case); None: full precision
    w_bits: int | None
    size_bytes: int
    is_vlm: bool
    hub_id: str | None = None  # 'org/name' for models found in a hub cache
    weights_bytes: int = 0  # the weight files alone: what the GPU must hold

    @property
    def model_format(self) -> str | None:
        """lmdeploy's --model-format for this folder, or None for plain Hugging Face weights."""
        if self.quantization in ("awq", "lmdeploy-awq"):
            return "awq"
        if self.quantization == "gptq":
            return "gptq"
        if self.quantization in ("fp8", "compressed-tensors", "mxfp4"):
            return self.quantization
        return None

    @property
    def params_text(self) -> str:
        return format_params(self.params_estimate)

    @property
    def quant_text(self) -> str:
        if self.quantization is None:
            return "-"
        return f"{self.quantization} w{self.w_bits}" if self.w_bits else self.quantization


@dataclass(frozen=True)
class DiscoveryResult:
    """Models found (sorted by name) and one sentence per folder that was skipped because it is broken."""

    models: list[ModelInfo]
    problems: list[str]


# ---------------------------------------------------------------- discovery


def hf_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub or ~/.cache/..."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return _home(env) / ".cache" / "huggingface" / "hub"


def modelscope_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The ModelScope cache: $MODELSCOPE_CACHE or ~/.cache/modelscope/hub."""
    env = os.environ if env is None else env
    if env.get("MODELSCOPE_CACHE"):
        return Path(env["MODELSCOPE_CACHE"]).expanduser()
    return _home(env) / ".cache" / "modelscope" / "hub"


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def discover(
    roots: Sequence[Path], *, include_caches: bool = True, env: Mapping[str, str] | None = None
) -> DiscoveryResult:
    """Every model folder under `roots` (and the hub caches), each listed once, broken ones as problems."""
    env = os.environ if env is None else env
    found: list[tuple[Path, str | None]] = []
    for root in roots:
        found.extend(_scan_root(Path(root).expanduser()))
    if include_caches:
        found.extend(_scan_hf_cache(hf_cache_dir(env)))
        found.extend(_scan_modelscope(modelscope_cache_dir(env)))

    models: list[ModelInfo] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for path, hub_id in found:
        try:
            real = path.resolve()
        except OSError:
            continue
        if real in seen:
            continue
        seen.add(real)
        try:
            models.append(inspect_model(path, hub_id=hub_id))
        except TuichatError as exc:
            problems.append(str(exc))
    models.sort(key=lambda m: (m.name.lower(), str(m.path)))
    return DiscoveryResult(models, problems)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and _is_dir(p))
    except OSError:
        return []


def _scan_root(root: Path) -> Iterator[tuple[Path, str | None]]:
    """A root may be a model, hold models, hold org/model folders, or be a Hugging Face hub cache itself."""
    if not _is_dir(root):
        return
    if (root / "config.json").exists():
        yield root, None
        return
    for child in _children(root):
        if child.name.startswith("models--"):
            yield from _hf_entry(child)
        elif (child / "config.json").exists():
            yield child, None
        else:
            for grandchild in _children(child):
                if (grandchild / "config.json").exists():
                    yield grandchild, None


def _scan_hf_cache(cache: Path) -> Iterator[tuple[Path, str | None]]:
    if not _is_dir(cache):
        return
    for entry in _children(cache):
        if entry.name.startswith("models--"):
            yield from _hf_entry(entry)


def _hf_entry(entry: Path) -> Iterator[tuple[Path, str | None]]:
    """One `models--org--name` folder: the snapshot `refs/main` names, else the newest with a config."""
    hub_id = "/".join(entry.name[len("models--") :].split("--"))
    snapshots = entry / "snapshots"
    try:
        ref = (entry / "refs" / "main").read_text().strip()
    except OSError:
        ref = ""
    if ref and (snapshots / ref / "config.json").exists():
        yield snapshots / ref, hub_id
        return
    candidates = [s for s in _children(snapshots) if (s / "config.json").exists()]
    if candidates:
        yield max(candidates, key=_mtime), hub_id


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _scan_modelscope(cache: Path) -> Iterator[tuple[Path, str | None]]:
    # Versions differ: org/name at the top, or under models/, and some put the hub folder one level down.
    bases = [cache, cache / "models", cache / "hub", cache / "hub" / "models"]
    for base in bases:
        if not _is_dir(base):
            continue
        for org in _children(base):
            if org.name in ("models", "hub", "datasets") and base in (cache, cache / "hub"):
                continue
            for model in _children(org):
                if (model / "config.json").exists():
                    # ModelScope stores '.' in names as '___' on disk
                    yield model, f"{org.name}/{model.name.replace('___', '.')}"


# ---------------------------------------------------------------- one folder


def inspect_model(path: Path, *, hub_id: str | None = None) -> ModelInfo:
    """Read one model folder's config.json and weight files; a broken folder raises a TuichatError sentence."""
    path = Path(path).expanduser()
    config_path = path / "config.json"
    if not _is_dir(path):
        raise TuichatError(f"{path} is not a folder: give a model folder that holds a config.json.")
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuichatError(
            f"{path} has no config.json, so it is not a Hugging Face model folder: "
            "point at the folder that holds config.json and the weights."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TuichatError(f"{config_path} cannot be read ({exc}): check the file; the folder is skipped.") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TuichatError(
            f"{config_path} is not valid JSON (line {exc.lineno}: {exc.msg}): the download may be incomplete; "
            "fetch the model again. The folder is skipped."
        ) from None
    if not isinstance(config, dict) or not (config.get("architectures") or config.get("model_type")):
        raise TuichatError(
            f"{config_path} is not a model config (it names no architectures or model_type): the folder is skipped."
        )

    files = list(_files(path))
    weights = [(p, size) for p, size in files if _is_weight(p)]
    quant, bits = _quantization(config, path, weights)
    text_cfg = _text_config(config)
    dtype = _dtype(config)
    params = _params_from_safetensors(weights, bits) if quant is None or bits else None
    if params is None:
        params = _params_from_config(config)
    if params is None and weights and quant is None and dtype in _DTYPE_BYTES:
        params = sum(size for _, size in weights) // _DTYPE_BYTES[dtype]
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    architecture = arch or str(config.get("model_type") or text_cfg.get("model_type") or "unknown")
    return ModelInfo(
        path=path,
        name=hub_id or path.name,
        architecture=architecture,
        params_estimate=params,
        dtype=dtype,
        quantization=quant,
        w_bits=bits,
        size_bytes=sum(size for _, size in files),
        is_vlm=looks_like_vlm(config, architecture),
        hub_id=hub_id,
        weights_bytes=sum(size for _, size in weights),
    )


def _files(folder: Path) -> Iterator[tuple[Path, int]]:
    """Every file under `folder` with its size, following symlinks (HF snapshots link to blobs) once each."""
    seen_files: set[tuple[int, int]] = set()
    seen_dirs: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue  # a dangling link (an interrupted download)
            key = (st.st_dev, st.st_ino)
            if key in seen_files:
                continue
            seen_files.add(key)
            yield p, st.st_size


def _is_weight(path: Path) -> bool:
    return path.suffix in _WEIGHT_SUFFIXES and not _NOT_WEIGHTS.search(path.name)


def _text_config(config: Mapping[str, object]) -> Mapping[str, object]:
    """The language model's part of a config: VLMs nest it under one of several names."""
    for key in ("text_config", "llm_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and sub:
            return sub
    return config


def config_section(config: Mapping[str, object]) -> Mapping[str, object]:
    """The language model's part of a config.json (VLMs nest it), where its shape numbers are."""
    return _text_config(config)


def _dtype(config: Mapping[str, object]) -> str | None:
    for cfg in (config, _text_config(config)):
        for key in ("torch_dtype", "dtype"):
            value = cfg.get(key)
            if isinstance(value, str) and value:
                return value.removeprefix("torch.")
    return None


def _quantization(
    config: Mapping[str, object], path: Path, weights: list[tuple[Path, int]]
) -> tuple[str | None, int | None]:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        qc = _text_config(config).get("quantization_config")
    lmdeploy_made = (path / "inputs_stats.pth").exists()
    if isinstance(qc, dict):
        method = str(qc.get("quant_method") or qc.get("quant_type") or "quantized").lower()
        raw_bits = qc.get("bits", qc.get("w_bit", qc.get("weight_bits")))
        bits = raw_bits if isinstance(raw_bits, int) and not isinstance(raw_bits, bool) else None
        if method == "awq" and lmdeploy_made:
            method = "lmdeploy-awq"
        return method, bits
    # Older lmdeploy wrote its AWQ output without a quantization_config: calibration stats beside packed weights.
    if lmdeploy_made and any(_has_tensor_suffix(p, ".qweight") for p, _ in weights):
        return "lmdeploy-awq", 4
    return None, None


def _safetensors_header(path: Path) -> dict[str, object] | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > 100_000_000:
                return None
            data = json.loads(fh.read(length))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_tensor_suffix(path: Path, suffix: str) -> bool:
    if path.suffix != ".safetensors":
        return False
    header = _safetensors_header(path)
    return header is not None and any(name.endswith(suffix) for name in header)


def _params_from_safetensors(weights: list[tuple[Path, int]], bits: int | None) -> int | None:
    shards = [p for p, _ in weights if p.suffix == ".safetensors"]
    if not shards:
        return None
    total = 0
    for shard in shards:
        header = _safetensors_header(shard)
        if header is None:
            return None
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict) or _QUANT_SIDE.search(name):
                continue
            shape = info.get("shape")
            if not isinstance(shape, list):
                continue
            count = 1
            for dim in shape:
                count *= int(dim)
            if name.endswith(".qweight") and bits:
                # packed: each 32-bit word holds 32 // bits weights
                count *= 32 // bits
            total += count
    return total or None


def _int(cfg: Mapping[str, object], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _params_from_config(config: Mapping[str, object]) -> int | None:
    """Decoder-only transformer arithmetic: attention + MLP per layer, embeddings and head; a vision tower."""
    cfg = _text_config(config)
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model", "dim")
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = _int(cfg, "vocab_size", "padded_vocab_size")
    if not hidden or not layers or not vocab:
        return None
    heads = _int(cfg, "num_attention_heads", "n_head", "num_heads") or max(1, hidden // 128)
    kv_heads = _int(cfg, "num_key_value_heads", "multi_query_group_num", "num_kv_heads") or heads
    head_dim = _int(cfg, "head_dim", "kv_channels") or hidden // heads
    inter = _int(cfg, "intermediate_size", "ffn_hidden_size", "n_inner") or 4 * hidden
    act = str(cfg.get("hidden_act") or cfg.get("activation_function") or "silu").lower()
    gated = act in ("silu", "swish", "swiglu") or str(cfg.get("model_type", "")).startswith("gemma")
    mlp_mats = 3 if gated else 2

    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    if experts:
        expert_inter = _int(cfg, "moe_intermediate_size") or inter
        shared = _int(cfg, "n_shared_experts", "num_shared_experts") or 0
        mlp = (experts + shared) * mlp_mats * hidden * expert_inter + hidden * experts
    else:
        mlp = mlp_mats * hidden * inter
    total = layers * (attn + mlp + 2 * hidden) + vocab * hidden
    if not cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)):
        total += vocab * hidden

    vision = config.get("vision_config")
    if isinstance(vision, dict):
        v_hidden = _int(vision, "hidden_size", "embed_dim", "width")
        v_layers = _int(vision, "num_hidden_layers", "depth", "layers")
        if v_hidden and v_layers:
            v_inter = _int(vision, "intermediate_size") or 4 * v_hidden
            total += v_layers * (4 * v_hidden * v_hidden + 2 * v_hidden * v_inter)
    return total


def looks_like_vlm(config: Mapping[str, object], architecture: str) -> bool:
    """True for a config.json of a model that takes images (a vision block, or a known VLM architecture)."""
    if any(key in config for key in _VISION_KEYS):
        return True
    return bool(_VLM_ARCH.search(architecture))


def local_model_folder(model: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The local folder behind a profile's or server's model: the path itself, or a hub id's snapshot in the
    Hugging Face cache. None when there is no such folder here (a remote server, a model not downloaded)."""
    if model is None:
        return None
    text = os.fspath(model).strip()
    if not text:
        return None
    try:
        local = Path(text).expanduser()
        if (local / "config.json").is_file():
            return local
    except (OSError, RuntimeError, ValueError):
        return None
    if looks_like_hub_id(text):
        entry = hf_cache_dir(env) / ("models--" + text.replace("/", "--"))
        for path, _ in _hf_entry(entry):
            return path
    return None


def format_params(n: int | None) -> str:
    """1.9B, 350M, 7.2K; '?' when unknown."""
    if n is None:
        return "?"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------- hub ids


def looks_like_hub_id(s: str) -> bool:
    """True for `owner/name` (as lmdeploy fetches from a hub); False for paths such as `./x/y` or `/data/m`."""
    s = s.strip()
    parts = s.split("/")
    if len(parts) != 2 or ".." in s or s.endswith((".", "-")):
        return False
    return all(_HUB_PART.fullmatch(p) for p in parts)


# ---------------------------------------------------------------- profiles

_PROFILE_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")
VLM_SESSION_LEN = 16384  # images count towards session_len; the tutorial's large images overflowed less room


def profile_name_for(model: ModelInfo | str) -> str:
    """A valid profile name from a model's name: letters, digits, '.', '_' and '-', at most 64 characters."""
    raw = model.name if isinstance(model, ModelInfo) else model.rstrip("/")
    base = raw.rsplit("/", 1)[-1]
    name = _PROFILE_NAME_BAD.sub("-", base).strip("-._")[:64].rstrip("-._")
    return name or "model"


def profile_for(model: ModelInfo | str, name: str | None = None) -> tuple[str, dict[str, object]]:
    """A profile name and a `[profiles.NAME]` table with settings that suit the model.

    A string is a hub id (kept as typed, lmdeploy downloads it) or a local folder (inspected).
    """
    if isinstance(model, str):
        text = model.strip()
        local = Path(text).expanduser()
        if _is_dir(local):
            model = inspect_model(local)
        elif looks_like_hub_id(text):
            return name or profile_name_for(text), {"model": text}
        else:
            raise TuichatError(
                f"'{text}' is neither a model folder nor a hub id such as 'internlm/internlm2-chat-1_8b': "
                "check the path or the spelling."
            )
    # absolute, so the profile works from any directory; not resolved, so a symlinked folder stays the link
    table: dict[str, object] = {"model": os.path.abspath(model.path)}
    fmt = model.model_format
    if fmt is not None:
        table["model_format"] = fmt
    if fmt in ("awq", "gptq"):
        table["cache_max_entry_count"] = AWQ_CACHE_SHARE
    if model.is_vlm:
        table["session_len"] = VLM_SESSION_LEN
    return name or profile_name_for(model), table


def profile_notes(model: ModelInfo) -> list[str]:
    """Sentences to show beside the profile a model gets (a TOML table cannot carry them)."""
    notes: list[str] = []
    if model.model_format == "awq":
        notes.append(
            f"AWQ {model.w_bits or 4}-bit weights: served with --model-format awq; "
            f"the KV cache share is {AWQ_CACHE_SHARE} as in the tutorial."
        )
    elif model.model_format == "gptq":
        notes.append("GPTQ weights: served with --model-format gptq.")
    if model.is_vlm:
        note = f"Vision-language model: images count towards session_len (set to {VLM_SESSION_LEN:,})."
        fits = image_fit_note(model.path, VLM_SESSION_LEN)
        notes.append(f"{note} {fits}" if fits else note)
    return notes


def image_fit_note(model: str | os.PathLike[str] | None, session_len: int | None) -> str | None:
    """Which image size fits a session of `session_len` for the model (a folder or a downloaded hub id); None for
    a text-only model or one whose folder is not here."""
    from tuichat.chat.vision import read_spec, session_sentence  # vision reads configs through this module

    return session_sentence(read_spec(local_model_folder(model)), session_len)


def free_profile_name(base: str, taken: set[str] | Sequence[str]) -> str:
    """`base`, or `base-2`, `base-3`… whichever no profile has yet."""
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"
