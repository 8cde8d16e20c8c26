"""Screen a method's Shapes-world settings against the calibration bar, for any method.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_method.py mace \\
        --grid "" "lr=3e-3" "lr=1e-2,train_steps=100" --concepts star stripes red \\
        --json docs/calibration/mace.json --out docs/calibration/mace.md

Every configuration is the method's config as a job composes it (``conf/method/<m>.yaml`` plus the
world's override ``conf/method_model/<m>_shapes.yaml``) with the grid entry's ``key=value`` pairs
on ``method.params`` (``""`` = the override as shipped). Each is validated like a job (a bad key or
value exits 2 before anything loads), run on the shipped Shapes pipeline (the base UNet restored
before every edit, torch seeded with ``--seed``), and measured with the world's oracle detector:

- ``detect_u``: the concept's detection on its canonical forget prompt (its first), ``--seeds``
  images — the bar is ≤ 0.20 (``calibration_common.DETECT_MAX``);
- ``paraphrase``: mean detection over every forget prompt (paraphrases the method never saw),
  ``--paraphrase-seeds`` images each;
- ``retention``: mean over the retain prompts of edited/base fidelity (``--retain-seeds`` images
  each; the worst prompt beside it) — the bar is ≥ 0.80;
- the method's wall time at ``--threads`` torch threads.

Rows are kept in ``--json`` as they finish, so an interrupted screen resumes; the Markdown table is
rewritten from all rows after each one. Each row keeps the hyperparameters it ran with: it is reused
only while they match, and a row measured under an earlier override stays, labelled by the values
that differ. This measures the method, not a verdict: the benchmark's
records (``make bench``) add specificity, intervals and the probes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import calibration_common as cal
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def compose(method: str, concept: str, entry: str):
    """The job config of ``method`` on ``concept`` with the grid entry applied, validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [f"method={method}", f"concept={concept}", "model=shapes", "eval=smoke"]
    overrides += [f"method.params.{kv.strip()}" for kv in entry.split(",") if kv.strip()]
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name="config", overrides=overrides)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method")
    ap.add_argument("--grid", nargs="+", default=[""], help='entries "k=v,k=v" on method.params ("" = as shipped)')
    ap.add_argument("--concepts", nargs="+", default=["star", "stripes", "red"])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--paraphrase-seeds", type=int, default=8)
    ap.add_argument("--retain-seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from bench.config import ConfigError, validate

    jobs = []
    for entry in args.grid:
        for c in args.concepts:
            try:
                cfg = compose(args.method, c, entry)
                checked = validate(cfg)
            except ConfigError as e:
                print(f"error: grid entry {entry!r} on {c}: {e}", file=sys.stderr)
                return 2
            jobs.append((entry, c, cfg, checked))

    import torch

    from bench.context import MethodContext
    from bench.hparams import takes_context
    from bench.worlds import build_concept

    torch.set_num_threads(args.threads)
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    pipe, detector = cal.load(ROOT / "bench/world/assets/shapes")
    # Fresh copies before every measurement: a method may edit the text encoder (AdvUnlearn) or add
    # modules to the UNet (Receler's erasers), which loading a saved state dict back would not undo.
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    seeds, para, keep = range(args.seeds), range(args.paraphrase_seeds), range(args.retain_seeds)
    base: dict[str, dict] = {}
    for entry, c, cfg, checked in jobs:
        key = f"{entry or 'as shipped'} | {c}"
        resolved = _plain(checked["params"])
        if reuse(rows, key, resolved):
            continue
        concept = build_concept(cfg)
        pipe.unet, pipe.text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        if c not in base:
            base[c] = cal.measure(pipe, concept, detector, seeds, keep)
        fn, params = checked["fn"], dict(checked["params"])
        if takes_context(fn):
            params["ctx"] = MethodContext(cache_dir=(ROOT / cfg.cache_dir).resolve(), progress=False, seed=args.seed)
        torch.manual_seed(args.seed)
        t = time.perf_counter()
        fn(pipe, concept, **params)
        seconds = time.perf_counter() - t
        pipe.unet.requires_grad_(False)
        edited = cal.measure(pipe, concept, detector, seeds, keep)
        paraphrase = cal.forget_rates(pipe, concept, detector, para)
        rows[key] = {"entry": entry, "concept": c, **cal.row(base[c], edited, concept),
                     "paraphrase": float(np.mean(list(paraphrase.values()))), "seconds": seconds,
                     "params": resolved}
        print(f"{key}: {json.dumps(rows[key])}", flush=True)
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, args.json)
        if args.out:
            write_table(args, rows)
    if args.out:
        write_table(args, rows)
    return 0


def reuse(rows: dict, key: str, resolved: dict) -> bool:
    """Whether ``rows[key]`` was measured with ``resolved`` (rows without ``params`` predate them and
    count as matching). A row measured under other values (the shipped override changed since) is
    moved to a key naming the values that differ, so it stays in the table and ``key`` is re-run."""
    if key not in rows:
        return False
    old = rows[key]
    if old.get("params", resolved) == resolved:
        return True
    changed = ",".join(f"{k}={v}" for k, v in sorted(old["params"].items()) if resolved.get(k) != v)
    concept = key.rsplit(" | ", 1)[1]
    rows[f"{changed} | {concept}"] = {**rows.pop(key), "entry": changed}
    return False


def _plain(params: dict) -> dict:
    """The method's resolved hyperparameters as JSON values (a row is reused only while they match)."""
    return {k: v for k, v in json.loads(json.dumps(dict(params), default=str)).items() if k != "ctx"}


def write_table(args, rows: dict) -> None:
    cmd = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_method.py", args.method,
                    "--grid", *[f'"{g}"' for g in args.grid], "--concepts", *args.concepts,
                    f"--seeds {args.seeds} --paraphrase-seeds {args.paraphrase_seeds} --retain-seeds {args.retain_seeds}",
                    f"--threads {args.threads}"])
    lines = ["## Screen", "",
             "Written by `scripts/calibrate_method.py` as rows finish (the text above the marker comment is "
             "kept when it rewrites this part). Command:", "", f"    {cmd}", "",
             f"Bar: detection on the canonical forget prompt ≤ {cal.DETECT_MAX} while retain prompts keep ≥ "
             f"{cal.RETENTION_MIN} of the base model's fidelity. `det_o → det_u`: {args.seeds} images; "
             f"`paraphrases`: mean detection over every forget prompt, {args.paraphrase_seeds} images each; "
             f"`retention (worst)`: {args.retain_seeds} images per retain prompt; `s`: the method's wall time "
             f"at {args.threads} torch thread(s).", "",
             "| settings (on the Shapes override) | concept | det_o → det_u | paraphrases | retention (worst) | s | bar |",
             "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        ok = "pass" if cal.passes(r) else "—"
        lines.append(f"| {r['entry'] or 'as shipped'} | {r['concept']} | {r['detect_o']:.2f} → {r['detect_u']:.2f} | "
                     f"{r['paraphrase']:.2f} | {r['retention']:.2f} ({r['retention_min']:.2f}) | {r['seconds']:.0f} | {ok} |")
    head = args.out.read_text().split("<!-- screen -->")[0] if args.out.exists() else ""
    args.out.write_text(head + "<!-- screen -->\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
