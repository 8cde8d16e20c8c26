"""``python -m bench.sweep_report <multirun dir>``: table + plot of a hyperparameter sweep.

Reads every job's ``result.json`` (written by ``bench.run`` into its Hydra job directory), loads
the records, and writes ``sweep_report.md``, ``sweep_report.csv``, ``sweep_report.png`` (metric
against metric) and ``sweep_hparams.png`` (each swept hyperparameter against the metrics) into the
sweep directory: each configuration's erasure, retention, CCS and CRS, the Pareto front over
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


def metric(record: dict, name: str) -> float | None:
    """A metric's value from a record: forget-prompt ``metrics`` first, then the ``retain`` block."""
    m, r = record.get("metrics") or {}, record.get("retain") or {}
    return (m.get(name) or r.get(name) or {}).get("value")


def read_result(job_dir: Path) -> tuple[dict, dict | None]:
    """The ``result.json`` pointer ``bench.run`` leaves in a Hydra job directory, and the record
    it points to (None when the record is missing or unreadable)."""
    info = json.loads((job_dir / "result.json").read_text())
    try:
        return info, json.loads(Path(info["record"]).read_text())
    except (OSError, ValueError):
        return info, None


def search_value(record: dict | None) -> float:
    """The value the Optuna search maximises: ``objective`` where the retention floor holds; below
    it, −1 minus the retention shortfall (worse than any feasible point, ≥ −1, but still ordered so
    the sampler is steered back towards retention); −2 for a failed or missing job."""
    if not record or record.get("status") != "ok":
        return -2.0
    row = {k: metric(record, k) for k in ("erasure", "retention", "crs")}
    value = objective(row)
    if value is not None:
        return float(value)
    if row["retention"] is None or row["erasure"] is None:
        return -2.0
    return -1.0 - max(0.0, RETENTION_FLOOR - row["retention"])


def default_params(method: str, model: str) -> dict | None:
    """The hyperparameters a plain ``python -m bench method=<method> model=<model>`` would use."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    try:
        with initialize_config_dir(version_base=None, config_dir=str(conf)):
            cfg = compose(config_name="config", overrides=[f"method={method}", f"model={model}", "logger=none"])
    except Exception:  # noqa: BLE001 — a method or model this checkout does not have
        return None
    return OmegaConf.to_container(cfg.method.params, resolve=True)


def _hparams(overrides: list[str]) -> dict[str, str]:
    return {o.split("=", 1)[0].removeprefix("method.params."): o.split("=", 1)[1] for o in overrides if o.startswith("method.params.") and "=" in o}


def load_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for res in sorted(sweep_dir.glob("*/result.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        info, rec = read_result(res.parent)
        rec = rec or {}
        row = {"job": res.parent.name, "overrides": " ".join(o for o in info["overrides"] if "params" in o or o.startswith("method=")),
               "status": rec.get("status", info["status"]), "record": info["record"], "hparams": _hparams(info["overrides"]),
               "params": (rec.get("method") or {}).get("params"), "method": (rec.get("method") or {}).get("name"),
               "model": (rec.get("model") or {}).get("name")}
        for k in COLUMNS:
            row[k] = metric(rec, k)
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
    defaults = {}
    for r in rows:
        key = (r["method"], r["model"])
        if r["params"] is not None and None not in key and key not in defaults:
            defaults[key] = default_params(*key)
    current = [r for r in rows if r["params"] is not None and r["params"] == defaults.get((r["method"], r["model"]))]
    if current:
        lines.append(f"**Current default** (conf/method + conf/method_model for {current[0]['model']}): job {current[0]['job']}"
                     + (" — the sweep agrees with it." if chosen and chosen["job"] == current[0]["job"] else
                        f" (objective {_fmt(current[0]['objective'])})."))
    else:
        lines.append("**Current default:** not among the sweep's points.")
    (sweep_dir / "sweep_report.md").write_text("\n".join(lines) + "\n")
    with open(sweep_dir / "sweep_report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "overrides", "status", *COLUMNS, "objective", "seconds", "record"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
    _plot(rows, front, chosen, sweep_dir / "sweep_report.png")
    _plot_hparams(rows, chosen, sweep_dir / "sweep_hparams.png")
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


def _plot_hparams(rows: list[dict], chosen: dict | None, path: Path) -> None:
    """One row per swept hyperparameter: its value against erasure, retention, CCS and CRS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    names = sorted({k for r in ok for k in r["hparams"] if len({x["hparams"].get(k) for x in ok}) > 1})
    if not names:
        return
    metrics = ("erasure", "retention", "ccs", "crs")
    fig, axes = plt.subplots(len(names), len(metrics), figsize=(3.2 * len(metrics), 2.6 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        values = sorted({r["hparams"].get(name) for r in ok}, key=lambda v: (_num(v) is None, _num(v) or 0, str(v)))
        numeric = all(_num(v) is not None for v in values)
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            for r in ok:
                if r[m] is None:
                    continue
                v = r["hparams"].get(name)
                x = _num(v) if numeric else values.index(v)
                ax.scatter(x, r[m], s=40 if r is chosen else 22, c="C3" if r is chosen else "C0", alpha=0.8)
            if numeric:
                lo, hi = _num(values[0]), _num(values[-1])
                if lo > 0 and hi / lo >= 20:
                    ax.set_xscale("log")
            else:
                ax.set_xticks(range(len(values)), [str(v) for v in values], fontsize=7)
            ax.set(xlabel=name, title=m if i == 0 else "")
            ax.grid(alpha=0.3)
    fig.suptitle("hyperparameters against the metrics (red = chosen)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


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
