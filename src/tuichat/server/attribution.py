"""Which node of a fleet served each reply, worked out from the nodes' own counters.

lmdeploy 0.18's proxy says nothing about where it sent a request: no response header, no field in the stream, and
`/nodes/status` only counts unfinished requests and recent latencies. Each node's `/metrics` does count what it
did (requests finished, prompt and generated tokens), so a reply is attributed to the nodes whose counters moved
between a reading taken before it started and one taken after it ended. When only one node moved, that node served
it. When several did (another reply of this chat overlapped, or another client used the fleet meanwhile), the
reply says "one of A, B": a guess presented as certain would be worse than an honest doubt. A node that answered
before the reply and was down after it is a candidate too: it most likely died serving it.

`ReplyLedger` is fed every `FleetView` the poller produces (`observe`) and told when each reply starts and ends;
it is plain bookkeeping over timestamps, safe to call from the poller's thread and the UI's, and a UI only shows
its `entries()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from tuichat.server.metrics import lmdeploy_samples

_PREFIX = "lmdeploy:"
# Counters that only grow while a node works on a request; each summed over its label sets. Finished requests:
# the end-to-end latency histogram's count (one observation as each request ends; seen on lmdeploy 0.18), else
# `request_success_total` where a server has that counter.
_REQUEST_COUNTERS = ("e2e_request_latency_seconds_count",)
_REQUEST_FALLBACK = "request_success_total"
_TOKEN_COUNTERS = {
    "prompt_tokens_total": "prompt_tokens",
    "prompt_tokens": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
    "generation_tokens": "generation_tokens",
}
MAX_OBSERVATIONS = 64  # a reply's readings are found among the latest ones; older readings are dropped


@dataclass(frozen=True)
class NodeCounters:
    """The work counters of one node at one reading; a counter the node does not report is None."""

    requests: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None

    def moved_since(self, earlier: NodeCounters) -> bool | None:
        """Whether the node did any work between `earlier` and this reading; None when no counter can tell.

        A counter that went down means the node restarted in between: it did something, so it counts as moved."""
        known = False
        for now, then in (
            (self.requests, earlier.requests),
            (self.prompt_tokens, earlier.prompt_tokens),
            (self.generation_tokens, earlier.generation_tokens),
        ):
            if now is None or then is None:
                continue
            known = True
            if now != then:
                return True
        return False if known else None


def read_counters(text: str) -> NodeCounters:
    """The work counters of an lmdeploy `/metrics` text; raises MetricsError if it is not Prometheus text."""
    sums: dict[str, float] = {}
    for key, value in lmdeploy_samples(text):
        if key in _REQUEST_COUNTERS:
            sums["requests"] = sums.get("requests", 0.0) + value
        elif key == _REQUEST_FALLBACK:
            sums["fallback"] = sums.get("fallback", 0.0) + value
        elif key in _TOKEN_COUNTERS:
            field_name = _TOKEN_COUNTERS[key]
            sums[field_name] = sums.get(field_name, 0.0) + value
    return NodeCounters(
        requests=sums.get("requests", sums.get("fallback")),
        prompt_tokens=sums.get("prompt_tokens"),
        generation_tokens=sums.get("generation_tokens"),
    )


@dataclass(frozen=True)
class NodeReading:
    """What one poll learnt of one node: whether it answered, and its counters if they could be read."""

    label: str
    up: bool
    counters: NodeCounters | None = None


@dataclass(frozen=True)
class Observation:
    """One poll of the whole fleet, by node URL: begun at `start`, every node read by `end`."""

    start: float
    end: float
    nodes: Mapping[str, NodeReading]


Certainty = Literal["pending", "one", "several", "unknown"]


@dataclass
class ReplyServed:
    """Where one reply of this chat was served, as far as the counters tell."""

    key: object  # the caller's id of the reply
    started: float
    ended: float | None = None
    certainty: Certainty = "pending"
    nodes: tuple[str, ...] = ()  # labels of the candidate nodes, in fleet order
    died: tuple[str, ...] = ()  # candidates that were up before the reply and down after it
    why: str = ""

    def describe(self) -> str:
        """A few words for the fleet screen: "n1", "one of n1, n2", "n2 (went down)", "not known yet"."""
        if self.certainty == "pending":
            return "replying…" if self.ended is None else "waiting for the nodes' counters…"
        if self.certainty == "unknown":
            return f"unknown ({self.why})" if self.why else "unknown"
        names = [f"{n} (went down)" if n in self.died else n for n in self.nodes]
        if self.certainty == "one":
            return names[0]
        if len(names) == 1:
            return f"{names[0]}, probably ({self.why})"
        return "one of " + ", ".join(names)


@dataclass
class ReplyLedger:
    """Attributes replies to nodes from observations taken before and after each (see the module docstring)."""

    clock: Callable[[], float] = time.monotonic
    _observations: list[Observation] = field(default_factory=list)
    _replies: list[ReplyServed] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, nodes: Mapping[str, NodeReading], start: float, end: float | None = None) -> None:
        """Record one poll of the fleet (begun at `start`, done at `end`, on `clock`'s scale); settles every
        ended reply that now has a reading taken wholly after its end."""
        with self._lock:
            self._observations.append(Observation(start, start if end is None else end, dict(nodes)))
            self._observations.sort(key=lambda o: o.start)  # polls can finish out of order
            del self._observations[:-MAX_OBSERVATIONS]
            for reply in self._replies:
                if reply.certainty == "pending" and reply.ended is not None:
                    self._settle(reply)

    def started(self, key: object, at: float | None = None) -> None:
        """A reply was requested (call it before the request goes out)."""
        with self._lock:
            self._replies.append(ReplyServed(key, self.clock() if at is None else at))

    def ended(self, key: object, at: float | None = None) -> None:
        """The reply is over: finished, stopped, or broken off. It settles at the next observation."""
        with self._lock:
            for reply in self._replies:
                if reply.key == key and reply.ended is None:
                    reply.ended = self.clock() if at is None else at

    def forget(self, key: object) -> None:
        """The reply was removed from the chat (undo, retry replaced it)."""
        with self._lock:
            self._replies = [r for r in self._replies if r.key != key]

    def entries(self) -> list[ReplyServed]:
        """Every reply's attribution, oldest first (copies: safe to read while polls go on)."""
        with self._lock:
            return [ReplyServed(**vars(r)) for r in self._replies]

    def get(self, key: object) -> ReplyServed | None:
        return next((r for r in self.entries() if r.key == key), None)

    def _settle(self, reply: ReplyServed) -> None:
        assert reply.ended is not None
        # before: read completely before the request went out; after: begun only once the reply was over
        before = next((o for o in reversed(self._observations) if o.end <= reply.started), None)
        after = next((o for o in self._observations if o.start > reply.ended), None)
        if after is None:
            return
        if before is None:
            reply.certainty, reply.why = "unknown", "no reading of the nodes from before it"
            return
        moved: list[str] = []
        died: list[str] = []
        unreadable = False
        for url, now in after.nodes.items():
            then = before.nodes.get(url)
            if then is None:
                # a node that joined during the reply: it could have served it only if its counters say so, and
                # there is nothing to compare them with
                unreadable = unreadable or now.counters is not None
                continue
            if then.up and not now.up:
                moved.append(now.label)
                died.append(now.label)
                continue
            if now.counters is None or then.counters is None:
                unreadable = unreadable or now.up
                continue
            if now.counters.moved_since(then.counters):
                moved.append(now.label)
        for url, then in before.nodes.items():
            if url not in after.nodes and then.up:
                # gone from the fleet altogether after the reply: as for a node that went down
                moved.append(then.label)
                died.append(then.label)
        reply.nodes, reply.died = tuple(moved), tuple(died)
        if len(moved) == 1 and not unreadable:
            reply.certainty = "one"
        elif moved:
            reply.certainty = "several"
            if unreadable:
                reply.why = "some nodes' counters could not be read"
        else:
            reply.certainty = "unknown"
            reply.why = (
                "the nodes' /metrics could not be read with their keys" if unreadable else "no node's counters moved"
            )
