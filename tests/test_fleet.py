"""Fleets: `[fleets.NAME]` validation, and `tuichat serve / ps / stop FLEET` with two stand-in api_servers behind the
stand-in `lmdeploy serve proxy` (real subprocesses, each in its own session, started through tuichat's launcher):
chat through the proxy, a node killed shown down while chat goes on through the other, no process and no key on
any command line left behind; plus attaching to a proxy by URL and the proxy stand-in's own 0.18 behaviour."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w
from fakegpu import FakeGpuReader
from standin import fake_proxy
from standin.harness import (
    STANDIN_COMMAND,
    free_port,
    group_pids,
    proc_file,
    run_standin,
    session_pids,
    wait_for,
)

from tuichat.cli import server as servercli
from tuichat.config import add_fleet, load_config, remove_fleet
from tuichat.errors import ConfigError
from tuichat.server import launcher
from tuichat.server.fleet import FleetPoller, find_fleet, probe_proxy
from tuichat.server.gpu import GpuInfo
from tuichat.server.launcher import ServerManager

GIB = 1 << 30
FAKE_PROXY = str(Path(fake_proxy.__file__).resolve())
PROXY_COMMAND = [sys.executable, FAKE_PROXY]


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tuichat")
    servercli.add_subcommands(parser.add_subparsers(dest="command"))
    return servercli.run(parser.parse_args(list(argv)))


def _node(*extra: str) -> dict[str, object]:
    return {
        "model": "internlm/internlm2-chat-1_8b",
        "backend": "pytorch",
        "command": STANDIN_COMMAND,
        "port": free_port(),
        "stop_timeout": 3,
        "extra_args": ["--fake-load-seconds", "1.0", "--fake-words", "6", *extra],
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path))
    # the nodes' model is a hub id: a cached snapshot of it, so the launcher's preflight neither downloads nor
    # finds the machine offline
    snapshot = tmp_path / "hub" / "models--internlm--internlm2-chat-1_8b" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    gpu = FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=10 * GIB, mem_total=140 * GIB)])
    monkeypatch.setattr(launcher, "make_gpu_reader", lambda: gpu)
    config = {
        "profiles": {
            "n1": _node(),
            "n2": _node(),
            "broken": _node("--fake-crash-while-loading"),
            "slow": _node("--fake-rate", "20", "--fake-tokens-per-chunk", "1"),
            "slow2": _node("--fake-rate", "20", "--fake-tokens-per-chunk", "1"),
            "stubborn": {**_node("--fake-ignore-signals"), "stop_timeout": 1},
        },
        "fleets": {
            "pair": {
                "nodes": ["n1", "n2"],
                "proxy_port": free_port(),
                "proxy_command": PROXY_COMMAND,
                "health_check_interval": 1,
            },
            "bad": {"nodes": ["n1", "broken"], "proxy_port": free_port(), "proxy_command": PROXY_COMMAND},
            "hard": {"nodes": ["n1", "stubborn"], "proxy_port": free_port(), "proxy_command": PROXY_COMMAND},
            "slowpair": {
                "nodes": ["slow", "slow2"],
                "proxy_port": free_port(),
                "proxy_command": PROXY_COMMAND,
                "health_check_interval": 30,  # long: what shows the dead node down is tuichat, not the proxy
            },
        },
    }
    (tmp_path / "config.toml").write_text(tomli_w.dumps(config))
    yield tmp_path
    mgr = ServerManager()
    for server in mgr.running_all():
        mgr.stop(server, timeout=1.0)
    mgr.close()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


PROFILES = """
[profiles.tiny]
model = "/tmp/tiny-chat"
port = "auto"
"""


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("fleet", "key", "words"),
    [
        ('nodes = ["tiny"]\nproxy_prot = 8000', "fleets.f.proxy_prot", "did you mean 'proxy_port'"),
        ('nodes = ["tiyn"]', "fleets.f.nodes", "no profile is called 'tiyn' (did you mean 'tiny'?)"),
        ("proxy_port = 8000", "fleets.f.nodes", "is required"),
        ('nodes = "tiny"', "fleets.f.nodes", "must be a list"),
        ("nodes = []", "fleets.f.nodes", "at least one"),
        ('nodes = ["tiny"]\nrouting_strategy = "min_latency"', "fleets.f.routing_strategy", "min_expected_latency"),
        ('nodes = ["tiny"]\nproxy_port = 0', "fleets.f.proxy_port", "between 1 and 65535"),
        ('nodes = ["tiny"]\napi_key = "two words"', "fleets.f.api_key", "without spaces"),
        ('nodes = ["tiny"]\nhealth_check_interval = 0', "fleets.f.health_check_interval", "from 1 to 3600"),
    ],
)
def test_a_fleet_is_validated_strictly_naming_file_and_key(tmp_path: Path, fleet: str, key: str, words: str) -> None:
    path = _write(tmp_path, PROFILES + "\n[fleets.f]\n" + fleet + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert words in err.value.message
    assert str(path) in str(err.value)


def test_a_fleet_named_like_a_profile_or_repeating_a_fixed_port_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, PROFILES + '\n[fleets.tiny]\nnodes = ["tiny"]\n')
    with pytest.raises(ConfigError, match="also a profile"):
        load_config(path)
    fixed = PROFILES.replace('port = "auto"', "port = 23400")
    path = _write(tmp_path, fixed + '\n[fleets.f]\nnodes = ["tiny", "tiny"]\n')
    with pytest.raises(ConfigError, match="fixed port 23400"):
        load_config(path)


def test_a_valid_fleet_loads_and_repeated_profiles_get_their_own_names(tmp_path: Path) -> None:
    path = _write(tmp_path, PROFILES + '\n[fleets.f]\nnodes = ["tiny", "tiny"]\nrouting_strategy = "random"\n')
    spec = load_config(path).fleets["f"]
    assert spec.routing_strategy == "random"
    assert spec.proxy_port == 8000
    assert spec.node_names() == [("f.tiny", "tiny"), ("f.tiny-2", "tiny")]


def test_fleets_are_saved_and_removed_keeping_the_users_comments(tmp_path: Path) -> None:
    path = _write(tmp_path, "# my servers\n" + PROFILES)
    add_fleet("f", {"nodes": ["tiny", "tiny"], "proxy_port": 8100}, path=path)
    text = path.read_text()
    assert "# my servers" in text and "[fleets.f]" in text
    assert load_config(path).fleets["f"].proxy_port == 8100
    with pytest.raises(ConfigError, match="no profile is called 'nope'"):
        add_fleet("g", {"nodes": ["nope"]}, path=path)
    remove_fleet("f", path=path)
    assert "fleets" not in path.read_text()
    assert "# my servers" in path.read_text()
    # a profile a fleet still uses cannot be removed from under it
    add_fleet("f", {"nodes": ["tiny"]}, path=path)
    from tuichat.config import remove_profile

    with pytest.raises(ConfigError) as err:
        remove_profile("tiny", path=path)
    assert err.value.key == "fleets.f.nodes"


# ---------------------------------------------------------------- the proxy stand-in


def test_the_proxy_standin_parses_like_lmdeploy_018() -> None:
    opts = fake_proxy.parse_args(["serve", "proxy"])
    assert opts["--server-name"] == "0.0.0.0"  # the real default: tuichat must pass 127.0.0.1
    assert opts["--server-port"] == 8000
    opts = fake_proxy.parse_args(["serve", "proxy", "--api-keys", "a", "b", "--disable-cache-status"])
    assert opts["--api-keys"] == ["a", "b"]
    with pytest.raises(fake_proxy.UsageError, match="invalid choice"):
        fake_proxy.parse_args(["serve", "proxy", "--routing-strategy", "fastest"])
    with pytest.raises(fake_proxy.UsageError, match="unrecognized arguments: --health"):
        fake_proxy.parse_args(["serve", "proxy", "--health"])


# ---------------------------------------------------------------- serve / ps / chat / kill / stop


def _chat(url: str, key: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    text = ""
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                continue
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk and "error_code" not in chunk, chunk
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
            elif line.strip():
                raise AssertionError(f"not a stream line: {line!r}")
    return text


def _all_pids(manager: ServerManager, fleet: str) -> set[int]:
    found = find_fleet(manager, fleet)
    assert found is not None
    return {pid for member in found.members for pid in session_pids(member.pid)}


def test_serve_a_fleet_chat_through_the_proxy_lose_a_node_and_stop_it_all(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("serve", "pair", "--detach", "--timeout", "30") == 0
    out, err = capsys.readouterr()
    assert "Fleet pair is ready at http://127.0.0.1:" in out
    for node in ("pair.n1", "pair.n2"):
        assert f"{node} ready" in err and f"{node} registered with the proxy" in err
    assert "Loading weights from safetensors" in err  # progress per node

    manager = ServerManager()
    fleet = find_fleet(manager, "pair")
    assert fleet is not None and fleet.proxy is not None and fleet.url is not None and fleet.api_key
    pids = _all_pids(manager, "pair")
    keys = [fleet.api_key, *(n.api_key or "" for n in fleet.nodes)]
    assert len(set(keys)) == 3  # each node its own key, the proxy its own
    for pid in pids:
        for name in ("cmdline", "environ"):
            seen = proc_file(pid, name)
            assert not any(key.encode() in seen for key in keys), (pid, name)
    cmdline = proc_file(fleet.proxy.pid, "cmdline").split(b"\0")
    assert b"--disable-cache-status" in cmdline
    assert cmdline[cmdline.index(b"--server-name") + 1] == b"127.0.0.1"

    model = "internlm/internlm2-chat-1_8b"
    for _ in range(6):
        assert _chat(fleet.url, fleet.api_key, model).strip()
    bad = httpx.get(f"{fleet.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert bad.status_code == 401
    status = httpx.get(f"{fleet.url}/nodes/status", timeout=5).json()
    assert set(status) == {n.url for n in fleet.nodes}
    assert sum(len(s["latency"]) for s in status.values()) == 6
    assert all(s["unfinished"] == 0 for s in status.values())

    assert _cli("ps") == 0
    out = capsys.readouterr().out
    assert "Fleet pair: proxy at " + fleet.url + "; 2 of 2 nodes up and registered" in out
    assert "pair.n1" in out and "pair.n2" in out and "up, 0 unfinished" in out
    assert "No server started by tuichat" not in out

    with fleet.poller(supervise=True) as poller:
        view = poller.poll()
        assert [n.health for n in view.nodes] == ["up", "up"]
        assert all(n.running == 0 and n.kv_cache_usage is not None for n in view.nodes)  # read with each node's key
        victim, survivor = fleet.nodes
        os.killpg(victim.pgid, signal.SIGKILL)

        def victim_down() -> bool:
            nodes = {n.url: n for n in poller.poll().nodes}
            return nodes[victim.url].health == "down" and nodes[survivor.url].health == "up"

        wait_for(victim_down, timeout=5, interval=0.2, message="the killed node shown down")
        # the supervising poller took it off the proxy's list: chat goes on through the other node
        assert set(httpx.get(f"{fleet.url}/nodes/status", timeout=5).json()) == {survivor.url}
        for _ in range(4):
            assert _chat(fleet.url, fleet.api_key, model).strip()

    assert _cli("stop", "pair") == 0
    wait_for(lambda: not any(session_pids(p) for p in pids), timeout=10, message="every process of the fleet gone")
    assert find_fleet(ServerManager(), "pair") is None
    assert _cli("ps") == 0
    assert "No server started by tuichat is running." in capsys.readouterr().out


def test_a_node_that_crashes_while_loading_stops_the_whole_fleet(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("serve", "bad", "--detach", "--timeout", "30") == 1
    err = capsys.readouterr().err
    assert "Node bad.broken failed" in err and "ran out of memory" in err
    assert "The rest of the fleet was stopped" in err
    manager = ServerManager()
    assert find_fleet(manager, "bad") is None
    assert manager.running_all() == []


def test_the_proxy_drops_a_dead_node_at_its_health_check(home: Path) -> None:
    """Without a supervising tuichat, the proxy's own check (every health_check_interval s) removes a dead node."""
    assert _cli("serve", "pair", "--detach", "--timeout", "30") == 0
    fleet = find_fleet(ServerManager(), "pair")
    assert fleet is not None and fleet.url is not None
    victim = fleet.nodes[0]
    os.killpg(victim.pgid, signal.SIGKILL)

    def dropped() -> bool:
        return victim.url not in httpx.get(f"{fleet.url}/nodes/status", timeout=5).json()

    wait_for(dropped, timeout=6, interval=0.2, message="the proxy dropping the dead node")
    assert _cli("stop", "pair") == 0


