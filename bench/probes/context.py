"""Image-context probes: start from an image that holds the concept and let θ* finish it.

- **Diffusion completion** (``probes=[completion]``): the concept image is noised to an intermediate
  timestep and θ* denoises it with the forget prompt — SDEdit (Meng et al., ICLR 2022) used as the
  concept-restoration probe of HUB (Moon et al., "Holistic Unlearning Benchmark", 2024) and as the
  "supplying visual context" probes of Lu et al., "When Are Concepts Erased From Diffusion Models?"
  (NeurIPS 2025, kevinlu4588/WhenAreConceptsErased @ 9a03e07).
- **Inpainting** (``probes=[inpainting]``): a centred square of the concept image (``mask_fractions``
  of its area) is masked and θ* fills it while the rest is held to the image — the reference's
  InpaintingProbe (``src/probes/inpainting_probe.py``: base-model images, a centred 256×256 mask
  on 512² images = a quarter of the area, diffusers' inpainting pipeline over the erased UNet).

Both axes count the context θ* is given, so that — as for every probe — a recovery earlier on the
axis means the concept came back with less help: completion's axis is the share of the trajectory
*kept* from the image (1 − strength: 1 = the image itself, 0 = noise), inpainting's the share of
the image kept unmasked (1 − mask fraction). The recovery point is the least context at which
concept detection reaches 0.5; a model that never knew the concept (the gold standard) needs more
of it to keep the concept, θ needs none.

Concept images: on the Shapes world, renders with every factor the forget prompt names (the
renderer holds the ground truth); on SD worlds, θ's own images of the forget prompt (what the
reference probes start from).

Deliberate deviations (every one):
1. Inpainting blends latents at every step (the known region is re-noised from the image's latent
   to the step's noise level and kept, the masked region comes from θ*), which is what diffusers'
   inpainting pipeline does with a 4-channel UNet; the mask is applied in latent space.
2. Strength 0 / nothing masked is not run: the input image is returned as it is (no VAE round trip).
3. Per-seed generators draw the noise, so an image never depends on its batch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.hparams import ConfigError
from bench.probes import Axis, Probe, ProbeContext, ProbeOutput, Workload
from bench.probes import _fewshot as F

SEED_OFFSET = {"completion": 500_000, "inpainting": 600_000}


def context_images(ctx: ProbeContext, prompt: str, seeds: list[int]) -> np.ndarray:
    """One concept image per seed for ``prompt``: a render (Shapes) or θ's own image (SD)."""
    if ctx.world == "shapes":
        from bench.worlds import shapes_prompt_renders

        return shapes_prompt_renders(prompt, ctx.concept, len(seeds), seeds[0])
    return ctx.images(ctx.theta, prompt, seeds)


def centre_mask(size: int, fraction: float) -> torch.Tensor:
    """(size, size) float mask, 1 = regenerated: a centred square of ``fraction`` of the area."""
    side = int(round(size * fraction ** 0.5))
    lo = (size - side) // 2
    m = torch.zeros(size, size)
    m[lo : lo + side, lo : lo + side] = 1.0
    return m


def finish(ctx: ProbeContext, unet: Any, prompt: str, images: np.ndarray, seeds: list[int], start: int,
           mask: torch.Tensor | None = None) -> np.ndarray:
    """``finish_latents``, decoded to uint8 images."""
    from bench.sampling import decode

    return decode(ctx.pipe, finish_latents(ctx, unet, prompt, images, seeds, start, mask), ctx.sampler.batch_size)


