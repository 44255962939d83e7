"""Stacked bar charts drawn on the server: report rows in, the shapes of an SVG out.

The templates turn a ``Chart`` into an inline ``<svg>`` (presentation attributes and CSS classes
only, so the strict Content-Security-Policy holds), with a ``<title>`` on every segment, a text
summary for screen readers and a legend. No chart library, nothing to vendor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from service.usage import usd

WIDTH = 640
HEIGHT = 220
LEFT = 64
BOTTOM = 24
TOP = 8
SERIES = 7
"""Series drawn apart; the rest are summed as "other"."""
OTHER = "other"

Row = Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Measure:
    name: str
    label: str
    value: Callable[[Row], int]
    shown: Callable[[int], str]


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def dollars(micro_usd: int) -> str:
    return "$" + usd(micro_usd)


MEASURES = {
    "cost": Measure("cost", "Cost (USD)", lambda row: _int(row.get("costMicroUsd")), dollars),
    "requests": Measure("requests", "Requests", lambda row: _int(row.get("requests")), lambda n: f"{n:,}"),
    "tokens": Measure(
        "tokens",
        "Tokens (input + output)",
        lambda row: _int(row.get("inputTokens")) + _int(row.get("outputTokens")),
        lambda n: f"{n:,}",
    ),
}


@dataclass(frozen=True, slots=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    series: int
    """Index into the legend (and the CSS class ``s{series}``)."""
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    measure: Measure
    width: int = WIDTH
    height: int = HEIGHT
    segments: list[Segment] = field(default_factory=list)
    x_labels: list[tuple[float, str, str]] = field(default_factory=list)
    """(x, text, text-anchor)."""
    y_max: str = ""
    legend: list[tuple[int, str, str]] = field(default_factory=list)
    """(series index, name, total shown)."""
    summary: str = ""

    @property
    def plot_bottom(self) -> int:
        return self.height - BOTTOM


def stacked(
    title: str,
    rows: Sequence[Row],
    x_field: str | None,
    series_field: str | None,
    measure: Measure,
    x_values: Sequence[str] | None = None,
) -> Chart:
    """A bar per value of ``x_field`` (one bar when ``None``), stacked by ``series_field``.

    ``x_values`` fixes the bars (every day of a range, even empty ones); otherwise they are the
    values the rows hold, in order. The ``SERIES`` largest series are drawn apart, the rest as "other".
    """

    def name(row: Row, field_name: str | None) -> str:
        value = row.get(field_name) if field_name else None
        return "all" if value is None else str(value)

    totals: dict[str, int] = {}
    for row in rows:
        series = name(row, series_field)
        totals[series] = totals.get(series, 0) + measure.value(row)
    ranked = sorted(totals, key=lambda s: (-totals[s], s))
    slots = {series: min(i, SERIES) for i, series in enumerate(ranked)}
    legend = [(i, series, measure.shown(totals[series])) for i, series in enumerate(ranked[:SERIES])]
    if len(ranked) > SERIES:
        legend.append((SERIES, OTHER, measure.shown(sum(totals[s] for s in ranked[SERIES:]))))
    names = {i: series for i, series, _ in legend}
    xs = list(x_values) if x_values is not None else list(dict.fromkeys(name(row, x_field) for row in rows))
    stacks: dict[str, dict[int, int]] = {x: {} for x in xs}
    for row in rows:
        stack = stacks.get(name(row, x_field))
        if stack is not None:
            slot = slots[name(row, series_field)]
            stack[slot] = stack.get(slot, 0) + measure.value(row)
    peak = max((sum(stack.values()) for stack in stacks.values()), default=0)
    plot_height = HEIGHT - BOTTOM - TOP
    step = (WIDTH - LEFT - 4) / max(len(xs), 1)
    bar = min(max(step * 0.8, 1.0), 48.0)
    segments: list[Segment] = []
    for n, x in enumerate(xs):
        left = round(LEFT + n * step + (step - bar) / 2, 2)
        base = float(HEIGHT - BOTTOM)
        for slot, value in sorted(stacks[x].items()):
            if value <= 0:
                continue
            height = value / peak * plot_height
            base -= height
            title_text = f"{x} · {names[slot]}: {measure.shown(value)}"
            segments.append(Segment(left, round(base, 2), round(bar, 2), round(height, 2), slot, title_text))
    x_labels: list[tuple[float, str, str]] = []
    if len(xs) == 1:
        x_labels.append((round(LEFT + step / 2, 2), xs[0], "middle"))
    elif xs:  # the first and last labels end at the plot's edges, so they are never cut off
        ends = {0: ("start", LEFT), len(xs) - 1: ("end", WIDTH - 4)}
        for i in sorted({0, len(xs) // 2, len(xs) - 1}):
            anchor, at = ends.get(i, ("middle", LEFT + i * step + step / 2))
            x_labels.append((round(at, 2), xs[i], anchor))
    summary = f"{title}: {measure.shown(sum(totals.values()))} in all over {len(xs)} bars"
    if legend:
        summary += "; " + ", ".join(f"{series} {value}" for _, series, value in legend)
    return Chart(
        title,
        measure,
        segments=segments,
        x_labels=x_labels,
        y_max=measure.shown(peak),
        legend=legend,
        summary=summary + ".",
    )
