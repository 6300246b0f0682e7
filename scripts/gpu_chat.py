"""Drive tuichat headlessly against a real lmdeploy server (GPU machine checks; see scripts/gpu_check.sh).

usage: python scripts/gpu_chat.py PROFILE OUT_DIR [--load]

Opens the app on PROFILE through the same code path as `tuichat PROFILE` (attach if running, else launch),
then: one 1,000-token reply (time to first token, decode tokens/s), a long reply stopped with Esc (the server's
/metrics must show generation stopped), and with --load, several concurrent streams from other clients while
the status pane (real NVML and /metrics) is captured as an SVG. Prints one JSON line of figures at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tuichat.chat.sampling import Sampling
from tuichat.config import load_config
from tuichat.server.metrics import parse_metrics
from tuichat.ui.app import AppOptions, TuichatApp, make_app

FIGURES: dict[str, Any] = {}
_original_fields = Sampling.request_fields


def _fields_without_eos(self: Sampling) -> dict[str, Any]:
    # The kit's random-weight model may emit EOS at any point; a fixed-length reply needs ignore_eos.
    out = _original_fields(self)
    out["ignore_eos"] = True
    return out


async def until(pilot: Any, cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def scrape(url: str, key: str | None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return parse_metrics(httpx.get(f"{url}/metrics", headers=headers, timeout=5, trust_env=False).text)


async def send(pilot: Any, app: TuichatApp, text: str) -> None:
    prompt = app.query_one("#prompt")
    prompt.text = text  # type: ignore[attr-defined]
    prompt.focus()
    await pilot.press("enter")


def load(url: str, key: str | None, model: str, streams: int, stop: threading.Event) -> None:
    def one() -> None:
        with httpx.Client(trust_env=False, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            while not stop.is_set():
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": "load " * 600}],
                    "stream": True,
                    "max_tokens": 1500,
                    "ignore_eos": True,
                }
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                    for _ in resp.iter_lines():
                        if stop.is_set():
                            break

    for _ in range(streams):
        threading.Thread(target=one, daemon=True).start()


async def main(profile: str, out: Path, with_load: bool) -> None:
    Sampling.request_fields = _fields_without_eos  # type: ignore[method-assign]
    t0 = time.monotonic()
    app = make_app(AppOptions(profile=profile, config=load_config(), poll_interval=1.0, cursor_blink=False))
    async with app.run_test(size=(140, 45)) as pilot:
        await until(pilot, lambda: app.query_one("#statusline").state == "ready", 600, "ready")  # type: ignore[attr-defined]
        FIGURES["ready_s_from_app_start"] = round(time.monotonic() - t0, 1)
        server = app.server
        assert server is not None
        FIGURES["pid"] = server.pid
        # 1) a 1,000-token reply
        app.sampling = Sampling(max_tokens=1000)
        await send(pilot, app, "Tell me a long story about a cat.")
        await until(pilot, lambda: not app.streaming and len(app.chat.turns) >= 2, 300, "1000-token reply")
        stats = app.chat.turns[-1].stats or {}
        FIGURES["reply_1000"] = {
            k: stats.get(k) for k in ("ttft_s", "decode_tokens_per_s", "completion_tokens", "total_s")
        }
        # 2) Esc stops generation on the server
        app.sampling = Sampling(max_tokens=6000)
        await send(pilot, app, "Another very long story.")
        await until(pilot, lambda: len(app.chat.turns) >= 4 and len(app.chat.turns[-1].content) > 300, 120, "stream")
        await pilot.press("escape")
        await until(pilot, lambda: not app.streaming, 30, "stop")
        stopped_at = time.monotonic()
        FIGURES["stopped_reply_chars"] = len(app.chat.turns[-1].content)
        FIGURES["stopped_state"] = app.chat.turns[-1].state
        await asyncio.sleep(12)  # LMDeploy refreshes its gauges about every 10 s
        first = scrape(server.url, server.api_key)
        await asyncio.sleep(11)
        second = scrape(server.url, server.api_key)
        FIGURES["after_stop"] = {
            "seconds_after_stop": round(time.monotonic() - stopped_at, 1),
            "running": second.running,
            "generation_tokens_total_delta_over_11s": (second.generation_tokens_total or 0)
            - (first.generation_tokens_total or 0),
        }
        # 3) the status pane under load
        if with_load:
            stop = threading.Event()
            load(server.url, server.api_key, server.model_name, 8, stop)
            await pilot.press("f3")
            await asyncio.sleep(12)
            await until(
                pilot, lambda: ((app.status_view.metrics and app.status_view.metrics.running) or 0) > 0, 60, "load"
            )
            app.sampling = Sampling(max_tokens=200)
            await send(pilot, app, "A short one while the server is busy.")
            await until(
                pilot, lambda: not app.streaming and app.chat.turns[-1].role == "assistant", 120, "reply under load"
            )
            await asyncio.sleep(3)
            (out / "status-h200.svg").write_text(app.export_screenshot(title="tuichat on an H200 under load"))
            m = app.status_view.metrics
            gpu = app.status_view.gpu
            FIGURES["under_load"] = {
                "kv_cache_usage": m.kv_cache_usage if m else None,
                "running": m.running if m else None,
                "waiting": m.waiting if m else None,
                "gen_rate_tok_s": app.status_view.gen_rate,
                "kv_history": app.status_view.kv_history[-10:],
                "gpu": [
                    {
                        "name": g.name,
                        "util": g.util_percent,
                        "mem_used": g.mem_used,
                        "mem_total": g.mem_total,
                        "power_w": g.power_w,
                        "procs": [(p.pid, p.used_bytes) for p in g.processes],
                    }
                    for g in (gpu.gpus if gpu else ())
                ],
                "gpu_error": gpu.error if gpu else "no reading",
                "our_pids": sorted(app.status_view.our_pids),
                "reply": app.chat.turns[-1].stats,
            }
            stop.set()
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)
        if app.screen.__class__.__name__ == "QuitScreen":
            await pilot.press("k")  # keep: the re-attach check follows
    print("FIGURES " + json.dumps(FIGURES))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), "--load" in sys.argv))
