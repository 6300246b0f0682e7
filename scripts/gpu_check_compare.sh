#!/usr/bin/env bash
# Issue 12 on the real engine, one device call (carry .kit): BF16 vs W4A16 of a ~0.9 B model in `tuichat compare`
# (both columns' figures and a screenshot), then the batch of 64 swept over 1,4,16,64 after a warm-up pass (the
# first batch at each new concurrency pays Triton's kernel compiles: seen as 5.3 s TTFT p95 in the cold run).
#   bash scripts/gpu_check_compare.sh
set -u
t_start=$(date +%s)
source .kit/setup.sh >/dev/null
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .kit/wheels/{pyte,wcwidth,httpx_sse,tomlkit,plotext}-*.whl 2>/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/th-gpu NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; W=/tmp/gpuwork; mkdir -p "$OUT" "$TUICHAT_HOME" $W
exec > >(tee "$OUT/compare.log") 2>&1
log() { echo "== +$(( $(date +%s) - t_start ))s $*"; }
cat > "$TUICHAT_HOME/config.toml" <<'EOF'
[profiles.bf16]
model = "/tmp/m09"
backend = "pytorch"
model_name = "m09"
cache_max_entry_count = 0.3

[profiles.w4]
model = "/tmp/m09-awq"
backend = "pytorch"
model_format = "awq"
model_name = "m09"
cache_max_entry_count = 0.3
EOF
for i in $(seq 64); do echo "Write a short story about the number $i."; done > $W/p64.txt
if [ ! -f /tmp/m09/config.json ]; then log "make the 0.9 B model"; python3 .kit/make_model.py /tmp/m09 2048 24 > $W/make.log 2>&1; tail -1 $W/make.log; fi
if [ ! -f /tmp/m09-awq/config.json ]; then
  log "W4A16 with tuichat quantize (data-free: offline)"
  python3 -m tuichat quantize /tmp/m09 --out /tmp/m09-awq --calib-samples 0 --yes --no-profile > $W/quant.log 2>&1; echo "quantize rc=$?"
fi
log "serve bf16 and w4 at once"
python3 -m tuichat serve bf16 --detach --timeout 300 > $W/serve-bf16.txt 2>&1 & a=$!
python3 -m tuichat serve w4 --detach --timeout 300 > $W/serve-w4.txt 2>&1 & b=$!
wait $a; echo "serve bf16 rc=$?"; wait $b; echo "serve w4 rc=$?"; python3 -m tuichat ps
log "tuichat compare bf16 w4 (headless, 160x45), three prompts"
timeout 200 python3 - <<'EOF'
import asyncio, time
from tuichat.server.launcher import ServerManager
from tuichat.ui.compare_app import make_compare_app, stop_started
PROMPTS = ["Explain KV cache quantization in 200 words.", "Write a haiku about GPUs.", "List five prime numbers."]
async def go():
    m = ServerManager(); app = make_compare_app(["bf16", "w4"], m)
    async with app.run_test(size=(160, 45)) as p:
        s = app.compare
        for prompt in PROMPTS:
            s.send(prompt); t = time.time()
            while time.time() - t < 60:
                await p.pause(0.2)
                if not s.streaming and all(x.conversation.last_stats for x in s.sides): break
            await p.pause(1.0)
            await s._poll_once(); s._refresh_all(); await p.pause(0.3)
            for x, pane in zip(s.sides, s.panes):
                st = x.conversation.last_stats or {}
                print("COMPARE", repr(prompt[:20]), x.endpoint.label, {k: st.get(k) for k in ("ttft_s", "decode_tokens_per_s", "completion_tokens", "total_s")},
                      "GPU", x.gpu_bytes, "KV", x.kv_usage, pane.marks())
        import os
        app.save_screenshot(filename="compare-h200.svg", path=os.environ.get("OUT", "/tmp/out"))
    print(stop_started(app, m)); m.close()
asyncio.run(go())
EOF
log "warm-up pass (8 tokens at each concurrency), then the sweep"
timeout 120 python3 -m tuichat batch $W/p64.txt --compare bf16 w4 --max-tokens 8 --sweep 1,4,16,64 --out $W/warm.jsonl > $W/warm.txt 2>&1; echo "warm rc=$?"
timeout 300 python3 -m tuichat batch $W/p64.txt --compare bf16 w4 --max-tokens 64 --sweep 1,4,16,64 --out $W/sweep.jsonl --plot $OUT/sweep-warm.svg > $W/sweep.txt 2>$W/sweep.err; echo "batch rc=$?"
cat $W/sweep.txt | sed -n '1,14p'; tail -3 $W/sweep.err
cp $W/sweep.summary.json $OUT/sweep-warm.summary.json 2>/dev/null
python3 -m tuichat stop bf16; python3 -m tuichat stop w4
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
tar czf "$OUT/compare-files.tgz" -C $W . 2>/dev/null
log "done"
