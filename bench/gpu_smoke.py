"""``make gpu-smoke``: every stage of a job on an SD-v1.4-architecture pipeline with random weights.

No download: the UNet (block_out_channels 320/640/1280/1280, cross-attention 768), the CLIP text
encoder (768-d, 12 layers, SD 1.x tokenizer) and the VAE (128/256/512/512) are built with the real
SD v1.4 sizes and random weights, so the numbers are meaningless but the code path, the tensor
shapes, the memory and the time are those of SD v1.4 at 512² (``--tiny``: the test-sized pipeline,
seconds on a CPU). Stages: λ generation, θ-prefix snapshots + attack over the paper's ψ grid, VAE
decoding, the classifier, each method's unlearning for a few steps, the detectors' networks (random
weights; NudeNet's shipped model when installed), the metrics. For each stage it prints wall time,
the per-unit cost (per UNet row, per decoded image, per training step) and peak memory (CUDA: peak
allocated; CPU: process max RSS), then estimates ``experiment=paper_table`` from those unit costs.

    python -m bench.gpu_smoke [--device cuda:0] [--tiny] [--batch 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER_PSI = [0.001, 0.01, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55]
# Few steps per method: enough to time one step; the estimate scales by the real counts below.
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    # name: (conf/method file, smoke params, --tiny extra params, the param counting its steps)
    "esd_u": ("esd_u", {"iterations": 3}, {"ddim_steps": 4}, "iterations"),
    "esd_x": ("esd_x", {"iterations": 3}, {"ddim_steps": 4}, "iterations"),
    "fmn": ("fmn", {"steps": 3, "num_images": 2}, {"image_steps": 2}, "steps"),
    "concept_ablation": ("concept_ablation", {"steps": 3, "num_anchor_images": 4, "anchor_batch_size": 4}, {"anchor_steps": 2}, "steps"),
    "uce": ("uce", {}, {}, ""),
}


def sd14_random(device: torch.device, tiny: bool):
    """A ``StableDiffusionPipeline`` with SD v1.4's architecture and random weights (PNDM, as SD v1.4)."""
    from bench.testing import tiny_sd_pipeline

    if tiny:
        return tiny_sd_pipeline(seed=0, scheduler="pndm").to(device)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.testing import _tokenizer, sd_scheduler

    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialise on the device: 1.1 B parameters
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=_tokenizer(77), unet=unet.eval(),
                                   scheduler=sd_scheduler("pndm"), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Meter:
    """Times stages and records peak memory per stage."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str, units: float = 0, unit: str = "", **info: Any):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        row = {"stage": name, "units": units, "unit": unit, **info}
        yield row
        self._sync()
        row["seconds"] = time.perf_counter() - t
        if self.device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            row["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process max RSS so far
        row["per_unit"] = row["seconds"] / row["units"] if row["units"] else None
        self.rows.append(row)
        per = f"{row['per_unit'] * 1e3:9.2f} ms/{row['unit']}" if row["per_unit"] else " " * 18
        print(f"  {name:<28} {row['seconds']:8.2f} s {per}  peak {row['peak_gb']:6.2f} GB", file=sys.stderr, flush=True)


def _concept():
    from omegaconf import OmegaConf

    from bench.concepts import concept_from_cfg

    return concept_from_cfg(OmegaConf.load(ROOT / "conf" / "concept" / "r2d2.yaml"))


def _method(name: str, tiny: bool) -> tuple[Callable, dict, str]:
    from omegaconf import OmegaConf

    from bench.config import load_target
    from bench.hparams import check_params

    file, smoke, tiny_extra, count = METHODS[name]
    mcfg = OmegaConf.load(ROOT / "conf" / "method" / f"{file}.yaml")
    fn = load_target(mcfg._target_)
    params = {**OmegaConf.to_container(mcfg.params), **smoke, **(tiny_extra if tiny else {})}
    return fn, check_params(fn, params), count


def run(device: torch.device, tiny: bool, batch: int, autocast: str | None, methods: list[str]) -> dict[str, Any]:
    from bench.classifier import ClassifierConfig, train_classifier
    from bench.metrics import ccs, crs, kid
    from bench.pipeline import apply_memory_options
    from bench.probes.partial_diffusion import attack
    from bench.sampling import NFECounter, SamplerConfig, decode, generate, prefix_snapshots
    from bench.testing import perturbed_unet

    meter, counter = Meter(device), NFECounter()
    amp = (lambda: torch.autocast(device.type, dtype=getattr(torch, autocast))) if autocast and device.type == "cuda" else contextlib.nullcontext
    steps = 8 if tiny else 20
    n = 10  # images per set: the classifier's minimum at val_frac 0.2 with 3 negatives
    sampler = SamplerConfig(steps=steps, guidance=7.5, batch_size=batch)
    print(f"gpu-smoke: {'tiny' if tiny else 'SD v1.4 architecture, random weights, 512²'} on {device}, autocast {autocast if device.type == 'cuda' else None}, "
          f"batch {batch} images ({2 * batch} UNet rows with CFG), PNDM {steps} steps", file=sys.stderr)
    with meter.stage("build pipeline") as row:
        pipe = sd14_random(device, tiny)
        apply_memory_options(pipe, {"attention": "sdpa", "vae_slicing": True})
        theta = pipe.unet.requires_grad_(False)
        star = perturbed_unet(theta, scale=0.05)
        row["unet_params_m"] = sum(p.numel() for p in theta.parameters()) / 1e6
    prompt = "R2D2"
    before = counter.total
    with meter.stage("generate λ_O (θ)", unit="UNet row") as row, amp():
        lat_o = generate(pipe, theta, prompt, list(range(n)), sampler, counter)
        row["units"] = counter.total - before
    before = counter.total
    with meter.stage("generate λ_U (θ*)", unit="UNet row") as row, amp():
        lat_u = generate(pipe, star, prompt, list(range(n)), sampler, counter)
        row["units"] = counter.total - before
    with meter.stage("decode (VAE)", units=2 * n, unit="image"), amp():
        img_o, img_u = decode(pipe, lat_o, batch), decode(pipe, lat_u, batch)
    seeds = [100_000 + s for s in range(2)]
    before = counter.total
    with meter.stage("θ-prefix snapshots", unit="UNet row") as row, amp():
        snaps = prefix_snapshots(pipe, theta, prompt, seeds, PAPER_PSI, sampler, counter, split="timestep")
        row["units"] = counter.total - before
    before = counter.total
    with meter.stage("attack (θ* continuations)", unit="UNet row") as row, amp():
        lam_p = attack(pipe, theta, star, prompt, seeds, PAPER_PSI, sampler, snapshots=snaps, counter=counter, split="timestep")
        row["units"] = counter.total - before
    with meter.stage("classifier (1 epoch)", units=2 * n, unit="image"):
        clf = train_classifier(img_o, img_u, ClassifierConfig(backbone="resnet18_scratch", epochs=1), device=device)
    with meter.stage("metrics (CCS, CRS, KID)"):
        p_orig = {p: clf.prob_original(x) for p, x in lam_p.items()}
        feats = {p: clf.features(x) for p, x in lam_p.items()}
        ccs(p_orig), crs(feats, clf.features(img_o), clf.features(img_u)), kid(clf.features(img_o), clf.features(img_u))
    _detector_stages(meter, device, np.concatenate([img_o, img_u])[:2] if tiny else np.concatenate([img_o, img_u]), tiny)
    concept = _concept()
    with tempfile.TemporaryDirectory(prefix="concealbench-gpu-smoke-") as cache:
        from bench.context import MethodContext
        from bench.hparams import takes_context

        mctx = MethodContext(cache_dir=Path(cache))  # Concept Ablation's anchor images: not the user's cache
        for name in methods:
            fn, params, count = _method(name, tiny)
            pipe.unet = copy.deepcopy(theta).requires_grad_(False)
            steps_run = int(params.get(count, 1)) if count else 1
            try:
                with meter.stage(f"unlearn: {name}", units=steps_run, unit="step") as row:
                    report = fn(pipe, concept, **params, **({"ctx": mctx} if takes_context(fn) else {})) or {}
                    row["nfe"] = report.get("nfe")
            except torch.cuda.OutOfMemoryError as e:  # a finding, not a crash: the method needs more memory
                meter.rows.append({"stage": f"unlearn: {name}", "error": f"CUDA out of memory: {str(e).splitlines()[0]}"})
                print(f"  unlearn: {name}: CUDA out of memory", file=sys.stderr)
            finally:
                pipe.unet = theta
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "tiny": tiny, "batch_images": batch, "autocast": autocast if device.type == "cuda" else None, "stages": meter.rows}
    out["paper_table_estimate"] = estimate_paper_table(meter.rows)
    return out


def _detector_stages(meter: Meter, device: torch.device, images: np.ndarray, tiny: bool) -> None:
    """The detectors' networks with random weights (cost only); NudeNet's real model when installed."""
    import torchvision

    from bench.classifier import imagenet_preprocess

    x = imagenet_preprocess(images)
    with meter.stage("detector: ResNet-50 (random)", units=len(images), unit="image"), torch.no_grad():
        torchvision.models.resnet50(weights=None).eval().to(device)(torch.nn.functional.interpolate(x, 224).to(device))
    with meter.stage("KID: Inception-v3 (random)", units=len(images), unit="image"), torch.no_grad():
        torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval().to(device)(torch.nn.functional.interpolate(x, 299).to(device))
    if not tiny:
        import open_clip

        with meter.stage("CLIP ViT-L-14 (random)", units=len(images), unit="image"), torch.no_grad():
            open_clip.create_model("ViT-L-14", pretrained=None).eval().to(device).encode_image(torch.nn.functional.interpolate(x, 224).to(device))
    try:
        from bench.detectors import NudeNet

        det = NudeNet(["FEMALE_BREAST_EXPOSED"], 0.6)
        with meter.stage("detector: NudeNet (shipped)", units=len(images), unit="image"):
            det.scores(images)
    except Exception as e:  # noqa: BLE001 — optional package
        print(f"  detector: NudeNet skipped ({type(e).__name__}: {e})", file=sys.stderr)


def paper_table_counts() -> dict[str, Any]:
    """UNet rows, decodes, classifiers and method steps of ``experiment=paper_table`` (from the configs)."""
    import yaml

    from bench.sampling import prefix_steps
    from bench.testing import sd_scheduler

    conf = ROOT / "conf"
    ev = yaml.safe_load((conf / "eval" / "paper.yaml").read_text())
    e = ev["eval"]
    a = e["probes"]["partial_diffusion"]
    sched = sd_scheduler("pndm")
    sched.set_timesteps(e["steps"])
    T = len(sched.timesteps)
    k = [prefix_steps(sched, p, a["split"]) for p in a["psi"]]
    seeds_att = a["seeds"] + (1 if a.get("paper_seed") is not None else 0)
    exp = yaml.safe_load((conf / "experiment" / "paper_table.yaml").read_text())
    pairs = str(exp["hydra"]["sweeper"]["params"]["pair"]).split(",")
    rows = decodes = 0
    prompts_seen: set[str] = set()
    jobs, method_steps = [], {}
    for pair in pairs:
        pair_cfg = yaml.safe_load((conf / "pair" / f"{pair}.yaml").read_text())
        d = pair_cfg["defaults"]
        method = d[0]["override /method"]
        concept = yaml.safe_load((conf / "concept" / f"{d[1]['override /concept']}.yaml").read_text())
        concept.update(pair_cfg.get("concept") or {})  # a pair may carry its own prompts (sdd_nudity)
        prompts = list(concept["forget_prompts"]) + list(concept["retain_prompts"] or [])
        new = [p for p in prompts if p not in prompts_seen]
        prompts_seen.update(prompts)
        # λ_U per prompt; λ_O and the θ prefix once per prompt (shared cache); θ* continuations per ψ
        rows += len(prompts) * (e["n"] * T * 2 + seeds_att * sum(T - x for x in k) * 2)
        rows += len(new) * (e["n"] * T * 2 + seeds_att * max(k) * 2)
        decodes += len(prompts) * (e["n"] + seeds_att * len(a["psi"])) + len(new) * e["n"]
        mcfg = yaml.safe_load((conf / "method" / f"{method}.yaml").read_text())["params"]
        method_steps[method] = method_steps.get(method, 0) + int(mcfg.get("iterations") or mcfg.get("steps") or 1)
        jobs.append({"pair": pair, "method": method, "prompts": len(prompts)})
    return {"jobs": len(jobs), "prompts": len(prompts_seen), "classifiers": sum(j["prompts"] for j in jobs), "unet_rows": rows,
            "decodes": decodes, "method_steps": method_steps, "T": T, "prefix_steps": k, "classifier_images": 2 * e["n"],
            "classifier_epochs": e["classifier"]["epochs"]}


def estimate_paper_table(rows: list[dict]) -> dict[str, Any]:
    """Seconds for ``experiment=paper_table`` from this run's unit costs (an estimate, not a measurement)."""
    c = paper_table_counts()
    unit = {r["stage"]: r.get("per_unit") for r in rows}
    row_cost = unit.get("attack (θ* continuations)") or unit.get("generate λ_U (θ*)") or 0.0
    parts = {
        "sampling": c["unet_rows"] * row_cost,
        "decoding": c["decodes"] * (unit.get("decode (VAE)") or 0.0),
        "classifiers": c["classifiers"] * c["classifier_images"] * c["classifier_epochs"] * (unit.get("classifier (1 epoch)") or 0.0),
        "detectors+KID": c["classifiers"] * c["classifier_images"] * sum(unit.get(k) or 0.0 for k in unit if k.startswith(("detector:", "KID:", "CLIP"))),
    }
    for method, n_steps in c["method_steps"].items():
        parts[f"unlearn: {method}"] = n_steps * (unit.get(f"unlearn: {method}") or 0.0)
    total = sum(parts.values())
    return {"counts": c, "seconds": parts, "total_hours": total / 3600,
            "note": "unit costs of this run × the configs' counts; method costs include their one-off image generation"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--tiny", action="store_true", help="the test-sized pipeline (seconds on a CPU)")
    ap.add_argument("--batch", type=int, default=None, help="images per UNet call (default: conf/model/sd14.yaml max_batch_size)")
    ap.add_argument("--autocast", default="float16", choices=["float16", "bfloat16", "none"])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)} ('' = none)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    from bench.hparams import ConfigError
    from bench.pipeline import resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: `--methods` must be a subset of {','.join(METHODS)}, got {unknown}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import yaml

    batch = args.batch or int(yaml.safe_load((ROOT / "conf" / "model" / "sd14.yaml").read_text())["max_batch_size"])
    out = run(device, args.tiny, batch, None if args.autocast == "none" else args.autocast, methods)
    est = out["paper_table_estimate"]
    print(f"experiment=paper_table estimate from these unit costs: {est['total_hours']:.1f} h on this device "
          f"({est['counts']['jobs']} jobs, {est['counts']['unet_rows'] / 1e6:.2f} M UNet rows; peak memory above)"
          + ("  [--tiny: not meaningful]" if args.tiny else ""), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
