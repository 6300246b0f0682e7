"""Background load for the GPU run: K concurrent streamed chat completions, straight to the server, for S seconds.

    python bench/loadgen.py URL API_KEY MODEL K SECONDS [MAX_TOKENS]

Each of the K loops sends one long streamed request after another (max_tokens, ignore_eos), reading and
discarding the chunks, until the time is up; it prints how many chunks it received. The measured client shares
the server with these streams, as it would on a busy box.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx


async def one_loop(client: httpx.AsyncClient, model: str, deadline: float, max_tokens: int) -> int:
    chunks = 0
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    while time.monotonic() < deadline:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                    if time.monotonic() >= deadline:
                        break
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
    return chunks


async def run(url: str, key: str, model: str, streams: int, seconds: float, max_tokens: int) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, trust_env=False, timeout=httpx.Timeout(600)
    ) as client:
        counts = await asyncio.gather(*(one_loop(client, model, deadline, max_tokens) for _ in range(streams)))
    print(f"loadgen: {streams} streams, {sum(counts)} chunks in {seconds:.0f} s", flush=True)


def main() -> int:
    url, key, model, streams, seconds = sys.argv[1:6]
    max_tokens = int(sys.argv[6]) if len(sys.argv) > 6 else 2000
    asyncio.run(run(url, key, model, int(streams), float(seconds), max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
