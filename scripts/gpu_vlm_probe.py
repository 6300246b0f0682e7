"""Send images through tuichat's own client and image path to a real VLM server and print what the server counted.

usage: python3 scripts/gpu_vlm_probe.py URL [KEY]   (on the GPU machine, against the device kit's tiny Qwen2-VL)

For each image size: the prompt tokens the server reported (usage), the reply's finish reason, or the error
sentence tuichat would show. These numbers are what the stand-in's image-token counting is checked against.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from PIL import Image

from tuichat.chat.client import ChatClient, ChatError, Delta, Finish, Usage
from tuichat.chat.images import load_attachment
from tuichat.chat.sampling import Sampling
from tuichat.chat.turns import ChatSession, Turn

SIZES = [(112, 112), (448, 448), (896, 896), (1344, 1344), (1344, 672)]


async def one(client: ChatClient, model: str, text: str, image: Path | None, max_side: int) -> str:
    attachments = [load_attachment(image, max_side=max_side)] if image else []
    conv = ChatSession([Turn("user", text, attachments=attachments)])
    usage = finish = None
    chars = 0
    try:
        async for event in client.stream_chat(model, conv.history(), Sampling(max_tokens=8)):
            if isinstance(event, Usage):
                usage = event
            elif isinstance(event, Finish):
                finish = event.reason
            elif isinstance(event, Delta):
                chars += len(event.text)
    except ChatError as exc:
        return f"error {exc.kind}: {exc.message}"
    sent = f"{attachments[0].width}x{attachments[0].height}" if attachments else "-"
    prompt = usage.prompt_tokens if usage else None
    return f"sent {sent} prompt_tokens {prompt} finish {finish} reply_chars {chars}"


async def main() -> None:
    url = sys.argv[1]
    key = sys.argv[2] if len(sys.argv) > 2 else None
    client = ChatClient(url, key)
    model = (await client.list_models())[0]
    print("VLM model", model)
    print("VLM text-only:", await one(client, model, "Describe this image.", None, 1344))
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in SIZES:
            path = Path(tmp) / f"img{w}x{h}.png"
            Image.new("RGB", (w, h), (200, 120, 40)).save(path)
            # max_side 4096: no downscale by tuichat, so the server's own counting is what is seen
            print(f"VLM {w}x{h} as is:", await one(client, model, "Describe this image.", path, 4096))
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
