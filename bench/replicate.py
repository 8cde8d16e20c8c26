"""``make replicate METHOD=… CONCEPT=… SEEDS=3``: the same job under several seeds, and how stable it is.

``seed`` moves every random choice of the evaluation (the λ_O/λ_U seeds, every probe's seeds,
the classifier, the bootstraps) and the method's training, so replicates are independent runs of
the whole protocol. ``python -m bench.replicate seeds N`` checks N and prints the seed list
(``0,1,…,N−1``) for the Hydra multirun; ``python -m bench.replicate report <sweep dir>`` reads each
replicate's record (the ``result.json`` pointers the jobs leave) and writes ``stability.md`` and
``stability.json`` beside them: each metric's value per seed with its spread, and per probe
whether the verdict (judged against the gold standard of the same seed) holds in every replicate —
the rule the leaderboard applies to a replicated row (disagreeing seeds → inconclusive).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import verdict as V

METRICS = (("metrics", "erasure"), ("metrics", "specificity"), ("retain", "retention"))
PROBE_METRICS = ("recover", "ccs", "crs")


def seeds_list(text: str) -> str:
    """``"3"`` → ``"0,1,2"``; anything but an integer ≥ 2 is one clear error (exit 2)."""
    try:
        n = int(str(text).strip())
    except ValueError:
        n = None
    if n is None or str(n) != str(text).strip() or n < 2:
        raise ValueError(f"`SEEDS` must be an integer >= 2 (replicates need at least two seeds), got {text!r}")
    return ",".join(str(s) for s in range(n))


def _records(sweep_dir: Path) -> list[tuple[dict, Path]]:
    from bench.sweep_report import read_result

    out = []
    for res in sorted(Path(sweep_dir).glob("*/result.json")):
        try:
            _, rec = read_result(res.parent)
        except (OSError, ValueError, KeyError):
            continue
        if rec and rec.get("status") == "ok":
            out.append((rec, Path(json.loads(res.read_text())["record"])))
    return out


def _spread(values: list[float | None]) -> dict[str, Any]:
    nums = [v for v in values if v is not None]
    if not nums:
        return {"values": values, "mean": None, "min": None, "max": None, "sd": None}
    return {"values": values, "mean": float(np.mean(nums)), "min": float(min(nums)), "max": float(max(nums)),
            "sd": float(np.std(nums, ddof=1)) if len(nums) > 1 else 0.0}


def stability(records: list[tuple[dict, Path]]) -> dict[str, Any]:
    """Spread of each metric and the per-probe verdicts over the replicates of one job."""
    from bench.run import find_gold

    th = V.thresholds()
    records = sorted(records, key=lambda rp: rp[0]["seed"])
    seeds = [r["seed"] for r, _ in records]
    out: dict[str, Any] = {"seeds": seeds, "job_keys": [r["job_key"] for r, _ in records], "metrics": {}, "probes": {}}
    for block, name in METRICS:
        out["metrics"][name] = _spread([(r.get(block) or {}).get(name, {}).get("value") for r, _ in records])
    probes = sorted({p for r, _ in records for p in r.get("probes") or {}})
    for probe in probes:
        entry: dict[str, Any] = {"metrics": {}, "verdicts": []}
        for name in PROBE_METRICS:
            entry["metrics"][name] = _spread([((r["probes"].get(probe) or {}).get("metrics") or {}).get(name, {}).get("value")
                                              for r, _ in records])
        verdicts = []
        for rec, path in records:
            block = rec["probes"].get(probe)
            if block is None:
                continue
            if rec["method"].get("reference") == "gold":
                gold = block
            else:
                out_dir = path.parents[4]  # <out_dir>/<model>/<concept>/<method>/<key>/record.json
                g = find_gold(out_dir, rec["model"]["name"], rec["concept"]["name"], rec["seed"], probe, block["protocol"]["hash"])
                gold = g["record"]["probes"][probe] if g else None
            v = V.judge_forget(rec["metrics"], block, gold, probe, th)
            verdicts.append(v)
            entry["verdicts"].append({"seed": rec["seed"], **v.to_dict()})
        combined = V.combine(verdicts)
        entry["combined"] = combined.to_dict()
        entry["holds_in_every_replicate"] = len({v.key for v in verdicts}) == 1
        out["probes"][probe] = entry
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def markdown(rec: dict, st: dict) -> str:
    m = rec["method"]
    lines = [f"# Stability: {m.get('display') or m['name']} on {rec['concept']['name']} ({rec['model']['name']}, eval={rec['protocol'].get('eval')})",
             "", f"Seeds {', '.join(map(str, st['seeds']))} — each a full, independent run of the protocol (reference images, "
             "probe seeds, classifier and the method's own training all move with the seed).", "",
             "| metric | " + " | ".join(f"seed {s}" for s in st["seeds"]) + " | mean | spread (min–max) | sd |",
             "|---|" + "---:|" * (len(st["seeds"]) + 3)]
    rows = [(name, sp) for name, sp in st["metrics"].items()]
    for probe, e in st["probes"].items():
        rows += [(f"{probe}: {name}", sp) for name, sp in e["metrics"].items()]
    for name, sp in rows:
        spread = "—" if sp["min"] is None else f"{sp['min']:.3f}–{sp['max']:.3f}"
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in sp["values"]) + f" | {_fmt(sp['mean'])} | {spread} | {_fmt(sp['sd'])} |")
    lines += ["", "| probe | " + " | ".join(f"seed {s}" for s in st["seeds"]) + " | combined | holds in every replicate |",
              "|---|" + "---|" * (len(st["seeds"]) + 2)]
    for probe, e in st["probes"].items():
        cells = [f"{v['key']}" + (f" ({V.probability_text(v)})" if v["probability"] is not None else "") for v in e["verdicts"]]
        c = e["combined"]
        named = f"P({c['event']})" if c["key"] == "inconclusive" and c.get("event") else "P"  # the smallest over the seeds
        lines.append(f"| {probe} | " + " | ".join(cells) + f" | {c['key']}" + (f" ({named} ≥ {V.format_p(c['probability'])})" if c["probability"] is not None else "")
                     + f" | {'yes' if e['holds_in_every_replicate'] else 'no'} |")
    return "\n".join(lines) + "\n"


def report(sweep_dir: Path) -> int:
    records = _records(sweep_dir)
    if len(records) < 2:
        print(f"error: `{sweep_dir}` holds {len(records)} finished replicate(s); a stability report needs at least 2", file=sys.stderr)
        return 2
    keys = {(r["model"]["name"], r["concept"]["name"], r["method"]["name"], r["protocol"]["hash"],
             json.dumps(r["method"].get("params"), sort_keys=True)) for r, _ in records}
    if len(keys) != 1:
        print(f"error: `{sweep_dir}` mixes {len(keys)} different jobs; a replicate sweep varies only `seed`", file=sys.stderr)
        return 2
    st = stability(records)
    from bench.record import write_json

    write_json(Path(sweep_dir) / "stability.json", st)
    text = markdown(records[0][0], st)
    tmp = Path(sweep_dir) / ".stability.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(Path(sweep_dir) / "stability.md")
    print(text)
    print(f"wrote {Path(sweep_dir) / 'stability.md'} and stability.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seeds", help="check SEEDS and print the seed list 0,1,…,N−1")
    s.add_argument("n")
    r = sub.add_parser("report", help="stability report of a replicate sweep")
    r.add_argument("sweep_dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "seeds":
        try:
            print(seeds_list(args.n))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return report(args.sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
