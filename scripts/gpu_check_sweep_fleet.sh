#!/usr/bin/env bash
# Issue 12 and 10 on the real engine, in device calls on one warm machine (carry .kit):
#   PART=sweep bash scripts/gpu_check_sweep_fleet.sh   BF16 vs W4A16 of a ~0.9 B model: batch of 64 swept over
#                                                      1,4,16,64 (--compare), the status pane sampled during it
#   PART=fleet bash scripts/gpu_check_sweep_fleet.sh   two tiny nodes + the real proxy: batch of 32 at c=8 with
#                                                      per-node counts, attribution of 6 chats, a node killed mid-reply
# Each part writes $OUT/PART.log and a tarball of its files; the last lines are a summary.
set -u
PART=${PART:-sweep}
LOG_NAME=$PART.log
source scripts/gpu_common.sh
cat >> "$TUICHAT_HOME/config.toml" <<'EOF'

[profiles.tiny]
model = "/tmp/tiny-chat"
backend = "pytorch"
cache_max_entry_count = 0.05

[fleets.pair]
nodes = ["tiny", "tiny"]
proxy_port = 8000
health_check_interval = 30
EOF
head -32 $W/p64.txt > $W/p32.txt

if [ "$PART" = sweep ]; then
  make_models
  log "serve bf16 and w4 (one after the other: both on one GPU)"
  python3 -m tuichat serve bf16 --detach --timeout 300 > $W/serve-bf16.txt 2>&1; echo "serve bf16 rc=$?"; tail -2 $W/serve-bf16.txt
  python3 -m tuichat serve w4 --detach --timeout 300 > $W/serve-w4.txt 2>&1; echo "serve w4 rc=$?"; tail -2 $W/serve-w4.txt
  python3 -m tuichat ps
  log "the status pane attached to bf16 at 200x50, sampled during the sweep"
  python3 - > $W/pane.txt 2>&1 <<'EOF' &
import os, sys, time, re
from ptyterm import PtyApp
a = PtyApp([sys.executable, "-m", "tuichat", "bf16"], dict(os.environ, TERM="xterm-256color"), 200, 50)
a.wait_for("KV", 60)
t = time.time()
while time.time() - t < 200:
    a.pump(0.5)
    s = a.screen_text()
    lines = [l.strip() for l in s.splitlines() if re.search(r"KV|running|waiting|requests", l)]
    print(f"PANE t={time.time()-t:5.1f}", " | ".join(" ".join(l.split()) for l in lines)[:400], flush=True)
    if os.path.exists("/tmp/gpuwork/sweep.done"): break
    time.sleep(1.5)
print(s); a.close()
EOF
  pane=$!
  log "batch of 64, --compare bf16 w4, --sweep 1,4,16,64, max 64 tokens"
  timeout 420 python3 -m tuichat batch $W/p64.txt --compare bf16 w4 --max-tokens 64 --sweep 1,4,16,64 --out $W/sweep.jsonl --plot $OUT/sweep.svg > $W/sweep.txt 2>$W/sweep.err; echo "batch rc=$?"
  touch $W/sweep.done; cat $W/sweep.txt; tail -5 $W/sweep.err
  wait $pane
  grep "^PANE" $W/pane.txt | awk 'NR%4==1' | head -40
  python3 -m tuichat stop bf16; python3 -m tuichat stop w4
fi

if [ "$PART" = fleet ]; then
  log "fleet: tuichat serve pair (two tiny nodes + the real proxy)"
  timeout 280 python3 -m tuichat serve pair --detach --timeout 260 > $W/fleet-serve.txt 2>&1; echo "fleet serve rc=$?"; tail -4 $W/fleet-serve.txt
  python3 -m tuichat ps
  log "batch of 32 at concurrency 8 through the fleet"
  timeout 200 python3 -m tuichat batch $W/p32.txt --fleet pair -c 8 --max-tokens 64 --out $W/fleet.jsonl > $W/fleet.txt 2>$W/fleet.err; echo "fleet batch rc=$?"
  cat $W/fleet.txt; tail -3 $W/fleet.err; cat $W/fleet.summary.json 2>/dev/null | head -c 800; echo
  log "attribution of 6 chats, then a node killed mid-reply"
  timeout 120 python3 - <<'EOF'
