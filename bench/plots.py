"""Figures written next to a record: ψ-curves (in the style of the paper's) and image grids."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SERIES = (("detection", "concept detection", "C3"), ("p_original", "classifier P(original)", "C0"),
          ("retrieval", "retrieval rate (CRS)", "C1"), ("specificity", "specificity (other factors kept)", "C2"))


def probe_curve_plot(curve: Sequence[dict], path: Path, title: str, xlabel: str, gold: Sequence[dict] | None = None,
                     recover: dict | None = None, gold_recover: dict | None = None) -> None:
    """A probe's recovery curve on the forget prompts: concept detection, P(original), retrieval
    and specificity against the probe's axis, with the gold standard's curves dashed and both
    recovery points (with their 95% intervals) marked where detection crosses 0.5."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    xs = [r["x"] for r in curve]
    for key, label, colour in SERIES:
        ys = [r.get(key) for r in curve]
        if any(y is not None for y in ys):  # detection (what the recovery point is read from) on top
            top = key == "detection"
            ax.plot(xs, [np.nan if y is None else y for y in ys], "o-", ms=4 if top else 3, lw=2.2 if top else 1.2,
                    color=colour, label=label, zorder=5 if top else 3)
        if gold:
            gy = [r.get(key) for r in gold]
            if any(y is not None for y in gy) and key in ("detection", "p_original"):
                ax.plot([r["x"] for r in gold], [np.nan if y is None else y for y in gy], "--", color=colour, alpha=0.6,
                        label=f"{label}, gold standard")
    for rec, colour, who in ((recover, "C3", "recovers"), (gold_recover, "grey", "gold recovers")):
        if isinstance(rec, dict) and rec.get("value") is not None:
            ci = rec.get("ci") or [None, None]
            lo = ci[0] if ci[0] is not None else rec["value"]
            hi = ci[1] if ci[1] is not None else max(xs)
            ax.axvspan(lo, hi, color=colour, alpha=0.12, lw=0)
            ax.axvline(rec["value"], color=colour, lw=1, ls="-." if who.startswith("gold") else "-",
                       label=f"{who} at {rec['value']:.3g} [{lo:.3g}, {'never' if ci[1] is None else f'{hi:.3g}'}]")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel=xlabel, ylabel="rate", ylim=(-0.02, 1.02), title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_quantized(fig, path, dpi=100)
    plt.close(fig)


def image_grid(rows: Sequence[np.ndarray], path: Path, row_labels: Sequence[str] | None = None, title: str | None = None, max_cols: int = 8) -> None:
    """One row of images per entry of ``rows`` (uint8 NHWC), labelled on the left."""
    plt = _plt()
    rows = [r[:max_cols] for r in rows]
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=1)
    h, w = rows[0].shape[1:3] if n_rows else (32, 32)
    scale = max(0.5, 0.65 * min(h, 64) / 32)  # 32-px images at ~2× (they are copied into every published record)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * scale * 0.9 + 1.2, n_rows * scale * 0.9 + 0.4), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(r[j], interpolation="nearest")
        if row_labels:
            axes[i][0].text(-0.08, 0.5, _wrap(row_labels[i]), transform=axes[i][0].transAxes, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    # Room on the left for the labels (forget and retain rows must be told apart): inches, not a fraction.
    label_in = 2.3 if row_labels else 0.05
    width = fig.get_figwidth() + label_in
    fig.set_figwidth(width)
    fig.subplots_adjust(left=label_in / width, right=0.99, top=0.92 if title else 0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_quantized(fig, path, dpi=100)
    plt.close(fig)


def _wrap(label: str, width: int = 34) -> str:
    """Break a long row label at spaces so it fits the margin (never cut)."""
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def _save_quantized(fig, path: Path, dpi: int) -> None:
    """PNG with a 256-colour palette: grids of small generations lose nothing visible and shrink
    ~2.5× (they are copied into every published record and the leaderboard site)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.open(buf).convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
