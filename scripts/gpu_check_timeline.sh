#!/usr/bin/env bash
# Where the H200's first-token time goes (eighth and ninth sessions; carry .kit): twelve fresh-chat streams of 60
# chunks against a real lmdeploy 0.18 api_server, tuichat instrumented by bench/ttft_timeline.py (marks on the
# first word's path, in-process), then one line per run: when each step began, in ms from Enter, and the bench's
# own stamps (Enter written, request at the tap, chunk 1 sent, word 1 read) beside tuichat's on the one clock
# (`ttft_timeline.py join`). VARIANTS="reused fresh" adds a run with a connection per request.
#   bash scripts/gpu_check_timeline.sh
set -u
LOG_NAME=timeline.log
source scripts/gpu_common.sh
# Twice: tuichat as it is, then with no keep-alive connection (each request on a connection of its own, as the raw
# httpx client's), to see whether the slow runs come from the reused connection.
keepalive_off='import httpx; _init = httpx.AsyncClient.__init__
def _no_keepalive(self, *a, **k):
    k["limits"] = httpx.Limits(max_keepalive_connections=0)
    _init(self, *a, **k)
httpx.AsyncClient.__init__ = _no_keepalive'
for variant in ${VARIANTS:-reused}; do
  rm -rf /tmp/tuichat-timeline
  extra=""; [[ $variant == fresh ]] && extra="$keepalive_off"
  log "twelve instrumented fresh-chat streams ($variant connection)"
  BENCH_TUICHAT_PRELUDE="$extra
exec(open('$PWD/bench/ttft_timeline.py').read())" CHUNKS=60 REPS=12 LOADS="0" \
    SCENARIOS="${SCENARIOS:-stream}" CLIENTS="tuichat,raw httpx" timeout 400 bash bench/gpu_run.sh > "$OUT/bench-$variant.log" 2>&1
  echo "bench rc=$?"
  grep -A6 "Time to first token" "$OUT/bench-$variant.log" | tail -3
  python3 bench/ttft_timeline.py show /tmp/tuichat-timeline | tee "$OUT/timeline-$variant.txt"
  mkdir -p "$OUT/tl-$variant" && cp /tmp/tuichat-timeline/tl-*.txt "$OUT/tl-$variant/" 2>/dev/null
  cp "$OUT/gpu-load0.json" "$OUT/gpu-$variant.json" 2>/dev/null
  python3 bench/ttft_timeline.py join "$OUT/gpu-$variant.json" /tmp/tuichat-timeline | tee "$OUT/join-$variant.txt"
done
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
