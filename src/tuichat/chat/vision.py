"""Image tokens of vision-language models: what an image costs in the session, and the size that still fits.

LMDeploy counts an image's tokens towards `session_len` and refuses a request whose input reaches it ("Input
length (N) must be smaller than the model context length (S)."). For the Qwen2-VL family the count is exact and
known in advance: the model's processor resizes the image to multiples of patch_size * merge_size (28 for
Qwen2-VL), shrinking it to at most `max_pixels` and growing it to at least `min_pixels` (transformers'
`smart_resize`), then spends one token per 28x28 cell plus two for <|vision_start|> and <|vision_end|>.
Measured on lmdeploy 0.18 with the device kit's Qwen2-VL: a 448x448 image took 258 tokens (277 with the
19-token text prompt), an 896x896 one 1,026 when the processor allowed 1344*1344 pixels.

Other architectures cut images in their own ways (tiles, fixed resolutions); for them the count is unknown and
tuichat keeps its plain longest-side rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuichat.errors import TuichatError
from tuichat.models.discovery import looks_like_vlm

# Architectures whose processor follows Qwen2-VL's smart_resize with one token per merged patch.
_QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
_QWEN_VL_ARCHS = frozenset({"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"})
# transformers' Qwen2VLImageProcessor defaults, used when preprocessor_config.json leaves a value out.
QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
VISION_MARKERS = 2  # <|vision_start|> and <|vision_end|> around each image's pad tokens
# Room kept for the typed question and the start of a reply when nothing better is known.
DEFAULT_RESERVE = 256


@dataclass(frozen=True)
class VisionSpec:
    """How one model folder turns images into tokens. `predicts` is False where tuichat does not know the rule."""

    architecture: str
    is_vlm: bool
    predicts: bool
    patch_size: int = QWEN_PATCH_SIZE
    merge_size: int = QWEN_MERGE_SIZE
    min_pixels: int = QWEN_MIN_PIXELS
    max_pixels: int = QWEN_MAX_PIXELS

    @property
    def factor(self) -> int:
        """The side of one image token's cell, in pixels."""
        return self.patch_size * self.merge_size

    def processed_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the model's processor turns an image of this size into."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h

    def image_tokens(self, width: int, height: int) -> int | None:
        """Prompt tokens one image of this size costs, or None where the rule is unknown."""
        if not self.predicts:
            return None
        w, h = self.processed_size(width, height)
        return (w // self.factor) * (h // self.factor) + VISION_MARKERS

    @property
    def largest_side(self) -> int:
        """The side of the largest square image the processor keeps as it is (bigger ones are shrunk to it)."""
        return max(self.factor, math.isqrt(self.max_pixels) // self.factor * self.factor)


@dataclass(frozen=True)
class ImagePlan:
    """The size to send an image at, what it costs, and the sentence to show when tuichat shrank it to fit."""

    width: int
    height: int
    tokens: int | None
    original_tokens: int | None
    note: str | None = None

    @property
    def shrunk_to_fit(self) -> bool:
        return self.tokens is not None and self.original_tokens is not None and self.tokens < self.original_tokens


# ---------------------------------------------------------------- the Qwen2-VL rule


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, then scaled into [min_pixels, max_pixels].

    The same arithmetic as transformers' Qwen2-VL image processor (Python's round, so halves go to even):
    the server does this to every image, so tokens predicted here are the tokens the server counts.
    """
    if height <= 0 or width <= 0:
        raise TuichatError(f"An image of {width}x{height} pixels has no area: use a real image.")
    if max(height, width) / min(height, width) > 200:
        raise TuichatError(
            f"An image of {width}x{height} is more than 200 times longer than it is wide, which Qwen2-VL "
            "refuses: crop it first."
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------- reading a folder


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _positive(table: Mapping[str, Any], key: str) -> int | None:
    value = table.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _table(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _image_processor_config(folder: Path) -> Mapping[str, Any]:
    """The image processor's settings: preprocessor_config.json, or (transformers 5 writes only that) the
    `image_processor` table inside processor_config.json."""
    pre = _read_json(folder / "preprocessor_config.json")
    if pre is not None:
        return pre
    return _table((_read_json(folder / "processor_config.json") or {}).get("image_processor"))


def read_spec(model_dir: Path | None) -> VisionSpec | None:
    """The image rule of the model in `model_dir` (config.json, preprocessor_config.json); None without a config."""
    if model_dir is None:
        return None
    folder = Path(model_dir).expanduser()
    config = _read_json(folder / "config.json")
    if config is None:
        return None
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    model_type = str(config.get("model_type") or "")
    architecture = arch or model_type or "unknown"
    if arch not in _QWEN_VL_ARCHS and model_type not in _QWEN_VL_TYPES:
        return VisionSpec(architecture, looks_like_vlm(config, architecture), predicts=False)
    pre = _image_processor_config(folder)
    vision = _table(config.get("vision_config"))
    patch = _positive(pre, "patch_size") or _positive(vision, "patch_size") or QWEN_PATCH_SIZE
    merge = _positive(pre, "merge_size") or _positive(vision, "spatial_merge_size") or QWEN_MERGE_SIZE
    # Newer processors write size = {shortest_edge, longest_edge} (in pixels); min_pixels/max_pixels win over it,
    # as in transformers' Qwen2VLImageProcessor.
    size = _table(pre.get("size"))
    min_pixels = _positive(pre, "min_pixels") or _positive(size, "shortest_edge") or QWEN_MIN_PIXELS
    max_pixels = _positive(pre, "max_pixels") or _positive(size, "longest_edge") or QWEN_MAX_PIXELS
    return VisionSpec(architecture, True, True, patch, merge, min_pixels, max(max_pixels, min_pixels))


# ---------------------------------------------------------------- fitting a session


def token_budget(session_len: int | None, used_tokens: int, reserve: int = DEFAULT_RESERVE) -> int | None:
    """Tokens an image may take: the session minus the chat so far, the reserve, and one (the input must be
    strictly smaller than session_len). None while session_len is unknown."""
    if not session_len or session_len <= 0:
        return None
    return session_len - max(used_tokens, 0) - max(reserve, 0) - 1


def _shrink_to_side(width: int, height: int, max_side: int) -> tuple[int, int]:
    if max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _candidates(spec: VisionSpec, width: int, height: int) -> list[tuple[int, int]]:
    """Smaller sizes of the same shape, largest first, each side a multiple of the processor's cell so the server
    keeps it as sent (no second resize, and no rounding that could tip the count over)."""
    f = spec.factor
    long_side, short_side = max(width, height), min(width, height)
    out: list[tuple[int, int]] = []
    for k in range(long_side // f, 0, -1):
        new_long = k * f
        new_short = min(max(f, round(short_side * new_long / long_side / f) * f), new_long)
        out.append((new_long, new_short) if width >= height else (new_short, new_long))
    return out


def plan_image(
    spec: VisionSpec | None,
    width: int,
    height: int,
    *,
    name: str = "the image",
    max_side: int = 1344,
    session_len: int | None = None,
    used_tokens: int = 0,
    reserve: int = DEFAULT_RESERVE,
) -> ImagePlan:
    """The largest size at which an image of `width`x`height` fits what is left of the session.

    Always at most `max_side` on its longest side. Raises TuichatError with a sentence when even the smallest size
    cannot fit. Without a known rule (`spec` None or not predicting) only the longest-side rule applies.
    """
    w0, h0 = _shrink_to_side(width, height, max(1, max_side))
    if spec is None or not spec.predicts:
        note = None
        if spec is not None and spec.is_vlm:
            note = (
                f"{name}: tuichat cannot predict how many tokens {spec.architecture} spends on an image; "
                f"sent at {w0}x{h0}, and it counts towards the session."
            )
        return ImagePlan(w0, h0, None, None, note)
    original = spec.image_tokens(width, height)
    tokens = spec.image_tokens(w0, h0)
    assert original is not None and tokens is not None
    budget = token_budget(session_len, used_tokens, reserve)
    if budget is None or tokens <= budget:
        return ImagePlan(w0, h0, tokens, original)
    assert session_len is not None
    for w, h in _candidates(spec, w0, h0):
        cost = spec.image_tokens(w, h)
        assert cost is not None
        if cost <= budget:
            note = (
                f"{name} {width}x{height} would take ~{original:,} tokens of the {session_len:,}-token session "
                f"(~{max(budget, 0):,} left for it): sent at {w}x{h} (~{cost:,} tokens)."
            )
            return ImagePlan(w, h, cost, original, note)
    smallest = spec.image_tokens(spec.factor, spec.factor)
    used = f"the chat already uses ~{used_tokens:,} and " if used_tokens > 0 else ""
    raise TuichatError(
        f"{name} does not fit the {session_len:,}-token session even at its smallest (~{smallest} tokens): "
        f"{used}~{reserve:,} are kept for the reply. Start a new chat, undo earlier exchanges, "
        "or use a profile with a longer session_len."
    )


def largest_square(spec: VisionSpec, session_len: int, reserve: int = DEFAULT_RESERVE) -> tuple[int, int] | None:
    """(side, tokens) of the largest square image that fits an empty session of `session_len`; None if none."""
    budget = token_budget(session_len, 0, reserve)
    if budget is None or not spec.predicts:
        return None
    for k in range(spec.largest_side // spec.factor, 0, -1):
        cost = spec.image_tokens(k * spec.factor, k * spec.factor)
        assert cost is not None
        if cost <= budget:
            return k * spec.factor, cost
    return None


def session_sentence(spec: VisionSpec | None, session_len: int | None, reserve: int = DEFAULT_RESERVE) -> str | None:
    """Which image size fits a session of `session_len` tokens, for a profile or a model row; None for text-only
    models or when there is nothing to say."""
    if spec is None or not spec.is_vlm:
        return None
    if not spec.predicts:
        return (
            f"Images count towards session_len, but tuichat cannot predict how many tokens {spec.architecture} "
            "spends on one: keep them small on a short session."
        )
    if not session_len:
        side = spec.largest_side
        cost = spec.image_tokens(side, side)
        return f"The processor shrinks images to at most {side}x{side} (~{cost:,} tokens each)."
    fit = largest_square(spec, session_len, reserve)
    if fit is None:
        return f"No image fits a {session_len:,}-token session with room for a reply: raise session_len to send images."
    side, cost = fit
    text = f"Images up to {side}x{side} (~{cost:,} tokens each) fit a {session_len:,}-token session"
    if side >= spec.largest_side:
        room = token_budget(session_len, 0, reserve) or 0
        many = max(1, room // cost)
        return f"{text}; the processor shrinks larger ones to that size, so about {many:,} fit in one chat."
    return f"{text}; tuichat shrinks larger ones before sending."
