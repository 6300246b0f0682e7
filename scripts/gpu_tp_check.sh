#!/usr/bin/env bash
# Tensor parallelism on the two-GPU machine (device kind nvidia-h200-x2): launch the kit's tiny model with tp=2
# through tuichat, chat once, capture the status pane (our memory on both GPUs), stop, and check both GPUs are
# empty. Run: carry .kit; command: bash scripts/gpu_tp_check.sh
set -u
source .kit/setup.sh >/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/tuichat-home
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TUICHAT_HOME"
cat > "$TUICHAT_HOME/config.toml" <<TOML
[profiles.tp2]
model = "/tmp/tiny-chat"
backend = "pytorch"
tp = 2
cache_max_entry_count = 0.1
TOML
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
t0=$(date +%s.%N)
python3 -m tuichat serve tp2 --detach; echo "exit $?"
echo "TIME tp2_ready_s $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
python3 -m tuichat ps
timeout 120 python3 - <<'PY'
import asyncio, json, os
from tuichat.config import load_config
from tuichat.gpu import format_bytes, memory_split
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
            await pilot.press("k")
asyncio.run(main())
PY
python3 -m tuichat stop tp2; echo "exit $?"; sleep 2
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
python3 -m tuichat ps
cp "$TUICHAT_HOME"/state/logs/tp2.log "$OUT/" 2>/dev/null; ls "$OUT"
