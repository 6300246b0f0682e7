#!/usr/bin/env bash
# Tensor parallelism on the two-GPU machine (device kind nvidia-h200-x2), issue 11: a ~0.9 B random-weight model
# served with tp=2 through tuichat (mp executor, NVLink multicast off), one chat, the status pane captured (our
# memory on both GPUs), per-GPU memory from nvidia-smi and `tuichat ps`, decode tok/s against tp=1, then stop and
# both GPUs empty. Run from the repository root with .kit carried: bash scripts/gpu_tp_check.sh
# Lines that prove it: "TIME tp2_ready_s", "TP split" (ours > 0 on GPU 0 and GPU 1), "DECODE tp1/tp2", and after
# "AFTER STOP" no compute app on either GPU.
set -u
[ -f .kit/setup.sh ] || bash /work/shared/device-kit/build.sh
source .kit/setup.sh >/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/tuichat-home
# NVLink multicast makes NCCL set-up fail or hang on these hosts; tuichat sets it too, this covers nvidia-smi probes
export NCCL_NVLS_ENABLE=0 TM_COMM_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TUICHAT_HOME"
[ -d /tmp/m1b ] || python3 .kit/make_model.py /tmp/m1b 2048 24
cat > "$TUICHAT_HOME/config.toml" <<TOML
[profiles.tp2]
model = "/tmp/m1b"
backend = "pytorch"
tp = 2
cache_max_entry_count = 0.1
start_timeout = 900
log_level = "DEBUG"  # lmdeploy logs each rank's steps (proc[N] call method) at DEBUG only

[profiles.tp1]
model = "/tmp/m1b"
backend = "pytorch"
cache_max_entry_count = 0.1
TOML
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader

decode() {  # decode tok/s of one 512-token reply from the running profile $1
  python3 - "$1" <<'PY'
import sys, time, json, httpx
from tuichat.server.launcher import ServerManager
s = ServerManager().find(sys.argv[1])
h = {"Authorization": f"Bearer {s.api_key}"}
body = {"model": s.model_name, "messages": [{"role": "user", "content": "count"}], "max_tokens": 512,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
first = last = None; tokens = 0
with httpx.stream("POST", f"{s.url}/v1/chat/completions", headers=h, json=body, timeout=300) as r:
    for line in r.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            tokens = d["usage"]["completion_tokens"]
        if d.get("choices") and d["choices"][0]["delta"].get("content"):
            last = time.monotonic(); first = first or last
print(f"DECODE {sys.argv[1]} {tokens} tokens {(tokens - 1) / (last - first):.1f} tok/s")
PY
}

t0=$(date +%s.%N)
python3 -m tuichat serve tp2 --detach; echo "serve exit $?"
echo "TIME tp2_ready_s $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
grep -E "proc\[[0-9]+\]|MPExecutor|Build <" "$TUICHAT_HOME"/state/logs/tp2.log | head -20
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
python3 -m tuichat ps
timeout 180 python3 - <<'PY'
import asyncio, json, os
from tuichat.config import load_config
from tuichat.server.gpu import format_bytes, memory_split
from tuichat.ui.app import AppOptions, make_app

async def main():
    app = make_app(AppOptions(profile="tp2", config=load_config(), poll_interval=0.5, cursor_blink=False))
    async with app.run_test(size=(140, 40)) as pilot:
        while app.query_one("#statusline").state != "ready":
            await pilot.pause(0.1)
        prompt = app.query_one("#prompt"); prompt.text = "hello over two GPUs"; prompt.focus()
        await pilot.press("enter")
        while app.streaming or len(app.chat.turns) < 2:
            await pilot.pause(0.1)
        await pilot.press("f3")
        while not (app.status_view.gpu and len(app.status_view.gpu.gpus) == 2 and app.status_view.our_pids):
            await pilot.pause(0.2)
        await pilot.pause(2.5)
        snap = app.status_view.gpu
        split = memory_split(snap, app.status_view.our_pids)
        print("TP split", json.dumps([{"gpu": s.index, "ours": format_bytes(s.ours_bytes), "others": format_bytes(s.others_bytes)} for s in split]))
        print("reply", app.chat.turns[-1].state, app.chat.turns[-1].stats)
        open(os.path.join(os.environ["OUT"], "status-tp2.svg"), "w").write(app.export_screenshot(title="tuichat, tp=2 on two H200s"))
        await pilot.press("ctrl+q"); await pilot.pause(0.3)
        if app.screen.__class__.__name__ == "QuitScreen":
            await pilot.press("k")  # keep the server: the decode run below uses it
asyncio.run(main())
PY
decode tp2
python3 -m tuichat stop tp2; echo "stop exit $?"; sleep 2
echo "AFTER STOP"
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
python3 -m tuichat ps

t0=$(date +%s.%N)
python3 -m tuichat serve tp1 --detach; echo "serve exit $?"
echo "TIME tp1_ready_s $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
decode tp1
python3 -m tuichat stop tp1; echo "stop exit $?"; sleep 2
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
cp "$TUICHAT_HOME"/state/logs/tp2.log "$TUICHAT_HOME"/state/logs/tp1.log "$OUT/" 2>/dev/null; ls "$OUT"
