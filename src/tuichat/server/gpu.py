"""GPU readings for the status panel, preflight checks and stop confirmation, through NVML.

NVML (module `pynvml`, from `nvidia-ml-py`) is imported inside functions so that start-up does not pay for
it (~60 ms). A reading never raises: a value NVML cannot give becomes None, and a machine without a usable
NVIDIA driver gives a snapshot whose `error` says why in a sentence.

Byte counts are shown in decimal units (1 GB = 1000**3 bytes) everywhere in tuichat; see `format_bytes`.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")

NO_GPU = "no NVIDIA GPU visible"
INIT_RETRY_S = 30.0
"""After NVML failed to start, try again at most this often (a driver may be loaded later)."""


@dataclass(frozen=True)
class GpuProcess:
    """A process with a context on a GPU; `used_bytes` is None where NVML does not say (WDDM, permissions)."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU at one moment. Every reading that failed is None.

    `processes_known` is False when NVML would not list the processes (permissions, old driver), so an
    empty `processes` then means "unknown", not "idle".
    """

    index: int
    name: str
    uuid: str
    util_percent: int | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    processes_known: bool = True


@dataclass(frozen=True)
class GpuSnapshot:
    """All GPUs at one moment (`taken_at` is `time.monotonic()`), or an error sentence and no GPUs."""

    taken_at: float
    gpus: tuple[GpuInfo, ...]
    error: str | None = None


@dataclass(frozen=True)
class GpuMemorySplit:
    """Memory on one GPU held by our server's processes against everything else (other processes, driver)."""

    index: int
    ours_bytes: int
    others_bytes: int
    used_bytes: int | None
    total_bytes: int | None


