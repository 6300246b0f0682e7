#!/usr/bin/env bash
# The checks against real lmdeploy on the GPU machine, in one device run (see ../shared/device-kit/README.md):
#   carry .kit; command: bash scripts/gpu_check.sh
# Launches the kit's tiny model and a ~0.9 B model through `tuichat serve`, chats through the app's own code
# path, stops with Esc and checks /metrics, captures the status pane under load, checks that a stop leaves no
# GPU memory (NVML), that tuichat re-attaches after a SIGKILL, and that quantize fails cleanly offline.
set -u
source .kit/setup.sh >/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/tuichat-home
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TUICHAT_HOME"
log() { echo "== $(date +%T) $*"; }
tc() { python3 -m tuichat "$@"; }
gpu_apps() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; }

python3 .kit/make_model.py /tmp/m1b 2048 24 > "$OUT/make_m1b.log" 2>&1 &
maker=$!
cat > "$TUICHAT_HOME/config.toml" <<TOML
[profiles.tiny]
model = "/tmp/tiny-chat"
backend = "pytorch"
cache_max_entry_count = 0.1
session_len = 4096

[profiles.m1b]
model = "/tmp/m1b"
backend = "pytorch"
cache_max_entry_count = 0.3
session_len = 8192
TOML
log "doctor"; tc doctor
log "serve tiny --detach"; t0=$(date +%s.%N)
tc serve tiny --detach; echo "exit $?"
echo "TIME tiny_ready_s $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
tc ps
log "chat with tiny"
timeout 200 python3 scripts/gpu_chat.py tiny "$OUT" 2>&1 | tail -3
log "stop tiny"; tc stop tiny; echo "exit $?"; sleep 1
echo "GPU apps after stopping tiny:"; gpu_apps; tc ps

wait $maker; tail -1 "$OUT/make_m1b.log"
log "serve m1b --detach"; t0=$(date +%s.%N)
tc serve m1b --detach; echo "exit $?"
echo "TIME m1b_ready_s $(python3 -c "import time; print(round(time.time() - $t0, 1))")"
tc ps
log "chat with m1b, stop check, status pane under load"
timeout 300 python3 scripts/gpu_chat.py m1b "$OUT" --load 2>&1 | tail -3

log "SIGKILL tuichat, then re-attach"
timeout 120 python3 - <<'PY'
import os, signal, sys, time
sys.path.insert(0, "tests")
from ptyterm import PtyApp
env = {k: v for k, v in os.environ.items()}
env["TERM"] = "xterm-256color"
a = PtyApp([sys.executable, "-m", "tuichat", "m1b"], env, 120, 40)
a.wait_for("ready", 120); a.signal(signal.SIGKILL); a.wait_exit(); a.close()
b = PtyApp([sys.executable, "-m", "tuichat"], env, 120, 40)
b.wait_for("Attached to m1b", 60); b.wait_for("ready", 60)
b.type("hello after the kill\r"); time.sleep(4); b.pump(0.5)
print("REATTACH ok"); print(b.screen_text()[-1500:]); b.close()
PY
tc ps
if [ -x bench/gpu_run.sh ]; then log "bench against m1b"; timeout 240 bash bench/gpu_run.sh 2>&1 | tail -40; fi
log "stop m1b"; tc stop m1b; echo "exit $?"; sleep 2
echo "GPU apps after stopping m1b:"; gpu_apps; nvidia-smi --query-gpu=memory.used,memory.total --format=csv
tc ps
log "quantize offline"; timeout 120 python3 -m tuichat quantize /tmp/tiny-chat --out /tmp/tiny-awq --yes 2>&1 | tail -6
echo "partial folder left: $(ls -d /tmp/tiny-awq /tmp/.tiny-awq* 2>/dev/null | wc -l)"; pgrep -fa "lite auto_awq" || echo "no quantize process left"
for f in "$TUICHAT_HOME"/state/logs/*.log; do cp "$f" "$OUT/server-$(basename "$f")"; done 2>/dev/null; ls "$OUT"
