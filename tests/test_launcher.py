"""The server launcher, mostly against the stand-in lmdeploy run as a real subprocess group: progress while
loading, readiness, failures with their hints, preflight, stopping stubborn groups with no survivors,
re-attaching after a restart of tuichat (and after SIGHUP), stale records, and keeping the API key private."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import FakeHubCache
from fakegpu import FakeGpuReader
from standin.harness import FAKE_PATH, STANDIN_COMMAND, free_port, proc_file, session_pids, wait_for

from tuichat.server.gpu import GpuInfo, GpuProcess
from tuichat.server.launch import Checked, LaunchEvent, Started, StatusChanged, launch
from tuichat.server.launcher import (
    Check,
    LaunchError,
    ManagedServer,
    PreflightFailed,
    Progress,
    ServerManager,
    ServerStatus,
    diagnose,
    parse_progress,
    read_log_tail,
)
from tuichat.server.procgroup import group_pids, pid_alive
from tuichat.server.profiles import BUILTIN_PROFILES, Profile

GIB = 1 << 30


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def gpu() -> FakeGpuReader:
    return FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=2 * GIB, mem_total=140 * GIB)])


@pytest.fixture
def manager(home: Path, gpu: FakeGpuReader) -> Iterator[ServerManager]:
    mgr = ServerManager(gpu_reader=gpu)
    yield mgr
    # never leave a stand-in group behind, whatever a test did
    for server in mgr.running():
        mgr.stop(server, timeout=1.0)
    mgr.close()


def standin(*fake: str, **changes: object) -> Profile:
    base = Profile(
        model="internlm/internlm2-chat-1_8b",
        backend="pytorch",  # the stand-in then shows PyTorch's progress bars
        command=tuple(STANDIN_COMMAND),
        port=free_port(),
        extra_args=tuple(fake),
        stop_timeout=5.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _ready(server: ManagedServer) -> None:
    status = server.wait_ready(timeout=20)
    assert status.state == "ready", (status.message, status.last_lines)


# ---------------------------------------------------------------- pure parts


def test_tqdm_segments_become_progress() -> None:
    p = parse_progress("Loading weights from safetensors:  45%|████▌     | 9/20 [00:01<00:02,  4.50it/s]")
    assert p == Progress("Loading weights from safetensors", 9 / 20, p.text if p else "")
    warm = parse_progress("Warming up decoding: 100%|██████████| 4/4 [00:00<00:00, 12.1it/s]")
    assert warm is not None and warm.label == "Warming up decoding" and warm.fraction == 1.0
    unknown_total = parse_progress("Loading: 12it [00:03,  3.90it/s]")
    assert unknown_total is not None and unknown_total.label == "Loading" and unknown_total.fraction is None
    assert parse_progress("INFO: Uvicorn running on http://127.0.0.1:23333") is None


def test_log_tail_collapses_carriage_returns_and_masks_key(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(
        b"start\n"
        b"\rLoading:  10%|#  | 1/10\rLoading:  50%|##  | 5/10\rLoading: 100%|###| 10/10\n"
        b"argv --api-keys s3cret-KEY\n"
        b"\x1b[31mred\x1b[0m s3cret-KEY again\n"
    )
    tail = read_log_tail(log, 10, "s3cret-KEY")
    assert tail[0] == "start"
    assert tail[1] == "Loading: 100%|###| 10/10"
    assert all("s3cret-KEY" not in line for line in tail)
    assert tail[3] == "red ******** again"
    assert read_log_tail(log, 2, None)[0] == "argv --api-keys ********"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "cache_max_entry_count"),
        ("ERROR: [Errno 98] error while attempting to bind on address: address already in use", "port"),
        ("lmdeploy: error: unrecognized arguments: --enable-metrics", "--enable-metrics"),
        ("huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error", "model was not found"),
        ("ValueError: Unsupported architecture: FooForCausalLM", 'backend = "pytorch"'),
    ],
)
def test_usual_failures_get_a_hint(line: str, words: str) -> None:
    hint = diagnose(["some output", line], exit_code=1, port=23333)
    assert hint is not None and words in hint


# ---------------------------------------------------------------- preflight


def test_busy_port_is_an_error_before_anything_loads(manager: ServerManager, home: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        profile = standin(port=port)
        checks = manager.preflight(profile)
        assert [c.level for c in checks] == ["error"]
        assert f"Port {port}" in checks[0].message
        with pytest.raises(LaunchError, match=f"Port {port}"):
            manager.start("busy", profile)
    assert manager.running() == []
    assert not (home / "state" / "logs" / "busy.log").exists()


def test_preflight_finds_missing_model_command_and_lmdeploy(manager: ServerManager, tmp_path: Path) -> None:
    missing = manager.preflight(standin(model=str(tmp_path / "nope")))
    assert any(c.level == "error" and "does not exist" in c.message for c in missing)
    no_cmd = manager.preflight(standin(command=(str(tmp_path / "no-lmdeploy"),)))
    assert any(c.level == "error" and 'pip install "tuichat[lmdeploy]"' in c.message for c in no_cmd)
    default_cmd = manager.preflight(Profile(model="internlm/internlm2-chat-1_8b", port=free_port()))
    assert any('pip install "tuichat[lmdeploy]"' in c.message for c in default_cmd)  # not in the test venv


def test_w4_builtin_asks_for_the_quantize_that_makes_its_model(
    manager: ServerManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    w4 = replace(BUILTIN_PROFILES["internlm2-w4"], port=free_port())
    errors = [c.message for c in manager.preflight(w4) if c.level == "error"]
    assert any("tuichat quantize internlm/internlm2-chat-1_8b --out ~/models/" in m for m in errors), errors
    with pytest.raises(LaunchError, match="tuichat quantize"):
        manager.start("w4", w4)
    made = tmp_path / "models" / "internlm2-chat-1_8b-w4a16"
    made.mkdir(parents=True)
    (made / "config.json").write_text("{}")
    assert not any("quantize" in c.message for c in manager.preflight(w4))


def test_no_gpu_and_public_address_are_warnings_only(home: Path) -> None:
    mgr = ServerManager(gpu_reader=FakeGpuReader(error="no NVIDIA GPU visible: driver not loaded"))
    checks = mgr.preflight(standin(server_name="0.0.0.0"))
    assert [c.level for c in checks] == ["warning", "warning"]
    assert any("driver not loaded" in c.message for c in checks)
    assert any("0.0.0.0" in c.message for c in checks)


# ---------------------------------------------------------------- launch and stop


def test_slow_start_shows_progress_then_ready(manager: ServerManager, home: Path) -> None:
    server = manager.start("slow", standin("--fake-load-seconds", "2"))
    seen: list[ServerStatus] = []
    status = server.wait_ready(timeout=20, on_status=seen.append, interval=0.05)
    assert status.state == "ready"
    fractions = [s.progress.fraction for s in seen if s.state == "starting" and s.progress is not None]
    labels = {s.progress.label for s in seen if s.progress is not None}
    assert any("Loading weights" in label for label in labels)
    assert any(f is not None and 0 < f < 1 for f in fractions)
    # the key lives in a 0600 file only, and the record names the file, not the key
    key = server.api_key
    assert key and len(key) >= 32
    assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600
    assert key not in manager.record_path("slow").read_text()
    assert all(key not in line for line in server.log_tail())
    assert key not in repr(server)


def _group_processes_showing(server: ManagedServer, key: str) -> dict[str, list[int]]:
    members = session_pids(server.pgid)
    assert {server.pid} < members, "the server and its engine child"
    return {name: [pid for pid in members if key.encode() in proc_file(pid, name)] for name in ("cmdline", "environ")}


def _auth_works(server: ManagedServer, key: str) -> None:
    with httpx.Client(trust_env=False, timeout=5) as http:
        assert http.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert http.get(f"{server.url}/v1/models").status_code == 401
        assert http.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


# ids: the test's name is in the environment (PYTEST_CURRENT_TEST), so it must not hold the key
@pytest.mark.parametrize("fixed_key", [None, "my-own-profile-key-1234"], ids=["generated", "from-profile"])
def test_no_process_of_the_group_shows_the_key(manager: ServerManager, fixed_key: str | None) -> None:
    server = manager.start("private", standin(api_key=fixed_key))
    _ready(server)
    key = server.api_key
    assert key and (fixed_key is None or key == fixed_key)
    # every local user can read /proc/PID/cmdline; environ is the owner's only, but shows the start-up
    # environment for the process's whole life, so the key must not pass through it either
    assert _group_processes_showing(server, key) == {"cmdline": [], "environ": []}
    _auth_works(server, key)
    assert key not in manager.record_path("private").read_text()
    assert key not in server.log_path.read_text()


def test_a_command_that_cannot_hide_the_key_warns_and_still_launches(manager: ServerManager, tmp_path: Path) -> None:
    wrapper = tmp_path / "lmdeploy-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_PATH}" "$@"\n')
    wrapper.chmod(0o755)
    profile = standin(command=(str(wrapper),))
    warnings = [c.message for c in manager.preflight(profile) if c.level == "warning"]
    assert any("`ps`" in m and "command" in m for m in warnings), warnings
    server = manager.start("shell", profile)
    _ready(server)
    key = server.api_key
    assert key
    assert _group_processes_showing(server, key)["cmdline"]  # as the warning said
    _auth_works(server, key)
    assert key not in manager.record_path("shell").read_text()
    assert all(key not in line for line in server.log_tail())


def test_crash_while_loading_reports_exit_code_tail_and_oom_hint(manager: ServerManager) -> None:
    server = manager.start("oom", standin("--fake-crash-while-loading"))
    status = server.wait_ready(timeout=20)
    assert status.state == "failed"
    assert status.exit_code == 1
    assert status.message is not None and "code 1" in status.message
    assert status.hint is not None and "cache_max_entry_count" in status.hint
    assert any("out of memory" in line.lower() for line in status.last_lines)
    assert manager.running() == []
    wait_for(lambda: not group_pids(server.pgid))  # nothing of the group is left holding memory


def test_bad_flag_gets_a_hint(manager: ServerManager) -> None:
    status = manager.start("flag", standin("--fake-reject-flag")).wait_ready(timeout=20)
    assert status.state == "failed" and status.exit_code == 2
    assert status.hint is not None and "extra_args" in status.hint


def test_stubborn_group_is_killed_with_its_engine_and_nothing_survives(
    manager: ServerManager, gpu: FakeGpuReader
) -> None:
    server = manager.start("stubborn", standin("--fake-ignore-signals", stop_timeout=1.0))
    _ready(server)
    members = server.pids()
    engine = members - {server.pid}
    assert engine, "the stand-in runs an engine child in the server's group"
    # the engine holds the GPU memory, as with the PyTorch backend
    holder = next(iter(engine))
    gpu.set([GpuInfo(0, "Fake H200", "GPU-0", 40 * GIB, 140 * GIB, processes=(GpuProcess(holder, 30 * GIB),))])
    assert server.gpu_pids() == {holder}
    assert server.gpu_memory() == 30 * GIB

    result = manager.stop(server)
    assert result.signal_used == "SIGKILL"
    assert result.clean and not result.survivors and not result.gpu_holders
    assert not any(pid_alive(p) for p in members)
    assert server.poll().state == "stopped"
    assert manager.running() == []
    assert not server.key_file.exists()


def test_orphaned_engine_goes_too_when_server_was_killed_alone(manager: ServerManager) -> None:
    server = manager.start("orphan", standin())
    _ready(server)
    engine = server.pids() - {server.pid}
    assert engine
    os.kill(server.pid, signal.SIGKILL)  # like an OOM kill of the server process only
    wait_for(lambda: server.poll().state != "ready")
    status = server.poll()
    assert status.state == "failed" and status.hint is not None and "SIGKILL" in status.hint
    wait_for(lambda: not any(pid_alive(p) for p in engine))


def test_clean_stop_uses_sigint_and_leaves_no_process(manager: ServerManager) -> None:
    server = manager.start("gentle", standin())
    _ready(server)
    members = server.pids()
    result = manager.stop(server)
    assert result.signal_used == "SIGINT" and result.clean
    assert not any(pid_alive(p) for p in members)


def test_name_already_running_is_refused(manager: ServerManager) -> None:
    profile = standin()
    manager.start("twice", profile)
    with pytest.raises(LaunchError, match="already running"):
        manager.start("twice", standin())


# ---------------------------------------------------------------- records and re-attach


def test_new_manager_reattaches_to_running_server(manager: ServerManager, gpu: FakeGpuReader) -> None:
    first = manager.start("keep", standin())
    _ready(first)

    later = ServerManager(gpu_reader=gpu)  # a new tuichat process
    found = later.find("keep")
    assert isinstance(found, ManagedServer)
    assert (found.pid, found.url, found.api_key) == (first.pid, first.url, first.api_key)
    assert found.poll().state == "ready"
    assert later.stop(found).clean
    assert first.poll().state in ("stopped", "failed") and manager.running() == []


def test_stale_record_of_dead_server_is_dropped(manager: ServerManager) -> None:
    server = manager.start("stale", standin())
    _ready(server)
    record = manager.record_path("stale")
    text = record.read_text()
    manager.stop(server)
    record.write_text(text)  # as if tuichat had crashed before cleaning up
    assert ServerManager().running() == []
    assert not record.exists()


def test_server_survives_sighup_of_the_tuichat_that_started_it(home: Path, tmp_path: Path) -> None:
    profile = standin()
    script = textwrap.dedent(
        f"""
        import sys, time
        from tuichat.server.launcher import ServerManager
        from tuichat.server.profiles import Profile
        p = Profile(model="a/b", command={tuple(STANDIN_COMMAND)!r}, port={profile.port})
        s = ServerManager().start("hup", p)
        print(s.wait_ready(timeout=20).state, flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # tuichat in its own session stands for the SSH login session that is about to drop
    tui = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert tui.stdout is not None and tui.stdout.readline().strip() == "ready"
        os.killpg(tui.pid, signal.SIGHUP)
        assert tui.wait(timeout=10) == -signal.SIGHUP
    finally:
        if tui.poll() is None:
            tui.kill()
            tui.wait()
    mgr = ServerManager()
    server = mgr.find("hup")
    assert server is not None and server.poll().state == "ready"
    assert mgr.stop(server, timeout=1.0).clean


def test_tensor_parallel_without_ray_gets_a_hint() -> None:
    # The last lines lmdeploy 0.18 printed on two H200s with tp = 2 and no ray installed.
    lines = [
        "2026-11-30 11:26:02,300 - lmdeploy - ERROR - base.py:55 - <Dist> check failed!",
        "Multi-nodes support requires `ray`.",
        "lmdeploy.pytorch.engine.mp_engine.zmq_rpc.RPCServerDeadError: PyTorch ZMQ engine process is not alive.",
    ]
    hint = diagnose(lines, exit_code=1)
    assert hint is not None
    assert "pip install ray" in hint and "--distributed-executor-backend" in hint


def test_another_server_on_the_port_is_not_taken_for_ours(manager: ServerManager) -> None:
    """Two launches racing for one port: the loser must not report the winner's /health as its own."""
    from standin.harness import run_standin

    with run_standin(api_key="someone-elses-key") as other:
        ours = manager.start("racer", standin("--fake-load-seconds", "2"))
        ours.record = replace(ours.record, port=other.port)  # as if both had picked the same port
        assert ours.poll().state == "starting"  # /health answers 200, but /v1/models refuses our key
        manager.stop(ours, timeout=1.0)


# ---------------------------------------------------------------- hub ids not on disk, and the one launch flow


def test_hub_id_in_the_cache_needs_no_download(manager: ServerManager, hub_cache: FakeHubCache) -> None:
    hub_cache.add("owner/cached-model")
    assert manager.preflight(standin(model="owner/cached-model")) == []


def test_hub_id_not_in_the_cache_offers_tuichat_pull_first(
    manager: ServerManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a hub that answers: nothing blocks the download but the fact that lmdeploy would do it silently
    with socket.socket() as hub:
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        checks = manager.preflight(standin(model="owner/not-pulled"))
        with pytest.raises(PreflightFailed, match="tuichat pull owner/not-pulled") as raised:
            manager.start("not-pulled", standin(model="owner/not-pulled"))
    assert [(c.level, c.fix) for c in checks] == [("error", "tuichat pull owner/not-pulled")]
    assert "not in the Hugging Face cache" in checks[0].message and "silently" in checks[0].message
    assert raised.value.checks == tuple(checks)
    assert manager.running() == []


def test_hub_id_not_in_the_cache_on_an_offline_box_says_it_is_offline(
    manager: ServerManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (offline,) = manager.preflight(standin(model="owner/not-pulled"))
    assert offline.level == "error" and offline.fix is None
    assert "offline: HF_HUB_OFFLINE is set" in offline.message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    port = free_port()  # nothing listens there: refused at once, like a box with no route to the hub
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    (unreachable,) = manager.preflight(standin(model="owner/not-pulled"))
    assert f"offline: 127.0.0.1:{port} cannot be reached" in unreachable.message and unreachable.fix is None


def test_modelscope_cache_is_checked_when_lmdeploy_uses_modelscope(
    manager: ServerManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMDEPLOY_USE_MODELSCOPE", "True")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    (missing,) = manager.preflight(standin(model="Shanghai_AI_Laboratory/internlm2-chat-1.8b"))
    assert missing.fix == "tuichat pull Shanghai_AI_Laboratory/internlm2-chat-1.8b --source modelscope"
    folder = tmp_path / "ms" / "Shanghai_AI_Laboratory" / "internlm2-chat-1___8b"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert manager.preflight(standin(model="Shanghai_AI_Laboratory/internlm2-chat-1.8b")) == []


def test_launch_runs_the_preflight_once_and_reports_each_step(
    manager: ServerManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Profile] = []
    original = ServerManager.preflight

    def counted(self: ServerManager, profile: Profile, port: int | None = None) -> list[Check]:
        calls.append(profile)
        return original(self, profile, port)

    monkeypatch.setattr(ServerManager, "preflight", counted)
    events: list[LaunchEvent] = []
    profile = standin("--fake-load-seconds", "0.3", server_name="0.0.0.0")
    launched = launch(manager, "flow", profile, events.append, timeout=20)
    assert launched.status is not None and launched.status.state == "ready"
    assert len(calls) == 1
    checked, started, *changes = events
    assert isinstance(checked, Checked) and [c.level for c in checked.checks] == ["warning"]  # 0.0.0.0
    assert isinstance(started, Started) and started.server is launched.server
    assert all(isinstance(e, StatusChanged) for e in changes)
    last = changes[-1]
    assert isinstance(last, StatusChanged) and last.status.state == "ready"
