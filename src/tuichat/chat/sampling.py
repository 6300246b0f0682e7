"""Sampling parameters: their allowed ranges, parsing from what the user typed, and the request fields.

Every value is optional: an unset field is left to the server, which takes it from the model's
generation_config.json (then LMDeploy's own defaults). The ranges are LMDeploy's own checks, applied here
first so that a bad value is refused in the pane instead of costing a round trip (or, as in the tutorial's
repetition_penalty of 2, 2,000 tokens of garbage before anyone notices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tuichat.errors import TuichatError


class SamplingError(TuichatError):
    """A sampling value is out of range or not a number; names the field."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(f"{name}: {message}")


@dataclass(frozen=True)
class FieldSpec:
    """How one sampling field is typed, checked and explained."""

    name: str
    label: str
    kind: str  # "float" | "int" | "text" | "list"
    help: str
    check: Callable[[float], bool] | None = None
    rule: str = ""


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[float], bool]:
    def ok(v: float) -> bool:
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    return ok


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("temperature", "Temperature", "float", "randomness; 0 = greedy", _in(0, 2), "in [0, 2]"),
    FieldSpec("top_p", "Top-p", "float", "nucleus share of probability", _in(0, 1, lo_open=True), "in (0, 1]"),
    FieldSpec("top_k", "Top-k", "int", "keep the k likeliest tokens; 0 = off", lambda v: v >= 0, ">= 0"),
    FieldSpec("min_p", "Min-p", "float", "drop tokens below this share of the top one", _in(0, 1), "in [0, 1]"),
    FieldSpec(
        "repetition_penalty",
        "Repetition penalty",
        "float",
        "1 = none; above 1.3 often gives garbage",
        lambda v: v > 0 and math.isfinite(v),
        "> 0",
    ),
    FieldSpec("max_tokens", "Max tokens", "int", "longest reply", lambda v: v >= 1, ">= 1"),
    FieldSpec("seed", "Seed", "int", "blank = random", lambda v: 0 <= v < 2**63, "a whole number >= 0"),
    FieldSpec("stop", "Stop strings", "list", "comma-separated; the reply ends at any of them"),
)
FIELD_BY_NAME: dict[str, FieldSpec] = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class Sampling:
    """The values the next request uses; None means 'leave it to the server'."""

    system_prompt: str = ""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def request_fields(self) -> dict[str, Any]:
        """The OpenAI-style request fields for the values that are set."""
        out: dict[str, Any] = {}
        for spec in FIELDS:
            value = getattr(self, spec.name)
            if spec.kind == "list":
                if value:
                    out[spec.name] = list(value)
            elif value is not None:
                out[spec.name] = value
        return out

    def with_value(self, name: str, value: Any) -> Sampling:
        changes: dict[str, Any] = {name: value}
        return replace(self, **changes)

    def to_table(self) -> dict[str, Any]:
        """A TOML-ready table of the values that are set (unset ones stay absent)."""
        table: dict[str, Any] = {}
        if self.system_prompt:
            table["system_prompt"] = self.system_prompt
        for spec in FIELDS:
            value = getattr(self, spec.name)
            if spec.kind == "list":
                if value:
                    table[spec.name] = list(value)
            elif value is not None:
                table[spec.name] = value
        return table

    def describe(self) -> str:
        """A short summary, e.g. for a saved conversation or the status line."""
        parts = [f"{k}={v}" for k, v in self.request_fields().items()]
        return ", ".join(parts) if parts else "server defaults"


def parse_value(name: str, text: str) -> Any:
    """Turn what the user typed into a checked value; blank means unset. Raises SamplingError."""
    if name == "system_prompt":
        return text
    spec = FIELD_BY_NAME.get(name)
    if spec is None:
        raise SamplingError(name, "is not a sampling parameter")
    raw = text.strip()
    if spec.kind == "list":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if not raw:
        return None
    return check_value(name, _number(spec, raw))


def _number(spec: FieldSpec, raw: str) -> float | int:
    try:
        if spec.kind == "int":
            as_float = float(raw)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        value = float(raw)
    except (ValueError, OverflowError):
        kind = "a whole number" if spec.kind == "int" else "a number"
        raise SamplingError(spec.name, f"'{raw}' is not {kind}; it must be {spec.rule}") from None
    if not math.isfinite(value):
        raise SamplingError(spec.name, f"must be {spec.rule}")
    return value


def check_value(name: str, value: object) -> Any:
    """Check an already-typed value (from the config file or the pane) against the field's range."""
    spec = FIELD_BY_NAME.get(name)
    if spec is None:
        if name == "system_prompt" and isinstance(value, str):
            return value
        raise SamplingError(name, "is not a sampling parameter")
    if value is None:
        return None
    if spec.kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise SamplingError(name, "must be a list of strings")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingError(name, f"must be {spec.rule}")
    if spec.kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise SamplingError(name, f"{value} is not a whole number; it must be {spec.rule}")
        value = int(value)
    else:
        value = float(value)
    assert spec.check is not None
    if not spec.check(value):
        raise SamplingError(name, f"{value} is out of range; it must be {spec.rule}")
    return value


def sampling_from_table(table: Mapping[str, object]) -> Sampling:
    """Build Sampling from a config table; raises SamplingError naming the first bad key."""
    known = {f.name for f in fields(Sampling)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise SamplingError(key, "is not a sampling parameter (known: " + ", ".join(sorted(known)) + ")")
        if key == "system_prompt":
            if not isinstance(value, str):
                raise SamplingError(key, "must be a string")
            values[key] = value
        else:
            values[key] = check_value(key, value)
    return Sampling(**values)


def display_value(sampling: Sampling, name: str) -> str:
    """The value as the pane shows it in its input (blank when unset)."""
    value = getattr(sampling, name)
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)
