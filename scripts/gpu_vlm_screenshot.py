"""The chat screen with an image, on a real VLM: attach a 1344x1344 image through the app (F8's code path) to a
server with a 1,024-token session, send, and save the screen as an SVG.

usage: python3 scripts/gpu_vlm_screenshot.py PROFILE OUT_DIR   (GPU machine; see scripts/gpu_check_vlm_shot.sh)
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from apphelpers import screen_text
from PIL import Image

from tuichat.ui.app import AppOptions, make_app
from tuichat.ui.widgets.prompt_area import PromptArea


async def main(profile: str, out: Path) -> None:
    image = Path(tempfile.mkdtemp()) / "tiger.png"
    Image.new("RGB", (1344, 1344), (200, 120, 40)).save(image)
    app = make_app(AppOptions(profile=profile, cursor_blink=False))
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 90
        while "ready" not in screen_text(app) and time.monotonic() < deadline:
            await pilot.pause(0.2)
        await app.attach_image(str(image))
        prompt = app.query_one(PromptArea)
        prompt.text = "Describe this image."
        prompt.focus()
        await pilot.press("enter")
        deadline = time.monotonic() + 60
        while (app.streaming or len(app.chat) < 2) and time.monotonic() < deadline:
            await pilot.pause(0.2)
        await pilot.pause(0.5)
        reply = app.chat.turns[-1]
        print("VLMSHOT reply", reply.role, reply.state, "stats", reply.stats)
        print("VLMSHOT notes", [t.content for t in app.chat.turns if t.role == "notice"])
        app.save_screenshot(filename="vlm-chat.svg", path=str(out))
        print(screen_text(app)[-2500:])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
