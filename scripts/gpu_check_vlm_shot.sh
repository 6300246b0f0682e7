#!/usr/bin/env bash
# A screenshot of the chat with an image on a real Qwen2-VL (carry .kit):  bash scripts/gpu_check_vlm_shot.sh
set -u
source .kit/setup.sh >/dev/null
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .kit/wheels/{pyte,wcwidth,httpx_sse,tomlkit}-*.whl 2>/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/th-vlm
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TUICHAT_HOME"
python3 .kit/make_vlm.py /tmp/vlm-big $((1344*1344)) > /dev/null 2>&1
cat > "$TUICHAT_HOME/config.toml" <<'TOML'
[profiles.vlm]
model = "/tmp/vlm-big"
backend = "pytorch"
session_len = 1024
cache_max_entry_count = 0.05
TOML
t0=$(date +%s); python3 -m tuichat serve vlm --detach --timeout 150; echo "serve rc=$? in $(( $(date +%s) - t0 )) s"
timeout 120 python3 scripts/gpu_vlm_screenshot.py vlm "$OUT" 2>&1 | tail -45
python3 -m tuichat stop vlm; echo "stop rc=$?"
sleep 1; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
