#!/usr/bin/env bash
# The session's last device call (carry .kit): the chat app launching a profile through the one launch flow
# (scripts/gpu_chat.py: ready, a 1,000-token reply, a stopped reply), then bench/gpu_run.sh on the final code.
#   bash scripts/gpu_check_final.sh
set -u
LOG_NAME=final.log
source scripts/gpu_common.sh
cat > "$TUICHAT_HOME/config.toml" <<'EOF'
[profiles.tiny]
model = "/tmp/tiny-chat"
backend = "pytorch"
cache_max_entry_count = 0.1
session_len = 4096
EOF
log "the app launches tiny (tuichat tiny's code path) and chats"
timeout 240 python3 scripts/gpu_chat.py tiny "$OUT" 2>&1 | tail -3
python3 -m tuichat stop tiny
log "bench/gpu_run.sh on the final code"
[ -e /tmp/m1b ] || python3 .kit/make_model.py /tmp/m1b 2048 24 > $W/make.log 2>&1
CHUNKS=500 REPS=2 LOADS="0" EXCHANGES=100 IDLE_S=40 timeout 420 bash bench/gpu_run.sh > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
tail -16 "$OUT/bench.log"
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
