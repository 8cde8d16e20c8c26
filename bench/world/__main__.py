"""``python -m bench.world build|check`` — rebuild or check the Shapes world."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def _build(args: argparse.Namespace) -> None:
    import torch

    from bench.world import assemble, train
    from bench.world.report import plot_training

    cfg = train.BuildConfig(seed=args.seed, build_dir=Path(args.build_dir), out_dir=Path(args.out))
    for k, v in (("unet_steps", args.unet_steps), ("gold_steps", args.gold_steps), ("vae_steps", args.vae_steps), ("detector_steps", args.detector_steps), ("n_train", args.n_train), ("eval_every", args.eval_every), ("threads", args.threads)):
        if v is not None:
            setattr(cfg, k, v)
    torch.set_num_threads(cfg.threads)
    out = cfg.out_dir
    parts = ["vae", "detector", "base", "gold"] if args.part == "all" else [args.part]
    specs = train.gold_specs()
    concepts = [args.concept] if args.concept else list(specs)
    for c in concepts:
        if c not in specs:
            sys.exit(f"error: --concept must be one of {', '.join(sorted(specs))} (the Shapes presets in conf/concept/), got {c!r}")
    if parts == ["gold"] and not all(train.built(cfg, p) for p in ("vae", "detector", "base")):
        # A gold model only needs the world's VAE, text encoder and detector: on a clone without
        # the build folder, train it against the shipped ones instead of rebuilding the world.
        print(f"gold: {cfg.build_dir} holds no finished VAE/detector/base; training against the shipped ones in {out}")
        vae_dir, det_dir, text_dir = out / "vae", out / "detector", out / "text_encoder"
    else:
        vae_dir = train.train_vae(cfg)
        if "vae" in parts:
            (out / "report").mkdir(parents=True, exist_ok=True)
            shutil.copy2(cfg.job_dir("vae") / "report.json", out / "report" / "vae.json")
        if parts == ["vae"]:
            return
        det_dir = train.train_detector(cfg, vae_dir)
        if "detector" in parts:
            assemble.write_detector(out, det_dir)
            shutil.copy2(cfg.job_dir("detector") / "report.json", out / "report" / "detector.json")
        if parts == ["detector"]:
            return
        base_dir = train.train_unet(cfg, vae_dir, det_dir)
        text_dir = base_dir / "text_encoder"
        if "base" in parts:
            assemble.write_pipeline(out, vae_dir, base_dir, Path(cfg.build_dir) / "tokenizer")
            assemble.write_detector(out, det_dir)
            shutil.copy2(cfg.job_dir("base") / "report.json", out / "report" / "base.json")
            plot_training(out / "report" / "base.json", out / "report" / "base.png")
            assemble.update_world_json(out, seed=cfg.seed, n_train=cfg.n_train)
    if "gold" in parts:
        for c in concepts:
            gdir = train.train_unet(cfg, vae_dir, det_dir, concept=c, text_dir=text_dir)
            assemble.write_gold(out, c, gdir)
            shutil.copy2(cfg.job_dir(f"gold-{c}") / "report.json", out / "report" / f"gold-{c}.json")
            plot_training(out / "report" / f"gold-{c}.json", out / "report" / f"gold-{c}.png")
            excl = [list(p) for p in specs[c].exclude]
            entry = {"unet": f"gold/{c}/unet", "exclude": excl}
            if len(excl) == 1:
                entry.update(factor=excl[0][0], value=excl[0][1])
            assemble.update_world_json(out, gold={c: entry})


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench.world", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train (or resume) world parts; writes the shipped assets")
    b.add_argument("--part", choices=["all", "vae", "detector", "base", "gold"], default="all")
    b.add_argument("--concept", default=None, help="with --part gold: one concept (default: all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--build-dir", default="world-build", help="checkpoints and caches (not shipped)")
    b.add_argument("--out", default=str(Path(__file__).parent / "assets" / "shapes"))
    for k in ("unet-steps", "gold-steps", "vae-steps", "detector-steps", "n-train", "eval-every", "threads"):
        b.add_argument(f"--{k}", type=int, default=None)
    c = sub.add_parser("check", help="print the fidelity table of the shipped world")
    c.add_argument("--seeds", type=int, default=64)
    c.add_argument("--world", default=str(Path(__file__).parent / "assets" / "shapes"))
    c.add_argument("--out", default=None, help="write the table (JSON) and grids here")
    c.add_argument("--golds", nargs="+", default=None, help="check only these gold models (e.g. one just built)")
    t = sub.add_parser("throughput", help="benchmark generation speed (images/s) of the shipped base model")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--world", default=str(Path(__file__).parent / "assets" / "shapes"))
    args = p.parse_args(argv)
    if args.cmd == "build":
        _build(args)
    elif args.cmd == "check":
        from bench.world.check import run_check

        run_check(Path(args.world), seeds=args.seeds, out=Path(args.out) if args.out else None, golds=args.golds)
    else:
        import json

        from bench.world.check import throughput

        print(json.dumps(throughput(Path(args.world), batch=args.batch), indent=2))


if __name__ == "__main__":
    main()
