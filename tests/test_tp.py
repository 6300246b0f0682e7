"""Tensor parallelism: the mp executor picked for tp > 1 on the PyTorch backend, NVLink multicast off, preflight
against the GPUs visible, per-rank start-up progress, a hung start-up stopped with no survivors, and our memory
on every GPU of a tp = 2 server (a fake NVML reader with two GPUs, the stand-in with two rank processes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fakegpu import FakeGpuReader
from rich.console import Console
from standin.harness import STANDIN_COMMAND, free_port, proc_file, session_pids, wait_for

from tuichat.cli import server as servercli
from tuichat.errors import ConfigError
from tuichat.server.gpu import GpuInfo, GpuProcess, memory_split, visible_gpu_count
from tuichat.server.launcher import LaunchError, ServerManager, ServerStatus, parse_rank
from tuichat.server.profiles import Profile, parse_profile, profile_to_table, server_args, server_env
from tuichat.ui.widgets.status_pane import gpu_renderable

GIB = 1 << 30
EXECUTOR_FLAG = "--distributed-executor-backend"


def two_gpus(processes: tuple[tuple[GpuProcess, ...], tuple[GpuProcess, ...]] = ((), ())) -> list[GpuInfo]:
    return [
        GpuInfo(i, "NVIDIA H200", f"GPU-{i}", mem_used=GIB, mem_total=140 * GIB, processes=processes[i])
        for i in range(2)
    ]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.delenv("TM_COMM_NVLS_ENABLE", raising=False)
    monkeypatch.delenv("LMDEPLOY_EXECUTOR_BACKEND", raising=False)
    return tmp_path


@pytest.fixture
def gpu() -> FakeGpuReader:
    return FakeGpuReader(two_gpus())


@pytest.fixture
def manager(home: Path, gpu: FakeGpuReader) -> Iterator[ServerManager]:
    mgr = ServerManager(gpu_reader=gpu)
    yield mgr
    for server in mgr.running():
        mgr.stop(server, timeout=0.5)
    mgr.close()


def tp2(*fake: str, **changes: object) -> Profile:
    base = Profile(
        model="internlm/internlm2-chat-1_8b",
        backend="pytorch",
        tp=2,
        command=tuple(STANDIN_COMMAND),
        port=free_port(),
        extra_args=("--fake-load-seconds", "0.4", *fake),
        stop_timeout=2.0,
        log_level="DEBUG",  # lmdeploy logs each rank's steps at DEBUG only
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- argv and environment


def _executor(argv: list[str]) -> str | None:
    return argv[argv.index(EXECUTOR_FLAG) + 1] if EXECUTOR_FLAG in argv else None


def test_tp2_on_pytorch_starts_with_the_mp_executor() -> None:
    argv = server_args(Profile(model="m", backend="pytorch", tp=2), port=1)
    assert argv[argv.index("--tp") + 1] == "2"
    assert _executor(argv) == "mp"


def test_a_named_executor_wins_and_is_not_passed_twice() -> None:
    assert (
        _executor(server_args(Profile(model="m", backend="pytorch", tp=2, distributed_executor_backend="ray"), port=1))
        == "ray"
    )
    own = Profile(model="m", backend="pytorch", tp=2, extra_args=(EXECUTOR_FLAG, "ray"))
    assert server_args(own, port=1).count(EXECUTOR_FLAG) == 1


@pytest.mark.parametrize(
    "profile",
    [
        Profile(model="m", backend="turbomind", tp=2),
        Profile(model="m", backend="turbomind", tp=2, distributed_executor_backend="mp"),
        Profile(model="m", backend="pytorch", tp=1),
        Profile(model="m", backend="pytorch"),
    ],
)
def test_no_executor_flag_for_turbomind_or_one_gpu(profile: Profile) -> None:
    assert EXECUTOR_FLAG not in server_args(profile, port=1)


def test_launch_env_turns_nvlink_multicast_off_unless_the_user_set_it() -> None:
    env = server_env(Profile(model="m", backend="pytorch", tp=2), {})
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TM_COMM_NVLS_ENABLE"] == "0"
    assert "NCCL_NVLS_ENABLE" not in server_env(Profile(model="m"), {"NCCL_NVLS_ENABLE": "1"})
    # backend left to lmdeploy (TurboMind, which may fall back to PyTorch): the executor goes by variable
    assert server_env(Profile(model="m", tp=2), {})["LMDEPLOY_EXECUTOR_BACKEND"] == "mp"
    assert "LMDEPLOY_EXECUTOR_BACKEND" not in server_env(Profile(model="m", backend="turbomind", tp=2), {})


def test_the_profile_key_is_validated_and_round_trips() -> None:
    p = parse_profile("x", {"model": "m", "tp": 2, "distributed_executor_backend": "MP", "start_timeout": 600}, "c")
    assert p.distributed_executor_backend == "mp" and p.start_timeout == 600.0
    assert parse_profile("x", profile_to_table(p), "c") == p
    with pytest.raises(ConfigError) as err:
        parse_profile("x", {"model": "m", "distributed_executor_backend": "threads"}, "c")
    assert err.value.key == "profiles.x.distributed_executor_backend"
    assert "'mp'" in err.value.message and "'ray'" in err.value.message


# ---------------------------------------------------------------- preflight


def test_preflight_refuses_more_ranks_than_visible_gpus(manager: ServerManager, gpu: FakeGpuReader) -> None:
    gpu.set(two_gpus()[:1])
    with pytest.raises(LaunchError) as err:
        manager.start("tp4", tp2(tp=4))
    assert "tp = 4" in str(err.value) and "only 1 GPU is visible" in str(err.value)
    assert manager.running() == []


def test_cuda_visible_devices_narrows_what_nvml_lists(manager: ServerManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    errors = [c.message for c in manager.preflight(tp2()) if c.level == "error"]
    assert any("CUDA_VISIBLE_DEVICES=1" in m and "tp = 2" in m for m in errors), errors
    assert visible_gpu_count(FakeGpuReader(two_gpus()), {"CUDA_VISIBLE_DEVICES": "0,1"}) == (
        2,
        "CUDA_VISIBLE_DEVICES=0,1",
    )
    assert visible_gpu_count(FakeGpuReader(two_gpus()), {"CUDA_VISIBLE_DEVICES": ""})[0] == 0


def test_preflight_with_enough_gpus_has_no_tp_error(manager: ServerManager) -> None:
    assert not [c for c in manager.preflight(tp2()) if c.level == "error"]


def test_ray_without_ray_is_refused_with_the_mp_advice(manager: ServerManager) -> None:
    profile = Profile(model="m", backend="pytorch", tp=2, distributed_executor_backend="ray")  # tuichat's Python
    errors = [c.message for c in manager.preflight(profile) if c.level == "error"]
    assert any("ray is not installed" in m and 'distributed_executor_backend = "mp"' in m for m in errors), errors


def test_uni_with_tp2_is_refused(manager: ServerManager) -> None:
    errors = [c.message for c in manager.preflight(tp2(distributed_executor_backend="uni")) if c.level == "error"]
    assert any('"uni" executor runs on one GPU only' in m for m in errors), errors


def test_without_mp_the_launch_fails_with_the_ray_hint(manager: ServerManager) -> None:
    # the profile's own command: tuichat cannot look for ray there, so lmdeploy's own failure must explain it
    server = manager.start("ray", tp2(distributed_executor_backend="ray"))
    status = server.wait_ready(timeout=20)
    assert status.state == "failed"
    assert status.message is not None and 'distributed_executor_backend = "mp"' in status.message
    assert not session_pids(server.pgid)


# ---------------------------------------------------------------- launch, status, stop


def test_tp2_launch_shows_each_rank_our_memory_on_both_gpus_and_stops_clean(
    manager: ServerManager, gpu: FakeGpuReader, capsys: pytest.CaptureFixture[str]
) -> None:
    server = manager.start("tp2", tp2())
    seen: list[ServerStatus] = []
    status = server.wait_ready(timeout=20, on_status=seen.append)
    assert status.state == "ready", (status.message, status.last_lines)
    env = proc_file(server.pid, "environ").split(b"\0")
    assert b"NCCL_NVLS_ENABLE=0" in env and b"TM_COMM_NVLS_ENABLE=0" in env
    assert {r for s in seen for r, _ in s.ranks} == {0, 1}
    # each rank's step is shown as it goes (which steps a 0.2 s poll catches depends on the machine's speed)
    steps = {part for s in seen for part in s.ranks_text().split(" · ")}
    assert any(part.startswith("rank 1: ") for part in steps), steps

    stats = httpx.get(f"{server.url}/standin/stats", timeout=5).json()
    rank0, rank1 = stats["engine_pid"], stats["worker_pids"][0]
    assert {server.pid, rank0, rank1} <= server.pids()
    stranger = os.getppid()  # some process that is not ours, on GPU0 too
    gpu.set(
        two_gpus(
            (
                (GpuProcess(rank0, 30 * GIB), GpuProcess(stranger, 5 * GIB)),
                (GpuProcess(rank1, 29 * GIB),),
            )
        )
    )
    snap = gpu.read()
    split = {s.index: s for s in memory_split(snap, server.pids())}
    assert split[0].ours_bytes == 30 * GIB and split[1].ours_bytes == 29 * GIB
    assert server.gpu_memory_by_gpu() == [(0, 30 * GIB), (1, 29 * GIB)]
    console = Console(width=80, record=True)
    console.print(gpu_renderable(snap, server.pids()))
    text = console.export_text()
    assert "GPU0" in text and "GPU1" in text
    assert "ours 32.2 GB" in text and "ours 31.1 GB" in text  # 30 GiB and 29 GiB in decimal units

    servercli._ps_servers([server], snap)
    assert "GPU0 32.2 GB, GPU1 31.1 GB" in capsys.readouterr().out

    result = manager.stop(server)
    assert result.clean, result.describe()
    assert not session_pids(server.pgid)
    assert manager.running() == []


def test_a_hanging_mp_start_ends_with_a_message_and_no_survivors(manager: ServerManager) -> None:
    server = manager.start("hang", tp2("--fake-mp-hang", start_timeout=1.5, stop_timeout=0.4))
    wait_for(lambda: len(session_pids(server.pgid)) >= 3, message="the server and both ranks")
    status = server.wait_ready(timeout=30)
    assert status.state == "failed"
    assert status.message is not None
    assert "not ready after 1.5 s" in status.message and "start_timeout" in status.message
    assert "No word from rank 1" in status.message and "mp executor can hang" in status.message
    assert not session_pids(server.pgid)  # the ranks ignored SIGINT and SIGTERM: SIGKILL got them
    assert manager.running() == []


def test_rank_lines_of_the_real_mp_executor_are_read() -> None:
    assert parse_rank(
        "2026-01-01 10:00:00,001 - lmdeploy - DEBUG - mp_executor.py:621 - proc[1] call method: <warmup>."
    ) == (1, "warmup")
    assert parse_rank("2026-01-01 - lmdeploy - ERROR - mp_executor.py:585 - Proc[0] failed") == (0, "failed")
    assert parse_rank("Loading weights from safetensors: 50%") is None
