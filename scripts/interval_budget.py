"""How wide the gold standard's recovery interval is, where the width comes from, and what would narrow it.

    python scripts/interval_budget.py leaderboard/results/shapes                   # partial diffusion, every gold
    python scripts/interval_budget.py leaderboard/results/shapes --probe completion --prompts 12 24

Reads the published gold records (``method=retrain``) and, per gold and seed, prints:

- the recovery point and the half-width of its 95% interval as recorded (two-level bootstrap:
  prompts, then attacked seeds within each prompt);
- the half-width when only the prompts are resampled, each prompt's detection curve kept as
  observed: what is left once the seed level is taken away, so no number of attacked seeds brings
  the interval below it at this many prompts;
- the same prompt-level half-width for a design with more forget prompts (``--prompts``), drawn
  from the observed prompts — a projection that assumes new paraphrases differ from each other as
  these do;
- the half-width of the paired difference (method − gold, replicate by replicate) over the method
  rows of the same concept, seed and bootstrap design: what the verdict's probability is read from.

Statistic: the recovery point of the prompt-mean detection curve (``bench.scorers``), "never" as
+∞; half-width = (97.5th − 2.5th percentile) / 2. Prints Markdown; ``--json`` writes the numbers and
``--plot`` a figure of the prompt-level half-width against the number of forget prompts, per gold.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.metrics import psi_recover  # noqa: E402
from bench.recordspec import SCHEMA_VERSION  # noqa: E402
from bench.scorers import _percentile_ci  # noqa: E402  (the records' own interval rule)
from bench.verdict import paired  # noqa: E402


def _half_width(reps: np.ndarray, censored: bool) -> float | None:
    """Half the 95% interval of ``reps`` (NaN = never): as the records compute it, an infinite end
    (censored) or an empty set gives None."""
    ci = _percentile_ci(reps, censored=censored)
    return None if ci is None or None in ci else (ci[1] - ci[0]) / 2


def prompt_curves(record: dict, probe: str) -> tuple[list[float], np.ndarray]:
    """The probe's axis and the forget prompts' detection curves (prompts × axis values)."""
    xs = [float(x) for x in record["probes"][probe]["axis"]["values"]]
    rows = [[pt["detection"] for pt in p["probes"][probe]["curve"]]
            for p in record["prompts"] if p["class"] == "forget" and probe in (p.get("probes") or {})]
    return xs, np.asarray(rows, float)


def prompt_level_half_width(xs: list[float], curves: np.ndarray, n_prompts: int, n_boot: int = 2000,
                            seed: int = 0) -> float | None:
    """Half-width of the recovery point when ``n_prompts`` prompts are drawn (with replacement) from
    the observed curves, each curve kept as is (no seed-level resampling)."""
    if curves.ndim != 2 or len(curves) < 2:
        raise ValueError(f"need the detection curves of at least two forget prompts, got shape {curves.shape}")
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        picked = curves[rng.integers(0, len(curves), n_prompts)]
        v = psi_recover(xs, picked.mean(axis=0).tolist())
        reps.append(np.nan if v is None else v)
    return _half_width(np.array(reps), censored=True)


def paired_half_widths(gold: dict, methods: list[dict], probe: str) -> list[float]:
    """Half-width of method − gold over the bootstrap replicates, for every method record that
    shares the gold's design (same prompts, seeds and bootstrap draws) and recovers in both."""
    g = gold["probes"][probe]["metrics"]["recover"]
    out = []
    for m in methods:
        r = ((m.get("probes") or {}).get(probe) or {}).get("metrics", {}).get("recover") or {}
        if not r.get("replicates") or not paired(r, g):
            continue
        d = np.array([np.nan if a is None or b is None else a - b for a, b in zip(r["replicates"], g["replicates"], strict=True)])
        if np.isnan(d).mean() > 0.025:  # a "never" inside the interval: no finite width to report
            continue
        out.append(_half_width(d, censored=False))  # the finite differences
    return out


