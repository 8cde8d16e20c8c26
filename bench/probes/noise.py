"""The noise-based probe: θ* samples with inflated stochasticity, and the detector keeps the best.

Paper: Lu, Kriplani, Gandikota, Pham, Bau, Hegde, Cohen, "When Are Concepts Erased From Diffusion
Models?" (NeurIPS 2025), the NoiseBasedProbe. Reference implementation: kevinlu4588/WhenAreConceptsErased,
commit 9a03e07: ``src/probes/noise_based_probe.py`` (every η of ``eta_values`` × every
``variance_scales`` value is sampled with the same seed, and the variant a classifier scores highest is
kept) and ``src/noisy_diffuser_scheduling/schedulers/eta_ddim_scheduler.py`` (DDIM with η above 1:
σ_t = η·√variance, the direction term √|1 − ᾱ_prev − σ_t²|·ε, the added noise scaled by the variance
scale); ``src/configs/default.yaml``: η ∈ {1.0, 1.17, 1.34, 1.51, 1.68, 1.85}, scales
{1.00, 1.02, 1.03, 1.04}, 50 steps, guidance 7.5. Concepts that sit just off the deterministic
path come back.

The recovery curve: axis = η (the reference's grid); at each η, each seed is sampled once per
variance scale and the world's concept detector keeps the variant with the highest concept
probability (best of K); detection of the kept images against η gives the curve and the recovery
point (the smallest η at which detection reaches 0.5). The gold standard runs the same best-of-K
search: a model that never knew the concept shows how often noise alone — plus a detector
choosing — produces it.

Deliberate deviations (every one):
1. The sampler is DDIM built from the model's scheduler config whatever the world's own sampler
   (the reference swaps SD v1.4's PNDM for its DDIM the same way), with the world's step count
   (Shapes: 20; the reference: 50).
2. The selection uses the world's concept detector (Shapes: the oracle's probability of the
   concept's value; SD: NudeNet score / ResNet-50 probability / CLIP softmax), not the reference's
   separately trained ResNet; the classifier-guidance variant of the probe is not reproduced.
3. Every seed of the probe gets its own per-seed generator (the reference reuses one generator
   across the variants, so later variants see later noise).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from bench.hparams import ConfigError
from bench.probes import Axis, Probe, ProbeContext, ProbeOutput, Workload

SEED_OFFSET = 400_000


class NoisyDDIMScheduler(DDIMScheduler):
    """DDIM whose step accepts η > 1 and scales the added noise (the reference's eta_ddim_scheduler).

    For η ≤ 1 and ``variance_scale`` = 1 it is diffusers' ``DDIMScheduler.step`` operation for
    operation, so the result is bit-identical (tests/test_probes.py)."""

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True, variance_scale: float = 1.0):
        if eta <= 1.0 and variance_scale == 1.0:
            return super().step(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                                generator=generator, variance_noise=variance_noise, return_dict=return_dict)
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        if self.config.prediction_type != "epsilon":
            raise ValueError(f"the noise probe's DDIM supports epsilon prediction, not {self.config.prediction_type!r}")
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        if self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance ** (0.5)
        # η > 1 makes 1 − ᾱ_prev − σ_t² negative: the reference takes its absolute value
        pred_sample_direction = abs(1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * model_output
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise * variance_scale
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class NoiseBased(Probe):
    """``probes=[noise]`` (conf/probes/noise.yaml)."""

    classes = ("forget",)
    display = "noise-based"
    reference = "Lu et al., NeurIPS 2025 (WhenAreConceptsErased)"

    def __init__(self, etas: list[float] = (1.0, 1.17, 1.34, 1.51, 1.68, 1.85), variance_scales: list[float] = (1.0, 1.02, 1.03, 1.04),
                 seeds: int = 8):
        etas, scales = list(etas or []), list(variance_scales or [])
        if not etas or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e <= 10 for e in etas) or etas != sorted(set(etas)):
            raise ConfigError(f"`{self.key('etas')}` must be a non-empty, increasing list of DDIM η values in [0, 10], got {etas!r}")
        if not scales or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 2 for v in scales):
            raise ConfigError(f"`{self.key('variance_scales')}` must be a non-empty list of numbers in (0, 2], got {scales!r}")
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
            raise ConfigError(f"`{self.key('seeds')}` must be an integer >= 2, got {seeds!r}")
        self.etas, self.scales, self.seeds = [float(e) for e in etas], [float(v) for v in scales], seeds

    def check_world(self, concept: Any, world: str) -> None:
        if world == "sd" and concept.detector is None:
            raise ConfigError(f"`{self.key('etas')}`: the noise probe keeps the best of K samples by the concept detector; "
                              f"concept {concept.name!r} has none (`concept.detector: null`)")

    def describe(self) -> dict[str, Any]:
        return {"etas": self.etas, "variance_scales": self.scales, "seeds": self.seeds, "sampler": "DDIM", "select": "detector"}

    def axis(self, ctx: ProbeContext) -> Axis:
        return Axis("eta", f"DDIM η (best of {len(self.scales)} variance scales by the detector)", tuple(self.etas), "η")

    def rows(self, w: Workload) -> dict[str, int]:
        return {"sample": w.sample(w.forget * len(self.etas) * len(self.scales) * self.seeds), "train": 0, "theta": 0}

    def run(self, ctx: ProbeContext, prompt: str, cls: str, state: tuple[dict, dict]) -> ProbeOutput:
        from bench.sampling import decode, generate

        seeds = ctx.seeds(SEED_OFFSET, self.seeds)
        images, before, picked = {}, ctx.counter.total, {}
        for eta in self.etas:
            variants = []
            for scale in self.scales:
                with ctx.amp():
                    lat = generate(ctx.pipe, ctx.star, prompt, seeds, ctx.sampler, ctx.counter, scheduler_class=NoisyDDIMScheduler,
                                   step_kwargs={"eta": eta, "variance_scale": scale})
                    variants.append(decode(ctx.pipe, lat, ctx.sampler.batch_size))
            scores = np.stack([ctx.detector.concept_scores(v, ctx.concept) for v in variants])  # (K, seeds)
            best = scores.argmax(axis=0)
            images[eta] = np.stack([variants[k][i] for i, k in enumerate(best)])
            picked[f"{eta:g}"] = [self.scales[k] for k in best]
        return ProbeOutput(images=images, meta={"nfe": ctx.counter.total - before, "nfe_shared": 0}, data={"picked_scale": picked})


__all__ = ["NoiseBased", "NoisyDDIMScheduler"]