import httpx, os, signal, threading, time
from tuichat.server.launcher import ServerManager
from tuichat.server.fleet import find_fleet, observe
from tuichat.server.attribution import ReplyLedger
f = find_fleet(ServerManager(), "pair"); h = {"Authorization": "Bearer " + f.api_key}
L = ReplyLedger(); p = f.poller(supervise=False); observe(L, p.poll())
m = httpx.get(f.url + "/v1/models", headers=h).json()["data"][0]["id"]
def ask(n):
    return httpx.post(f.url + "/v1/chat/completions", headers=h, timeout=120,
        json={"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": n})
for i in range(6):
    L.started(i); ask(16); L.ended(i); observe(L, p.poll())
print("ATTRIB", [e.describe() for e in L.entries()])
for n in f.nodes:
    r = httpx.get(n.url + "/metrics", headers={"Authorization": "Bearer " + n.api_key}).text
    done = [l for l in r.splitlines() if l.startswith("lmdeploy:e2e_request_latency_seconds_count")]
    print("NODE", n.name, n.url, done[:1])
# a long reply, then kill the node that is running it
res = {}
def long(): 
    try:
        with httpx.stream("POST", f.url + "/v1/chat/completions", headers=h, timeout=120, json={"model": m,
            "stream": True, "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "ignore_eos": True}) as r:
            res["chunks"] = sum(1 for _ in r.iter_lines())
    except Exception as e: res["error"] = repr(e)[:200]
t = threading.Thread(target=long); t.start(); time.sleep(2.0)
busy = None
for n in f.nodes:
    r = httpx.get(n.url + "/metrics", headers={"Authorization": "Bearer " + n.api_key}).text
    run = [l for l in r.splitlines() if l.startswith("lmdeploy:num_requests_running")]
    if run and float(run[0].split()[-1]) > 0: busy = n
print("BUSY", busy.name if busy else None)
victim = busy or f.nodes[0]; L.started("long")
os.killpg(victim.pgid, signal.SIGKILL); k = time.time(); t.join(60); L.ended("long")
print("LONG after kill:", res)
while True:
    v = p.poll(); observe(L, v)
    if any(n.health == "down" for n in v.nodes) or time.time() - k > 40: break
    time.sleep(0.3)
print(f"DOWN after {time.time()-k:.1f}s:", [(n.name, n.health) for n in v.nodes])
print("ATTRIB long:", L.get("long").describe() if L.get("long") else None)
r = ask(16); print("CHAT after kill:", r.status_code, r.text[:120].replace("\n", " "))
EOF
  python3 -m tuichat stop pair; echo "fleet stop rc=$?"
  log "hub id not in the cache, offline box"
  cat >> "$TUICHAT_HOME/config.toml" <<'EOF'

[profiles.hub]
model = "internlm/internlm2-chat-1_8b"
backend = "pytorch"
EOF
  HF_HOME=$(mktemp -d) timeout 30 python3 -m tuichat serve hub < /dev/null; echo "serve hub rc=$?"
  python3 -c "from tuichat.models.discovery import inspect_model; from tuichat.models.fit import model_facts; from tuichat.server.gpu import NvmlReader; print(*model_facts(inspect_model('/tmp/tiny-chat'), NvmlReader().read()), sep='\n')" 2>&1 | tail -8
fi
sleep 2; echo "GPU apps at the end: [$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)]"
pgrep -fa "lmdeploy|serve_entry" | grep -v pgrep || echo "no lmdeploy process left"
tar czf "$OUT/$PART-files.tgz" -C $W . "$TUICHAT_HOME/state" 2>/dev/null
log "done"