# ---------------------------------------------------------------- attach by URL


def test_attach_to_any_proxy_recognise_it_and_follow_nodes_coming_and_going(tmp_path: Path) -> None:
    port = free_port()
    argv = [*PROXY_COMMAND, "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(port)]
    log = open(tmp_path / "proxy.log", "wb")  # noqa: SIM115 - closed below, after the process
    proxy = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: probe_proxy(url), timeout=10, message="the proxy up")
        with run_standin(api_key="node-key") as node, FleetPoller(url, node_keys={node.url: "node-key"}) as poller:
            assert not probe_proxy(node.url)  # an api_server is not a proxy
            assert poller.poll().nodes == ()
            # a node with a key cannot be added by URL alone: the proxy reads its /v1/models without a key
            added = httpx.post(f"{url}/nodes/add", json={"url": node.url}, timeout=5)
            assert "10402" in added.json() and poller.poll().nodes == ()
            httpx.post(f"{url}/nodes/add", json={"url": node.url, "status": {"models": ["tiny-chat"]}}, timeout=5)
            view = poller.poll()
            assert [(n.url, n.health, n.models) for n in view.nodes] == [(node.url, "up", ("tiny-chat",))]
            assert view.nodes[0].kv_cache_usage is not None  # read from the node itself, with its key
            httpx.post(f"{url}/nodes/remove", json={"url": node.url}, timeout=5)
            assert poller.poll().nodes == ()
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)
        proxy.wait()
        log.close()


