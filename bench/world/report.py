"""Training-report plots: loss curves and fidelity over training time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def plot_training(report_json: Path, out_png: Path) -> None:
    """Loss (smoothed) and per-factor fidelity of the EMA model against training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(Path(report_json).read_text())
    log = rep["log"]
    t = np.array([e["t"] for e in log]) / 60
    loss = np.array([e["loss"] for e in log])
    k = min(50, len(loss))
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if k else loss
    threads = (rep.get("config") or {}).get("threads")
    xlabel = f"training minutes ({threads} torch thread{'s' if threads != 1 else ''})" if threads else "training minutes"
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(t[k - 1 :] if k else t, smooth, lw=1.2)
    ax[0].set(xlabel=xlabel, ylabel="min-SNR loss (moving avg 50)", title=f"{rep['job']}: loss")
    ax[0].grid(alpha=0.3)
    ev = [e for e in log if "eval" in e]
    for f, c in (("shape", "C0"), ("colour", "C3"), ("texture", "C2")):
        ys = [e["eval"]["summary"].get(f) for e in ev]
        ax[1].plot([e["t"] / 60 for e in ev], ys, "o-", color=c, label=f)
    ax[1].set(xlabel=xlabel, ylabel="oracle fidelity (12 prompts × 16 seeds)", ylim=(0, 1.02), title=f"{rep['job']}: fidelity")
    ax[1].grid(alpha=0.3)
    ax[1].legend(loc="lower right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