def budget(folder: Path, probe: str, sizes: list[int], n_boot: int) -> list[dict]:
    records = []
    for p in sorted(folder.rglob("record.json")):
        r = json.loads(p.read_text())
        if int(r.get("schema_version", 1)) == SCHEMA_VERSION and r.get("status") == "ok" and probe in (r.get("probes") or {}):
            records.append(r)
    rows = []
    for g in records:
        if g["method"]["name"] != "retrain":
            continue
        concept, seed = g["concept"]["name"], g["seed"]
        xs, curves = prompt_curves(g, probe)
        rec = g["probes"][probe]["metrics"]["recover"]
        ci = rec.get("ci") or [None, None]
        peers = [m for m in records if m["concept"]["name"] == concept and m["seed"] == seed
                 and m["method"]["name"] not in ("retrain", "noop")]
        paired = paired_half_widths(g, peers, probe)
        rows.append({
            "concept": concept, "seed": seed, "recover": rec.get("value"),
            "ci": ci, "half_width": None if None in ci else (ci[1] - ci[0]) / 2,
            "prompts": len(curves), "seeds": (rec.get("n") or {}).get("seeds"),
            "prompt_level": {str(n): prompt_level_half_width(xs, curves, n, n_boot, seed)
                             for n in [len(curves), *sizes]},
            "paired": {"rows": len(paired), "median": statistics.median(paired) if paired else None,
                       "max": max(paired) if paired else None},
        })
    rows.sort(key=lambda r: (r["concept"], r["seed"]))
    return rows


def _f(v) -> str:
    return "—" if v is None else f"±{v:.3f}"


def markdown(rows: list[dict], sizes: list[int]) -> str:
    head = ["concept", "seed", "recovery [95% CI]", "half-width (prompts, then seeds)",
            "prompts only, as run"] + [f"prompts only, {n} prompts" for n in sizes] + ["paired method − gold (median / max, rows)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = "[" + ", ".join("never" if v is None else f"{v:.2f}" for v in r["ci"]) + "]"
        val = "never" if r["recover"] is None else f"{r['recover']:.2f}"
        pl = r["prompt_level"]
        p = r["paired"]
        paired = "—" if not p["rows"] else f"{_f(p['median'])} / {_f(p['max'])} ({p['rows']})"
        out.append("| " + " | ".join([r["concept"], str(r["seed"]), f"{val} {ci}", _f(r["half_width"]),
                                      f"{_f(pl[str(r['prompts'])])} ({r['prompts']})"]
                                     + [_f(pl[str(n)]) for n in sizes] + [paired]) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, goal: float = 0.05) -> None:
    """Prompt-level half-width against forget prompts (log scale), one line per gold and seed, the
    recorded two-level half-width as a marker at the prompts run, and the goal as a line."""
    from bench.plots import _plt, _save_quantized

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    concepts = sorted({r["concept"] for r in rows})
    for r in rows:
        sizes = sorted(int(n) for n in r["prompt_level"])
        ys = [r["prompt_level"][str(n)] for n in sizes]
        colour = f"C{concepts.index(r['concept']) % 10}"  # a colour per concept, a line style per seed
        ax.plot(sizes, [np.nan if y is None else y for y in ys], marker="o", ls=("-", "--", ":")[int(r["seed"]) % 3],
                ms=3, lw=1.2, color=colour, label=f"{r['concept']} (seed {r['seed']})")
        if r["half_width"] is not None:
            ax.plot([r["prompts"]], [r["half_width"]], "x", ms=7, color=colour)
    ax.axhline(goal, color="k", ls="--", lw=1)
    ax.text(ax.get_xlim()[1], goal, f" goal ±{goal:g}", va="bottom", ha="right", fontsize=8)
    ax.set_xscale("log")
    ticks = sorted({int(n) for r in rows for n in r["prompt_level"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("forget prompts (6 = the quick protocol; more: drawn from the observed ones)")
    ax.set_ylabel("half-width of the gold's 95% interval")
    ax.set_title("Gold recovery point: prompt-level interval (×: as recorded, prompts then seeds)", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    _save_quantized(fig, path, 110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="a folder of records, e.g. leaderboard/results/shapes")
    ap.add_argument("--probe", default="partial_diffusion")
    ap.add_argument("--prompts", type=int, nargs="*", default=[12, 24, 48], help="forget-prompt counts to project")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="write the figure here (.png)")
    a = ap.parse_args(argv)
    if not a.folder.is_dir():
        print(f"interval_budget: `folder` must be a folder of records, got {str(a.folder)!r}", file=sys.stderr)
        return 2
    if any(n < 2 for n in a.prompts) or a.n_boot < 100:
        print(f"interval_budget: `--prompts` must be integers >= 2 and `--n-boot` >= 100, got {a.prompts} and {a.n_boot}",
              file=sys.stderr)
        return 2
    rows = budget(a.folder, a.probe, a.prompts, a.n_boot)
    if not rows:
        print(f"interval_budget: no gold record (method=retrain) with probe {a.probe!r} under {a.folder}", file=sys.stderr)
        return 2
    print(markdown(rows, a.prompts))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    if a.plot:
        plot(rows, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
