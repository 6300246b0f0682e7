#!/usr/bin/env bash
# The first-token device call (carry .kit and bench/out/ab_base_src): the first-token A/B on a real lmdeploy 0.18
# api_server. bench/out/ab_base_src is a copy of src/ from another commit (fourth session: before the sent
# message's echo waited for the request; fifth session: 8f67056, before the request went out first); the working
# tree's src/ is the other side. Three pairs of eight fresh-chat streams each, alternating, on one server, then
# the usual streaming table for the working tree.
#   bash scripts/gpu_check_ttft.sh
set -u
LOG_NAME=ttft.log
source scripts/gpu_common.sh
log "first-token A/B"
CHUNKS=100 REPS=8 LOADS="0" SCENARIOS="stream" CLIENTS="tuichat,raw httpx" AB_SRC=$PWD/bench/out/ab_base_src \
  AB_PAIRS=3 AB_REPS=8 timeout 500 bash bench/gpu_run.sh > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
tail -40 "$OUT/bench.log"
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
