"""``python -m bench.perf`` (``make perf``): the snapshot attack against the authors' way.

Runs the partial-diffusion attack (DESIGN §1.1) on one model both ways on the same prompts,
seeds and ψ grid:
- ours: ``prefix_snapshots`` (θ once per prompt up to the largest ψ, batched) + one θ*
  continuation per ψ (batched);
- naive: the authors' notebook (paper notes §2.3): for every ψ and seed, θ from scratch for the
  prefix, then θ*, one image at a time.
It checks that both give the same final latents (max |Δ| ≤ ``--tol``; the paths differ only in
batch size, i.e. in float summation order), prints NFE and wall time for both, and writes them to
a JSON file. θ* is θ with its cross-attention weights perturbed (``bench.testing.perturbed_unet``),
a stand-in with the cost of any real unlearned model. Timings cover sampling only (no VAE decode).

    python -m bench.perf --tiny --prompts 1 --seeds 2 --steps 10     # seconds, no trained world
    python -m bench.perf --model bench/world/assets/shapes            # the shipped Shapes model
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "bench/world/assets/shapes"
PAPER_PSIS = "0.001,0.01,0.05,0.15,0.25,0.35,0.45,0.55"  # paper notes §2.3, the notebook's grid
PROMPTS = (
    "a red star on a striped background",
    "a blue circle",
    "a green heart on a dotted background",
    "a yellow square",
    "a purple triangle on a checkered background",
    "a cyan cross",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers StableDiffusionPipeline directory (θ)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random pipeline instead of --model")
    p.add_argument("--prompts", type=int, default=2, help=f"number of prompts (at most {len(PROMPTS)})")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt")
    p.add_argument("--psi", default=PAPER_PSIS, help="comma-separated ψ grid, strictly increasing")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (the Shapes world ships 20)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--split", default="step", choices=["step", "timestep"], help="ψ split rule (DESIGN §1.1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on our path")
    p.add_argument("--tol", type=float, default=1e-4, help="max allowed |Δ latent| between the two paths")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/perf/perf.json", help="where to write the JSON record")
    return p


def _load(args: argparse.Namespace):
    import torch

    if args.tiny:
        from bench.testing import tiny_sd_pipeline

        return tiny_sd_pipeline(seed=0, scheduler="ddim"), "tiny_sd_pipeline(seed=0, scheduler='ddim')"
    if not (Path(args.model) / "model_index.json").is_file():
        sys.exit(f"error: `--model` must be a diffusers pipeline directory, got {args.model!r} "
                 "(no model_index.json there); build the world with `make world` or pass --tiny")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, str(args.model)


def run(args: argparse.Namespace) -> dict:
    """Both attack paths on the same inputs; returns the JSON record (see module docstring)."""
    import diffusers
    import torch

    from bench.probes.partial_diffusion import naive_attack
    from bench.sampling import (
        NFECounter,
        SamplerConfig,
        check_psi_grid,
        continue_from,
        prefix_snapshots,
    )
    from bench.testing import perturbed_unet

    psis = check_psi_grid([float(x) for x in args.psi.split(",")])
    if not 1 <= args.prompts <= len(PROMPTS):
        sys.exit(f"error: `--prompts` must be in [1, {len(PROMPTS)}], got {args.prompts}")
    if args.seeds < 1:
        sys.exit(f"error: `--seeds` must be >= 1, got {args.seeds}")
    cfg = SamplerConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, model_id = _load(args)
    pipe.to(args.device)
    star = perturbed_unet(pipe.unet)
    prompts, seeds = list(PROMPTS[: args.prompts]), list(range(args.seeds))

    ours_nfe, naive_nfe = NFECounter(), NFECounter()
    t_prefix = t_cont = t_naive = 0.0
    max_diff = max_abs = 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        snaps = prefix_snapshots(pipe, pipe.unet, prompt, seeds, psis, cfg, ours_nfe, split=args.split)
        t1 = time.perf_counter()
        ours = {p: continue_from(pipe, star, snaps[p], prompt, cfg, ours_nfe) for p in psis}
        t2 = time.perf_counter()
        naive = naive_attack(pipe, pipe.unet, star, prompt, seeds, psis, cfg, naive_nfe, split=args.split)
        t3 = time.perf_counter()
        t_prefix, t_cont, t_naive = t_prefix + t1 - t0, t_cont + t2 - t1, t_naive + t3 - t2
        for p in psis:
            max_diff = max(max_diff, (ours[p] - naive[p]).abs().max().item())
            max_abs = max(max_abs, naive[p].abs().max().item())
    t_ours = t_prefix + t_cont
    return {
        "model": model_id,
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
        "scheduler": type(pipe.scheduler).__name__,
        "config": {"prompts": prompts, "seeds": seeds, "psi": psis, "steps": cfg.steps,
                   "guidance": cfg.guidance, "split": args.split, "batch_size": cfg.batch_size},
        "ours": {"wall_s": t_ours, "wall_prefix_s": t_prefix, "wall_continue_s": t_cont,
                 "nfe": ours_nfe.total, "nfe_prefix": ours_nfe.by_stage.get("prefix", 0),
                 "nfe_continue": ours_nfe.by_stage.get("continue", 0)},
        "naive": {"wall_s": t_naive, "nfe": naive_nfe.total},
        "ratio_naive_over_ours": {"wall": t_naive / t_ours, "nfe": naive_nfe.total / ours_nfe.total},
        "max_abs_latent_diff": max_diff,
        "max_abs_latent": max_abs,
        "tol": args.tol,
        "passed": max_diff <= args.tol,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    record = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    o, n, r = record["ours"], record["naive"], record["ratio_naive_over_ours"]
    print(f"model {record['model']} ({record['scheduler']}, {record['device']}, {record['threads']} threads): "
          f"{len(record['config']['prompts'])} prompts × {len(record['config']['seeds'])} seeds × "
          f"{len(record['config']['psi'])} ψ, {record['config']['steps']} steps, split={record['config']['split']}")
    print(f"  ours : NFE {o['nfe']:>9,d}  wall {o['wall_s']:8.2f} s  (prefix {o['nfe_prefix']:,d} NFE "
          f"{o['wall_prefix_s']:.2f} s, continuations {o['nfe_continue']:,d} NFE {o['wall_continue_s']:.2f} s)")
    print(f"  naive: NFE {n['nfe']:>9,d}  wall {n['wall_s']:8.2f} s")
    print(f"  naive/ours: NFE × {r['nfe']:.2f}, wall × {r['wall']:.2f}")
    verdict = "ok" if record["passed"] else "FAILED"
    print(f"  max |Δ latent| = {record['max_abs_latent_diff']:.3g} (|latent| ≤ {record['max_abs_latent']:.3g}, "
          f"tol {record['tol']:g}): {verdict}  → {out}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
