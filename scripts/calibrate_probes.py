"""Calibrate a probe's Shapes defaults: run it at each grid setting on the reference rows and a few
methods, and pick the setting by a rule fixed before looking at the numbers.

    python scripts/calibrate_probes.py --probe inversion --grid lr=0.001,0.005,0.02 \\
        --methods noop retrain esd_x uce --concepts star red --threads 2

Every run is an ordinary job (``python -m bench … probes=[<probe>] probes.<probe>.<key>=<value>``,
eval=quick with one retain prompt: the probes run on forget prompts only) under
``runs/calibration/``; re-running reuses finished stages. The rule: a setting is *eligible* when θ
(noop) recovers at the axis' first value on every concept and the gold standard does not recover
before the first third of the axis on any concept (a probe that teaches a never-knew model the
concept at once cannot tell removal from concealment); the default is the strongest eligible
setting (the last in grid order, which is ordered weakest → strongest). Writes a Markdown table
and the choice to ``docs/calibration/probes-<probe>.md``. ``--records <folder>`` instead judges the current
defaults on finished records (no jobs run) and writes ``docs/calibration/probes-<probe>-check.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "calibration"
sys.path.insert(0, str(ROOT))
from bench.cpuload import record_busy  # noqa: E402  (torch-free)
from bench.recordspec import timed_whole  # noqa: E402  (torch-free)


def run_job(method: str, concept: str, probe: str, key: str | None, value: str | None, threads: int) -> dict:
    args = [sys.executable, "-m", "bench", f"method={method}", f"concept={concept}", f"probes=[{probe}]",
            "eval.max_retain_prompts=1", "logger=none", f"threads={threads}", f"out_dir={OUT}", f"cache_dir={ROOT / '.cache/concealbench'}"]
    if key is not None:
        args.append(f"probes.{probe}.{key}={value}")
    t = time.time()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{method}/{concept} {key}={value} failed:\n{r.stderr[-3000:]}")
    path = Path(r.stdout.strip().splitlines()[-2].split("record:", 1)[1].strip())
    return {**row_of(path, probe), "value": value, "seconds": time.time() - t}


def row_of(path: Path, probe: str) -> dict:
    rec = json.loads(path.read_text())
    block = rec["probes"][probe]
    return {"method": rec["method"]["name"], "concept": rec["concept"]["name"], "value": None,
            "probe_seconds": block["cost"]["seconds"] if timed_whole(rec, probe) and not record_busy(rec, probe) else None, "recover": block["metrics"]["recover"], "axis": block["axis"]["values"],
            "curve": [pt.get("detection") for pt in block["curve"]], "erasure": rec["metrics"]["erasure"]["value"], "record": str(path),
            "metrics": rec["metrics"], "block": block}


def judge(rows: list[dict], probe: str) -> None:
    """Give each method row (not noop, not retrain) the leaderboard's verdict at this setting, against the
    gold row of its concept in the same screen (``bench.verdict.judge_forget``, the thresholds in
    leaderboard/schema.json): what a setting would change on the board, not only on the references.
    Judged at once, because the next setting's job writes over the same record."""
    from bench.verdict import judge_forget, thresholds

    th, gold = thresholds(), {r["concept"]: r for r in rows if r["method"] == "retrain"}
    for r in rows:
        if r["method"] not in ("noop", "retrain") and r["concept"] in gold:
            r["verdict"] = judge_forget(r["metrics"], r["block"], gold[r["concept"]]["block"], probe, th)


def default_settings(probe: str) -> dict:
    """The probe's settings at its current Shapes defaults (eval=quick), as its protocol records them."""
    from hydra import compose, initialize_config_dir

    from bench.probes import build_probes

    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[f"probes=[{probe}]"])
    return build_probes(cfg.probes)[0].describe()


def from_records(folder: Path, probe: str, methods: list[str], concepts: list[str]) -> list[dict]:
    """The seed-0 rows of ``methods`` × ``concepts`` that ran ``probe`` at its current defaults, from finished records."""
    rows, want = {}, default_settings(probe)
    for path in sorted(folder.rglob("record.json")):
        rec = json.loads(path.read_text())
        if rec.get("seed") != 0 or probe not in (rec.get("probes") or {}):
            continue
        got = rec["probes"][probe]["protocol"].get("probe") or {k: rec["probes"][probe]["protocol"].get(k) for k in want}
        if {k: got.get(k) for k in want} != want:
            continue
        m, c = rec["method"]["name"], rec["concept"]["name"]
        if m in methods and c in concepts:
            rows[(m, c)] = row_of(path, probe)
    missing = [f"{m}/{c}" for c in concepts for m in methods if (m, c) not in rows]
    if missing:
        raise SystemExit(f"no seed-0 record with the {probe} probe under {folder} for: {', '.join(missing)}")
    return [rows[(m, c)] for c in concepts for m in methods]


def _fmt(m: dict) -> str:
    v, ci = m.get("value"), m.get("ci") or [None, None]
    if v is None:
        return "never"
    lo = "—" if ci[0] is None else f"{ci[0]:.3g}"
    hi = "never" if ci[1] is None else f"{ci[1]:.3g}"
    return f"{v:.3g} [{lo}, {hi}]"


