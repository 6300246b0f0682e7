"""Whether a model fits on this machine's GPUs: the estimate, the GPU it would go to, and the words for both.

Everything here is plain arithmetic on byte counts and a `GpuSnapshot`, shared by `tuichat models`/`pull`/
`quantize` and the models screen, which only picks a colour for the verdict (`FitLine.level`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tuichat.errors import TuichatError
from tuichat.server.gpu import GpuInfo, GpuSnapshot, describe_no_gpu, format_bytes

if TYPE_CHECKING:  # only for annotations: discovery imports this module
    from tuichat.models.discovery import ModelInfo

LMDEPLOY_CACHE_SHARE = 0.8  # lmdeploy's own default for --cache-max-entry-count, for profiles that set none
AWQ_CACHE_SHARE = 0.4  # the tutorial's value for its W4A16 model

FitLevel = Literal["pending", "unknown", "fits", "too-big"]


@dataclass(frozen=True)
class FitEstimate:
    """Whether the weights fit beside lmdeploy's KV cache. `kv_bytes` is per GPU."""

    fits: bool
    kv_bytes: int
    sentence: str


@dataclass(frozen=True)
class FitLine:
    """The fit as one line for a person: `pending` (GPU not read yet), `unknown` (no estimate), `fits`, `too-big`."""

    level: FitLevel
    sentence: str


def roomiest_gpu(snapshot: GpuSnapshot) -> GpuInfo | None:
    """The GPU with the most free memory (a one-GPU server goes there), among those whose memory is known."""
    known = [g for g in snapshot.gpus if g.mem_total is not None and g.mem_used is not None]
    if not known:
        return None
    return max(known, key=lambda g: (g.mem_total or 0) - (g.mem_used or 0))


def fit_estimate(
    weights_bytes: int, free_gpu_bytes: int, total_gpu_bytes: int, cache_share: float, tp: int = 1
) -> FitEstimate:
    """Weights against free GPU memory, and what the KV cache then gets.

    lmdeploy loads the weights first (split over `tp` GPUs), then gives the KV cache `cache_share` of the memory
    that is still free. `free_gpu_bytes` and `total_gpu_bytes` are per GPU (the emptiest-of-the-worst one).
    """
    if not 0.0 < cache_share <= 1.0:
        raise TuichatError(
            f"The KV-cache share must be more than 0 and at most 1 (got {cache_share}): "
            "it is the share of GPU memory left free after the weights."
        )
    tp = max(1, tp)
    per_gpu = weights_bytes // tp
    weights_text = format_bytes(weights_bytes)
    if tp > 1:
        weights_text += f" ({format_bytes(per_gpu)} on each of {tp} GPUs)"
    # CUDA context, activations and lmdeploy's own buffers need room beyond weights and cache
    reserve = max(1_000_000_000, total_gpu_bytes // 50)
    left = free_gpu_bytes - per_gpu
    busy = total_gpu_bytes - free_gpu_bytes
    busy_text = (
        f"; {format_bytes(busy)} of the GPU's {format_bytes(total_gpu_bytes)} is already in use"
        if busy > total_gpu_bytes // 10
        else ""
    )
    if per_gpu + reserve > total_gpu_bytes:
        more = "" if tp > 1 else " or spread it over more GPUs (tp)"
        return FitEstimate(
            False,
            0,
            f"weights {weights_text} need more than the GPU's {format_bytes(total_gpu_bytes)}; does not fit: "
            f"use a quantized (AWQ) model{more}.",
        )
    if left < reserve:
        return FitEstimate(
            False,
            0,
            f"weights {weights_text}, but only {format_bytes(free_gpu_bytes)} of GPU memory is free{busy_text}; "
            "does not fit: stop what holds the GPU, or use a quantized (AWQ) model.",
        )
    kv = int(left * cache_share)
    gpu_word = " per GPU" if tp > 1 else ""
    share = f"{cache_share:g}"
    verdict = "fits"
    if left - kv < reserve:
        verdict = (
            f"fits, but leaves under {format_bytes(reserve)} for activations: "
            "lower the KV-cache share if the server fails to start"
        )
    sentence = (
        f"weights {weights_text}, KV cache gets about {format_bytes(kv)}{gpu_word} at {share} "
        f"({share} of the {format_bytes(left)} left free after the weights){busy_text}; {verdict}."
    )
    return FitEstimate(True, kv, sentence)


def fit_sentence(weights_bytes: int, table: Mapping[str, object], snapshot: GpuSnapshot | None) -> FitLine:
    """The fit estimate for a profile's settings (its `cache_max_entry_count` and `tp`) in plain words.

    `snapshot` None means the GPU has not been read yet. Without a readable GPU the line says why and that a
    profile can still be made, since the estimate is advice, not a gate.
    """
    if snapshot is None:
        return FitLine("pending", "Fit: reading the GPU…")
    gpu = roomiest_gpu(snapshot) if snapshot.error is None else None
    if gpu is None or gpu.mem_total is None or gpu.mem_used is None:
        reason = describe_no_gpu(snapshot) if (snapshot.error or not snapshot.gpus) else "GPU memory is unreadable."
        return FitLine("unknown", f"Fit: no estimate. {reason} A profile can still be made.")
    if weights_bytes <= 0:
        return FitLine(
            "unknown", "Fit: no weight files in this folder (an unfinished download?), so there is no estimate."
        )
    share_value = table.get("cache_max_entry_count", LMDEPLOY_CACHE_SHARE)
    share = float(share_value) if isinstance(share_value, int | float) else LMDEPLOY_CACHE_SHARE
    tp_value = table.get("tp", 1)
    tp = tp_value if isinstance(tp_value, int) else 1
    free = gpu.mem_total - gpu.mem_used
    try:
        estimate = fit_estimate(weights_bytes, free, gpu.mem_total, share, tp)
    except TuichatError as exc:
        return FitLine("too-big", f"Fit: {exc}")
    where = f"GPU {gpu.index} ({gpu.name}, {format_bytes(free)} free of {format_bytes(gpu.mem_total)})"
    return FitLine("fits" if estimate.fits else "too-big", f"Fit on {where}: {estimate.sentence}")


def model_facts(info: ModelInfo, snapshot: GpuSnapshot | None) -> list[str]:
    """What a user wants to know about a model they just got: what it is, and whether it fits here."""
    quant = f"quantized: {info.quant_text}" if info.quantization else "not quantized"
    awq = "yes" if info.model_format == "awq" else "no"
    lines = [
        f"architecture: {info.architecture}, {info.params_text} parameters, dtype {info.dtype or 'unknown'}, "
        f"{quant} (AWQ: {awq}), vision-language: {'yes' if info.is_vlm else 'no'}",
        f"size: {format_bytes(info.size_bytes)} on disk, weights {format_bytes(info.weights_bytes)}",
    ]
    gpu = roomiest_gpu(snapshot) if snapshot is not None and snapshot.error is None else None
    if gpu is None or gpu.mem_total is None or gpu.mem_used is None:
        lines.append("fit: no estimate, GPU memory cannot be read on this machine.")
        return lines
    share = AWQ_CACHE_SHARE if info.model_format in ("awq", "gptq") else LMDEPLOY_CACHE_SHARE
    fit = fit_estimate(info.weights_bytes, gpu.mem_total - gpu.mem_used, gpu.mem_total, share)
    lines.append(f"fit on GPU {gpu.index} ({gpu.name}): {fit.sentence}")
    return lines
