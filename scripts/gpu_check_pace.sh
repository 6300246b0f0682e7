#!/usr/bin/env bash
# The server's pace with tuichat attached against a raw client, with more runs than the perf call's three (ninth
# session; carry .kit): the real server's rate moves by 2x between replies, so eight 500-chunk replies per case,
# the cases alternating; then the 100 live exchanges again (the growth figure sat on its goal).
#   bash scripts/gpu_check_pace.sh
set -u
LOG_NAME=pace.log
source scripts/gpu_common.sh
log "server pace: 8 alternating runs per case, then growth"
CHUNKS=500 REPS=8 LOADS="0" EXCHANGES=100 SCENARIOS="stream,status,growth" CLIENTS="tuichat,raw httpx" \
  timeout 540 bash bench/gpu_run.sh > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -B2 -A8 "Server pace\|Memory growth" "$OUT/bench.log" | tail -30
python3 - "$OUT/gpu-load0.json" <<'PY'
import json, sys
from statistics import median
trials = json.load(open(sys.argv[1]))["stream"]
cases: dict[str, list[float]] = {}
for t in trials:
    cases.setdefault(f"{t['client']} [{t['case']}]", []).append(round(t["measured_rate"] or 0, 1))
for name, rates in cases.items():
    print(f"{name}: median {median(rates):.1f} chunks/s over {len(rates)}: {rates}")
PY
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
