"""Wall time per probe and per job, from records (what every job measures about itself) or from fresh runs.

    python scripts/bench_probes.py --records leaderboard/results/shapes          # the published board
    python scripts/bench_probes.py --run --method esd_x --concept star --repeat 3  # cold jobs, one at a time

``--records`` summarises every record under a folder: per probe, the median / min / max of its
``cost.probes.<name>.seconds`` (its per-model preparation + its runs on every prompt + scoring), and
per job the wall time without the method's own unlearning, then the same per method and probe set
(the issues' "quick job's wall time per method"); only records of the current record schema made with
``--threads`` torch threads count (``env.threads``; default 2) — a first-wave record ran another
protocol, so its times would mix two jobs of different size. A resumed job (``resumed`` in its record) timed only the stages it ran:
its reused probes and its total are left out. A time measured beside other work (``others_cpus`` in the
record's ``cost`` and each probe's: CPUs that other processes kept busy meanwhile, ``bench/cpuload.py``)
is left out too and counted as "beside other work"; records older than that measurement cannot say,
are kept, and are counted as "load not measured". Each probe's time is also given over the same job's λ_U
generation (``cost.generate.seconds``: the same UNet rows on every host), a cost that does not move with
the host's speed the way seconds do (2-core hosts here differ by up to 3×). ``--run`` runs ``python -m bench … probes=all``
in a fresh output and cache folder each time (nothing reused: θ's λ_O and ψ-prefixes are computed
too) and summarises those records. Timings mean something only with nothing else on the machine.
Prints a Markdown table; ``--json`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.cpuload import record_busy  # noqa: E402  (torch-free)
from bench.recordspec import SCHEMA_VERSION, timed_whole  # noqa: E402  (torch-free)

GOAL_PROBE_S, GOAL_JOB_S = 120.0, 180.0  # the issues' goals at eval=quick on 2 cores


def _records(folder: Path, threads: int | None) -> list[dict]:
    out = []
    for p in sorted(folder.rglob("record.json")):
        r = json.loads(p.read_text())
        if r.get("status") == "failed" or (threads is not None and (r.get("env") or {}).get("threads") != threads):
            continue
        if int(r.get("schema_version", 1)) != SCHEMA_VERSION:
            continue
        out.append(r)
    return out


def _yardstick(r: dict) -> float | None:
    """Seconds this job spent generating λ_U and the detection images (the same rows on every host), if it
    ran that stage itself: a probe's seconds over it is its cost on any host (see the module doc)."""
    gen = ((r.get("cost") or {}).get("generate") or {}).get("seconds")
    return float(gen) if gen and "λ_U" not in (r.get("resumed") or {}) else None


def summarise(records: list[dict]) -> dict:
    probes: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    jobs = []
    per_method: dict[str, dict[str, list[float]]] = {}
    load = {"beside other work": 0, "load not measured": 0}  # timings (probe or job) of each kind

    def alone(r: dict, probe: str | None = None) -> bool:
        b = record_busy(r, probe)
        if b is not None:
            load["beside other work"] += b
        else:
            load["load not measured"] += 1
        return not b

    for r in records:
        c = r.get("cost") or {}
        ran = c.get("probes") or {}
        gen = _yardstick(r)
        for name, b in ran.items():
            if b.get("seconds") is not None and timed_whole(r, name) and alone(r, name):
                probes.setdefault(name, []).append(float(b["seconds"]))
                if gen:
                    ratios.setdefault(name, []).append(float(b["seconds"]) / gen)
        total = c.get("total_seconds")
        if total is not None and timed_whole(r) and alone(r):
            unlearn = float((c.get("unlearn") or {}).get("seconds") or 0.0)
            job = float(total) - unlearn
            jobs.append(job)
            key = f"{(r.get('method') or {}).get('name', '?')} | {'all' if len(ran) > 1 else ', '.join(ran) or '—'}"
            m = per_method.setdefault(key, {"job": [], "unlearn": []})
            m["job"].append(job)
            m["unlearn"].append(unlearn)

    def stats(xs: list[float]) -> dict:
        return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {"n": 0}

    return {"probes": {k: {**stats(v), "per_generate": stats(ratios.get(k, []))} for k, v in probes.items()},
            "job_without_unlearn": stats(jobs), "load": load,
            "per_method": {k: {"job_without_unlearn": stats(v["job"]), "unlearn": stats(v["unlearn"])}
                           for k, v in sorted(per_method.items())}}


