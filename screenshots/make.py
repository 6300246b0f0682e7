"""Regenerate the SVG screenshots in this folder: `python screenshots/make.py`.

The app talks to the stand-in lmdeploy server (tests/standin) over real HTTP; GPU readings come from a fake
reader so the pictures do not depend on the machine they are made on. The GPU machine's own screenshot
(status-h200.svg) is made by bench/gpu_run.sh with real NVML figures.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ["TUICHAT_HOME"] = tempfile.mkdtemp(prefix="tuichat-shots-")

from fakegpu import FakeGpuReader  # noqa: E402
from standin.harness import run_standin  # noqa: E402

from tuichat.config import load_config  # noqa: E402
from tuichat.server.gpu import GpuInfo, GpuProcess  # noqa: E402
from tuichat.ui.app import AppOptions, make_app  # noqa: E402

GB = 1000**3
REPLY = """Sure. A **KV cache** keeps the attention keys and values of earlier tokens, so each new token
only attends to them instead of recomputing the whole prefix.

- `--cache-max-entry-count 0.4` gives it 40% of the GPU memory left after the weights
- `--quant-policy 8` stores it as int8: about twice the tokens in the same memory

```python
from lmdeploy import pipeline, TurbomindEngineConfig
pipe = pipeline("internlm/internlm2-chat-1_8b",
                backend_config=TurbomindEngineConfig(cache_max_entry_count=0.4))
```
"""


async def shoot(url: str, key: str, size: tuple[int, int], name: str, status: bool) -> None:
    gpu = FakeGpuReader(
        [GpuInfo(0, "NVIDIA H200", "u", 37, 61 * GB, 143 * GB, 48, 182.0, 700.0, (GpuProcess(os.getpid(), 57 * GB),))]
    )
    app = make_app(
        AppOptions(
            url=url, api_key=key, config=load_config(), env={}, gpu_reader=gpu, poll_interval=0.5, cursor_blink=False
        )
    )
    app.status_view.our_pids = {os.getpid()}
    async with app.run_test(size=size) as pilot:
        while app.query_one("#statusline").state != "ready":  # type: ignore[attr-defined]
            await pilot.pause(0.05)
        prompt = app.query_one("#prompt")
        prompt.text = "What does the KV cache do, and how do I give it less memory?"  # type: ignore[attr-defined]
        await pilot.press("enter")
        while app.streaming or len(app.chat) < 2:
            await pilot.pause(0.05)
        if status and not app.query_one("#status").display:
            await pilot.press("f3")
        await pilot.pause(1.2)
        prompt.text = "And with tensor parallelism?"  # type: ignore[attr-defined]
        await pilot.pause(0.2)
        (HERE / f"{name}.svg").write_text(app.export_screenshot(title="tuichat"))
        print("wrote", HERE / f"{name}.svg")


async def main() -> None:
    with run_standin("--fake-reply", REPLY, "--fake-rate", "400") as server:
        await shoot(server.url, server.api_key or "", (120, 40), "chat", status=True)
        await shoot(server.url, server.api_key or "", (80, 24), "chat-80x24", status=False)


if __name__ == "__main__":
    asyncio.run(main())
