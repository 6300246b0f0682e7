#!/usr/bin/env bash
# Sixth session's second device call (carry .kit): why the H200's first-token figure is bimodal. Twelve fresh-chat
# streams of 60 chunks on a real lmdeploy 0.18 api_server, tuichat run with scripts/gpu_echo.prelude, which
# writes an in-process timeline per run to $OUT/tl/ (the engine's events, the first delta's text, what released the
# held echo, each layout and each write to the terminal), beside the bench's own per-run TTFT.
#   bash scripts/gpu_check_echo.sh
set -u
LOG_NAME=echo.log
source scripts/gpu_common.sh
mkdir -p "$OUT/tl"
log "first-token timelines"
BENCH_TUICHAT_PRELUDE="$(sed "s|/tmp/out/tl/|$OUT/tl/|g" scripts/gpu_echo.prelude)" CHUNKS=60 REPS=12 LOADS="0" SCENARIOS="stream" \
  CLIENTS="tuichat" timeout 400 bash bench/gpu_run.sh > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -h "ttft" "$OUT"/run-load0.log "$OUT/bench.log" 2>/dev/null | tail -14; ls "$OUT/tl" | wc -l
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