def test_serve_entry_passes_a_nodes_two_keys_from_the_pipe_and_neither_on_its_command_line(tmp_path: Path) -> None:
    from tuichat.server.profiles import SERVE_ENTRY

    script = tmp_path / "prog.py"
    script.write_text(
        "import json, sys\nprint(json.dumps([sys.argv, open('/proc/self/cmdline', 'rb').read().decode()]))\n"
    )
    done = subprocess.run(
        [sys.executable, str(SERVE_ENTRY), "--key-fd", "0", "--script", str(script), "--", "serve", "api_server", "m"],
        input="node-key\nproxy-key\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    argv, cmdline = json.loads(done.stdout)
    assert argv[-3:] == ["--api-keys", "node-key", "proxy-key"]
    assert "node-key" not in cmdline and "proxy-key" not in cmdline


# --- the app on a fleet: `tuichat FLEET` ----------------------------------------------------------------------


async def test_tuichat_fleet_chats_through_the_proxy_and_shows_every_node(home: Path) -> None:
    import apphelpers

    from tuichat.ui.app import AppOptions, make_app
    from tuichat.ui.widgets.prompt_area import PromptArea
    from tuichat.ui.widgets.status_pane import StatusPane

    assert _cli("serve", "pair", "--detach", "--timeout", "30") == 0
    gpu = FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=10 * GIB, mem_total=140 * GIB)])
    app = make_app(AppOptions(profile="pair", gpu_reader=gpu, poll_interval=0.2, cursor_blink=False))
    async with app.run_test(size=(200, 50)) as pilot:
        app.query_one(StatusPane).display = True
        pane = app.query_one("#fleet-view")
        await apphelpers.wait_for(pilot, lambda: "2 of 2 nodes up" in apphelpers.screen_text(app), timeout=20)
        prompt = app.query_one(PromptArea)
        prompt.focus()
        prompt.text = "hello fleet"
        await pilot.press("enter")
        await apphelpers.wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2, timeout=20)
        assert app.chat.turns[-1].role == "assistant" and app.chat.turns[-1].content.strip()
        text = apphelpers.screen_text(app)
        assert "n1" in text and "n2" in text and pane.display


