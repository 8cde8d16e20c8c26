"""``python -m bench.world check``: the Shapes world's fidelity table, from the shipped files.

Reports (issue "Foundation", must-show list):
- oracle accuracy per head on 2,000 held-out renders, on their VAE reconstructions, and (shape,
  texture) on darkened and desaturated copies — the duller tones of generated images; and on renders
  whose grey background is tinted (outside its training: where edited models can take it);
- base-model fidelity for every forget and retain prompt of every preset (64 seeds, guidance 7.5),
  and on 20 grammar prompts that no preset uses;
- each gold-standard UNet: concept detection on its forget prompts, fidelity on its retain prompts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.world.captions import parse, random_prompts
from bench.world.detector import HEADS, Detector
from bench.world.fidelity import MAX_TINT, factor_hits, generate, prompt_fidelity, tinted_accuracy
from bench.world.render import render_random

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "concept"


def presets() -> tuple[str, ...]:
    """Every Shapes concept preset (conf/concept/*.yaml with a detect spec on a world factor)."""
    from bench.world.train import gold_specs

    return tuple(gold_specs(CONF_DIR))


def load_world(world: Path, unet_dir: Path | None = None):
    """The shipped pipeline (fp32) and detector; optionally with another UNet (a gold model)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    kw = {}
    if unet_dir is not None:
        kw["unet"] = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(str(world), torch_dtype=torch.float32, use_safetensors=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Detector.load(world / "detector")


def _presets() -> dict[str, dict]:
    from omegaconf import OmegaConf

    return {p: OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{p}.yaml")) for p in presets()}


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:5.3f}"


def detector_accuracy(world: Path, det: Detector, n: int = 2000) -> dict:
    """The oracle on ``n`` fresh renders (the build's held-out seed) through the shipped VAE."""
    from diffusers import AutoencoderKL

    from bench.world.train import accuracy_report

    vae = AutoencoderKL.from_pretrained(str(world / "vae"), torch_dtype=torch.float32)
    return accuracy_report(det, vae, render_random(n, seed=999_999))


def run_check(world: Path, seeds: int = 64, out: Path | None = None, golds: list[str] | None = None) -> dict:
    """The whole table; with ``golds`` only those gold models (a gold just built), merged into
    ``out/check.json`` when it exists."""
    t0 = time.time()
    presets = _presets()
    seed_list = list(range(seeds))
    if golds:
        table = out / "check.json" if out is not None else None
        full = json.loads(table.read_text()) if table is not None and table.exists() else None
        if full is not None and full.get("seeds") != seeds:  # checked before any model runs
            _usage_error(f"`--seeds` {seeds} differs from {table}'s {full.get('seeds')}: not merged")
        result = check_golds(world, Detector.load(world / "detector"), presets, seed_list, only=golds)
        if full is not None:
            full.setdefault("gold", {}).update(result)
            table.write_text(json.dumps(full, indent=1))
            print(f"\nmerged into {table}")
        return result
    pipe, det = load_world(world)
    result: dict = {"seeds": seeds, "guidance": 7.5, "steps": 20}

    acc = detector_accuracy(world, det)
    result["detector"] = acc
    print("oracle accuracy on 2,000 held-out renders / their VAE reconstructions / darkened ×0.5 / desaturated 50%")
    for h in HEADS:
        tone = " / ".join(f"{acc[k][h]:.4f}" if h in acc[k] else "  –   " for k in ("darkened_x0.5", "desaturated_50pct"))
        print(f"  {h:8s} {acc['renders'][h]:.4f} / {acc['vae_reconstructions'][h]:.4f} / {tone}")
    result["detector_tinted"] = tinted = tinted_accuracy(det)
    print("oracle accuracy on the same kind of renders with the grey background tinted (outside its training; "
          f"an image whose frame tint exceeds {MAX_TINT} counts as off its domain, `off_domain_u`)")
    for key, row in tinted.items():
        print(f"  {key:10s} frame tint {row['frame_tint']:.2f}   " + "   ".join(f"{h} {row[h]:.3f}" for h in HEADS))

    used = set()
    rows = []
    grids = {}
    for name, cfg in presets.items():
        prompts = [(p, "forget") for p in cfg["forget_prompts"]] + [(p, "retain") for p in cfg["retain_prompts"]]
        images = generate(pipe, [p for p, _ in prompts], seed_list)
        grids[name] = np.concatenate([images[i * seeds : i * seeds + 8] for i in range(len(prompts))])
        for i, (p, cls) in enumerate(prompts):
            used.add(p)
            rows.append({"preset": name, "class": cls, "prompt": p, **prompt_fidelity(images[i * seeds : (i + 1) * seeds], p, det)})
    extra = random_prompts(20, seed=123, exclude=used)
    images = generate(pipe, extra, seed_list)
    for i, p in enumerate(extra):
        rows.append({"preset": "-", "class": "unseen", "prompt": p, **prompt_fidelity(images[i * seeds : (i + 1) * seeds], p, det)})
    result["base"] = rows

    print(f"\nbase model fidelity ({seeds} seeds per prompt, DDIM 20 steps, guidance 7.5)")
    print(f"  {'preset':8s} {'class':7s} {'shape':>6s} {'colour':>6s} {'texture':>7s}  prompt")
    for r in rows:
        print(f"  {r['preset']:8s} {r['class']:7s} {_fmt(r.get('shape')):>6s} {_fmt(r.get('colour')):>6s} {_fmt(r.get('texture')):>7s}  {r['prompt']}")
    for cls in ("forget", "retain", "unseen"):
        sel = [r for r in rows if r["class"] == cls]
        means = {h: np.mean([r[h] for r in sel if h in r]) for h in HEADS if any(h in r for r in sel)}
        worst = {h: min(r[h] for r in sel if h in r) for h in means}
        print(f"  mean {cls:7s}: " + "  ".join(f"{h} {means[h]:.3f} (min {worst[h]:.3f})" for h in means))

    result["gold"] = check_golds(world, det, presets, seed_list)
    result["seconds"] = time.time() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.json").write_text(json.dumps(result, indent=1))
        for name, g in grids.items():
            save_grid(g, out / f"grid-{name}.png", cols=8)
        print(f"\nwrote {out / 'check.json'} and grids")
    return result


def check_golds(world: Path, det: Detector, presets: dict[str, dict], seed_list: list[int], only: list[str] | None = None) -> dict:
    """Each shipped gold UNet (``only``: these): concept detection on its preset's forget prompts
    (any of its excluded factor values), fidelity on its retain prompts; printed and returned."""
    seeds = len(seed_list)
    gold = {}
    wj = json.loads((world / "world.json").read_text()) if (world / "world.json").exists() else {}
    unknown = sorted(set(only or ()) - set(wj.get("gold", {})))
    if unknown:
        _usage_error(f"`--golds`: no shipped gold for {unknown}; the world has {sorted(wj.get('gold', {}))}")
    for name, g in sorted(wj.get("gold", {}).items()):
        if only and name not in only:
            continue
        gpipe, _ = load_world(world, world / g["unet"])
        cfg = presets[name]
        forget, retain = cfg["forget_prompts"], cfg["retain_prompts"]
        imgs = generate(gpipe, forget + retain, seed_list)
        pairs = [tuple(x) for x in g.get("exclude") or [[g["factor"], g["value"]]]]
        det_rates = []
        for i in range(len(forget)):
            hits = factor_hits(imgs[i * seeds : (i + 1) * seeds], det)
            shown = np.zeros(seeds, dtype=bool)
            for factor, value in pairs:
                shown |= hits[factor] == value
            det_rates.append(float(shown.mean()))
        ret = [prompt_fidelity(imgs[(len(forget) + i) * seeds : (len(forget) + i + 1) * seeds], p, det) for i, p in enumerate(retain)]
        ret_all = [np.mean(list(r.values())) for r in ret]
        gold[name] = {"forget_detection": dict(zip(forget, det_rates, strict=True)), "retain_fidelity": dict(zip(retain, ret, strict=True)),
                      "forget_detection_mean": float(np.mean(det_rates)), "retain_fidelity_mean": float(np.mean(ret_all))}
        what = " or ".join(f"{f}={v}" for f, v in pairs)
        print(f"\ngold[{name}]: {what} detected in {np.mean(det_rates):.3f} of forget-prompt images (max {max(det_rates):.3f});"
              f" retain-prompt fidelity {np.mean(ret_all):.3f} (min {min(ret_all):.3f})")
    return gold


def _usage_error(message: str) -> None:
    """One message on stderr and exit 2, like every bad input to the CLI."""
    import sys

    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def save_grid(images: np.ndarray, path: Path, cols: int = 8, scale: int = 2) -> None:
    """Tile uint8 images (N, H, W, 3) into a PNG, upscaled ``scale``× (nearest; 2 keeps the shipped world small)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def throughput(world: Path, batch: int = 64, repeats: int = 3) -> dict:
    """Images/s of the base model at the default sampler settings (CFG on), batch ``batch``."""
    pipe, _ = load_world(world)
    prompts = ["a red star on a striped background"]
    generate(pipe, prompts, list(range(batch)))  # warm-up
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        generate(pipe, prompts, list(range(r * batch, (r + 1) * batch)))
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"batch": batch, "steps": 20, "guidance": 7.5, "seconds_per_batch": med, "images_per_s": batch / med, "threads": torch.get_num_threads()}


__all__ = ["run_check", "throughput", "load_world", "save_grid", "parse"]
