"""``make verify RECORD=leaderboard/results/shapes/star/esd_x/<key>``: rerun the job a record describes
and say whether it reproduced.

A verdict is worth citing when anyone can rebuild it. A record carries its whole resolved config
(``config``), so the job is rerun from that config as written — into ``--out`` (default
``runs/verify``; resumable like any job, the published folder is never touched) — and the two
records are compared leaf by leaf:

- **verdicts**, per probe and for the retain class, both judged against the same gold-standard
  record: the one the record's job found (of its concept, probe protocol and seed, under the
  record's own out_dir first, then the published one), a gold row against itself;
- **detector-based numbers** — detections, erasure, specificity, retention, detection-based recovery
  points, their curves and every bootstrap replicate — must be *equal*: they count oracle decisions
  on uint8 images, and the same config, seed, library versions and CPU kernels give the same images;
- **embedding-based numbers** — CCS, CRS, the authors' CRS, KID, the classifier's P(original),
  retrieval and validation accuracy, classifier-based recovery points — must agree within
  ``--tolerance`` (1e-6): they are float statistics of learned features, which move in the 8th
  digit with the convolution kernels' summation order (README, "What a job does");
- **provenance** — when and where it ran, timings, loads, wandb, artifact and output paths — is not
  compared; the environment difference is printed, since a trained method drifts apart across CPU
  instruction sets (``env.cpu_isa``) and library versions.

A field only the rerun has (the record format grew after the record was made) is listed, not
failed; a field only the record has is a difference. ``--against OTHER`` compares two finished
records without running anything (e.g. a job rerun on a GPU machine). The report is printed and
written beside the rerun record as ``verify.json``. The outcome is *reproduced* (all of the above),
*verdicts reproduced* (verdicts and detector-based numbers equal, embedding-based ones beyond the
tolerance) or *not reproduced*; exit code 0 only for the first, 1 otherwise, 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.recordspec import SCHEMA_VERSION, is_number

DEFAULT_OUT = "runs/verify"
TOLERANCE = 1e-6
# Statistics of the classifier's or the detector trunk's features: floats that round with the kernels.
EMBEDDING = frozenset({"ccs", "crs", "crs_paper", "kid_po", "kid_pu", "kid_uo", "kid", "kid_std", "p_original",
                       "retrieval", "classifier_val_acc", "loss"})
# Where and how fast it ran: never compared.
PROVENANCE_TOP = frozenset({"created", "env", "cost", "wandb", "artifacts", "resumed", "job_key"})
PROVENANCE_CONFIG = frozenset({"out_dir", "cache_dir", "logger", "overwrite", "device", "threads"})
# ``gold``: the gold standard's recovery point copied in at run time (another record's number).
PROVENANCE_KEYS = frozenset({"cost", "others_cpus", "cpus", "peak_memory_mb", "gold"})
# Holds torch, MKL and oneDNN to AVX2 kernels on a newer CPU (README, "What a job does").
AVX2_PREFIX = "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2"


class VerifyError(ValueError):
    """A record that cannot be verified: missing, unreadable, failed, or made under another record format."""


def read(path: str | Path) -> tuple[dict, Path]:
    """The record at ``path`` (its folder or its ``record.json``) and the file, or one clear error."""
    p = Path(path)
    f = p / "record.json" if p.is_dir() or not p.suffix else p
    try:
        rec = json.loads(f.read_text())
    except OSError as e:
        raise VerifyError(f"`RECORD` = {str(path)!r}: no readable record.json ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise VerifyError(f"`RECORD` = {str(path)!r}: record.json is not JSON ({e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
        raise VerifyError(f"`RECORD` = {str(path)!r}: not a job record (it has no `config` block to rerun)")
    if rec.get("status") != "ok":
        raise VerifyError(f"`RECORD` = {str(path)!r}: its status is {rec.get('status')!r}; only a finished (ok) job has numbers to reproduce")
    if rec.get("schema_version") != SCHEMA_VERSION:
        sha = (rec.get("env") or {}).get("git_sha")
        raise VerifyError(f"`RECORD` = {str(path)!r}: made under record schema {rec.get('schema_version')!r}, this code writes "
                          f"schema {SCHEMA_VERSION}; rerun it with the code that made it" + (f" (git {sha[:10]})" if sha else ""))
    return rec, f


# ----------------------------------------------------------------------------- comparison
def _classifier_based(record: dict) -> set[tuple]:
    """Per-prompt recovery points read from the classifier's P(original), not the detector: retain
    prompts, and every prompt where the world has no detector (``bench.scorers``, per-prompt rows;
    the aggregate blocks say so themselves in ``basis``)."""
    detector = bool((record.get("protocol") or {}).get("detector"))
    return {("prompts", i, "probes", name, "metrics", "recover")
            for i, row in enumerate(record.get("prompts") or [])
            if not (detector and row.get("class") == "forget") for name in (row.get("probes") or {})}


def _provenance(key: Any) -> bool:
    return key in PROVENANCE_KEYS or (isinstance(key, str) and key.endswith("seconds"))


def _leaves(x: Any, path: tuple = (), embedding: bool = False, classifier: frozenset = frozenset(),
            probes: frozenset | None = None) -> Iterator[tuple[tuple, Any, bool]]:
    """(path, value, embedding-based?) for every leaf worth comparing: provenance is skipped, and
    with ``probes`` only those probes' blocks (the probes both records ran)."""
    if isinstance(x, dict):
        if not path:
            x = {k: v for k, v in x.items() if k not in PROVENANCE_TOP}
        elif path == ("config",):
            x = {k: v for k, v in x.items() if k not in PROVENANCE_CONFIG}
        if probes is not None and path and path[-1] == "probes":
            x = {k: v for k, v in x.items() if k in probes}
        emb = embedding or x.get("basis", "detection") != "detection" or path in classifier
        for k, v in x.items():
            if not _provenance(k):
                yield from _leaves(v, path + (k,), emb or k in EMBEDDING, classifier, probes)
    elif isinstance(x, list):
        yield path + ("#len",), len(x), False
        for i, v in enumerate(x):
            yield from _leaves(v, path + (i,), embedding, classifier, probes)
    else:
        yield path, x, embedding


