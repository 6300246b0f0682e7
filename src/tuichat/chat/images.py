"""Images for vision-language models: read a file, downscale it to fit the session, encode a data URL.

Large images cost many tokens: the tutorial's llava step returned empty replies until the image was shrunk or
session_len raised. So images are downscaled to a configurable longest side before sending and, where the model
folder tells how it counts image tokens (`tuichat.chat.vision`), further to the largest size that still fits what is
left of the session, with a sentence saying so. Pillow is an optional extra (`pip install "tuichat[images]"`).
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuichat.chat.turns import Attachment
from tuichat.chat.vision import DEFAULT_RESERVE, VisionSpec, plan_image, read_spec
from tuichat.errors import TuichatError
from tuichat.models.discovery import local_model_folder

SUPPORTED = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"}
MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class Prepared:
    """An attachment ready to send, its predicted prompt tokens (None: unknown) and a note to show, if any."""

    attachment: Attachment
    tokens: int | None
    note: str | None


def attachment_tokens(spec: VisionSpec | None, attachments: Sequence[Attachment]) -> int:
    """Predicted tokens of images already attached to the next message (0 for those the rule cannot count)."""
    if spec is None:
        return 0
    return sum(spec.image_tokens(a.width, a.height) or 0 for a in attachments)


def load_attachment(path: Path, max_side: int = 1344) -> Attachment:
    """Read `path` into an Attachment, longest side at most `max_side`; raises TuichatError with a sentence."""
    return prepare_attachment(path, max_side).attachment


def prepare_attachment(
    path: Path,
    max_side: int = 1344,
    *,
    model: str | os.PathLike[str] | None = None,
    session_len: int | None = None,
    used_tokens: int = 0,
    reserve: int = DEFAULT_RESERVE,
    pending: Sequence[Attachment] = (),
) -> Prepared:
    """Read `path` for `model` (its folder, a downloaded hub id, or a served name that is a path), shrunk so the
    request fits the session.

    `used_tokens` is what the conversation already takes (the context meter), `reserve` the room kept for the
    question and the reply; images in `pending` (already attached to the same message) are counted too.
    Raises TuichatError with a sentence when the file cannot be used or cannot fit at any size.
    """
    if not path.is_file():
        raise TuichatError(f"no image at {path}: check the path (~ and relative paths work)")
    mime = mimetypes.guess_type(path.name)[0] or ""
    if mime not in SUPPORTED:
        raise TuichatError(f"{path.name} is not a supported image (PNG, JPEG, WebP, GIF or BMP)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise TuichatError(f"{path.name} is {size / 1e6:.0f} MB; images over 50 MB are refused")
    data = path.read_bytes()
    spec = read_spec(local_model_folder(model))
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise TuichatError(
            f'attaching {path.name} needs Pillow to check and shrink it: pip install "tuichat[images]"'
        ) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
            plan = plan_image(
                spec,
                width,
                height,
                name=path.name,
                max_side=max_side,
                session_len=session_len,
                used_tokens=used_tokens + attachment_tokens(spec, pending),
                reserve=reserve,
            )
            if (plan.width, plan.height) != (width, height):
                resized = img.convert("RGB").resize((plan.width, plan.height), Image.Resampling.LANCZOS)
                out = io.BytesIO()
                resized.save(out, format="JPEG", quality=90)
                data, mime = out.getvalue(), "image/jpeg"
                width, height = plan.width, plan.height
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TuichatError(f"{path.name} could not be read as an image: {exc}") from None
    url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    note = plan.note
    if note is None and spec is not None and not spec.is_vlm:
        note = (
            f"{spec.architecture} is a text-only model: the server will refuse {path.name}; "
            "start a vision-language model to send images."
        )
    return Prepared(Attachment(path.name, url, width, height, len(data)), plan.tokens, note)


def reopened_images_note(names: Sequence[str]) -> str | None:
    """The line a reopened chat shows for a message that had images: only their names are kept, so say so."""
    if not names:
        return None
    listed = ", ".join(names)
    them = "it" if len(names) == 1 else "them"
    return (
        f"The next message had {listed}: the history keeps image names, not the images, so the model does not see "
        f"{them} again; attach {them} again with /image to ask about {them}."
    )