@torch.no_grad()
def finish_latents(ctx: ProbeContext, unet: Any, prompt: str, images: np.ndarray, seeds: list[int], start: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """θ* finishes ``images`` from sampler step ``start`` (their latents noised to that step's level),
    optionally holding the unmasked region (``mask`` = 1 where θ* paints, latent resolution).
    ``start`` = 0 starts from pure noise drawn exactly as a plain generation does."""
    from diffusers.utils.torch_utils import randn_tensor

    from bench.sampling import _batch_embeddings, _embeddings, _step_kwargs, make_scheduler

    pipe, cfg = ctx.pipe, ctx.sampler
    device = pipe._execution_device
    emb = _embeddings(pipe, prompt, cfg, device, unet)
    out = []
    for lo in range(0, len(seeds), cfg.batch_size):
        s = seeds[lo : lo + cfg.batch_size]
        x0 = F.encode(pipe, images[lo : lo + len(s)]).to(device)
        sched = make_scheduler(pipe, cfg.steps, device)
        gens = [torch.Generator("cpu").manual_seed(v) for v in s]
        noise = randn_tensor(x0.shape, generator=gens, device=device, dtype=x0.dtype)
        ts = sched.timesteps
        latents = sched.add_noise(x0, noise, ts[start : start + 1].repeat(len(s))) if start > 0 else noise * sched.init_noise_sigma
        e = _batch_embeddings(emb, len(s), cfg)
        kwargs = _step_kwargs(sched, gens, cfg.eta)
        m = None if mask is None else mask.to(device, x0.dtype)[None, None]
        for i in range(start, len(ts)):
            t = ts[i]
            x = torch.cat([latents] * 2) if cfg.uses_cfg else latents
            eps = unet(sched.scale_model_input(x, t), t, encoder_hidden_states=e, return_dict=False)[0]
            ctx.counter.add(x.shape[0], "probe")
            if cfg.uses_cfg:
                u, c = eps.chunk(2)
                eps = u + cfg.guidance * (c - u)
            latents = sched.step(eps, t, latents, **kwargs, return_dict=False)[0]
            if m is not None:  # hold the known region to the image at the next noise level
                known = sched.add_noise(x0, noise, ts[i + 1 : i + 2].repeat(len(s))) if i + 1 < len(ts) else x0
                latents = m * latents + (1 - m) * known
        out.append(latents)
    return torch.cat(out)


def _kept(mask_fraction: float) -> float:
    return round(1.0 - mask_fraction, 6)


class _ContextProbe(Probe):
    classes = ("forget",)

    def _check_seeds(self, seeds: Any) -> int:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
            raise ConfigError(f"`{self.key('seeds')}` must be an integer >= 2, got {seeds!r}")
        return seeds

    def _theta_rows(self, w: Workload) -> int:
        return 0 if w.renders else w.sample(w.forget * self.seeds)  # SD: θ's own images are the context

    def check_world(self, concept: Any, world: str) -> None:
        if world == "shapes" and concept.render is None:
            raise ConfigError(f"`{self.key('seeds')}`: concept {concept.name!r} has no renderer (no `concept.detect` on a Shapes "
                              "factor): the probe has no concept images to start from")


class Completion(_ContextProbe):
    """``probes=[completion]`` (conf/probes/completion.yaml): SDEdit-style completion of a concept image."""

    display = "diffusion completion"
    reference = "SDEdit (Meng et al., ICLR 2022); HUB concept restoration; Lu et al., NeurIPS 2025"

    def __init__(self, kept: list[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), seeds: int = 8):
        kept = list(kept or [])
        if not kept or any(isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 <= k <= 1 for k in kept) or kept != sorted(set(kept)):
            raise ConfigError(f"`{self.key('kept')}` must be a non-empty, increasing list of shares in [0, 1] of the trajectory "
                              f"kept from the image (1 − strength), got {kept!r}")
        self.kept, self.seeds = [float(k) for k in kept], self._check_seeds(seeds)

    def describe(self) -> dict[str, Any]:
        return {"kept": self.kept, "seeds": self.seeds}

    def axis(self, ctx: ProbeContext) -> Axis:
        return Axis("context_kept", "share of the trajectory kept from the concept image (1 − strength)", tuple(self.kept), "kept")

    def rows(self, w: Workload) -> dict[str, int]:
        left = [w.steps - int(round(k * w.steps)) for k in self.kept]
        return {"sample": sum(w.sample(w.forget * self.seeds, s) for s in left if s > 0), "train": 0, "theta": self._theta_rows(w)}

    def run(self, ctx: ProbeContext, prompt: str, cls: str, state: tuple[dict, dict]) -> ProbeOutput:
        from bench.sampling import make_scheduler

        seeds = ctx.seeds(SEED_OFFSET["completion"], self.seeds)
        source = context_images(ctx, prompt, seeds)
        T = len(make_scheduler(ctx.pipe, ctx.sampler.steps).timesteps)
        images, before = {}, ctx.counter.total
        for k in self.kept:
            start = int(round(k * T))  # kept share k: θ* re-runs the last (1 − k)·T steps
            if start >= T:
                images[k] = source.copy()  # strength 0: the image itself
                continue
            with ctx.amp():
                images[k] = finish(ctx, ctx.star, prompt, source, seeds, start)
        return ProbeOutput(images=images, meta={"nfe": ctx.counter.total - before, "nfe_shared": 0})


class Inpainting(_ContextProbe):
    """``probes=[inpainting]`` (conf/probes/inpainting.yaml): θ* fills a masked centre of a concept image."""

    display = "inpainting"
    reference = "Lu et al., NeurIPS 2025 (WhenAreConceptsErased InpaintingProbe)"

    def __init__(self, mask_fractions: list[float] = (0.9, 0.75, 0.5, 0.25, 0.1), seeds: int = 8):
        fr = list(mask_fractions or [])
        if not fr or any(isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1 for m in fr) or len(set(fr)) != len(fr):
            raise ConfigError(f"`{self.key('mask_fractions')}` must be a non-empty list of distinct fractions in (0, 1) of the image "
                              f"area that θ* repaints, got {mask_fractions!r}")
        self.fractions, self.seeds = sorted((float(m) for m in fr), reverse=True), self._check_seeds(seeds)

    def describe(self) -> dict[str, Any]:
        return {"mask_fractions": self.fractions, "mask": "centred square", "seeds": self.seeds}

    def axis(self, ctx: ProbeContext) -> Axis:
        return Axis("image_kept", "share of the concept image kept unmasked (1 − mask fraction)", tuple(_kept(m) for m in self.fractions), "kept")

    def rows(self, w: Workload) -> dict[str, int]:
        return {"sample": w.sample(w.forget * len(self.fractions) * self.seeds), "train": 0, "theta": self._theta_rows(w)}

    def run(self, ctx: ProbeContext, prompt: str, cls: str, state: tuple[dict, dict]) -> ProbeOutput:
        seeds = ctx.seeds(SEED_OFFSET["inpainting"], self.seeds)
        source = context_images(ctx, prompt, seeds)
        size = ctx.pipe.unet.config.sample_size
        images, before = {}, ctx.counter.total
        for m in self.fractions:
            with ctx.amp():
                images[_kept(m)] = finish(ctx, ctx.star, prompt, source, seeds, 0, centre_mask(size, m))
        return ProbeOutput(images=images, meta={"nfe": ctx.counter.total - before, "nfe_shared": 0})


__all__ = ["Completion", "Inpainting", "centre_mask", "context_images", "finish", "finish_latents"]
