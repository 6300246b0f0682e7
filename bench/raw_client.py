"""The raw reference client: a plain httpx streaming loop that prints each chunk's text as it arrives.

    python bench/raw_client.py URL API_KEY MODEL PROMPT

It connects first (GET /v1/models, as a chat client does on start), prints READY, waits for Enter, then sends
one streamed chat completion, writes every delta straight to the terminal, and waits to be stopped. It is the
floor for first-token time and CPU: no UI, no Markdown, no storage.
"""

from __future__ import annotations

import json
import sys

import httpx


def main() -> int:
    url, key, model, prompt = sys.argv[1:5]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, trust_env=False, timeout=httpx.Timeout(600, connect=5)) as c:
        c.get("/v1/models")
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        sys.stdin.readline()
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                text = choices[0].get("delta", {}).get("content") if choices else None
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
    sys.stdout.write("\n[done]\n")
    sys.stdout.flush()
    sys.stdin.readline()  # stay alive until the harness has read this process's CPU time and memory
    return 0


if __name__ == "__main__":
    sys.exit(main())
