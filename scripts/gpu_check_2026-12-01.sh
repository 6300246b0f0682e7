#!/usr/bin/env bash
# The hardening, offline-quantization and VLM checks against real lmdeploy 0.18 (PyTorch backend), in one device
# run (see ../shared/device-kit/README.md):   carry .kit; command: bash scripts/gpu_check_2026-12-01.sh
#  1. servers launched by `tuichat serve` show no API key in `ps -eo args` and still take tuichat's requests
#     (401 without the key); the status pane of a profile with its own api_key shows the KV bar, not an auth error
#  2. `tuichat quantize` offline with --calib-file and --calib-history; the results served with model_format awq
#  3. BF16 vs W4A16 vs KV int8 (quant_policy 8): decode tok/s, KV capacity in tokens, GPU memory of the server
#  4. images through tuichat's client to a tiny Qwen2-VL: prompt tokens per image size, an image too big
#  5. every stop leaves no process and no GPU memory
set -u
t_start=$(date +%s)
source .kit/setup.sh >/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/tuichat-home NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; L=/tmp/gpulogs; mkdir -p "$OUT" "$L" "$TUICHAT_HOME"
# $OUT takes at most 8 files back: every log goes to $L, packed into one archive at the end
exec > >(tee "$OUT/run.log") 2>&1
log() { echo "== +$(( $(date +%s) - t_start ))s $*"; }
tc() { python3 -m tuichat "$@"; }
gpu_apps() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; }
keyfile() { find "$TUICHAT_HOME" -name "$1.key" | head -1; }
port_of() { python3 -c "import tomllib;print(tomllib.load(open('$TUICHAT_HOME/config.toml','rb'))['profiles']['$1']['port'])"; }

