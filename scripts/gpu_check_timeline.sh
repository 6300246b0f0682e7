#!/usr/bin/env bash
# Where the H200's slow first-token runs lose their time (eighth session; carry .kit): twelve fresh-chat streams of
# 60 chunks against a real lmdeploy 0.18 api_server, tuichat instrumented by bench/ttft_timeline.py (marks on the
# first word's path, in-process), then one line per run: when each step began, in ms from Enter.
#   bash scripts/gpu_check_timeline.sh
set -u
LOG_NAME=timeline.log
source scripts/gpu_common.sh
rm -rf /tmp/tuichat-timeline
log "twelve instrumented fresh-chat streams"
BENCH_TUICHAT_PRELUDE="exec(open('$PWD/bench/ttft_timeline.py').read())" CHUNKS=60 REPS=12 LOADS="0" \
  SCENARIOS="stream" CLIENTS="tuichat,raw httpx" timeout 400 bash bench/gpu_run.sh > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -A6 "Time to first token" "$OUT/bench.log" | tail -5
python3 bench/ttft_timeline.py show /tmp/tuichat-timeline | tee "$OUT/timeline.txt"
mkdir -p "$OUT/tl" && cp /tmp/tuichat-timeline/tl-*.txt "$OUT/tl/" 2>/dev/null
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
