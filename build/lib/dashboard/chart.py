"""A bar chart drawn on the server as SVG: no script, no font or library from the internet."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from markupsafe import Markup, escape

WIDTH = 760
HEIGHT = 260
LEFT = 64
BOTTOM = 28
TOP = 12


def _tokens(value: int) -> str:
    for limit, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if value >= limit:
            return f"{value / limit:.1f}".rstrip("0").rstrip(".") + suffix
    return str(value)


def bar_chart(points: Sequence[tuple[date, int]], *, title: str) -> Markup:
    """One bar per day. Each bar carries its day and tokens (`data-day`, `data-tokens`) and a tooltip; its
    height is its share of the largest day's tokens."""
    plot_width, plot_height = WIDTH - LEFT - 8, HEIGHT - TOP - BOTTOM
    peak = max((tokens for _, tokens in points), default=0)
    slot = plot_width / max(len(points), 1)
    gap = min(2.0, slot * 0.2)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_height}" x2="{WIDTH - 8}" y2="{TOP + plot_height}"/>',
        f'<text class="label" x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">{_tokens(peak)}</text>',
        f'<text class="label" x="{LEFT - 6}" y="{TOP + plot_height}" text-anchor="end">0</text>',
    ]
    for index, (day, tokens) in enumerate(points):
        height = round(plot_height * tokens / peak, 2) if peak else 0.0
        x = round(LEFT + index * slot + gap / 2, 2)
        parts.append(
            f'<rect class="bar" data-day="{day.isoformat()}" data-tokens="{tokens}" x="{x}" '
            f'y="{round(TOP + plot_height - height, 2)}" width="{round(slot - gap, 2)}" height="{height}">'
            f"<title>{day.isoformat()}: {tokens:,} tokens</title></rect>"
        )
    if points:
        baseline = TOP + plot_height + 18
        parts.append(f'<text class="label" x="{LEFT}" y="{baseline}">{points[0][0].isoformat()}</text>')
        parts.append(
            f'<text class="label" x="{WIDTH - 8}" y="{baseline}" text-anchor="end">{points[-1][0].isoformat()}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (text in it is escaped above; the rest are numbers and dates)
