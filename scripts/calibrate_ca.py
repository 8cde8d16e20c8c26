"""Calibrate Concept Ablation's Shapes-world defaults by a small documented sweep.

For each concept preset and each grid point (loss variant × base lr × steps), starting from the
Shapes defaults in conf/method/concept_ablation.yaml + conf/method_model/concept_ablation_shapes.yaml:
  - unlearn (the base UNet is restored between grid points; anchor images come from the shared cache),
  - detection of the concept on its canonical forget prompt (the preset's first forget prompt):
    share of images whose detector argmax is the concept's value (``--seeds`` seeds),
  - retention: for each retain prompt, the fidelity of its own factors (``prompt_fidelity``, mean
    over the factors it names) relative to the base model's; reported as mean and min over prompts.
Target (method brief, phase 2): detection ≤ 20% while retention (mean over retain prompts) ≥ 80%.

Run (2 CPU cores, one torch thread, the shipped world):

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_ca.py \
        --concepts star,stripes,red --loss model-based --lrs 2e-6,2.5e-5,1e-4 --steps 200 \
        --out docs/calibration/concept_ablation.md

``--timing`` additionally runs the chosen defaults once with an empty anchor cache and reports
anchor-image generation and training time separately (the "≤ 10 minutes on 2 cores" check).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import calibration_common as cal  # noqa: E402

from bench.concepts import concept_from_cfg  # noqa: E402
from bench.hparams import check_params  # noqa: E402
from bench.pipeline import SHAPES_DIR  # noqa: E402
from methods import concept_ablation as ca  # noqa: E402

FORGET_SEEDS0, RETAIN_SEEDS0 = 10_000, 20_000  # evaluation seeds, disjoint from anchor seeds 0..n-1


def shapes_defaults(method: str) -> dict:
    base = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml").params)
    over = ROOT / "conf" / "method_model" / f"{method}_shapes.yaml"
    if over.exists():
        base.update(OmegaConf.to_container(OmegaConf.load(over).params))
    return base


def evaluate(pipe, concept, det, seeds: int, retain_seeds: int) -> dict:
    """Concept detection on the canonical forget prompt; per-retain-prompt fidelity."""
    canon = concept.forget_prompts[0]
    detect = cal.forget_rates(pipe, concept, det, range(FORGET_SEEDS0, FORGET_SEEDS0 + seeds), [canon])[canon]
    fid = cal.retain_fidelity(pipe, concept, det, range(RETAIN_SEEDS0, RETAIN_SEEDS0 + retain_seeds))
    return {"detect": detect, "retain_fidelity": list(fid.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=str(SHAPES_DIR))
    ap.add_argument("--method", default="concept_ablation", help="conf/method YAML whose Shapes defaults start the sweep")
    ap.add_argument("--concepts", default="star,stripes,red")
    ap.add_argument("--loss", default="model-based", help="comma list: model-based,noise-based")
    ap.add_argument("--lrs", default="", help="comma list of base lrs (default: the config's)")
    ap.add_argument("--steps", default="", help="comma list of step counts (default: the config's)")
    ap.add_argument("--set", default="", help="extra overrides, e.g. 'num_anchor_images=500,parameter_group=attn'")
    ap.add_argument("--seeds", type=int, default=64, help="seeds for the forget prompt")
    ap.add_argument("--retain-seeds", type=int, default=32, help="seeds per retain prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timing", action="store_true", help="also time one cold-cache run of the defaults per concept")
    ap.add_argument("--timing-only", action="store_true", help="only the cold-cache timing runs (no grid, no evaluation)")
    ap.add_argument("--out", default=None, help="markdown table to write")
    ap.add_argument("--json", default=None, help="raw results to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe, det = cal.load(args.world)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    defaults = shapes_defaults(args.method)
    extra = {}
    for kv in filter(None, args.set.split(",")):
        k, v = kv.split("=", 1)
        extra[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") or v[:1] == "-" else v
    grid = [
        {**defaults, **extra, "loss": loss, **({"lr": float(lr)} if lr else {}), **({"steps": int(s)} if s else {})}
        for loss in args.loss.split(",") for lr in (args.lrs.split(",") if args.lrs else [""])
        for s in (args.steps.split(",") if args.steps else [""])
    ]
    rows, t_start = [], time.perf_counter()
    for name in args.concepts.split(",") if not args.timing_only else []:
        concept = concept_from_cfg(OmegaConf.load(ROOT / "conf" / "concept" / f"{name}.yaml"))
        pipe.unet.load_state_dict(base_state)
        t0 = time.perf_counter()
        base = evaluate(pipe, concept, det, args.seeds, args.retain_seeds)
        print(f"[{name}] base: detect {base['detect']:.3f}, retain fidelity {np.round(base['retain_fidelity'], 3)} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        for params in grid:
            params = check_params(ca.unlearn, params)
            pipe.unet.load_state_dict(base_state)
            torch.manual_seed(0)
            report = ca.unlearn(pipe, concept, **params)
            t0 = time.perf_counter()
            res = evaluate(pipe, concept, det, args.seeds, args.retain_seeds)
            ratios = [u / b if b > 0 else float("nan") for u, b in zip(res["retain_fidelity"], base["retain_fidelity"], strict=True)]
            row = {
                "concept": name, "loss": params["loss"], "lr": params["lr"], "lr_effective": report["lr_effective"],
                "steps": params["steps"], "anchor_images": params["num_anchor_images"],
                "detect_base": base["detect"], "detect": res["detect"],
                "retention_mean": float(np.nanmean(ratios)), "retention_min": float(np.nanmin(ratios)),
                "anchor_s": report["anchor_seconds"], "anchor_cache_hit": report["anchor_cache_hit"],
                "train_s": report["train_seconds"], "eval_s": time.perf_counter() - t0,
                "loss_first10": float(np.mean(report["loss_history"][:10])),
                "loss_last10": float(np.mean(report["loss_history"][-10:])),
                "params": {k: v for k, v in params.items() if defaults.get(k) != v or k in extra},
            }
            row["ok"] = row["detect"] <= 0.20 and row["retention_mean"] >= 0.80
            rows.append(row)
            print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    timing = []
    if args.timing or args.timing_only:
        for name in args.concepts.split(","):
            concept = concept_from_cfg(OmegaConf.load(ROOT / "conf" / "concept" / f"{name}.yaml"))
            pipe.unet.load_state_dict(base_state)
            old = os.environ.get("CONCEALBENCH_CACHE")
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["CONCEALBENCH_CACHE"] = tmp  # cold cache: anchor images generated in this run
                torch.manual_seed(0)
                t0, c0 = time.perf_counter(), time.process_time()
                report = ca.unlearn(pipe, concept, **check_params(ca.unlearn, {**defaults, **extra}))
                total, cpu = time.perf_counter() - t0, time.process_time() - c0
            if old is None:
                os.environ.pop("CONCEALBENCH_CACHE")
            else:
                os.environ["CONCEALBENCH_CACHE"] = old
            timing.append({"concept": name, "anchor_s": report["anchor_seconds"], "train_s": report["train_seconds"],
                           "total_s": total, "cpu_s": cpu, "load_avg": os.getloadavg()[0], "nfe": report["nfe"],
                           "anchor_nfe": report["anchor_nfe"]})
            print(json.dumps(timing[-1]), flush=True)
    print(f"sweep wall time {time.perf_counter() - t_start:.0f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"defaults": defaults, "rows": rows, "timing": timing}, indent=1))
    if args.out:
        Path(args.out).write_text(table(rows, timing, defaults, " ".join(sys.argv[1:]), args))


def table(rows: list[dict], timing: list[dict], defaults: dict, argv: str, args) -> str:
    lines = [
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python scripts/calibrate_ca.py {argv}`",
        "",
        f"Forget detection: canonical forget prompt, {args.seeds} seeds; retention: fidelity of each retain prompt's own "
        f"factors relative to the base model ({args.retain_seeds} seeds per prompt), mean and min over the retain prompts. "
        "Target: detection ≤ 0.20 and mean retention ≥ 0.80.",
        "",
        "| concept | loss | base lr | eff. lr | steps | anchors | detect base | detect | retention mean | retention min | loss first→last 10 | anchor s | train s | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anchor = f"{r['anchor_s']:.0f}" + (" (cached)" if r["anchor_cache_hit"] else "")
        lines.append(
            f"| {r['concept']} | {r['loss']} | {r['lr']:.2g} | {r['lr_effective']:.2g} | {r['steps']} | {r['anchor_images']} | "
            f"{r['detect_base']:.2f} | {r['detect']:.2f} | {r['retention_mean']:.2f} | {r['retention_min']:.2f} | "
            f"{r['loss_first10']:.2e}→{r['loss_last10']:.2e} | {anchor} | {r['train_s']:.0f} | {'yes' if r['ok'] else 'no'} |"
        )
    if timing:
        lines += ["", "Cold-cache runs of the Shapes defaults (anchor generation timed separately from training):", "",
                  "| concept | anchor images s | training s | total wall s | CPU s | load avg | NFE (anchor) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['concept']} | {t['anchor_s']:.0f} | {t['train_s']:.0f} | {t['total_s']:.0f} | {t['cpu_s']:.0f} | "
                  f"{t['load_avg']:.1f} | {t['nfe']} ({t['anchor_nfe']}) |" for t in timing]
    lines += ["", "Starting parameters (conf/method + conf/method_model Shapes overrides):", "", "```json",
              json.dumps(defaults, indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
