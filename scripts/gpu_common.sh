# Sourced by the scripts/gpu_check_*.sh of a device run (carry .kit): the kit, the wheels the GPU machine lacks, the
# environment, a log() with elapsed seconds, $OUT and the work folder $W, and the BF16 / W4A16 profiles of the ~0.9 B
# model in a TUICHAT_HOME of their own. Set LOG_NAME first: everything the script prints also goes to $OUT/LOG_NAME.
t_start=$(date +%s)
source .kit/setup.sh >/dev/null
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .kit/wheels/{pyte,wcwidth,httpx_sse,tomlkit,plotext}-*.whl 2>/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/th-gpu NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; W=/tmp/gpuwork; mkdir -p "$OUT" "$TUICHAT_HOME" $W
exec > >(tee "$OUT/${LOG_NAME:-gpu.log}") 2>&1
log() { echo "== +$(( $(date +%s) - t_start ))s $*"; }
cat > "$TUICHAT_HOME/config.toml" <<'EOF'
[profiles.bf16]
model = "/tmp/m09"
backend = "pytorch"
model_name = "m09"
cache_max_entry_count = 0.3

[profiles.w4]
model = "/tmp/m09-awq"
backend = "pytorch"
model_format = "awq"
model_name = "m09"
cache_max_entry_count = 0.3
EOF
for i in $(seq 64); do echo "Write a short story about the number $i."; done > $W/p64.txt

# The 0.9 B random-weight model and its W4A16 copy (data-free AWQ: the machine is offline), made once per machine.
make_models() {
  if [ ! -f /tmp/m09/config.json ]; then log "make the 0.9 B model"; python3 .kit/make_model.py /tmp/m09 2048 24 > $W/make.log 2>&1; tail -1 $W/make.log; fi
  if [ ! -f /tmp/m09-awq/config.json ]; then
    log "W4A16 with tuichat quantize (data-free: offline)"
    python3 -m tuichat quantize /tmp/m09 --out /tmp/m09-awq --calib-samples 0 --yes --no-profile > $W/quant.log 2>&1; echo "quantize rc=$?"; tail -4 $W/quant.log
  fi
}
