"""A `GpuReader` for tests and screenshots: GPUs (or an error) given in advance, no NVML, no GPU needed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tuichat.server.gpu import NO_GPU, GpuInfo, GpuSnapshot


class FakeGpuReader:
    """A `GpuReader` for tests and demos: returns the GPUs (or the error) it was given.

    `fail_next(error)` makes the next read fail once: a string gives an error snapshot, an exception is raised
    (as a broken reader would, to exercise `GpuSampler`).
    """

    def __init__(
        self,
        gpus: Sequence[GpuInfo] = (),
        error: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gpus = tuple(gpus)
        self._error = error
        self._clock = clock
        self._fail: str | BaseException | None = None
        self.reads = 0
        self.closed = False

    def set(self, gpus: Sequence[GpuInfo] | None = None, error: str | None = None) -> None:
        """Replace what later reads return; `error` set means an error snapshot with no GPUs."""
        if gpus is not None:
            self._gpus = tuple(gpus)
        self._error = error

    def fail_next(self, error: str | BaseException = f"{NO_GPU}: driver not loaded") -> None:
        self._fail = error

    def read(self) -> GpuSnapshot:
        self.reads += 1
        now = self._clock()
        fail, self._fail = self._fail, None
        if isinstance(fail, BaseException):
            raise fail
        if fail is not None:
            return GpuSnapshot(now, (), fail)
        if self._error is not None:
            return GpuSnapshot(now, (), self._error)
        return GpuSnapshot(now, self._gpus, None)

    def close(self) -> None:
        self.closed = True
