#!/usr/bin/env bash
# Memory growth over 100 live exchanges and start-up (with a 500-message chat, opened the first time and again) on
# a real lmdeploy 0.18 api_server (carry .kit). Fourth session: after the fix that frees parked widgets' drawn
# lines; fifth: after the message list empties its own drawn rows at each housekeeping pass.
#   bash scripts/gpu_check_growth.sh
set -u
LOG_NAME=growth.log
source scripts/gpu_common.sh
log "growth and start-up"
LOADS="0" SCENARIOS="startup,growth" CLIENTS="tuichat" EXCHANGES=100 STARTUP_REPS=5 timeout 500 bash bench/gpu_run.sh \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
tail -45 "$OUT/bench.log"
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