def table(s: dict, where: str) -> str:
    left = s.get("load") or {}
    lines = [f"Wall seconds ({where}); goal ≤ {GOAL_PROBE_S:.0f} s per probe, ≤ {GOAL_JOB_S:.0f} s per job without unlearning.",
             f"Timings left out as run beside other work: {left.get('beside other work', 0)}; "
             f"kept without a load measurement (older records): {left.get('load not measured', 0)}.", "",
             "| stage | jobs | median | min | max | goal met (median) | × the job's λ_U generation: median (min–max) |",
             "|---|---|---|---|---|---|---|"]
    rows = [*s["probes"].items(), ("job without unlearning", s["job_without_unlearn"])]
    for name, st in rows:
        if not st.get("n"):
            continue
        goal = GOAL_JOB_S if name.startswith("job") else GOAL_PROBE_S
        g = st.get("per_generate") or {}
        ratio = f"{g['median']:.2f} ({g['min']:.2f}–{g['max']:.2f})" if g.get("n") else "—"
        lines.append(f"| {name} | {st['n']} | {st['median']:.0f} | {st['min']:.0f} | {st['max']:.0f} | {'yes' if st['median'] <= goal else 'no'} | {ratio} |")
    lines += ["", "Per method and probe set (job = wall time without the method's own unlearning):", "",
              "| method | probes | jobs | job median | job min | job max | unlearn median | job goal met (median) |",
              "|---|---|---|---|---|---|---|---|"]
    for key, st in s.get("per_method", {}).items():
        j, u = st["job_without_unlearn"], st["unlearn"]
        if j.get("n"):
            lines.append(f"| {key} | {j['n']} | {j['median']:.0f} | {j['min']:.0f} | {j['max']:.0f} | {u['median']:.0f} | "
                         f"{'yes' if j['median'] <= GOAL_JOB_S else 'no'} |")
    return "\n".join(lines)


def run(method: str, concept: str, repeat: int, threads: int, probes: str) -> list[dict]:
    recs = []
    for i in range(repeat):
        with tempfile.TemporaryDirectory(prefix="concealbench-bench-") as tmp:
            args = [sys.executable, "-m", "bench", f"method={method}", f"concept={concept}", f"probes={probes}", "eval=quick",
                    "logger=none", f"threads={threads}", f"out_dir={tmp}/runs", f"cache_dir={tmp}/cache"]
            print(f"run {i + 1}/{repeat}: {' '.join(args[2:])}", file=sys.stderr, flush=True)
            r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r.returncode != 0:
                raise SystemExit(f"the job failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            recs += _records(Path(tmp) / "runs", None)
    return recs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=Path, help="summarise the records under this folder")
    p.add_argument("--run", action="store_true", help="run fresh jobs instead (cold cache)")
    p.add_argument("--method", default="esd_x")
    p.add_argument("--concept", default="star")
    p.add_argument("--probes", default="all")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.run == (a.records is not None):
        p.error("give exactly one of --records DIR and --run")
    if a.run:
        recs, where = run(a.method, a.concept, a.repeat, a.threads, a.probes), f"{a.repeat} cold {a.method}/{a.concept} job(s), {a.threads} threads"
    else:
        recs, where = _records(a.records, a.threads), f"{a.records}, records made with {a.threads} torch threads"
    if not recs:
        print(f"error: no records found ({where})", file=sys.stderr)
        return 2
    s = summarise(recs)
    print(table(s, where))
    if a.json:
        a.json.write_text(json.dumps({"where": where, **s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