def test_tuichat_fleet_that_is_not_running_says_how_to_start_it(home: Path) -> None:
    from tuichat.errors import TuichatError
    from tuichat.ui.app import AppOptions, make_app

    with pytest.raises(TuichatError, match=r"fleet 'pair' is not running: start it with `tuichat serve pair --detach`"):
        make_app(AppOptions(profile="pair"))


def test_stop_a_fleet_with_a_node_that_ignores_sigterm_kills_it_after_the_grace_time(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("serve", "hard", "--detach", "--timeout", "30") == 0
    manager = ServerManager()
    fleet = find_fleet(manager, "hard")
    assert fleet is not None
    stubborn = next(n for n in fleet.nodes if n.name == "hard.stubborn")
    group = session_pids(stubborn.pid)
    assert len(group) >= 2  # the server and its engine child, both deaf to SIGINT and SIGTERM
    every = _all_pids(manager, "hard")
    capsys.readouterr()

    assert _cli("stop", "hard") == 0
    out, err = capsys.readouterr()
    said = out + err
    assert "hard.stubborn stopped after SIGKILL" in said, said  # SIGINT, SIGTERM, then SIGKILL at stop_timeout
    assert "hard.n1 stopped after SIGINT" in said, said  # the well-behaved node went at the first signal
    assert "still alive" not in said
    # no process left: every pid of each group, the stubborn engine child included, is gone (not even a zombie)
    wait_for(lambda: not any(session_pids(p) for p in every), timeout=10, message="every process of the fleet gone")
    assert group <= every and not group_pids(stubborn.pgid)
    assert find_fleet(ServerManager(), "hard") is None


async def test_a_node_dying_mid_reply_keeps_the_partial_reply_and_chat_goes_on_through_the_other(home: Path) -> None:
    import time

    import apphelpers

    from tuichat.ui.app import AppOptions, make_app
    from tuichat.ui.widgets.prompt_area import PromptArea

    assert _cli("serve", "slowpair", "--detach", "--timeout", "30") == 0
    fleet = find_fleet(ServerManager(), "slowpair")
    assert fleet is not None and fleet.url is not None
    gpu = FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=10 * GIB, mem_total=140 * GIB)])
    app = make_app(AppOptions(profile="slowpair", gpu_reader=gpu, poll_interval=0.2, cursor_blink=False))
    async with app.run_test(size=(200, 50)) as pilot:
        await apphelpers.wait_for(pilot, lambda: "2 of 2 nodes up" in apphelpers.screen_text(app), timeout=20)
        prompt = app.query_one(PromptArea)
        prompt.focus()
        # whichever node the proxy picks sends 3 words, then dies as a crashed server does (connection reset)
        prompt.text = "count [[fault:die=3]]"
        await pilot.press("enter")
        await apphelpers.wait_for(pilot, lambda: not app.streaming and len(app.chat) >= 2, timeout=20)
        died_at = time.monotonic()
        reply = app.chat.turns[1]
        assert reply.role == "assistant" and reply.state == "interrupted"  # kept, and marked as cut short
        assert reply.content.startswith("w1 w2")
        assert any(t.role == "error" for t in app.chat.turns[2:])
        assert "Traceback" not in apphelpers.screen_text(app)
        dead = [n for n in fleet.nodes if not n.is_alive()]
        alive = [n for n in fleet.nodes if n.is_alive()]
        assert len(dead) == 1 and len(alive) == 1

        # the dead node is shown down within seconds, long before the proxy's own 30 s health check
        dead_label = dead[0].name.split(".", 1)[1]

        def dead_row_shown() -> bool:
            # the summary and the node's own row are separate widgets: wait for both, not one frame of either
            lines = apphelpers.screen_text(app).splitlines()
            return any("1 of 2 nodes up" in line for line in lines) and any(
                dead_label + " " in line and "down" in line for line in lines
            )

        await apphelpers.wait_for(pilot, dead_row_shown, timeout=5)
        assert time.monotonic() - died_at < 5

        before = {u: len(s["latency"]) for u, s in httpx.get(f"{fleet.url}/nodes/status", timeout=5).json().items()}
        assert set(before) == {alive[0].url}  # taken off the proxy: the next message cannot go to it
        turns = len(app.chat)
        prompt.text = "and now?"
        await pilot.press("enter")
        await apphelpers.wait_for(pilot, lambda: not app.streaming and len(app.chat) == turns + 2, timeout=20)
        last = app.chat.turns[-1]
        assert last.role == "assistant" and last.state != "interrupted" and last.content.startswith("w1 w2")
        after = httpx.get(f"{fleet.url}/nodes/status", timeout=5).json()
        assert len(after[alive[0].url]["latency"]) == before[alive[0].url] + 1  # served by the survivor
    assert _cli("stop", "slowpair") == 0


