"""The README's result tables, from the published records (or any folder of records).

    python scripts/results_tables.py leaderboard/results/shapes [--seed 0] [--concepts star stripes red]

Prints Markdown: (1) erasure, specificity and retention with their intervals, and each probe's
recovery point [95% CI] per method and concept, the gold
standard's and the original model's rows included; (2) the verdict per probe with its probability;
(3) for each row some probe calls concealed, the cheapest probe that does (by its median wall time
over the records), every probe that does and which probes the row ran; rows every probe calls removed; (4) the replicated
seeds' verdict agreement when several seeds are present; (5) per method, across concepts and
probes, how many cells read each verdict. Verdicts are the records' own (judged by
``bench.verdict`` against the gold record of the same seed and probe protocol when the job ran);
records made before their gold are re-judged here with the same code.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import verdict as V  # noqa: E402

METHODS = ("noop", "retrain", "esd_x", "esd_u", "uce", "fmn", "ca_model", "ca_noise", "sdd", "salun", "mace", "spm",
           "rece", "advunlearn", "stereo", "receler")


def load(folder: Path) -> list[dict]:
    """Schema-2 records (one block per probe); the first wave's schema-1 records have no probes and
    are ranked apart on the page, so they are left out here."""
    recs = [json.loads(p.read_text()) for p in sorted(folder.rglob("record.json"))]
    return [r for r in recs if r.get("schema_version", 1) >= 2 and r.get("status", "ok") != "failed"]


def fmt_recover(m: dict | None) -> str:
    if not m:
        return "–"
    v, ci = m.get("value"), m.get("ci") or [None, None]
    if v is None:
        return "never"
    hi = "never" if ci[1] is None else f"{ci[1]:.3g}"
    lo = "–" if ci[0] is None else f"{ci[0]:.3g}"
    return f"{v:.3g} [{lo}, {hi}]"


def fmt_mean(m: dict | None) -> str:
    """A prompt-level mean with its interval (prompts, then seeds), e.g. ``0.97 [0.93, 1.00]``."""
    if not m or m.get("value") is None:
        return "–"
    ci = m.get("ci") or [None, None]
    return f"{m['value']:.2f}" + ("" if None in ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def judge(rec: dict, gold: dict | None, probe: str, th: dict) -> V.Verdict:
    block, gblock = rec["probes"][probe], (gold or {}).get("probes", {}).get(probe)
    if gblock is not None and gblock["protocol"]["hash"] != block["protocol"]["hash"]:
        gblock = None
    return V.judge_forget(rec["metrics"], block, gblock, probe, th)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concepts", nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    a = ap.parse_args()
    th = V.thresholds()
    recs = load(a.folder)
    by = {(r["concept"]["name"], r["method"]["name"], r["seed"]): r for r in recs}
    concepts = a.concepts or sorted({c for c, _, _ in by})
    probes: list[str] = []
    for r in recs:
        for p in r.get("probes") or {}:
            if p not in probes:
                probes.append(p)
    times: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        for p, b in (r.get("probes") or {}).items():
            if b.get("cost", {}).get("seconds") is not None:
                times[p].append(b["cost"]["seconds"])
    cheap = sorted(probes, key=lambda p: statistics.median(times[p]) if times[p] else 1e9)
    display = {p: next(r["probes"][p].get("display", p) for r in recs if p in (r.get("probes") or {})) for p in probes}

    out = [f"#### Recovery point per probe (95% CI; seed {a.seed})", "",
           "| concept | method | erasure | specificity | retention | " + " | ".join(display[p] for p in probes) + " |",
           "|---|---|---|---|---|" + "---|" * len(probes)]
    verdicts: dict[tuple[str, str], dict[str, V.Verdict]] = {}
    for c in concepts:
        gold = by.get((c, "retrain", a.seed))
        for m in a.methods:
            r = by.get((c, m, a.seed))
            if r is None:
                continue
            prompt_level = [fmt_mean(r["metrics"].get("erasure")), fmt_mean(r["metrics"].get("specificity")),
                            fmt_mean((r.get("retain") or {}).get("retention"))]
            cells = [fmt_recover((r["probes"].get(p) or {}).get("metrics", {}).get("recover")) if p in r["probes"] else "–" for p in probes]
            out.append(f"| {c} | {m} | " + " | ".join(prompt_level + cells) + " |")
            verdicts[(c, m)] = {p: judge(r, gold, p, th) for p in probes if p in r["probes"]}
    out += ["", "#### Verdict per probe (its probability)", "",
            "| concept | method | " + " | ".join(display[p] for p in probes) + " |", "|---|---|" + "---|" * len(probes)]
    for (c, m), vs in verdicts.items():
        out.append(f"| {c} | {m} | " + " | ".join(vs[p].brief() if p in vs else "–" for p in probes) + " |")
    out += ["", "#### Which probe exposes each concealing row", "",
            f"Probes in order of their median wall time per job: {', '.join(display[p] for p in cheap)}.", "",
            "| concept | method | cheapest probe that exposes it | every probe that does | probes run |", "|---|---|---|---|---|"]
    removed_everywhere = []
    for (c, m), vs in verdicts.items():
        ran_all = len(vs) == len(probes)
        conc = [p for p in cheap if p in vs and vs[p].key == "concealed"]
        if conc:
            ran = "all" if ran_all else ", ".join(display[p] for p in cheap if p in vs)
            out.append(f"| {c} | {m} | {display[conc[0]]} | {', '.join(display[p] for p in conc)} | {ran} |")
        if vs and ran_all and all(v.key == "removed" for v in vs.values()):
            removed_everywhere.append(f"{m} on {c}")
    out += ["", "Rows every probe calls removed: " + (", ".join(removed_everywhere) or "none") + "."]
    out += method_summary(verdicts, probes)
    seeds = sorted({s for _, _, s in by})
    if len(seeds) > 1:
        out += ["", f"#### Replication (seeds {', '.join(map(str, seeds))})", "",
                "| concept | method | probe | recovery point per seed | verdict per seed | agree |", "|---|---|---|---|---|---|"]
        for c in concepts:
            for m in a.methods:
                rs = [r for s in seeds if (r := by.get((c, m, s))) is not None]
                if len(rs) < 2:  # a row replicated in some seeds is shown with the seeds it has
                    continue
                for p in probes:
                    if not all(p in r["probes"] for r in rs):
                        continue
                    vs = [judge(r, by.get((c, "retrain", r["seed"])), p, th) for r in rs]
                    recs_ = [f"{r['seed']}: " + fmt_recover(r["probes"][p]["metrics"].get("recover")) for r in rs]
                    agree = "yes" if len({v.key for v in vs}) == 1 else "no → inconclusive"
                    out.append(f"| {c} | {m} | {display[p]} | {' · '.join(recs_)} | {' · '.join(v.brief() for v in vs)} | {agree} |")
        out += cross_seed_gold(by, concepts, seeds, probes, display, th)
    print("\n".join(out))
    return 0


SUMMARY_KEYS = ("removed", "concealed", "destroyed", "not_erased", "inconclusive")


def method_summary(verdicts: dict[tuple[str, str], dict[str, V.Verdict]], probes: list[str]) -> list[str]:
    """Per method, across concepts and probes: how many (concept, probe) cells read each verdict."""
    out = ["", "#### Per method, across concepts and probes", "",
           "Each cell counts (concept, probe) verdicts of the seed above; \"cells\" = concepts × probes run.", "",
           "| method | concepts | cells | " + " | ".join(V.SHORT_LABELS.get(k, k) for k in SUMMARY_KEYS) + " | other |",
           "|---|---|---|" + "---|" * (len(SUMMARY_KEYS) + 1)]
    for m in dict.fromkeys(m for _, m in verdicts):
        cells = [v for (c, mm), vs in verdicts.items() if mm == m for p, v in vs.items() if p in probes]
        concepts = sorted({c for c, mm in verdicts if mm == m})
        counts = [sum(v.key == k for v in cells) for k in SUMMARY_KEYS]
        out.append(f"| {m} | {', '.join(concepts)} | {len(cells)} | " + " | ".join(map(str, counts))
                   + f" | {len(cells) - sum(counts)} |")
    return out


def cross_seed_gold(by: dict, concepts: list[str], seeds: list[int], probes: list[str], display: dict, th: dict) -> list[str]:
    """The gold standard of seed s judged against the gold of another seed s'. Against its own record
    the gold is "removed" by construction (a paired difference of zero); against another seed's —
    other reference images, attacked seeds and classifier, compared as independent bootstraps — it
    shows whether the rule calls a never-knew model "removed" when nothing is shared."""
    out = ["", "#### The gold standard against another seed's gold (independent bootstraps)", "",
           "| concept | probe | seed s vs gold of seed s' : verdict (probability) |", "|---|---|---|"]
    for c in concepts:
        golds = {s: by.get((c, "retrain", s)) for s in seeds}
        for p in probes:
            cells = [f"{s} vs {t}: {judge(golds[s], golds[t], p, th).brief()}" for s in seeds for t in seeds
                     if s != t and golds[s] and golds[t] and p in golds[s]["probes"] and p in golds[t]["probes"]]
            if cells:
                out.append(f"| {c} | {display[p]} | {' · '.join(cells)} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
