#!/usr/bin/env bash
# Issue 15's device call (carry .kit; third to seventh sessions): the figures on the final code, bench/gpu_run.sh against a
# real lmdeploy 0.18 api_server (start-up with and without a 500-message history, streaming and first-token
# overhead, the status-pane case and the server's pace, 100 live exchanges, idle), then what is left on the GPU.
#   bash scripts/gpu_check_perf.sh
set -u
LOG_NAME=perf.log
source scripts/gpu_common.sh
log "bench/gpu_run.sh on the final code"
# AB_SRC (carry bench/out/ab_base_src, a copy of another commit's src/): the first-token A/B against it, 2 pairs of 8
ab=""
[[ -d bench/out/ab_base_src ]] && ab=$PWD/bench/out/ab_base_src
CHUNKS=500 REPS=3 LOADS="0" EXCHANGES=100 IDLE_S=40 STARTUP_REPS=5 AB_SRC=$ab AB_PAIRS=2 AB_REPS=8 timeout 480 bash bench/gpu_run.sh > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
tail -110 "$OUT/bench.log"
if [[ -n $ab ]]; then  # seventh session: the first frame, that copy vs the working tree, alternating, with the floor
  log "start-up A/B: bench/ab_first_frame.py"
  timeout 90 python3 bench/ab_first_frame.py "$ab" --runs 12 > "$OUT/ab_first_frame.md" 2>&1; echo "ab rc=$?"
  cat "$OUT/ab_first_frame.md"
fi
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