# --- which node served each reply (the proxy does not say: the nodes' own counters do) ------------------------

METRICS_TEXT = """# HELP lmdeploy:prompt_tokens_total Number of prefill tokens processed.
# TYPE lmdeploy:prompt_tokens_total counter
lmdeploy:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}
# HELP lmdeploy:generation_tokens_total Number of generation tokens processed.
# TYPE lmdeploy:generation_tokens_total counter
lmdeploy:generation_tokens_total{{engine="0",model_name="m"}} {gen}
# HELP lmdeploy:request_success_total Count of successfully processed requests.
# TYPE lmdeploy:request_success_total counter
lmdeploy:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {stop}
lmdeploy:request_success_total{{engine="0",finished_reason="length",model_name="m"}} 1.0
"""


def test_a_nodes_work_counters_are_read_from_its_metrics() -> None:
    from tuichat.server.attribution import NodeCounters, read_counters
    from tuichat.server.metrics import MetricsError

    counters = read_counters(METRICS_TEXT.format(prompt=120.0, gen=40.0, stop=3.0))
    assert counters == NodeCounters(requests=4.0, prompt_tokens=120.0, generation_tokens=40.0)
    later = read_counters(METRICS_TEXT.format(prompt=130.0, gen=40.0, stop=3.0))
    assert later.moved_since(counters) is True  # a prefill alone (a reply cut off before its first token) counts
    assert counters.moved_since(counters) is False
    assert NodeCounters().moved_since(counters) is None  # nothing to compare: no guess
    with pytest.raises(MetricsError):
        read_counters("<html>not metrics</html>")


