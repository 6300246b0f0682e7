#!/usr/bin/env bash
# Issue 12 on the real engine, one device call (carry .kit): BF16 vs W4A16 of a ~0.9 B model in `tuichat compare`
# (both columns' figures and a screenshot), then the batch of 64 swept over 1,4,16,64 after a warm-up pass (the
# first batch at each new concurrency pays Triton's kernel compiles: seen as 5.3 s TTFT p95 in the cold run).
#   bash scripts/gpu_check_compare.sh
set -u
LOG_NAME=compare.log
source scripts/gpu_common.sh
make_models
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
