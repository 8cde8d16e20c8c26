"""The relearning probe: fine-tune θ* on a handful of concept images and watch the concept return.

Papers: Liu & Zhang, "Erased or Dormant? Rethinking Concept Erasure Through Reversibility" (arXiv
2505.16174; its Instance-Personalization Probe reinstates erased concepts through few-shot
supervision); Suriyakumar et al., "Unstable Unlearning: The Hidden Risk of Concept Resurgence in
Diffusion Models" (arXiv 2410.08074). No reference code for the personalization probe is public
in the material this project can read; the recipe here is the standard few-shot fine-tune those
papers describe — the ε-MSE on K images of the concept captioned with the concept word, the
cross-attention only (``trainable: attn2``, lightweight adaptation) or the full UNet
(``trainable: unet``).

The recovery curve: θ* is fine-tuned for ``checkpoints[-1]`` steps, the trained tensors are kept at
every checkpoint (0 = θ* itself), and at each the model generates every forget prompt as it is.
The recovery point is the number of fine-tuning steps at which concept detection reaches 0.5. The
gold standard runs the same probe on the same K images: how quickly a model that never knew the
concept learns it is the control; θ recovers at step 0.

Deliberate choices (the papers give no single recipe): AdamW (β 0.9/0.999, weight decay 1e-2),
constant learning rate, fixed-size batches of the K images with replacement, no prior
preservation, no text-encoder training; the Shapes world trains on renders with the grammar's
one-clause captions, SD on θ's images (or ``concept.images_dir``) with the diffusers templates;
images, timesteps and noise are seeded by the job seed.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from bench.hparams import ConfigError
from bench.probes import Axis, Probe, ProbeContext, ProbeOutput, Workload
from bench.probes import _fewshot as F

SEED_OFFSET = 300_000
TRAINABLE = ("attn2", "unet")


class Relearning(Probe):
    """``probes=[relearn]`` (conf/probes/relearn.yaml)."""

    classes = ("forget",)
    display = "relearning"
    reference = "Liu & Zhang, arXiv 2505.16174; Suriyakumar et al., arXiv 2410.08074"

    def __init__(self, checkpoints: list[int] = (0, 10, 25, 50, 100, 200), images: int = 8, batch_size: int = 8,
                 lr: float = 1e-4, trainable: str = "attn2", seeds: int = 8):
        steps = F.check_settings(self, checkpoints, images, batch_size, lr, seeds)
        if trainable not in TRAINABLE:
            raise ConfigError(f"`{self.key('trainable')}` must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
        self.checkpoints, self.images, self.batch_size, self.lr = steps, images, batch_size, float(lr)
        self.trainable, self.seeds = trainable, seeds

    def check_world(self, concept: Any, world: str) -> None:
        F.check_images_available(self, concept, world)

    def describe(self) -> dict[str, Any]:
        return {"checkpoints": self.checkpoints, "images": self.images, "batch_size": self.batch_size, "lr": self.lr,
                "trainable": self.trainable, "seeds": self.seeds}

    def axis(self, ctx: ProbeContext) -> Axis:
        return Axis("relearn_steps", f"fine-tuning steps ({self.trainable}) on {self.images} concept images",
                    tuple(float(s) for s in self.checkpoints), "steps")

    def _names(self, unet: Any) -> list[str]:
        return [n for n, _ in unet.named_parameters() if self.trainable == "unet" or ".attn2." in n]

    def prepare(self, ctx: ProbeContext) -> tuple[dict[str, Any], dict[str, Any]]:
        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 29)
        groups = F.concept_images(ctx, self.images, ctx.seed * 1000 + SEED_OFFSET)
        lat = [F.encode(ctx.pipe, imgs) for imgs, _ in groups]
        words = list(ctx.concept.targets or (ctx.concept.target,))
        temps = F.templates(ctx.world, ctx.concept.kind)
        sched = F.train_scheduler(ctx.pipe)
        unet = copy.deepcopy(ctx.star)
        unet.requires_grad_(False)
        names = self._names(unet)
        if not names:
            raise ConfigError(f"`{self.key('trainable')}` = 'attn2' but the UNet has no `.attn2.` (cross-attention) parameters")
        params = dict(unet.named_parameters())
        trained = [params[n] for n in names]
        for p in trained:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(trained, lr=self.lr, betas=(0.9, 0.999), weight_decay=1e-2)
        te = ctx.pipe.text_encoder
        te_flags = [p.requires_grad for p in te.parameters()]
        te.requires_grad_(False)
        saved = {}

        def keep(step: int) -> None:
            if step in self.checkpoints:
                for n in names:
                    saved[f"{step}/{n}"] = params[n].detach().cpu().clone()

        try:
            unet.train()
            keep(0)
            history, rows = F.fit(ctx.pipe, unet, sched, opt, lat, [words[i] for _, i in groups], temps, g,
                                  steps=self.checkpoints[-1], batch_size=self.batch_size, text_grad=False,
                                  desc=f"relearning ({self.trainable})", on_step=keep)
        finally:
            for p, f in zip(te.parameters(), te_flags, strict=True):
                p.requires_grad_(f)
        ctx.counter.add(rows * 2, "probe_train")  # one forward and one backward pass per row (NFE-equivalents)
        meta = {"trained_tensors": len(names), "trained_elements": int(sum(p.numel() for p in trained)),
                "loss": F.loss_trace(history), "train_rows": rows, "words": words}
        return saved, meta

    def rows(self, w: Workload) -> dict[str, int]:
        return {"sample": w.sample(w.forget * len(self.checkpoints) * self.seeds), "train": 2 * self.checkpoints[-1] * self.batch_size,
                "theta": 0 if w.renders else w.sample(self.images)}

    def run(self, ctx: ProbeContext, prompt: str, cls: str, state: tuple[dict, dict]) -> ProbeOutput:
        tensors, _ = state
        work = copy.deepcopy(ctx.star).eval()
        seeds = ctx.seeds(SEED_OFFSET, self.seeds)
        images, before = {}, ctx.counter.total
        for step in self.checkpoints:
            prefix = f"{step}/"
            work.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=False)
            with torch.no_grad():
                images[float(step)] = ctx.images(work, prompt, seeds)
        return ProbeOutput(images=images, meta={"nfe": ctx.counter.total - before, "nfe_shared": 0})


__all__ = ["Relearning"]