def _readings(**nodes: tuple[bool, float | None]) -> dict[str, object]:
    from tuichat.server.attribution import NodeCounters, NodeReading

    return {
        f"http://{label}": NodeReading(label, up, None if work is None else NodeCounters(work, work * 10, work * 5))
        for label, (up, work) in nodes.items()
    }


def test_a_reply_is_attributed_to_the_one_node_whose_counters_moved() -> None:
    from tuichat.server.attribution import ReplyLedger

    ledger = ReplyLedger()
    ledger.observe(_readings(n1=(True, 5), n2=(True, 7)), 0.0, 0.1)
    ledger.started("r1", at=1.0)
    ledger.observe(_readings(n1=(True, 5), n2=(True, 7)), 1.5, 1.6)  # during the reply: not a closing reading
    ledger.ended("r1", at=2.0)
    assert ledger.get("r1") is not None and ledger.get("r1").describe() == "waiting for the nodes' counters…"  # type: ignore[union-attr]
    ledger.observe(_readings(n1=(True, 5), n2=(True, 8)), 1.9, 2.5)  # begun before the end: still not closing
    assert ledger.get("r1").certainty == "pending"  # type: ignore[union-attr]
    ledger.observe(_readings(n1=(True, 5), n2=(True, 8)), 2.1, 2.2)
    served = ledger.get("r1")
    assert served is not None and served.certainty == "one" and served.describe() == "n2"
    # the next reply, read from the same baseline as the last one closed with, goes to n1
    ledger.started("r2", at=3.0)
    ledger.ended("r2", at=4.0)
    ledger.observe(_readings(n1=(True, 6), n2=(True, 8)), 4.1, 4.2)
    assert [e.describe() for e in ledger.entries()] == ["n2", "n1"]


