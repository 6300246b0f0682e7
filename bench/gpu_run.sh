#!/bin/bash
# The harness's figures against a real LMDeploy server on the GPU machine, in one device run: start-up (1),
# streaming and first-token overhead (2, 4), the status-pane case and the server's own pace with each client
# attached (8), memory growth over live exchanges (6) and idle CPU with both panes (7).
#
# Here, once: bash ../shared/device-kit/build.sh pyte wcwidth httpx-sse   (adds the harness's needs to .kit/)
# Device run (carry .kit):  source .kit/setup.sh && bash bench/gpu_run.sh
#
# It makes the ~1B random-weight model (.kit/make_model.py /tmp/m1b 2048 24), starts `lmdeploy serve api_server`
# on it through tuichat's own launcher (`tuichat serve PROFILE --detach`, with the profile in a temporary
# TUICHAT_HOME), runs the harness against it (tuichat, the raw httpx loop and curl, each through the tap) with no
# background load and then with LOADS concurrent background streams, prints the tables, and stops the server.
# With no load every figure is measured; under load only the streaming ones (SCENARIOS_LOADED), since start-up,
# growth and idle say nothing more there.
# Everything it writes goes under $OUT (or /tmp/bench-gpu-out).
#
# Knobs (environment): LOADS="0 4" CHUNKS=1000 REPS=3 CLIENTS="tuichat,raw httpx,curl -N" EXCHANGES=100 IDLE_S=20
# STARTUP_REPS=5 SCENARIOS="startup,stream,status,growth,idle" SCENARIOS_LOADED="stream,status"; AB_SRC=DIR (a copy
# of another src/) adds an A/B of the first-token overhead on the same server: AB_PAIRS pairs (default 2) of
# AB_REPS fresh-chat streams (default 5) each, that copy then the working tree's, alternating; LMDEPLOY_CMD for a
# dry run here: LMDEPLOY_CMD='["python3", "tests/standin/fake_lmdeploy.py"]' LOADS=0 CHUNKS=50 REPS=1 EXCHANGES=5 \
#   IDLE_S=3 STARTUP_REPS=1 bash bench/gpu_run.sh
set -uo pipefail

cd "$(dirname "$0")/.."
out=${OUT:-/tmp/bench-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TUICHAT_HOME
TUICHAT_HOME=$(mktemp -d)
loads=${LOADS:-"0 4"}
chunks=${CHUNKS:-1000}
reps=${REPS:-3}
clients=${CLIENTS:-"tuichat,raw httpx,curl -N"}
exchanges=${EXCHANGES:-100}
idle_s=${IDLE_S:-20}
startup_reps=${STARTUP_REPS:-5}
scenarios=${SCENARIOS:-"startup,stream,status,growth,idle"}
scenarios_loaded=${SCENARIOS_LOADED:-"stream,status"}
profile=bench1b
key=bench-gpu-key
started=$(date +%s)

log() { echo "[gpu_run +$(($(date +%s) - started))s] $*" >&2; }

model_dir=/tmp/m1b
if [[ -n ${LMDEPLOY_CMD:-} ]]; then
  # a dry run: the stand-in loads nothing, but the launcher wants a model folder to exist
  model_dir=$TUICHAT_HOME/m1b
  mkdir -p "$model_dir" && echo '{"architectures": ["Qwen2ForCausalLM"]}' >"$model_dir/config.json"
elif [[ ! -f $model_dir/config.json ]]; then
  log "making the ~1B model"
  python3 .kit/make_model.py "$model_dir" 2048 24 >"$out/make_model.log" 2>&1 || { log "make_model failed"; tail "$out/make_model.log"; exit 1; }
fi

# LMDEPLOY_CMD (a TOML list) runs another program instead of `python -m lmdeploy` (a dry run with the stand-in)
command_line=${LMDEPLOY_CMD:+command = $LMDEPLOY_CMD}
cat >"$TUICHAT_HOME/config.toml" <<EOF
[profiles.$profile]
$command_line
model = "$model_dir"
backend = "pytorch"
model_name = "m1b"
session_len = 32768  # 100 live exchanges in one chat (the growth figure) outgrew 8192 at exchange ~93
cache_max_entry_count = 0.5
api_key = "$key"
stop_timeout = 60
EOF

stop_server() {
  log "stopping the server"
  python3 -m tuichat stop "$profile" >>"$out/serve.out" 2>&1 || true
  cp -r "$TUICHAT_HOME/state" "$out/tuichat-state" 2>/dev/null || true
}
trap stop_server EXIT

log "starting lmdeploy through tuichat's launcher"
if ! python3 -m tuichat serve "$profile" --detach --timeout 900 >"$out/serve.out" 2>"$out/serve.err"; then
  log "the server did not start"
  tail -20 "$out/serve.err"
  exit 1
fi
cat "$out/serve.out"
url=$(sed -n 's/.* is ready at \(http[^ ]*\) .*/\1/p' "$out/serve.out" | head -1)
[[ -n $url ]] || { log "no URL in the launcher's output"; exit 1; }
log "server ready at $url"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$out/gpu.csv" 2>/dev/null || true

status=0
for load in $loads; do
  these=$scenarios
  [[ $load == 0 ]] || these=$scenarios_loaded
  log "harness: load=$load chunks=$chunks reps=$reps scenarios=$these"
  if ! python3 bench/run.py --url "$url" --api-key "$key" --model m1b --load "$load" --chunks "$chunks" \
      --reps "$reps" --clients "$clients" --scenarios "$these" --exchanges "$exchanges" --idle-seconds "$idle_s" \
      --startup-reps "$startup_reps" --out "$out/RESULTS-gpu-load$load.md" --json "$out/gpu-load$load.json" \
      >"$out/table-load$load.md" 2>"$out/run-load$load.log"; then
    log "harness failed (load $load)"
    tail -30 "$out/run-load$load.log"
    status=1
  fi
done

if [[ -n ${AB_SRC:-} ]]; then
  for pair in $(seq "${AB_PAIRS:-2}"); do
    for side in base current; do
      src=$PWD/src
      [[ $side == base ]] && src=$AB_SRC
      log "A/B first token: pair $pair, $side"
      python3 bench/run.py --url "$url" --api-key "$key" --model m1b --chunks 100 --reps "${AB_REPS:-5}" \
        --clients "tuichat,raw httpx" --scenarios stream --src "$src" --out "$out/ab-$pair-$side.md" \
        >"$out/ab-$pair-$side.table" 2>"$out/ab-$pair-$side.log" || log "A/B run failed ($side)"
    done
  done
fi

for load in $loads; do
  echo
  echo "==================== load: $load concurrent background streams ===================="
  cat "$out/table-load$load.md" 2>/dev/null
done
if [[ -n ${AB_SRC:-} ]]; then
  echo
  echo "==================== A/B first-token overhead: $AB_SRC (base) vs src/ (current) ===================="
  for f in "$out"/ab-*-*.md; do
    echo "$(basename "$f" .md): $(grep -A6 '### 4' "$f" | grep '^| tuichat')"
  done
fi
exit $status