def _name(path: tuple) -> str:
    """``prompts[3].metrics.kid_po.ci[0]``; a list's length is ``[len]``, any index ``[]``."""
    out = ""
    for p in path:
        if isinstance(p, int) or p in ("[]", "#len"):
            out += f"[{p}]" if isinstance(p, int) else "[len]" if p == "#len" else "[]"
        else:
            out += ("." if out else "") + str(p)
    return out


def compare(published: dict, rerun: dict, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Leaf-by-leaf comparison of two records of the same job (see the module docstring)."""
    both = frozenset(published.get("probes") or {}) & frozenset(rerun.get("probes") or {})
    a = {p: (v, e) for p, v, e in _leaves(published, classifier=frozenset(_classifier_based(published)), probes=both)}
    b = {p: (v, e) for p, v, e in _leaves(rerun, classifier=frozenset(_classifier_based(rerun)), probes=both)}
    exact = {"compared": 0, "differ": []}
    emb = {"compared": 0, "differ": [], "within": 0, "max_delta": 0.0, "max_at": None}
    for p in a.keys() & b.keys():
        (x, is_emb), (y, _) = a[p], b[p]
        is_emb = is_emb and all(v is None or is_number(v) for v in (x, y))  # a setting's text is exact anywhere
        side = emb if is_emb else exact
        side["compared"] += 1
        if x == y:
            continue
        if is_emb and is_number(x) and is_number(y):
            d = abs(float(x) - float(y))
            if d > emb["max_delta"]:
                emb["max_delta"], emb["max_at"] = d, _name(p)
            if d <= tolerance * max(1.0, abs(float(x))):
                emb["within"] += 1
                continue
        side["differ"].append({"field": _name(p), "record": x, "rerun": y})
    missing = _new_fields(b, a)
    only = {"record": sorted(set(published.get("probes") or {}) - both), "rerun": sorted(set(rerun.get("probes") or {}) - both)}
    return {"tolerance": tolerance, "exact": exact, "embedding": emb, "missing": missing, "added": _new_fields(a, b),
            "probes_only": only}


def _new_fields(a: dict, b: dict) -> list[str]:
    """The fields of ``b`` that ``a`` lacks, one name per field (``prompts[].metrics.off_domain_u``),
    not one per leaf."""
    def shape(path: tuple) -> tuple:
        return tuple("[]" if isinstance(x, int) else x for x in path)

    known = {shape(p[:i]) for p in a for i in range(1, len(p) + 1)}
    out = set()
    for p in b.keys() - a.keys():
        s = shape(p)
        i = next((i for i in range(1, len(s) + 1) if s[:i] not in known), None)
        if i is not None:
            out.add(_name(s[:i]))
    return sorted(out)


def _golds(record: dict, root: Path | None = None) -> dict[str, dict | None]:
    """The gold-standard probe blocks a record is judged against: a gold row its own, else the gold its
    job found — under the record's own out_dir ``root`` first, then the published one (``find_gold``)."""
    from bench.run import PUBLISHED, find_gold

    out = {}
    for name, block in (record.get("probes") or {}).items():
        if record["method"].get("reference") == "gold":
            out[name] = block
            continue
        g = find_gold(root or PUBLISHED, record["model"]["name"], record["concept"]["name"], record["seed"], name, block["protocol"]["hash"])
        out[name] = g["record"]["probes"][name] if g else None
    return out


def out_dir_of(record_file: Path) -> Path | None:
    """The ``out_dir`` a record was written under (``<out_dir>/<model>/<concept>/<method>/<key>/record.json``)."""
    parents = Path(record_file).resolve().parents
    return parents[4] if len(parents) > 4 else None


def verdicts(published: dict, rerun: dict, root: Path | None = None) -> list[dict[str, Any]]:
    """The forget verdict of each probe both records ran and the retain verdict, for both records,
    against the same golds."""
    from bench.summary import verdicts as judge

    golds = _golds(published, root)
    va, vb = judge(published, golds), judge(rerun, golds)
    return [{"probe": k, "record": va[k].to_dict(), "rerun": vb[k].to_dict(),
             "same": (va[k].key, va[k].probability) == (vb[k].key, vb[k].probability)} for k in va if k in vb]


def env_changes(published: dict, rerun: dict) -> dict[str, list]:
    """What ran each record where they differ (versions, CPU, ISA, threads); the code version is printed apart."""
    ea, eb = published.get("env") or {}, rerun.get("env") or {}
    return {k: [ea.get(k), eb.get(k)] for k in sorted(ea.keys() | eb.keys())
            if k != "git_sha" and ea.get(k) != eb.get(k)}


def report(published: dict, rerun: dict, tolerance: float = TOLERANCE, root: Path | None = None) -> dict[str, Any]:
    """``compare`` plus the verdicts (against the golds found under ``root``, the record's out_dir, then
    the published ones), what ran each, and the outcome."""
    c = compare(published, rerun, tolerance)
    vs = verdicts(published, rerun, root)
    c["verdicts"] = vs
    c["env"] = env_changes(published, rerun)
    c["job_key"] = [published.get("job_key"), rerun.get("job_key")]
    decided = all(v["same"] for v in vs) and not c["exact"]["differ"] and not c["missing"]
    c["reproduced"] = decided and not c["embedding"]["differ"]
    c["outcome"] = "reproduced" if c["reproduced"] else "verdicts reproduced" if decided else "not reproduced"
    return c


def _short(v: dict | None) -> str:
    from bench.verdict import Verdict

    return "—" if v is None else Verdict(**v).brief()


def lines(published: dict, rerun: dict, rep: dict, shown: int = 8) -> list[str]:
    method = published["method"].get("display") or published["method"]["name"]
    out = [f"ConcealBench verify — {method} on '{published['concept']['name']}' ({published['model']['name']}, "
           f"seed {published['seed']}), job {rep['job_key'][0]}"]
    if rep["job_key"][0] != rep["job_key"][1]:
        out.append(f"  the rerun's job key is {rep['job_key'][1]}: this code derives the key (config or protocol) differently")
    sha = [((r.get("env") or {}).get("git_sha") or "?")[:10] for r in (published, rerun)]
    out.append(f"  code: record git {sha[0]}, rerun git {sha[1]}")
    for k, (x, y) in rep["env"].items():
        out.append(f"  env.{k}: record {x!r}, rerun {y!r}")
    out.append("  verdicts (record → rerun, both against the same gold):")
    for v in rep["verdicts"]:
        mark = "same" if v["same"] else "DIFFERENT"
        out.append(f"    {v['probe']}: {_short(v['record'])} → {_short(v['rerun'])}   {mark}")
    ex, em = rep["exact"], rep["embedding"]
    out.append(f"  detector-based numbers: {ex['compared']} compared, " + ("all equal" if not ex["differ"] else f"{len(ex['differ'])} differ"))
    for d in ex["differ"][:shown]:
        out.append(f"    {d['field']}: {d['record']!r} → {d['rerun']!r}")
    tail = f", largest |Δ| {em['max_delta']:.1e} ({em['max_at']})" if em["max_delta"] else ""
    out.append(f"  embedding-based numbers: {em['compared']} compared, {em['within']} differ within {rep['tolerance']:g} × max(1, |value|), "
               f"{len(em['differ'])} beyond it{tail}")
    for d in em["differ"][:shown]:
        out.append(f"    {d['field']}: {d['record']!r} → {d['rerun']!r}")
    for side, names in rep["probes_only"].items():
        if names:
            out.append(f"  probes only the {side} ran (not compared): {', '.join(names)}")
    if rep["missing"]:
        out.append("  fields of the record missing from the rerun: " + ", ".join(rep["missing"][:shown])
                   + (f", … ({len(rep['missing'])})" if len(rep["missing"]) > shown else ""))
    if rep["added"]:
        out.append("  fields only the rerun has (the record format grew since; not compared): " + ", ".join(rep["added"][:shown])
                   + (f", … ({len(rep['added'])})" if len(rep["added"]) > shown else ""))
    out.append({"reproduced": "  → REPRODUCED: every verdict and detector-based number equal, the embedding-based ones within tolerance",
                "verdicts reproduced": "  → VERDICTS REPRODUCED: every verdict and detector-based number equal, but embedding-based numbers "
                                       "(CCS, CRS, KID, classifier) differ beyond tolerance — a different env.cpu_isa or library version "
                                       "is the first suspect",
                "not reproduced": "  → NOT REPRODUCED: a verdict or a detector-based number differs (see above; a different env.cpu_isa "
                                  "or library version is the first suspect)"}[rep["outcome"]])
    hint = unnamed_isa_hint(published, rerun) if rep["outcome"] != "reproduced" else None
    if hint:
        out.append("    " + hint)
    return out


def unnamed_isa_hint(published: dict, rerun: dict) -> str | None:
    """Records made before ``env.cpu_isa`` existed ran on AVX2 or AVX512 kernels without saying which:
    when such a record did not reproduce on AVX512, the next thing to try is AVX2."""
    if (published.get("env") or {}).get("cpu_isa") or (rerun.get("env") or {}).get("cpu_isa") != "AVX512":
        return None
    return ("the record does not name its CPU kernels (older records ran on AVX2 or AVX512); try AVX2 in another folder: "
            f"{AVX2_PREFIX} python -m bench.verify <record> --out runs/verify-avx2")


# ----------------------------------------------------------------------------- rerun
def rerun(record: dict, out_dir: str, overwrite: bool = False, threads: int | None = None) -> tuple[int, Path | None]:
    """Run the record's job again from its own config into ``out_dir``; (exit code, new record file).
    ``threads``: torch's CPU threads (default: as many as the record's job had, ``env.threads``, since
    a method trained at another thread count can drift to another model)."""
    from omegaconf import OmegaConf

    from bench.run import execute

    cfg = OmegaConf.create(record["config"])
    cfg.out_dir, cfg.overwrite = out_dir, overwrite
    cfg.threads = threads or cfg.get("threads") or (record.get("env") or {}).get("threads")
    cfg.logger = {"name": "none"}  # a verification is not an experiment to track
    code = execute(cfg)
    if code:
        return code, None
    folder = Path(out_dir, record["model"]["name"], record["concept"]["name"], record["method"]["name"])
    if (folder / record["job_key"] / "record.json").is_file():
        return 0, folder / record["job_key"] / "record.json"
    # this code derived another job key from the same config: the job just written is the newest
    found = sorted(folder.glob("*/record.json"), key=lambda p: p.stat().st_mtime)
    return 0, found[-1] if found else None


def isa_note(record: dict) -> str | None:
    """A note when this machine's CPU kernels are not the record's (a trained method drifts across them)."""
    from bench.record import cpu_isa

    theirs, ours = (record.get("env") or {}).get("cpu_isa"), cpu_isa()
    if not theirs or not ours or theirs == ours:
        return None
    head = f"note: the record ran on {theirs} kernels, this machine's torch uses {ours}; a trained method may drift. "
    if theirs == "AVX2":  # a newer CPU can be held to the older kernels
        return head + f"Hold torch to AVX2 with {AVX2_PREFIX}"
    return head + f"A bit-exact rerun needs a CPU with {theirs}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("record", help="a record's folder (or its record.json), e.g. leaderboard/results/shapes/star/esd_x/<key>")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"where the rerun goes (default {DEFAULT_OUT}; a finished rerun there is reused)")
    ap.add_argument("--against", help="compare with this finished record instead of rerunning")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"largest |Δ| of an embedding-based number, × max(1, |value|) (default {TOLERANCE:g})")
    ap.add_argument("--overwrite", action="store_true", help="rerun even if --out holds the finished rerun")
    ap.add_argument("--threads", type=int, help="torch CPU threads for the rerun (default: the record's env.threads)")
    args = ap.parse_args(argv)
    try:
        if not 0 <= args.tolerance < 1:
            raise VerifyError(f"`--tolerance` must be in [0, 1), got {args.tolerance:g}")
        if args.threads is not None and args.threads < 1:
            raise VerifyError(f"`--threads` must be an integer >= 1, got {args.threads}")
        published, published_file = read(args.record)
        other = read(args.against) if args.against else None
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if other is None:
        note = isa_note(published)
        if note:
            print(note, file=sys.stderr)
        code, path = rerun(published, args.out, args.overwrite, args.threads)
        if code or path is None:
            return code or 1
        new, path = read(path)
    else:
        new, path = other
    rep = report(published, new, args.tolerance, root=out_dir_of(published_file))
    print("\n".join([""] + lines(published, new, rep)))
    if other is None:
        from bench.record import write_json

        write_json(path.parent / "verify.json", {"record": str(Path(args.record)), **rep})
        print(f"  report: {path.parent / 'verify.json'}")
    return 0 if rep["reproduced"] else 1


if __name__ == "__main__":
    sys.exit(main())