def test_overlapping_replies_are_ambiguous_and_say_so() -> None:
    from tuichat.server.attribution import ReplyLedger

    ledger = ReplyLedger()
    ledger.observe(_readings(n1=(True, 5), n2=(True, 7)), 0.0, 0.1)
    ledger.started("a", at=1.0)
    ledger.started("b", at=1.2)  # e.g. another tuichat or a batch on the same fleet
    ledger.ended("a", at=2.0)
    ledger.ended("b", at=2.1)
    ledger.observe(_readings(n1=(True, 6), n2=(True, 8)), 3.0, 3.1)
    assert [e.describe() for e in ledger.entries()] == ["one of n1, n2", "one of n1, n2"]
    assert {e.certainty for e in ledger.entries()} == {"several"}


def test_a_node_that_died_during_a_reply_is_named_as_having_served_it() -> None:
    from tuichat.server.attribution import ReplyLedger

    ledger = ReplyLedger()
    ledger.observe(_readings(n1=(True, 5), n2=(True, 7)), 0.0, 0.1)
    ledger.started("r", at=1.0)
    ledger.ended("r", at=2.0)
    ledger.observe(_readings(n1=(False, None), n2=(True, 7)), 2.5, 2.6)
    served = ledger.get("r")
    assert served is not None and served.certainty == "one" and served.describe() == "n1 (went down)"


def test_no_reading_before_or_unreadable_counters_leave_a_reply_unknown() -> None:
    from tuichat.server.attribution import ReplyLedger

    ledger = ReplyLedger()
    ledger.started("early", at=0.5)
    ledger.ended("early", at=0.8)
    ledger.observe(_readings(n1=(True, None), n2=(True, None)), 1.0, 1.1)  # no node key: no /metrics
    ledger.started("blind", at=2.0)
    ledger.ended("blind", at=3.0)
    ledger.observe(_readings(n1=(True, None), n2=(True, None)), 3.5, 3.6)
    early, blind = ledger.entries()
    assert early.describe() == "unknown (no reading of the nodes from before it)"
    assert blind.describe() == "unknown (the nodes' /metrics could not be read with their keys)"
    ledger.forget("blind")
    assert [e.key for e in ledger.entries()] == ["early"]


def test_replies_through_a_real_fleet_are_attributed_to_the_node_that_logged_them(home: Path) -> None:
    """End to end with two stand-in nodes: each reply's attribution matches the node whose own log shows it."""
    from tuichat.server.attribution import ReplyLedger
    from tuichat.server.fleet import observe

    assert _cli("serve", "pair", "--detach", "--timeout", "30") == 0
    fleet = find_fleet(ServerManager(), "pair")
    assert fleet is not None and fleet.url is not None and fleet.api_key
    ledger = ReplyLedger()
    model = "internlm/internlm2-chat-1_8b"
    with fleet.poller(supervise=False) as poller:
        observe(ledger, poller.poll())
        for i in range(4):
            ledger.started(i)
            assert _chat(fleet.url, fleet.api_key, model).strip()
            ledger.ended(i)
            observe(ledger, poller.poll())
    served = [e.describe() for e in ledger.entries()]
    assert all(e.certainty == "one" for e in ledger.entries()), served
    # the stand-in nodes count the requests they served: the attribution adds up to the same per node
    for node in fleet.nodes:
        completed = httpx.get(f"{node.url}/standin/stats", timeout=5).json()["completed"]
        assert served.count(node.name.split(".", 1)[1]) == completed, (served, node.name, completed)
    assert _cli("stop", "pair") == 0