# wheels added to the kit after setup.sh last ran on a warm machine
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .kit/wheels/{pyte,wcwidth,httpx_sse,tomlkit}-*.whl 2>/dev/null
serving=()
serve_bg() { for p in "$@"; do ( t0=$(date +%s.%N); tc serve $p --detach --timeout 240 > "$L/serve-$p.txt" 2>&1; echo "exit $? ready_s $(python3 -c "import time;print(round(time.time()-$t0,1))")" >> "$L/serve-$p.txt" ) & serving+=($!); done; }
# never a bare `wait`: it would also wait for the tee behind `exec > >(...)`, forever
wait_serving() { if ((${#serving[@]})); then wait "${serving[@]}"; fi; serving=(); }
(python3 .kit/make_vlm.py /tmp/vlm > "$L/make_vlm.log" 2>&1; python3 .kit/make_vlm.py /tmp/vlm-big $((1344*1344)) >> "$L/make_vlm.log" 2>&1) &
vlm_maker=$!
python3 .kit/make_model.py /tmp/m1b 2048 24 > "$L/make_m1b.log" 2>&1 &
m1b_maker=$!
cat > "$TUICHAT_HOME/config.toml" <<TOML
# hand-written comments must survive tuichat's own saves
[profiles.tiny]
model = "/tmp/tiny-chat"
backend = "pytorch"
cache_max_entry_count = 0.05
session_len = 4096
port = 23401
api_key = "tuichat-profile-own-key-4c1f9e"  # defect 8: a profile with its own key

[profiles.tiny-kv8]
model = "/tmp/tiny-chat"
backend = "pytorch"
cache_max_entry_count = 0.05
session_len = 4096
quant_policy = 8
port = 23402

[profiles.vlm]
model = "/tmp/vlm"
backend = "pytorch"
cache_max_entry_count = 0.05
session_len = 4096
port = 23403

[profiles.vlm-big]
model = "/tmp/vlm-big"
backend = "pytorch"
cache_max_entry_count = 0.05
session_len = 1024
port = 23404

[profiles.tiny-w4]
model = "/tmp/q-file"
backend = "pytorch"
model_format = "awq"
cache_max_entry_count = 0.05
port = 23405

[profiles.tiny-w4h]
model = "/tmp/q-hist"
backend = "pytorch"
model_format = "awq"
cache_max_entry_count = 0.05
port = 23406

[profiles.m1b]
model = "/tmp/m1b"
backend = "pytorch"
cache_max_entry_count = 0.1
port = 23407

[profiles.m1b-kv8]
model = "/tmp/m1b"
backend = "pytorch"
cache_max_entry_count = 0.1
quant_policy = 8
port = 23408

[profiles.m1b-w4]
model = "/tmp/m1b-w4"
backend = "pytorch"
model_format = "awq"
cache_max_entry_count = 0.1
port = 23409
TOML
cp "$TUICHAT_HOME/config.toml" "$L/config-before.toml"

log "serve tiny and tiny-kv8 (parallel); quantize tiny offline while they load"
serve_bg tiny tiny-kv8
python3 - <<'PY'
from pathlib import Path
from tuichat.chat.store import Store
para = ("The lighthouse keeper counted the ships that passed in the night and wrote each name in a blue book. "
        "In the morning the fog lifted, the harbour filled with gulls and fishermen, and the bakery opened. ")
Path("/tmp/calib.txt").write_text(para * 60)
with Store.open() as s:
    for i in range(12):
        c = s.create_conversation(model="tiny-chat")
        s.add_message(c, "user", f"Question {i}: tell me a story about the harbour and the lighthouse.")
        s.add_message(c, "assistant", para * 4)
PY
quantize() {  # NAME MODEL OUT ARGS...
  local name=$1 model=$2 out=$3; shift 3; rm -rf "$out"; echo "=== quantize $name: $*"; local t0=$(date +%s.%N)
  timeout 200 python3 -m tuichat quantize "$model" --out "$out" "$@" --calib-samples 8 --calib-seqlen 256 --yes \
    --profile-name "auto-$name" > "$L/quantize-$name.log" 2>&1
  echo "rc=$? wall=$(python3 -c "import time;print(round(time.time()-$t0,1))")s"
  grep -E "^(done in|Calibrat|Weights|Fit|tuichat:)" "$L/quantize-$name.log" | head -6
  python3 -c "import json;print(json.load(open('$out/config.json'))['quantization_config'])" 2>&1 | tail -1
  ls "$out" 2>/dev/null | grep -E "stats|safetensors" | tr '\n' ' '; echo
}
quantize tiny-file /tmp/tiny-chat /tmp/q-file --calib-file /tmp/calib.txt
serve_bg tiny-w4
quantize tiny-hist /tmp/tiny-chat /tmp/q-hist --calib-history
serve_bg tiny-w4h
echo "leftover job records: $(ls $TUICHAT_HOME/state/quantize/jobs 2>/dev/null | wc -l)"
grep -A4 "auto-tiny-file" "$TUICHAT_HOME/config.toml" | head -5
wait $vlm_maker; tail -1 "$L/make_vlm.log"
log "serve vlm and vlm-big"
serve_bg vlm vlm-big
wait_serving
for p in tiny tiny-kv8 tiny-w4 tiny-w4h vlm vlm-big; do echo "-- serve $p: $(tail -1 "$L/serve-$p.txt")"; done
tc ps

log "1. the key is in no command line; requests with the key work, without it 401"
for p in tiny tiny-kv8 vlm; do
  key=$(cat "$(keyfile $p)" 2>/dev/null); port=$(port_of $p)
  hits=$(ps -eo args | grep -F -c -- "$key" | tr -d ' '); # grep itself is one
  envhits=$(grep -l -F -- "$key" /proc/[0-9]*/environ 2>/dev/null | wc -l)
  with=$(curl -s -o /dev/null -w "%{http_code}" -H "Authorization: Bearer $key" http://127.0.0.1:$port/v1/models)
  without=$(curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1:$port/v1/models)
  echo "KEYCHECK $p key_len ${#key} argv_hits_excluding_grep $((hits - 1)) environ_hits $envhits with_key $with without_key $without"
done
ps -eo args | grep -q -- '[-]-api-keys' && echo "KEYCHECK FAIL --api-keys in ps" || echo "KEYCHECK OK no --api-keys in any command line"
ps -eo pid,sess,args | grep -E "tuichat|lmdeploy|spawn" | grep -v grep | cut -c1-220 > "$L/ps-args.txt"; head -12 "$L/ps-args.txt"

if [ -z "${SKIP_APP:-}" ]; then
log "defect 8 + chat through the app: tuichat tiny at 200x50, status pane after 6 s, one message"
timeout 90 python3 - <<'PY' 2>&1 | tail -40
import os, sys, time
sys.path.insert(0, "tests")
from ptyterm import PtyApp
env = dict(os.environ, TERM="xterm-256color")
a = PtyApp([sys.executable, "-m", "tuichat", "tiny"], env, 200, 50)
a.wait_for("ready", 60)
t0 = time.time()
while time.time() - t0 < 6:
    a.pump(0.2)
screen = a.screen_text()
print("STATUS6S unauthorized" if "Unauthorized" in screen or "unavailable" in screen else "STATUS6S ok")
print("STATUS6S kv_shown", "KV" in screen)
a.type("hello from tuichat on the H200\r")
a.wait_for("TTFT", 30)
print("APPCHAT ok")
print(a.screen_text()[-3000:])
a.close()
PY
grep -c '"GET /metrics HTTP/1.1" 401' "$TUICHAT_HOME"/state/logs/tiny*.log 2>/dev/null | sed 's/^/metrics 401s in tiny log: /'

fi
log "3. decode and KV capacity: BF16 vs KV int8 vs W4A16 (tiny)"
for p in tiny:23401 tiny-kv8:23402 tiny-w4:23405 tiny-w4h:23406; do
  python3 scripts/gpu_decode_probe.py http://127.0.0.1:${p#*:} "$(cat "$(keyfile ${p%%:*})")" ${p%%:*} 512
done
log "4. images on the VLM"
python3 scripts/gpu_vlm_probe.py http://127.0.0.1:23403 "$(cat "$(keyfile vlm)")" 2>&1 | sed 's/^/vlm: /'
python3 scripts/gpu_vlm_probe.py http://127.0.0.1:23404 "$(cat "$(keyfile vlm-big)")" 2>&1 | sed 's/^/vlm-big(session 1024): /'
python3 scripts/gpu_vlm_probe.py http://127.0.0.1:23402 "$(cat "$(keyfile tiny-kv8)")" 2>&1 | sed 's/^/text-only: /' | head -3
for p in tiny-kv8 tiny-w4h vlm vlm-big; do tc stop $p > /dev/null 2>&1; echo "stop $p: $?"; done

if (( $(date +%s) - t_start < 300 )); then
  log "2b. the 0.9 B model: BF16, KV int8, W4A16 calibrated on local text"
  while pgrep -f "make_model.py /tmp/m1b" > /dev/null; do sleep 1; done; tail -1 "$L/make_m1b.log"
  serve_bg m1b m1b-kv8
  quantize m1b /tmp/m1b /tmp/m1b-w4 --calib-file /tmp/calib.txt
  serve_bg m1b-w4
  wait_serving
  for p in m1b m1b-kv8 m1b-w4; do echo "-- serve $p: $(tail -1 "$L/serve-$p.txt")"; done
  for p in m1b:23407 m1b-kv8:23408 m1b-w4:23409; do
    python3 scripts/gpu_decode_probe.py http://127.0.0.1:${p#*:} "$(cat "$(keyfile ${p%%:*})")" ${p%%:*} 512
  done
else
  log "2b skipped: $(( $(date +%s) - t_start )) s already"
fi
tc ps > "$L/ps-final.txt" 2>&1
echo "GPU memory per process while all run:"; gpu_apps
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader

log "5. stop everything"
for p in tiny tiny-w4 tiny-w4h m1b m1b-kv8 m1b-w4; do tc stop $p > /dev/null 2>&1; echo "stop $p: $?"; done
sleep 2
echo "GPU apps after stopping all: [$(gpu_apps)]"; nvidia-smi --query-gpu=memory.used --format=csv,noheader
pgrep -fa "lmdeploy|serve_entry|calib_entry" | grep -v pgrep || echo "no lmdeploy process left"
diff <(grep '^#' "$L/config-before.toml") <(grep '^#' "$TUICHAT_HOME/config.toml") > /dev/null && echo "config comments kept"
for f in "$TUICHAT_HOME"/state/logs/*.log; do cp "$f" "$L/server-$(basename "$f")"; done 2>/dev/null
tar czf "$OUT/gpulogs.tgz" -C /tmp gpulogs tuichat-home/config.toml 2>/dev/null
log "done"
