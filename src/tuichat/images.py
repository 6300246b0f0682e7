"""Images for vision-language models: read a file, downscale it to fit the session, encode a data URL.

Large images cost many tokens: the tutorial's llava step returned empty replies until the image was shrunk or
session_len raised. So images are downscaled to a configurable longest side before sending. Pillow is an
optional extra (`pip install "tuichat[images]"`); without it, images that need no change are still sent.
"""

from __future__ import annotations

import base64
import io
import mimetypes
from pathlib import Path

from tuichat.chat import Attachment
from tuichat.errors import TuichatError

SUPPORTED = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"}
MAX_FILE_BYTES = 50 * 1024 * 1024


def load_attachment(path: Path, max_side: int = 1344) -> Attachment:
    """Read `path` into an Attachment; raises TuichatError with a sentence when it cannot be used."""
    if not path.is_file():
        raise TuichatError(f"no image at {path}: check the path (~ and relative paths work)")
    mime = mimetypes.guess_type(path.name)[0] or ""
    if mime not in SUPPORTED:
        raise TuichatError(f"{path.name} is not a supported image (PNG, JPEG, WebP, GIF or BMP)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise TuichatError(f"{path.name} is {size / 1e6:.0f} MB; images over 50 MB are refused")
    data = path.read_bytes()
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
            if max(width, height) > max_side:
                scale = max_side / max(width, height)
                new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
                resized = img.convert("RGB").resize(new_size, Image.Resampling.LANCZOS)
                out = io.BytesIO()
                resized.save(out, format="JPEG", quality=90)
                data, mime = out.getvalue(), "image/jpeg"
                width, height = new_size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TuichatError(f"{path.name} could not be read as an image: {exc}") from None
    url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return Attachment(path.name, url, width, height, len(data))
