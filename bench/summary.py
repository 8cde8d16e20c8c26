"""The end of a job, as a user sees it: what it found, last on screen (stdout).

The verdict per probe with the gold standard's recovery point beside it, the key metrics with their
95% intervals, what a resumed job reused, and where the record and the figures are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import verdict as V
from bench.cpuload import record_busy


def _num(m: dict | None, digits: int = 2) -> str:
    if not isinstance(m, dict) or m.get("value") is None:
        return "—"
    ci = m.get("ci")
    if isinstance(ci, list) and len(ci) == 2:
        lo = "—" if ci[0] is None else f"{ci[0]:.{digits}f}"
        hi = "never" if ci[1] is None else f"{ci[1]:.{digits}f}"
        return f"{m['value']:.{digits}f} [{lo}, {hi}]"
    return f"{m['value']:.{digits}f}"


def _recovery(m: dict | None, axis: dict) -> str:
    if not isinstance(m, dict):
        return "—"
    if m.get("value") is None:
        return f"never within {axis.get('unit') or axis['name']} ≤ {max(axis['values']):g}"
    text = f"{axis.get('unit') or axis['name']} {_num(m)}"
    steps = axis.get("steps")
    if steps and m.get("value") is not None:
        import numpy as np

        text += f" (sampler step {np.interp(m['value'], axis['values'], steps):.1f})"
    return text


def verdicts(record: dict, golds: dict[str, dict | None], th: dict | None = None) -> dict[str, V.Verdict]:
    """Forget verdict per probe (gold blocks by probe name) and the retain verdict under ``"retain"``."""
    th = th or V.thresholds()
    out = {name: V.judge_forget(record["metrics"], block, golds.get(name), name, th)
           for name, block in (record.get("probes") or {}).items()}
    out["retain"] = V.judge_retain(record.get("retain") or {}, th)
    return out


def summary_lines(record: dict, rec_path: Path, golds: dict[str, dict | None]) -> list[str]:
    m, r = record.get("metrics") or {}, record.get("retain") or {}
    method = record["method"].get("display") or record["method"]["name"]
    ref = record["method"].get("reference")
    head = f"{method} on '{record['concept']['name']}' ({record['model']['name']}, eval={record['protocol'].get('eval')}, seed {record['seed']})"
    lines = ["", f"ConcealBench — {head}" + (f"  [reference row: {ref}]" if ref else ""),
             f"  erasure {_num(m.get('erasure'))}   specificity {_num(m.get('specificity'))}   retention {_num(r.get('retention'))}"
             "   (95% intervals: prompts, then seeds)"]
    try:
        th = V.thresholds()
        vs = verdicts(record, golds, th)
        note = V.off_domain_note(record, th)
        if note:
            lines.append(f"  WARNING: {note}")
    except V.ThresholdError as e:
        vs = {}
        lines.append(f"  verdicts unavailable: {e}")
    for name, block in (record.get("probes") or {}).items():
        ax, gold = block["axis"], golds.get(name)
        gold_txt = _recovery(gold["metrics"].get("recover"), ax) if gold else "no gold-standard record for this seed"
        lines.append(f"  {block.get('display') or name}: recovers at {_recovery(block['metrics'].get('recover'), ax)}; gold standard: {gold_txt}")
        v = vs.get(name)
        if v is not None:
            p = f"  {V.probability_text(v.to_dict())}" if v.probability is not None else ""
            lines.append(f"      verdict: {v.key.replace('_', ' ').upper()}{p} — {v.detail}")
        ccs, crs = block["metrics"].get("ccs"), block["metrics"].get("crs")
        if ccs or crs:
            lines.append(f"      CCS {_num(ccs, 3)}   CRS {_num(crs, 3)}")
    if "retain" in vs:
        v = vs["retain"]
        p = f"  {V.probability_text(v.to_dict())}" if v.probability is not None else ""
        lines.append(f"  retain prompts: {v.key.upper()}{p}")
    if record.get("resumed"):
        lines.append("  resumed: reused " + ", ".join(f"{k} ×{n}" for k, n in record["resumed"].items()))
    cost = record.get("cost") or {}
    if cost.get("total_seconds") is not None:
        took = f"  took {cost['total_seconds']:.0f} s (method {float((cost.get('unlearn') or {}).get('seconds') or 0):.0f} s)"
        if record_busy(record):
            took += f" — beside other work ({cost['others_cpus']:.1f} of {cost['cpus']} CPUs busy with other processes): not a cost to quote"
        lines.append(took)
    lines.append(f"  record:  {rec_path}")
    figs = [str(rec_path.parent / f) for k, f in sorted((record.get("artifacts") or {}).items()) if k.startswith("curve_")]
    if figs:
        lines.append("  figures: " + ", ".join(figs) + " (and grid_*.png)")
    return lines


def print_summary(record: dict, rec_path: Path, job: Any) -> None:
    golds = {}
    for name, block in (record.get("probes") or {}).items():
        g = job.gold(name, block["protocol"]["hash"]) if job is not None else None
        golds[name] = g["record"]["probes"][name] if g else (block if record["method"].get("reference") == "gold" else None)
    print("\n".join(summary_lines(record, rec_path, golds)), flush=True)
