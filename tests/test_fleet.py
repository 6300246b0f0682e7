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
from standin.harness import STANDIN_COMMAND, free_port, proc_file, run_standin, session_pids, wait_for

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
    gpu = FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=10 * GIB, mem_total=140 * GIB)])
    monkeypatch.setattr(launcher, "make_gpu_reader", lambda: gpu)
    config = {
        "profiles": {"n1": _node(), "n2": _node(), "broken": _node("--fake-crash-while-loading")},
        "fleets": {
            "pair": {
                "nodes": ["n1", "n2"],
                "proxy_port": free_port(),
                "proxy_command": PROXY_COMMAND,
                "health_check_interval": 1,
            },
            "bad": {"nodes": ["n1", "broken"], "proxy_port": free_port(), "proxy_command": PROXY_COMMAND},
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
    from tuichat.ui.widgets.chat import PromptArea
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