def _cell(r: dict) -> str:
    """The recovery point; for "never", the share of bootstrap replicates that do recover on the axis (what keeps
    a censored gold from supporting "removed"); then the verdict, for a judged method row."""
    cell, reps = _fmt(r["recover"]), r["recover"].get("replicates")
    if r["recover"].get("value") is None and reps:
        cell += f" ({sum(x is not None for x in reps) / len(reps):.1%} of replicates recover)"
    v = r.get("verdict")
    return cell if v is None else f"{cell} — {v.brief()}"


def eligible(rows: list[dict]) -> tuple[bool, str]:
    why = []
    for r in rows:
        axis, rec = r["axis"], r["recover"].get("value")
        if r["method"] == "noop" and (rec is None or rec > axis[0]):
            why.append(f"θ does not recover at {axis[0]:g} on {r['concept']}")
        third = axis[0] + (axis[-1] - axis[0]) / 3
        if r["method"] == "retrain" and rec is not None and rec < third:
            why.append(f"the gold recovers at {rec:.3g} < {third:.3g} on {r['concept']}")
    return not why, "; ".join(why) or "eligible"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", required=True)
    p.add_argument("--grid", default=None, help="key=v1,v2,… (weakest first); none = the probe's defaults only")
    p.add_argument("--methods", nargs="+", default=["noop", "retrain", "esd_x", "uce"])
    p.add_argument("--concepts", nargs="+", default=["star", "red"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--records", type=Path, default=None, help="judge the defaults from finished records under this folder instead of running jobs")
    p.add_argument("--out", type=Path, default=None,
                   help="where the Markdown goes (default docs/calibration/probes-<probe>.md, or probes-<probe>-check.md with --records)")
    a = p.parse_args()
    if a.records is not None and a.grid:
        p.error("--records judges the current defaults only; it takes no --grid")
    key, values = (a.grid.split("=", 1)[0], a.grid.split("=", 1)[1].split(",")) if a.grid else (None, [None])
    table, choice, chosen = [], None, False
    for v in values:
        rows = (from_records(a.records, a.probe, a.methods, a.concepts) if a.records is not None
                else [run_job(m, c, a.probe, key, v, a.threads) for c in a.concepts for m in a.methods])
        ok, why = eligible(rows)
        judge(rows, a.probe)
        table.append((v, rows, ok, why))
        print(f"{f'{key}={v}' if key else 'defaults'}: {why}", file=sys.stderr)
        if ok:
            choice, chosen = v, True
    lines = [f"# Calibration of the `{a.probe}` probe (Shapes)", "",
             f"Command: `python scripts/calibrate_probes.py --probe {a.probe}" + (f" --grid {a.grid}" if a.grid else "")
             + (f" --records {a.records}" if a.records is not None else "")
             + f" --methods {' '.join(a.methods)} --concepts {' '.join(a.concepts)}"
             + ("" if a.records is not None else f" --threads {a.threads}") + (f" --out {a.out}" if a.out else "") + "`", "",
             "Rule (fixed before the runs): θ (noop) must recover at the axis' first value on every concept, and the gold standard "
             "must not recover before the first third of the axis on any concept; the default is the strongest eligible setting.", "",
             "Recovery point [95% CI] per method and concept (eval=quick forget prompts, seed 0; detection ≥ 0.5) — for a method row "
             "with its concept's gold in the screen, then the leaderboard's verdict at that setting and its probability — and the probe's own wall "
             + (f"time ({a.threads} torch thread{'s' if a.threads > 1 else ''}, a time measured beside other work is left out; records older than that measurement cannot say)." if a.records is None
                else "time as each record ran it (its `cost`; 1 or 2 torch threads; a time measured beside other work is left out, records older than that measurement cannot say)."), ""]
    heads = ["setting", *[f"{m} / {c}" for c in a.concepts for m in a.methods], "probe time (median of rows run, not reused)", "eligible"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for v, rows, ok, why in table:
        times = sorted(r["probe_seconds"] for r in rows if r["probe_seconds"] is not None)
        took = f"{times[len(times) // 2]:.0f} s" if times else "— (stages reused, or run beside other work)"
        lines.append(f"| {key}={v} | " if key else "| defaults | ")
        lines[-1] += " | ".join(_cell(r) for r in rows) + f" | {took} | {'yes' if ok else 'no: ' + why} |"
    if a.records is not None:
        verdict = "the defaults pass the rule" if chosen else f"the defaults fail the rule ({table[0][3]}); they are kept and the failure is reported"
    else:
        verdict = (f"{key}={choice}" if key else "the defaults stand") if chosen else "none eligible: no setting on this grid passes the rule; this screen changes no default, and the failure is reported"
    lines += ["", f"**Choice:** {verdict}.", "",
              "Detection curves (forget-prompt mean) along the axis:", ""]
    for v, rows, _, _ in table:
        for r in rows:
            lines.append(f"- {f'{key}={v} ' if key else ''}{r['method']}/{r['concept']}: " + ", ".join(f"{x:g}→{d:.2f}" for x, d in zip(r["axis"], r["curve"], strict=False) if d is not None))
    # a grid screen writes probes-<probe>.md; a check of the defaults on finished records writes beside it
    out = a.out or ROOT / "docs" / "calibration" / (f"probes-{a.probe}.md" if a.records is None else f"probes-{a.probe}-check.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
