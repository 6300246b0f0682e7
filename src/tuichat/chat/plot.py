"""Plots of a `tuichat batch --sweep`: throughput and TTFT p95 against concurrency, one line per target, drawn
for the terminal (plotext) and as an SVG file for a README.

plotext 6.1 writes text, ANSI and HTML but no SVG, so the SVG is drawn here: two panels side by side, each with
axes, ticks, grid lines, one line with dots per target and a legend. Concurrency runs on a log2 axis, since
sweeps are geometric (1, 4, 16, 64): equal steps then take equal room.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Series:
    """One target's points: (concurrency, value) in order of concurrency; a value may be None (no data there)."""

    label: str
    points: Sequence[tuple[int, float | None]]


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    series: Sequence[Series]


# Distinct on white and on GitHub's dark background, and for the common colour-vision deficiencies.
COLOURS = ("#1f77b4", "#e8710a", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def sweep_panels(
    throughput: Mapping[str, Sequence[tuple[int, float | None]]],
    ttft_p95: Mapping[str, Sequence[tuple[int, float | None]]],
) -> list[Panel]:
    return [
        Panel("Throughput", "tok/s", [Series(k, v) for k, v in throughput.items()]),
        Panel("TTFT p95", "s", [Series(k, v) for k, v in ttft_p95.items()]),
    ]


# -- the terminal --------------------------------------------------------------------------------------------


def terminal_plot(panels: Sequence[Panel], *, width: int = 100, height: int = 22, colour: bool = True) -> str:
    """The panels side by side as terminal text (ANSI colours unless `colour` is False)."""
    import plotext as plt

    fig = plt.figure
    fig.clear()
    fig.plot_size(max(40, width), max(10, height))
    fig.subplots(1, len(panels))
    for col, panel in enumerate(panels, 1):
        sub = fig.subplot(1, col)
        sub.title(f"{panel.title} ({panel.unit})")
        sub.label("concurrency")
        xs = sorted({c for s in panel.series for c, v in s.points if v is not None})
        if xs:
            sub.ruler("x").ticks([math.log2(x) for x in xs], [str(x) for x in xs])
        for series in panel.series:
            pts = [(math.log2(c), v) for c, v in series.points if v is not None]
            if not pts:
                continue
            signal = sub.signal([p[0] for p in pts], [p[1] for p in pts], marker="braille")
            signal.lines()
            if col == 1:  # one legend is enough: the colours are the same in both panels
                signal.label(series.label)
            sub.draw(signal)
    text: str = fig.build().string(colorless=not colour)
    fig.clear()
    return text


# -- the SVG -------------------------------------------------------------------------------------------------

PANEL_W, PANEL_H = 420, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 40, 48
LEGEND_H = 28


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3f}".rstrip("0").rstrip(".")


def svg_plot(panels: Sequence[Panel], *, title: str = "") -> str:
    """A self-contained SVG of the panels side by side with one shared legend under them."""
    labels = list(dict.fromkeys(s.label for p in panels for s in p.series))
    top = 28 if title else 0
    width = PANEL_W * len(panels)
    height = top + PANEL_H + LEGEND_H + 8
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="-apple-system, BlinkMacSystemFont, Segoe UI, Helvetica, Arial, sans-serif" font-size="12">',
        # An opaque background: GitHub's dark theme would otherwise show dark text on dark.
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    if title:
        out.append(
            f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="15" font-weight="600" '
            f'fill="#24292f">{escape(title)}</text>'
        )
    for i, panel in enumerate(panels):
        out.extend(_panel(panel, i * PANEL_W, top, labels))
    out.extend(_legend(labels, width, top + PANEL_H + 4))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _panel(panel: Panel, x0: float, y0: float, labels: Sequence[str]) -> list[str]:
    left, right = x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R
    top, bottom = y0 + MARGIN_T, y0 + PANEL_H - MARGIN_B
    xs = sorted({c for s in panel.series for c, v in s.points if v is not None})
    ys = [v for s in panel.series for _, v in s.points if v is not None]
    out = [
        f'<text x="{(left + right) / 2:.1f}" y="{y0 + 24:.1f}" text-anchor="middle" font-size="14" '
        f'font-weight="600" fill="#24292f">{escape(panel.title)} ({escape(panel.unit)})</text>'
    ]
    if not xs:
        out.append(
            f'<text x="{(left + right) / 2:.1f}" y="{(top + bottom) / 2:.1f}" text-anchor="middle" '
            'fill="#57606a">no data</text>'
        )
        return out
    lx = [math.log2(x) for x in xs]
    xlo, xhi = lx[0], lx[-1]
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    yticks = nice_ticks(0.0, max(ys) * 1.05 if max(ys) > 0 else 1.0)
    ylo, yhi = yticks[0], yticks[-1]

    def px(c: int) -> float:
        return left + (math.log2(c) - xlo) / (xhi - xlo) * (right - left)

    def py(v: float) -> float:
        return bottom - (v - ylo) / (yhi - ylo) * (bottom - top)

    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#d0d7de" stroke-width="1"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#57606a">{escape(_fmt(t))}</text>')
    for c in xs:
        x = px(c)
        out.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#57606a"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle" fill="#57606a">{c}</text>')
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#57606a" stroke-width="1"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#57606a" stroke-width="1"/>')
    out.append(
        f'<text x="{(left + right) / 2:.1f}" y="{bottom + 36}" text-anchor="middle" fill="#24292f">'
        "concurrency (requests in flight)</text>"
    )
    for series in panel.series:
        colour = COLOURS[labels.index(series.label) % len(COLOURS)]
        pts = [(px(c), py(v)) for c, v in series.points if v is not None]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.5"/>')
        for (x, y), (c, v) in zip(pts, [(c, v) for c, v in series.points if v is not None], strict=True):
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
                f"<title>{escape(series.label)}: {c} → {escape(_fmt(v))} {escape(panel.unit)}</title></circle>"
            )
    return out


def _legend(labels: Sequence[str], width: float, y: float) -> list[str]:
    item_w = [28 + 7 * len(label) + 24 for label in labels]
    x = (width - sum(item_w)) / 2
    out = []
    for label, w in zip(labels, item_w, strict=True):
        colour = COLOURS[labels.index(label) % len(COLOURS)]
        out.append(
            f'<line x1="{x:.1f}" y1="{y + 10}" x2="{x + 20:.1f}" y2="{y + 10}" stroke="{colour}" stroke-width="2.5"/>'
        )
        out.append(f'<circle cx="{x + 10:.1f}" cy="{y + 10}" r="3.5" fill="{colour}"/>')
        out.append(f'<text x="{x + 26:.1f}" y="{y + 14}" fill="#24292f">{escape(label)}</text>')
        x += w
    return out
