"""What the status pane and the status line show: one `StatusView`, kept by the app's `StatusWatch`.

A module of its own so the watch can hold a view from start-up without importing the pane, which (with NVML's
wrapper and Rich's tables behind it) is mounted only a second after the first frame, or at F3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuichat.server.fleet import FleetView
    from tuichat.server.gpu import GpuSnapshot
    from tuichat.server.metrics import ContextMeter, ServerMetrics


@dataclass
class StatusView:
    """Everything the pane shows, gathered by the app."""

    gpu: GpuSnapshot | None = None
    our_pids: set[int] = field(default_factory=set)
    metrics: ServerMetrics | None = None
    metrics_error: str | None = None
    gen_rate: float | None = None  # server-side generation tokens/s
    kv_history: list[float] = field(default_factory=list)
    rate_history: list[float] = field(default_factory=list)
    launch: dict[str, Any] = field(default_factory=dict)  # backend, cache share, quant policy, session_len, ...
    kv_capacity: int | None = None  # tokens the KV cache holds (num_gpu_blocks x block_size), when known
    last_reply: dict[str, Any] | None = None
    context: ContextMeter | None = None
    fleet: FleetView | None = None  # set when the chat goes through lmdeploy's proxy
