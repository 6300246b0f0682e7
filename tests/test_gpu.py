"""GPU readings: the fake reader, memory attribution, the sampler, and NvmlReader against a fake `pynvml`
module (success path, per-field failures, start-up retries) and against this machine's real NVML."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from fakegpu import FakeGpuReader

from tuichat.server.gpu import (
    INIT_RETRY_S,
    GpuInfo,
    GpuMemorySplit,
    GpuProcess,
    GpuSampler,
    GpuSnapshot,
    NvmlReader,
    describe_no_gpu,
    format_bytes,
    gpus_visible,
    memory_split,
    pids_on_gpu,
)

GB = 1000**3


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def h200(index: int, used: int | None = None, processes: tuple[GpuProcess, ...] = ()) -> GpuInfo:
    return GpuInfo(
        index=index,
        name="NVIDIA H200",
        uuid=f"GPU-{index}",
        util_percent=50,
        mem_used=used,
        mem_total=150_754_820_096,
        temperature_c=40,
        power_w=120.5,
        power_limit_w=700.0,
        processes=processes,
    )


# --- a fake pynvml -------------------------------------------------------------------------------------

NOT_SUPPORTED = 3
DRIVER_NOT_LOADED = 9
LIBRARY_NOT_FOUND = 12


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NOT_SUPPORTED: "Not Supported", DRIVER_NOT_LOADED: "Driver Not Loaded"}.get(
            self.value, f"code {self.value}"
        )


def fake_pynvml(
    devices: list[dict[str, Any]],
    failing: set[str] | None = None,
    init_error: int | None = None,
) -> ModuleType:
    """A module shaped like `pynvml`: each device dict has name, uuid, util, used, total, temp, mw, limit_mw,
    compute and graphics (lists of (pid, bytes)). Names in `failing` raise NOT_SUPPORTED."""
    mod = ModuleType("pynvml")
    calls: dict[str, int] = {}
    state = {"init_error": init_error, "failing": failing or set()}
    mod.calls = calls  # type: ignore[attr-defined]
    mod.state = state  # type: ignore[attr-defined]
    mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    mod.NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED  # type: ignore[attr-defined]
    mod.NVML_ERROR_DRIVER_NOT_LOADED = DRIVER_NOT_LOADED  # type: ignore[attr-defined]
    mod.NVML_ERROR_LIBRARY_NOT_FOUND = LIBRARY_NOT_FOUND  # type: ignore[attr-defined]
    mod.NVML_ERROR_NO_PERMISSION = 4  # type: ignore[attr-defined]
    mod.NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18  # type: ignore[attr-defined]
    mod.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]

    def api(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                calls[name] = calls.get(name, 0) + 1
                if name in state["failing"]:  # type: ignore[operator]
                    raise FakeNVMLError(NOT_SUPPORTED)
                return fn(*args)

            setattr(mod, name, call)
            return call

        return wrap

    @api("nvmlInit")
    def _init() -> None:
        if state["init_error"] is not None:
            raise FakeNVMLError(state["init_error"])  # type: ignore[arg-type]

    api("nvmlShutdown")(lambda: None)
    api("nvmlDeviceGetCount")(lambda: len(devices))
    api("nvmlDeviceGetHandleByIndex")(lambda i: devices[i])
    api("nvmlDeviceGetName")(lambda d: d["name"])
    api("nvmlDeviceGetUUID")(lambda d: d["uuid"])
    api("nvmlDeviceGetUtilizationRates")(lambda d: SimpleNamespace(gpu=d["util"], memory=3))
    api("nvmlDeviceGetMemoryInfo")(lambda d: SimpleNamespace(used=d["used"], total=d["total"], free=0))
    api("nvmlDeviceGetTemperature")(lambda d, sensor: d["temp"])
    api("nvmlDeviceGetPowerUsage")(lambda d: d["mw"])
    api("nvmlDeviceGetEnforcedPowerLimit")(lambda d: d["limit_mw"])
    api("nvmlDeviceGetComputeRunningProcesses")(
        lambda d: [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in d["compute"]]
    )
    api("nvmlDeviceGetGraphicsRunningProcesses")(
        lambda d: [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in d["graphics"]]
    )
    # Slow queries a UI loop must never make (~20 ms each on real hardware).
    api("nvmlDeviceGetPcieThroughput")(lambda d, counter: 0)
    api("nvmlDeviceGetNvLinkUtilizationCounter")(lambda d, link, counter: 0)
    return mod


def device(index: int, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": b"NVIDIA H200",  # older nvidia-ml-py versions return bytes
        "uuid": f"GPU-aaaa-{index}",
        "util": 87,
        "used": 31 * GB,
        "total": 150 * GB,
        "temp": 45,
        "mw": 250_500,
        "limit_mw": 700_000,
        "compute": [(4242, 30 * GB)],
        "graphics": [],
    }
    base.update(overrides)
    return base


@pytest.fixture
def install_pynvml(monkeypatch: pytest.MonkeyPatch) -> Callable[[ModuleType], ModuleType]:
    def install(mod: ModuleType) -> ModuleType:
        monkeypatch.setitem(sys.modules, "pynvml", mod)
        return mod

    return install


# --- FakeGpuReader -------------------------------------------------------------------------------------


def test_fake_reader_returns_what_it_was_given_and_can_change() -> None:
    clock = Clock(5.0)
    reader = FakeGpuReader([h200(0, used=10 * GB)], clock=clock)
    first = reader.read()
    assert first == GpuSnapshot(5.0, (h200(0, used=10 * GB),), None)

    reader.set([h200(0, used=20 * GB), h200(1, used=1 * GB)])
    clock.now = 6.0
    second = reader.read()
    assert [g.mem_used for g in second.gpus] == [20 * GB, 1 * GB]
    assert second.taken_at == 6.0 and second.error is None

    reader.set(error="no NVIDIA GPU visible: driver not loaded")
    assert reader.read().gpus == ()
    assert reader.read().error == "no NVIDIA GPU visible: driver not loaded"
    reader.close()
    assert reader.closed


def test_fake_reader_fails_once_when_told() -> None:
    reader = FakeGpuReader([h200(0)])
    reader.fail_next("no NVIDIA GPU visible: GPU is lost")
    failed = reader.read()
    assert failed.error == "no NVIDIA GPU visible: GPU is lost" and failed.gpus == ()
    assert reader.read().gpus == (h200(0),)

    reader.fail_next(RuntimeError("NVML crashed"))
    with pytest.raises(RuntimeError):
        reader.read()
    assert reader.read().error is None


def test_fake_reader_built_with_an_error_shows_no_gpus() -> None:
    snapshot = FakeGpuReader(error="no NVIDIA GPU visible: NVML found no device").read()
    assert snapshot.gpus == ()
    assert describe_no_gpu(snapshot).startswith("No NVIDIA GPU visible: NVML found no device.")


# --- memory attribution --------------------------------------------------------------------------------


def test_memory_split_across_tensor_parallel_gpus() -> None:
    ours = {1000, 1001, 1002}  # server, engine, a worker
    snapshot = GpuSnapshot(
        1.0,
        (
            # GPU 0: our engine 30 GB, someone's notebook 5 GB, 1 GB the driver keeps unattributed
            h200(0, used=36 * GB, processes=(GpuProcess(1001, 30 * GB), GpuProcess(77, 5 * GB))),
            # GPU 1: our TP worker only
            h200(1, used=30 * GB, processes=(GpuProcess(1002, 30 * GB),)),
            # GPU 2: not ours at all
            h200(2, used=12 * GB, processes=(GpuProcess(88, 12 * GB),)),
        ),
    )
    split = memory_split(snapshot, ours)
    total = 150_754_820_096
    assert split == [
        GpuMemorySplit(0, 30 * GB, 6 * GB, 36 * GB, total),
        GpuMemorySplit(1, 30 * GB, 0, 30 * GB, total),
        GpuMemorySplit(2, 0, 12 * GB, 12 * GB, total),
    ]
    assert pids_on_gpu(snapshot, ours) == {1001, 1002}
    assert pids_on_gpu(snapshot, {1000}) == set()


def test_memory_split_when_used_total_or_per_process_is_unknown() -> None:
    snapshot = GpuSnapshot(
        1.0,
        (
            GpuInfo(
                0,
                "NVIDIA H200",
                "GPU-0",
                mem_used=None,
                mem_total=None,
                processes=(GpuProcess(1, 4 * GB), GpuProcess(2, 3 * GB), GpuProcess(3, None)),
            ),
        ),
    )
    (split,) = memory_split(snapshot, [1, 3])
    assert (split.ours_bytes, split.others_bytes, split.used_bytes) == (4 * GB, 3 * GB, None)


def test_memory_split_of_an_error_snapshot_is_empty() -> None:
    assert memory_split(GpuSnapshot(1.0, (), "no NVIDIA GPU visible: driver not loaded"), {1}) == []


# --- NvmlReader against a fake pynvml -------------------------------------------------------------------


def test_nvml_reader_reads_every_field_and_caches_handles(install_pynvml: Any) -> None:
    mod = install_pynvml(
        fake_pynvml(
            [
                device(0, compute=[(4242, 30 * GB), (99, None)], graphics=[(4242, 30 * GB), (7, 200_000_000)]),
                device(1, name="NVIDIA H200", util=3, used=2 * GB, compute=[], graphics=[]),
            ]
        )
    )
    clock = Clock(10.0)
    reader = NvmlReader(clock=clock)
    snapshot = reader.read()
    assert snapshot.error is None and snapshot.taken_at == 10.0
    gpu0, gpu1 = snapshot.gpus
    assert gpu0 == GpuInfo(
        index=0,
        name="NVIDIA H200",
        uuid="GPU-aaaa-0",
        util_percent=87,
        mem_used=31 * GB,
        mem_total=150 * GB,
        temperature_c=45,
        power_w=250.5,
        power_limit_w=700.0,
        # pid 4242 has a compute and a graphics context: listed once
        processes=(GpuProcess(7, 200_000_000), GpuProcess(99, None), GpuProcess(4242, 30 * GB)),
    )
    assert (gpu1.index, gpu1.util_percent, gpu1.mem_used, gpu1.processes) == (1, 3, 2 * GB, ())

    clock.now = 12.0
    again = reader.read()
    assert again.taken_at == 12.0 and len(again.gpus) == 2
    assert mod.calls["nvmlInit"] == 1
    assert mod.calls["nvmlDeviceGetHandleByIndex"] == 2
    assert mod.calls["nvmlDeviceGetName"] == 2  # names are read once, not on every reading
    assert "nvmlDeviceGetPcieThroughput" not in mod.calls
    assert "nvmlDeviceGetNvLinkUtilizationCounter" not in mod.calls

    reader.close()
    assert mod.calls["nvmlShutdown"] == 1


def test_nvml_reader_turns_each_failing_reading_into_none(install_pynvml: Any) -> None:
    install_pynvml(
        fake_pynvml(
            [device(0)],
            failing={
                "nvmlDeviceGetPowerUsage",
                "nvmlDeviceGetEnforcedPowerLimit",
                "nvmlDeviceGetTemperature",
                "nvmlDeviceGetGraphicsRunningProcesses",
            },
        )
    )
    (gpu,) = NvmlReader().read().gpus
    assert (gpu.power_w, gpu.power_limit_w, gpu.temperature_c) == (None, None, None)
    # what could still be read is there
    assert (gpu.util_percent, gpu.mem_used, gpu.name) == (87, 31 * GB, "NVIDIA H200")
    assert gpu.processes == (GpuProcess(4242, 30 * GB),) and gpu.processes_known


def test_nvml_reader_marks_processes_unknown_when_nvml_will_not_list_them(install_pynvml: Any) -> None:
    install_pynvml(
        fake_pynvml(
            [device(0)],
            failing={
                "nvmlDeviceGetComputeRunningProcesses",
                "nvmlDeviceGetGraphicsRunningProcesses",
                "nvmlDeviceGetMemoryInfo",
                "nvmlDeviceGetUtilizationRates",
                "nvmlDeviceGetName",
            },
        )
    )
    (gpu,) = NvmlReader().read().gpus
    assert gpu.processes == () and not gpu.processes_known
    assert (gpu.mem_used, gpu.mem_total, gpu.util_percent) == (None, None, None)
    assert gpu.name == "unknown GPU" and gpu.uuid == "GPU-aaaa-0"


def test_nvml_reader_retries_start_up_at_most_every_30_seconds(install_pynvml: Any) -> None:
    mod = install_pynvml(fake_pynvml([device(0)], init_error=DRIVER_NOT_LOADED))
    clock = Clock(0.0)
    reader = NvmlReader(clock=clock)
    first = reader.read()
    assert first.error == "no NVIDIA GPU visible: driver not loaded" and first.gpus == ()

    mod.state["init_error"] = None  # the driver gets loaded
    clock.now = INIT_RETRY_S - 1
    still = reader.read()
    assert still.error == first.error and still.taken_at == INIT_RETRY_S - 1
    assert mod.calls["nvmlInit"] == 1

    clock.now = INIT_RETRY_S + 0.5
    recovered = reader.read()
    assert recovered.error is None and [g.name for g in recovered.gpus] == ["NVIDIA H200"]
    assert mod.calls["nvmlInit"] == 2


def test_nvml_reader_reports_a_machine_with_no_device(install_pynvml: Any) -> None:
    mod = install_pynvml(fake_pynvml([]))
    snapshot = NvmlReader().read()
    assert snapshot == GpuSnapshot(snapshot.taken_at, (), "no NVIDIA GPU visible: NVML found no device")
    assert mod.calls["nvmlShutdown"] == 1  # the failed start does not leave NVML initialised


def test_nvml_reader_without_the_bindings_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    snapshot = NvmlReader().read()
    assert snapshot.error == "no NVIDIA GPU visible: the nvidia-ml-py package is not installed"
    assert describe_no_gpu(snapshot).endswith("Install nvidia-ml-py into tuichat's environment.")


def _nvml_loadable() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_nvml_reader_on_this_machine_does_not_raise() -> None:
    reader = NvmlReader()
    try:
        snapshot = reader.read()
        visible, reason = gpus_visible()
    finally:
        reader.close()
    if not _nvml_loadable():
        # The developers' machines have no NVIDIA driver: the reason must say so plainly.
        assert snapshot.gpus == ()
        assert snapshot.error == "no NVIDIA GPU visible: NVML library not found (libnvidia-ml.so.1)"
        assert (visible, reason) == (False, snapshot.error)
        assert describe_no_gpu(snapshot) == (
            "No NVIDIA GPU visible: NVML library not found (libnvidia-ml.so.1). "
            "Install or load the NVIDIA driver, or run tuichat on the GPU machine."
        )
    elif snapshot.error is None:
        assert visible and reason.startswith(f"{len(snapshot.gpus)} GPU")
        assert all(g.mem_total for g in snapshot.gpus)
    else:
        assert snapshot.error.startswith("no NVIDIA GPU visible: ") and not visible


# --- the sampler ---------------------------------------------------------------------------------------


class ScriptedReader:
    """Returns snapshots stamped with the given times, in the given order."""

    def __init__(self, times: list[float]) -> None:
        self.times = times

    def read(self) -> GpuSnapshot:
        return GpuSnapshot(self.times.pop(0), (h200(0),), None)

    def close(self) -> None:
        pass


def test_sampler_drops_a_snapshot_older_than_the_last_delivered() -> None:
    sampler = GpuSampler(ScriptedReader([2.0, 1.0, 3.0]))
    first = sampler.sample()
    assert first is not None and first.taken_at == 2.0
    assert sampler.sample() is None
    third = sampler.sample()
    assert third is not None and third.taken_at == 3.0


def test_sampler_drops_the_slower_of_two_overlapping_workers() -> None:
    clock = Clock(1.0)
    release = threading.Event()
    entered = threading.Event()

    class SlowFirst:
        calls = 0

        def read(self) -> GpuSnapshot:
            SlowFirst.calls += 1
            taken = clock()
            if SlowFirst.calls == 1:
                entered.set()
                assert release.wait(5)
            return GpuSnapshot(taken, (h200(0),), None)

        def close(self) -> None:
            pass

    sampler = GpuSampler(SlowFirst(), clock=clock)
    results: list[GpuSnapshot | None] = []
    slow = threading.Thread(target=lambda: results.append(sampler.sample()))
    slow.start()
    assert entered.wait(5)
    clock.now = 2.0
    fast = sampler.sample()
    release.set()
    slow.join(5)
    assert fast is not None and fast.taken_at == 2.0
    assert results == [None]


def test_sampler_wraps_a_reader_exception_into_an_error_snapshot() -> None:
    clock = Clock(7.0)
    reader = FakeGpuReader([h200(0)], clock=clock)
    sampler = GpuSampler(reader, clock=clock)
    reader.fail_next(RuntimeError("NVML handle went away"))
    failed = sampler.sample()
    assert failed is not None
    assert failed.gpus == () and failed.error == "GPU reading failed: NVML handle went away"
    clock.now = 8.0
    ok = sampler.sample()
    assert ok is not None and ok.error is None and ok.gpus == (h200(0),)


# --- helpers for the UI and preflight -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (3_600_000_000, "3.6 GB"),
        (999_960_000, "1.0 GB"),  # rounds up into the next unit, not "1000.0 MB"
        (150_754_820_096, "150.8 GB"),
        (-2_500_000, "-2.5 MB"),
    ],
)
def test_format_bytes_uses_decimal_units(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_gpus_visible_lists_names_and_memory() -> None:
    reader = FakeGpuReader([h200(0), h200(1)])
    assert gpus_visible(reader) == (True, "2 GPUs: NVIDIA H200 (150.8 GB), NVIDIA H200 (150.8 GB)")
    assert not reader.closed  # a reader passed in belongs to the caller
    assert gpus_visible(FakeGpuReader([h200(0)]))[1] == "1 GPU: NVIDIA H200 (150.8 GB)"
    down = FakeGpuReader(error="no NVIDIA GPU visible: driver not loaded")
    assert gpus_visible(down) == (False, "no NVIDIA GPU visible: driver not loaded")


def test_describe_no_gpu_is_empty_when_gpus_are_visible() -> None:
    assert describe_no_gpu(GpuSnapshot(1.0, (h200(0),), None)) == ""
    assert describe_no_gpu(GpuSnapshot(1.0, (), None)) == (
        "No NVIDIA GPU visible: NVML found no device. Chat still works; GPU readings are off."
    )
