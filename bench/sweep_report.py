"""``python -m bench.sweep_report <multirun dir>``: table + plot of a hyperparameter sweep.

Reads every job's ``result.json`` (written by ``bench.run`` into its Hydra job directory), loads
the records, and writes ``sweep_report.md``, ``sweep_report.csv`` and ``sweep_report.png`` into
the sweep directory: each configuration's erasure, retention, CCS and CRS, the Pareto front over
(erasure ↑, retention ↑, CRS ↓), and the configuration chosen by the declared objective

    objective = erasure − max(0, 2·(crs − 0.5))     subject to retention ≥ 0.8

i.e. erase at the prompt level, pay for whatever the attack retrieves beyond chance (CRS above
0.5), and never accept collateral damage beyond 20%.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

RETENTION_FLOOR = 0.8
COLUMNS = ("erasure", "retention", "ccs", "crs", "crs_paper", "psi_recover")


def objective(row: dict) -> float | None:
    e, r, c = row.get("erasure"), row.get("retention"), row.get("crs")
    if e is None or c is None or r is None or r < RETENTION_FLOOR:
        return None
    return e - max(0.0, 2 * (c - 0.5))


def load_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for res in sorted(sweep_dir.glob("*/result.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        info = json.loads(res.read_text())
        rec = json.loads(Path(info["record"]).read_text()) if Path(info["record"]).exists() else {}
        row = {"job": res.parent.name, "overrides": " ".join(o for o in info["overrides"] if "params" in o or o.startswith("method=")),
               "status": rec.get("status", info["status"]), "record": info["record"]}
        m, r = rec.get("metrics") or {}, rec.get("retain") or {}
        for k in COLUMNS:
            v = (m.get(k) or r.get(k) or {}).get("value")
            row[k] = v
        row["seconds"] = (rec.get("cost") or {}).get("total_seconds")
        row["objective"] = objective(row)
        rows.append(row)
    return rows


def pareto(rows: list[dict]) -> set[str]:
    """Jobs not dominated on (erasure ↑, retention ↑, crs ↓)."""
    ok = [r for r in rows if r["status"] == "ok" and None not in (r["erasure"], r["retention"], r["crs"])]
    front = set()
    for a in ok:
        dominated = any(
            b is not a and b["erasure"] >= a["erasure"] and b["retention"] >= a["retention"] and b["crs"] <= a["crs"]
            and (b["erasure"] > a["erasure"] or b["retention"] > a["retention"] or b["crs"] < a["crs"])
            for b in ok
        )
        if not dominated:
            front.add(a["job"])
    return front


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(sweep_dir: Path) -> dict:
    rows = load_rows(sweep_dir)
    if not rows:
        raise SystemExit(f"error: no job results (*/result.json) under {sweep_dir}")
    front = pareto(rows)
    scored = [r for r in rows if r["objective"] is not None]
    chosen = max(scored, key=lambda r: r["objective"]) if scored else None
    lines = [f"# Sweep report: {sweep_dir}", "",
             f"Objective: erasure − max(0, 2·(crs − 0.5)) subject to retention ≥ {RETENTION_FLOOR}. "
             "★ = Pareto front over (erasure ↑, retention ↑, crs ↓).", "",
             "| job | overrides | status | " + " | ".join(COLUMNS) + " | objective | seconds |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        star = " ★" if r["job"] in front else ""
        lines.append(f"| {r['job']}{star} | `{r['overrides']}` | {r['status']} | " + " | ".join(_fmt(r[k]) for k in COLUMNS)
                     + f" | {_fmt(r['objective'])} | {_fmt(r['seconds'])} |")
    lines += ["", f"**Chosen configuration:** job {chosen['job']}: `{chosen['overrides']}` (objective {chosen['objective']:.3f})"
              if chosen else "**Chosen configuration:** none meets the retention floor."]
    (sweep_dir / "sweep_report.md").write_text("\n".join(lines) + "\n")
    with open(sweep_dir / "sweep_report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "overrides", "status", *COLUMNS, "objective", "seconds", "record"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
    _plot(rows, front, chosen, sweep_dir / "sweep_report.png")
    print("\n".join(lines))
    return {"rows": rows, "front": sorted(front), "chosen": chosen}


def _plot(rows: list[dict], front: set[str], chosen: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (x, y) in zip(axes, (("erasure", "retention"), ("erasure", "crs"), ("erasure", "ccs")), strict=True):
        for r in ok:
            if r[x] is None or r[y] is None:
                continue
            on = r["job"] in front
            ax.scatter(r[x], r[y], s=60 if on else 30, c="C3" if on else "C0", edgecolors="k" if chosen and r is chosen else "none", linewidths=1.5)
            ax.annotate(r["job"], (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=x, ylabel=y)
        ax.grid(alpha=0.3)
    axes[0].axhline(RETENTION_FLOOR, color="grey", ls=":", lw=1)
    fig.suptitle("sweep: red = Pareto front, black edge = chosen", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sweep_report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="a Hydra multirun directory (multirun/<date>/<time>)")
    args = p.parse_args(argv)
    d = Path(args.sweep_dir)
    if not d.is_dir():
        sys.exit(f"error: `sweep_dir` must be a directory, got {str(d)!r}")
    write_report(d)


if __name__ == "__main__":
    main()
