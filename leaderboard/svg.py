"""Inline SVG for probe curves: a per-row sparkline and the detail view's full plot.

Rendered here rather than in the browser so the page needs no charting library and shows the
curves without JavaScript. Only numbers and schema labels go into the markup (no record
strings), and the labels are escaped anyway.
"""
from __future__ import annotations

from html import escape

Curve = list[dict]


def primary_series(curve: Curve, preferred: list[str]) -> str | None:
    """The first series in ``preferred`` that has a value somewhere on the curve (the world's
    concept detector where there is one, else the classifier's P(original))."""
    for key in preferred:
        if any(_num(pt.get(key)) is not None for pt in curve):
            return key
    return None


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _points(curve: Curve, key: str, x, y) -> str:
    pts = [(x(pt["x"]), y(v)) for pt in curve if (v := _num(pt.get(key))) is not None]
    return " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)


def _scales(x0: float, x1: float, left: float, right: float, top: float, bottom: float):
    span = (x1 - x0) or 1.0

    def x(v: float) -> float:
        return left + (v - x0) / span * (right - left)

    def y(v: float) -> float:
        return bottom - min(max(v, 0.0), 1.0) * (bottom - top)

    return x, y


def sparkline(curve: Curve, gold: Curve | None, preferred: list[str],
              width: int = 96, height: int = 26) -> str:
    """A tiny probe curve (y in [0, 1]) with the gold standard's curve in grey and the 0.5 line."""
    key = primary_series(curve, preferred)
    if key is None:
        return ""
    xs = [pt["x"] for pt in curve + (gold or [])]
    x, y = _scales(min(xs), max(xs), 2, width - 2, 2, height - 2)
    parts = [f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="curve: {escape(key)}">',
             f'<line class="half" x1="2" y1="{y(0.5):.1f}" x2="{width - 2}" y2="{y(0.5):.1f}"/>']
    if gold and _points(gold, key, x, y):
        parts.append(f'<polyline class="gold" points="{_points(gold, key, x, y)}"/>')
    parts.append(f'<polyline class="method" points="{_points(curve, key, x, y)}"/>')
    parts.append("</svg>")
    return "".join(parts)


def curve_plot(curve: Curve, gold: Curve | None, series: list[dict], grid: list[float],
               markers: dict[str, float | None], width: int = 520, height: int = 300, axis_label: str = "ψ") -> str:
    """A probe's full curve: every series of ``series`` (schema ``curve.series``) for the method,
    the same in grey for the gold standard, and vertical markers at the recovery points."""
    left, right, top, bottom = 44, width - 12, 12, height - 64
    xs = [pt["x"] for pt in curve + (gold or [])] + list(grid)
    if not xs:
        return ""
    x, y = _scales(min(0.0, min(xs)), max(max(xs), 1e-9), left, right, top, bottom)
    out = [f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{escape(axis_label)} curve">',
           f'<rect class="frame" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/>']
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        cls = "half" if v == 0.5 else "grid"
        out.append(f'<line class="{cls}" x1="{left}" y1="{y(v):.1f}" x2="{right}" y2="{y(v):.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    last = -1e9
    for v in sorted(set(grid or [pt["x"] for pt in curve])):
        if x(v) - last >= 26:  # skip labels that would overlap on a dense grid
            out.append(f'<text class="tick" x="{x(v):.1f}" y="{bottom + 16}" text-anchor="middle">{v:g}</text>')
            last = x(v)
    out.append(f'<text class="axis" x="{(left + right) / 2:.1f}" y="{bottom + 32}" text-anchor="middle">{escape(axis_label)}</text>')
    for who, data in (("gold", gold or []), ("method", curve)):
        for s in series:
            pts = _points(data, s["key"], x, y)
            if pts:
                out.append(f'<polyline class="{who} {escape(s["style"])}" points="{pts}"/>')
    for who, v in markers.items():
        if v is not None:
            out.append(f'<line class="marker {escape(who)}" x1="{x(v):.1f}" y1="{top}" x2="{x(v):.1f}" y2="{bottom}"/>')
    out.append(_legend(curve, gold, series, left, bottom + 50))
    out.append("</svg>")
    return "".join(out)


def _legend(curve: Curve, gold: Curve | None, series: list[dict], left: float, top: float) -> str:
    items, xpos = [], left
    for s in series:
        if primary_series(curve, [s["key"]]) is None:
            continue
        items.append(f'<line class="method {escape(s["style"])}" x1="{xpos}" y1="{top - 4}" x2="{xpos + 18}" y2="{top - 4}"/>'
                     f'<text class="legend" x="{xpos + 22}" y="{top}">{escape(s["display"])}</text>')
        xpos += 30 + 6.2 * len(s["display"])
    if gold:
        items.append(f'<line class="gold solid" x1="{xpos}" y1="{top - 4}" x2="{xpos + 18}" y2="{top - 4}"/>'
                     f'<text class="legend" x="{xpos + 22}" y="{top}">gold standard</text>')
    return "".join(items)