class GpuReader(Protocol):
    """Something that gives GPU snapshots: NVML on a real machine, a fake in tests and demos."""

    def read(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


def _load_pynvml() -> ModuleType:
    return importlib.import_module("pynvml")


def _init_error_sentence(nvml: ModuleType, exc: BaseException) -> str:
    """Turn an NVML start-up failure into the reason shown after 'no NVIDIA GPU visible: '."""
    code = getattr(exc, "value", None)
    reasons = {
        getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", -1): "NVML library not found (libnvidia-ml.so.1)",
        getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", -1): "driver not loaded",
        getattr(nvml, "NVML_ERROR_NO_PERMISSION", -1): "no permission to use NVML",
        getattr(nvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", -1): (
            "the NVML library and the loaded driver are different versions (reboot after a driver update)"
        ),
    }
    if isinstance(code, int) and code in reasons:
        return f"{NO_GPU}: {reasons[code]}"
    return f"{NO_GPU}: NVML failed to start ({exc})"


def _as_str(value: object) -> str:
    # Older nvidia-ml-py versions return bytes for names and UUIDs.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class NvmlReader:
    """Reads every visible GPU through NVML.

    NVML starts on the first `read()`; device handles, names and UUIDs are cached. If NVML cannot start, the
    reason is remembered and start-up is retried at most every `INIT_RETRY_S` seconds. Only cheap queries are
    made (~0.1 ms each): never the PCIe/NVLink throughput ones, which block for ~20 ms. Safe to call from
    several threads; reads are serialised.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[], ModuleType] = _load_pynvml,
    ) -> None:
        self._clock = clock
        self._loader = loader
        self._lock = threading.Lock()
        self._nvml: ModuleType | None = None
        self._devices: list[tuple[Any, str, str]] = []  # (handle or None, name, uuid)
        self._init_error: str | None = None
        self._last_attempt: float | None = None

    def read(self) -> GpuSnapshot:
        with self._lock:
            now = self._clock()
            if self._nvml is None:
                due = self._last_attempt is None or now - self._last_attempt >= INIT_RETRY_S
                if due:
                    self._last_attempt = now
                    self._init_error = self._start()
                if self._nvml is None:
                    return GpuSnapshot(now, (), self._init_error or f"{NO_GPU}: NVML did not start")
            nvml = self._nvml
            gpus = tuple(self._read_device(nvml, i, h, n, u) for i, (h, n, u) in enumerate(self._devices))
            return GpuSnapshot(now, gpus, None)

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                self._shutdown_quietly(self._nvml)
            self._nvml = None
            self._devices = []
            self._last_attempt = None
            self._init_error = None

    def _start(self) -> str | None:
        """Start NVML and cache the devices; return the reason on failure."""
        try:
            nvml = self._loader()
        except ImportError:
            return f"{NO_GPU}: the nvidia-ml-py package is not installed"
        try:
            nvml.nvmlInit()
        except Exception as exc:
            return _init_error_sentence(nvml, exc)
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._shutdown_quietly(nvml)
            return f"{NO_GPU}: NVML could not count the devices ({exc})"
        if count <= 0:
            self._shutdown_quietly(nvml)
            return f"{NO_GPU}: NVML found no device"
        devices: list[tuple[Any, str, str]] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                devices.append((None, "unreadable GPU", ""))
                continue
            name, uuid = _identity(nvml, handle)
            devices.append((handle, name, uuid))
        self._nvml = nvml
        self._devices = devices
        return None

    @staticmethod
    def _shutdown_quietly(nvml: ModuleType) -> None:
        # A failing shutdown leaves nothing for the user to act on.
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()

    @staticmethod
    def _read_device(nvml: ModuleType, index: int, handle: Any, name: str, uuid: str) -> GpuInfo:
        if handle is None:
            return GpuInfo(index, name, uuid, processes_known=False)
        util = _try(lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        mem = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        mem_used = _try(lambda: int(mem.used)) if mem is not None else None
        mem_total = _try(lambda: int(mem.total)) if mem is not None else None
        temp = _try(lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        power = _try(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # NVML gives milliwatts
        limit = _try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
        processes, known = _read_processes(nvml, handle)
        return GpuInfo(
            index=index,
            name=name,
            uuid=uuid,
            util_percent=util,
            mem_used=mem_used,
            mem_total=mem_total,
            temperature_c=temp,
            power_w=power,
            power_limit_w=limit,
            processes=processes,
            processes_known=known,
        )


def _try(read: Callable[[], _T]) -> _T | None:
    """One NVML reading: any failure (not supported, no permission, GPU lost) means 'unknown'."""
    try:
        return read()
    except Exception:
        return None


def _identity(nvml: ModuleType, handle: Any) -> tuple[str, str]:
    """Name and UUID, read once at start-up since they never change."""
    name = _try(lambda: _as_str(nvml.nvmlDeviceGetName(handle))) or "unknown GPU"
    uuid = _try(lambda: _as_str(nvml.nvmlDeviceGetUUID(handle))) or ""
    return name, uuid


def _read_processes(nvml: ModuleType, handle: Any) -> tuple[tuple[GpuProcess, ...], bool]:
    """Union of compute and graphics processes, one entry per pid; False if neither list could be read."""
    by_pid: dict[int, int | None] = {}
    known = False
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            listed = getattr(nvml, getter)(handle)
        except Exception:
            continue
        known = True
        for proc in listed:
            try:
                pid = int(proc.pid)
            except (AttributeError, TypeError, ValueError):
                continue
            raw = getattr(proc, "usedGpuMemory", None)
            used = int(raw) if isinstance(raw, int) else None
            # A process with both a compute and a graphics context is listed twice: keep the known total.
            previous = by_pid.get(pid)
            if previous is None:
                by_pid[pid] = used
            elif used is not None:
                by_pid[pid] = max(previous, used)
    return tuple(GpuProcess(pid, used) for pid, used in sorted(by_pid.items())), known


class GpuSampler:
    """Calls a reader from the UI's thread worker and hands back only fresh snapshots.

    Overlapping workers can finish out of order; `sample()` returns None for a snapshot older than the last
    one it delivered, so the display never steps back in time. An exception from the reader becomes an error
    snapshot instead of killing the worker.
    """

    def __init__(self, reader: GpuReader, clock: Callable[[], float] = time.monotonic) -> None:
        self.reader = reader
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None

    def sample(self) -> GpuSnapshot | None:
        started = self._clock()
        try:
            snapshot = self.reader.read()
        except Exception as exc:
            snapshot = GpuSnapshot(started, (), f"GPU reading failed: {exc}")
        with self._lock:
            if self._last is not None and snapshot.taken_at < self._last:
                return None
            self._last = snapshot.taken_at
            return snapshot


def memory_split(snapshot: GpuSnapshot, pids: Collection[int]) -> list[GpuMemorySplit]:
    """Per GPU: bytes held by `pids` (our server's process group) against everything else.

    With tensor parallelism several GPUs have a share that is ours. `others_bytes` is the used memory not
    attributed to our processes (other processes, the driver's own reservations); when the used total is
    unknown it is the sum of the other listed processes. NVML inside a container may list host pids, which
    then never match ours.
    """
    ours_pids = set(pids)
    result: list[GpuMemorySplit] = []
    for gpu in snapshot.gpus:
        ours = sum(p.used_bytes or 0 for p in gpu.processes if p.pid in ours_pids)
        if gpu.mem_used is not None:
            others = max(gpu.mem_used - ours, 0)
        else:
            others = sum(p.used_bytes or 0 for p in gpu.processes if p.pid not in ours_pids)
        result.append(GpuMemorySplit(gpu.index, ours, others, gpu.mem_used, gpu.mem_total))
    return result


def pids_on_gpu(snapshot: GpuSnapshot, pids: Collection[int]) -> set[int]:
    """Which of `pids` still have a context on any GPU (to confirm a stopped server released its memory)."""
    wanted = set(pids)
    return {p.pid for gpu in snapshot.gpus for p in gpu.processes if p.pid in wanted}


def describe_no_gpu(snapshot: GpuSnapshot) -> str:
    """A sentence, with what to do, for a GPU panel with nothing to show; "" when GPUs are visible."""
    if snapshot.gpus and snapshot.error is None:
        return ""
    reason = snapshot.error or f"{NO_GPU}: NVML found no device"
    if "library not found" in reason or "driver not loaded" in reason:
        advice = "install or load the NVIDIA driver, or run tuichat on the GPU machine"
    elif "not installed" in reason:
        advice = "install nvidia-ml-py into tuichat's environment"
    elif "permission" in reason:
        advice = "run as a user allowed to use the GPU"
    else:
        advice = "chat still works; GPU readings are off"
    return f"{reason[:1].upper()}{reason[1:]}. {advice[:1].upper()}{advice[1:]}."


_UNITS = ("kB", "MB", "GB", "TB", "PB")


def format_bytes(n: float) -> str:
    """Decimal units, one decimal: 512 B, 3.6 GB, 143.8 GB (1 GB = 1000**3 bytes, as disk vendors count)."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1000:
        return f"{sign}{int(value)} B"
    for unit in _UNITS:
        value /= 1000.0
        if round(value, 1) < 1000 or unit == _UNITS[-1]:
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")


def gpus_visible(reader: GpuReader | None = None) -> tuple[bool, str]:
    """For preflight checks: (True, "2 GPUs: NVIDIA H200 (150.7 GB), ...") or (False, the reason)."""
    own = reader is None
    active: GpuReader = NvmlReader() if reader is None else reader
    try:
        snapshot = active.read()
    finally:
        if own:
            active.close()
    if snapshot.error is not None or not snapshot.gpus:
        return False, snapshot.error or f"{NO_GPU}: NVML found no device"
    names = ", ".join(
        f"{g.name} ({format_bytes(g.mem_total)})" if g.mem_total is not None else g.name for g in snapshot.gpus
    )
    count = len(snapshot.gpus)
    return True, f"{count} GPU{'s' if count != 1 else ''}: {names}"


def visible_gpu_count(reader: GpuReader | None, environ: Mapping[str, str]) -> tuple[int | None, str]:
    """How many GPUs a server started with `environ` can use, and how that was found; (None, "") when unknown.

    CUDA_VISIBLE_DEVICES narrows what NVML lists (NVML itself ignores it): CUDA stops at the first entry it
    cannot parse, and an empty value hides every GPU.
    """
    listed: int | None = None
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        listed = 0
        for item in cvd.split(","):
            item = item.strip()
            if not item or item.startswith("-") or not (item.isdigit() or item.startswith(("GPU-", "MIG-"))):
                break
            listed += 1
    nvml: int | None = None
    if reader is not None:
        try:
            snapshot = reader.read()
        except Exception:  # a broken reader leaves the count to CUDA_VISIBLE_DEVICES alone
            snapshot = None
        if snapshot is not None and snapshot.error is None:
            nvml = len(snapshot.gpus)
    if listed is not None and (nvml is None or listed <= nvml):
        return listed, f"CUDA_VISIBLE_DEVICES={cvd}"
    if nvml is not None:
        return nvml, "NVML"
    return None, ""
