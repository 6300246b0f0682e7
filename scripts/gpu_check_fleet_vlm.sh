#!/usr/bin/env bash
# A fleet of two real api_servers behind the real `lmdeploy serve proxy`, images shrunk to fit a short session on a
# real Qwen2-VL, and `tuichat pull` on a machine without internet, in one device run (carry .kit):
#   bash scripts/gpu_check_fleet_vlm.sh
set -u
t_start=$(date +%s)
source .kit/setup.sh >/dev/null
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .kit/wheels/{pyte,wcwidth,httpx_sse,tomlkit}-*.whl 2>/dev/null
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TUICHAT_HOME=/tmp/th-fleet NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TUICHAT_HOME"
exec > >(tee "$OUT/run2.log") 2>&1
log() { echo "== +$(( $(date +%s) - t_start ))s $*"; }
python3 .kit/make_vlm.py /tmp/vlm-big $((1344*1344)) > /tmp/make_vlm.log 2>&1 &
vlm_maker=$!
cat > "$TUICHAT_HOME/config.toml" <<'EOF'
[profiles.tiny]
model = "/tmp/tiny-chat"
backend = "pytorch"
cache_max_entry_count = 0.05

[fleets.pair]
nodes = ["tiny", "tiny"]
proxy_port = 8000
health_check_interval = 5
EOF

log "fleet: serve pair (two nodes + the real proxy)"
timeout 240 python3 -m tuichat serve pair --detach --timeout 220 > /tmp/fleet-serve.txt 2>&1 &
fleet_pid=$!
wait $vlm_maker; tail -1 /tmp/make_vlm.log
setsid python3 -m lmdeploy serve api_server /tmp/vlm-big --backend pytorch --server-name 127.0.0.1 --server-port 23410 \
  --session-len 1024 --cache-max-entry-count 0.05 > /tmp/vlm-big.log 2>&1 &
vlm_srv=$!

if [ -z "${FLEET_ONLY:-}" ]; then
log "pull without internet"
start=$(date +%s); timeout 60 python3 -m tuichat pull internlm/internlm2-chat-1_8b > /tmp/pull.txt 2>&1; rc=$?
echo "PULL rc=$rc after $(( $(date +%s)-start )) s"; head -c 600 /tmp/pull.txt; echo
python3 -m tuichat models --root /tmp/tiny-chat 2>&1 | tail -4
fi

wait $fleet_pid; echo "fleet serve rc=$?"; grep -E "registered|ready|Fleet|tuichat:" /tmp/fleet-serve.txt | head -8
python3 -m tuichat ps
timeout 90 python3 - <<'EOF'
import httpx, json, os, signal, time
from tuichat.server.launcher import ServerManager
from tuichat.server.fleet import find_fleet
f = find_fleet(ServerManager(), "pair"); h = {"Authorization": f"Bearer {f.api_key}"}
m = httpx.get(f"{f.url}/v1/models", headers=h).json()["data"][0]["id"]
chat = lambda: httpx.post(f"{f.url}/v1/chat/completions", headers=h, timeout=60, json={"model": m, "max_tokens": 16,
    "stream": True, "messages": [{"role": "user", "content": "hi"}]}).text[:100].replace("\n", " ")
for _ in range(4): print("FLEETCHAT", chat())
print("NODES", json.dumps(httpx.get(f"{f.url}/nodes/status").json())[:600])
keys = [f.api_key] + [n.api_key for n in f.nodes]
args = os.popen("ps -eo args").read()
print("FLEETKEYS in ps:", sum(k in args for k in keys if k), "of", len(keys))
os.killpg(f.nodes[0].pgid, signal.SIGKILL); t = time.time()
with f.poller() as p:
    while True:
        v = p.poll()
        if any(n.health == "down" for n in v.nodes) or time.time() - t > 30: break
        time.sleep(0.3)
    print(f"FLEETDOWN after {time.time()-t:.1f}s:", [(n.name, n.health, n.registered, n.kv_cache_usage) for n in v.nodes])
    print("FLEETCHAT after kill:", chat()); print("NODES", json.dumps(httpx.get(f"{f.url}/nodes/status").json())[:300])
EOF
log "the app on the fleet: tuichat pair at 200x50"
timeout 60 python3 - <<'EOF' 2>&1 | grep -E "APP|nodes up|pair|Fleet" | head -12
import os, sys, time
sys.path.insert(0, "tests")
from ptyterm import PtyApp
a = PtyApp([sys.executable, "-m", "tuichat", "pair"], dict(os.environ, TERM="xterm-256color"), 200, 50)
a.wait_for("ready", 40)
# at 200 columns the status pane is open from the start (F3 would close it)
a.wait_for("nodes up", 20)
print("APP fleet section shown"); print(a.screen_text()); a.close()
EOF
python3 -m tuichat stop pair; echo "fleet stop rc=$?"

if [ -z "${FLEET_ONLY:-}" ]; then
log "VLM: a 1344x1344 image on a 1,024-token session"
for i in $(seq 120); do curl -sf 127.0.0.1:23410/health >/dev/null && break; sleep 1; done
timeout 60 python3 - <<'EOF'
import asyncio, tempfile
from pathlib import Path
from PIL import Image
from tuichat.chat.turns import ChatSession, Turn
from tuichat.chat.client import ChatClient, ChatError, Usage
from tuichat.chat.images import prepare_attachment
from tuichat.chat.sampling import Sampling
from tuichat.chat.vision import read_spec
async def ask(c, m, att):
    try:
        async for ev in c.stream_chat(m, ChatSession([Turn("user", "Describe this image.", attachments=[att])]).history(), Sampling(max_tokens=8)):
            if isinstance(ev, Usage): return f"prompt_tokens {ev.prompt_tokens}"
        return "no usage"
    except ChatError as e: return f"error: {e.detail or e.message}"
async def main():
    c = ChatClient("http://127.0.0.1:23410"); m = (await c.list_models())[0]
    print("VLMFIT spec", read_spec(Path(m)))
    p = Path(tempfile.mkdtemp()) / "photo.png"; Image.new("RGB", (1344, 1344), (200, 120, 40)).save(p)
    raw = prepare_attachment(p, 4096)
    print("VLMFIT as is", raw.attachment.width, await ask(c, m, raw.attachment))
    fit = prepare_attachment(p, 4096, model=m, session_len=1024)
    print("VLMFIT note", fit.note)
    print("VLMFIT fitted", fit.attachment.width, fit.attachment.height, "predicted", 19 + fit.tokens, await ask(c, m, fit.attachment))
    await c.aclose()
asyncio.run(main())
EOF
fi
kill -INT -- -$vlm_srv; for i in $(seq 30); do kill -0 $vlm_srv 2>/dev/null || break; sleep 1; done
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
log "done"
