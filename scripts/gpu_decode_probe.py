"""Time one fixed-length reply through tuichat's client: time to first token and decode tokens/s.

usage: python3 scripts/gpu_decode_probe.py URL KEY LABEL [TOKENS]   (GPU machine; see scripts/gpu_check_2026-12-01.sh)

Prints one line `DECODE label ttft_s tok_s completion_tokens` plus the KV capacity the server reports
(/distserve/engine_info: blocks x block size), so BF16, W4A16 and KV int8 servers can be compared in one table.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from tuichat.chat.client import ChatClient, Delta, Usage
from tuichat.chat.sampling import Sampling
from tuichat.chat.turns import ChatSession, Turn


class FixedLength(Sampling):
    def request_fields(self) -> dict[str, Any]:
        # The kit's random-weight models may stop at any token; a fixed-length reply needs ignore_eos.
        return {**super().request_fields(), "ignore_eos": True}


async def main() -> None:
    url, key, label = sys.argv[1], sys.argv[2] or None, sys.argv[3]
    tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    client = ChatClient(url, key)
    model = (await client.list_models())[0]
    session = ChatSession([Turn("user", "Tell me a long story about a tiger.")])
    best: tuple[float, float, int] | None = None
    for _ in range(2):  # the first reply also warms up; keep the faster
        start = time.perf_counter()
        first = None
        usage = None
        async for event in client.stream_chat(model, session.history(), FixedLength(max_tokens=tokens)):
            if isinstance(event, Delta) and first is None:
                first = time.perf_counter()
            elif isinstance(event, Usage):
                usage = event
        end = time.perf_counter()
        done = usage.completion_tokens if usage and usage.completion_tokens else 0
        ttft = (first or end) - start
        rate = (done - 1) / (end - (first or end)) if first and done > 1 else 0.0
        if best is None or rate > best[1]:
            best = (ttft, rate, done)
    info = await client.engine_info() or {}
    blocks, block_size = info.get("num_gpu_blocks"), info.get("block_size")
    capacity = blocks * block_size if isinstance(blocks, int) and isinstance(block_size, int) else None
    assert best is not None
    print(
        f"DECODE {label} ttft_s {best[0]:.3f} tok_s {best[1]:.0f} tokens {best[2]} kv_blocks {blocks} "
        f"block_size {block_size} kv_tokens {capacity}"
    )
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
