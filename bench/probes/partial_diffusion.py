"""The partial-diffusion probe: θ denoises the first ψ of the trajectory, θ* finishes it.

Paper: Sharma et al., "Unlearning or Concealment? A Critical Analysis and Evaluation Metrics for
Unlearning in Diffusion Models", arXiv 2409.05668 (DESIGN §1.1; our notes on the paper and its
code, ``shared/reference/paper-2409.05668.md`` §2.2–2.3). Reference implementation: the authors'
notebook ``CCS_CRS.ipynb`` (two pipeline calls with ``denoising_end``/``denoising_start`` on a
fork of diffusers; stock SD-1.x pipelines ignore those arguments, so this file owns the loop).

For each ψ, θ (the original model) denoises the first part of the trajectory and θ* (the
unlearned model) finishes it with the same scheduler state and per-seed noise; λ_P(ψ) is the
decoded result. ψ = 0 is a plain θ* generation, ψ = 1 a plain θ generation. ``attack`` computes
the θ prefix once per prompt (or takes cached snapshots) and only continues it with θ* per ψ;
``naive_attack`` is the authors' way (per ψ, per seed, from scratch), kept as the reference that
``bench.perf`` and the tests compare against.

Deliberate deviations from the authors' code (each also in our paper notes):
1. Every attacked seed counts (``seeds``, disjoint from the λ_O/λ_U seeds); the authors attacked
   one image per ψ with seed 42, inside their classifier's training range — ``paper_seed: 42``
   adds that image set too, flagged ``*_seed42`` in the record.
2. ``split: step`` (θ runs ⌊ψ·T⌋ sampler steps) is the default; ``split: timestep`` reproduces the
   authors' ``round(1000 − 1000ψ)`` rule exactly.
3. No scheduler reset at the hand-over (the fork re-ran ``set_timesteps`` on a PNDM whose ε
   history then restarted); snapshots keep the scheduler's internal state.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench.hparams import ConfigError
from bench.probes import Axis, Probe, ProbeContext, ProbeOutput, Workload
from bench.sampling import (
    SPLITS,
    NFECounter,
    SamplerConfig,
    Snapshot,
    check_psi_grid,
    check_seeds,
    check_snapshot,
    continue_from,
    decode,
    make_scheduler,
    prefix_snapshots,
    prefix_steps,
    split_generate,
)

ATTACK_SEED_OFFSET = 100_000  # attacked seeds are disjoint from the λ_O/λ_U seeds 0..N−1 (DESIGN §1.2)


def _check_snapshots(snapshots: dict[float, Snapshot], psis: list[float], seeds: list[int], prompt: str,
                     cfg: SamplerConfig) -> None:
    missing = [p for p in psis if p not in snapshots]
    if missing:
        raise ValueError(f"snapshots are missing `probes.partial_diffusion.psi` values {missing} (have {sorted(snapshots)})")
    for p in psis:
        snap = snapshots[p]
        if snap.seeds != seeds or snap.prompt != prompt:
            raise ValueError(f"snapshot for ψ={p} was made for prompt {snap.prompt!r} and seeds "
                             f"{snap.seeds[:8]}…, not for prompt {prompt!r} and seeds {seeds[:8]}…")
        check_snapshot(snap, cfg)


def attack_latents(pipe, unet_theta, unet_star, prompt: str, seeds: Sequence[int], psis: Sequence[float],
                   cfg: SamplerConfig, snapshots: dict[float, Snapshot] | None = None,
                   counter: NFECounter | None = None, progress: bool = False, split: str = "step") -> dict[float, torch.Tensor]:
    """Final latents of λ_P(ψ) for every ψ on the grid, from θ-prefix snapshots (DESIGN §1.1).

    ``snapshots`` (from ``prefix_snapshots``, e.g. out of the stage cache) must cover every ψ for
    this prompt, these seeds and this sampler; if None they are computed here with θ.
    """
    psis, seeds = check_psi_grid(psis), check_seeds(seeds)
    if snapshots is None:
        snapshots = prefix_snapshots(pipe, unet_theta, prompt, seeds, psis, cfg, counter, progress, split=split)
    _check_snapshots(snapshots, psis, seeds, prompt, cfg)
    return {p: continue_from(pipe, unet_star, snapshots[p], prompt, cfg, counter, progress) for p in psis}


def attack(pipe, unet_theta, unet_star, prompt: str, seeds: Sequence[int], psis: Sequence[float],
           cfg: SamplerConfig, snapshots: dict[float, Snapshot] | None = None,
           counter: NFECounter | None = None, progress: bool = False, split: str = "step") -> dict[float, np.ndarray]:
    """λ_P(ψ) images, uint8 (N,H,W,3) in seed order, for every ψ on the grid (DESIGN §1.1 step 4)."""
    latents = attack_latents(pipe, unet_theta, unet_star, prompt, seeds, psis, cfg, snapshots, counter, progress, split)
    return {p: decode(pipe, lat, cfg.batch_size) for p, lat in latents.items()}


def naive_attack(pipe, unet_theta, unet_star, prompt: str, seeds: Sequence[int], psis: Sequence[float],
                 cfg: SamplerConfig, counter: NFECounter | None = None, split: str = "step") -> dict[float, torch.Tensor]:
    """Final latents of λ_P(ψ) the way the authors' notebook does it: for each ψ and each seed,
    θ from scratch for the prefix, then θ*, one image at a time (no snapshots, no batching).
    Reference for ``bench.perf`` and the tests; the benchmark uses ``attack``."""
    psis, seeds = check_psi_grid(psis), check_seeds(seeds)
    one = SamplerConfig(steps=cfg.steps, guidance=cfg.guidance, batch_size=1, eta=cfg.eta)
    return {p: torch.cat([split_generate(pipe, unet_theta, unet_star, prompt, [s], p, one, counter, split=split)
                          for s in seeds])
            for p in psis}


# --------------------------------------------------------------------------- the probe

class PartialDiffusion(Probe):
    """The probe behind ``probes=[partial_diffusion]`` (conf/probes/partial_diffusion.yaml).

    ``psi``: the ψ grid; ``split``: how ψ becomes a number of θ steps; ``seeds``: attacked seeds per
    forget prompt; ``retain_seeds``: per retain prompt (None = ``seeds``; only the retain rows'
    CCS/CRS use them); ``paper_seed``: the authors' single attacked seed as an extra image set.
    Its protocol keeps the first wave's layout (``psi``, ``split``, ``paper_seed``,
    ``attack_seeds`` beside the shared settings), so records made before the probe seam keep their
    protocol hash.
    """

    classes = ("forget", "retain")
    display = "partial diffusion"
    reference = "Sharma et al., arXiv 2409.05668"

    def __init__(self, psi: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.55), split: str = "step",
                 seeds: int = 8, retain_seeds: int | None = None,
                 paper_seed: int | None = None):
        try:
            self.psi = check_psi_grid(list(psi), self.key("psi"))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if split not in SPLITS:
            raise ConfigError(f"`{self.key('split')}` must be one of {', '.join(SPLITS)}, got {split!r}")
        for k, v, lo in (("seeds", seeds, 2), ("retain_seeds", retain_seeds, 2), ("paper_seed", paper_seed, 0)):
            if v is None and k != "seeds":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                why = " (KID and the bootstrap intervals need two attacked images per ψ)" if lo == 2 else ""
                raise ConfigError(f"`{self.key(k)}` must be an integer >= {lo}{why}, got {v!r}")
        self.split, self.seeds, self.retain_seeds, self.paper_seed = split, seeds, retain_seeds, paper_seed

    def describe(self) -> dict[str, Any]:
        d = {"psi": [float(p) for p in self.psi], "split": self.split, "paper_seed": self.paper_seed, "attack_seeds": int(self.seeds)}
        if self.retain_seeds is not None and self.retain_seeds != self.seeds:
            d["retain_attack_seeds"] = int(self.retain_seeds)  # absent = the same as attack_seeds (v1)
        return d

    def protocol_fields(self) -> dict[str, Any]:
        return self.describe()  # flat, as the first wave's protocol had them

    def axis(self, ctx: ProbeContext) -> Axis:
        sched = make_scheduler(ctx.pipe, ctx.sampler.steps)
        steps = tuple(prefix_steps(sched, p, self.split) for p in self.psi)
        return Axis("psi", "ψ (share of the trajectory denoised by the original model)", tuple(self.psi), "ψ", steps)

    def rows(self, w: Workload) -> dict[str, int]:
        # θ runs each prompt's seeds to the largest ψ once (cached, shared by every method); θ* continues
        # from every ψ. The split is taken as ⌊ψ·T⌋ (exact for split=step; within a step for timestep).
        k = [int(round(p * w.steps, 9) // 1) for p in self.psi]
        n_retain = self.seeds if self.retain_seeds is None else self.retain_seeds
        images = w.forget * self.seeds + w.retain * n_retain
        if self.paper_seed is not None:
            images += w.forget + w.retain
        return {"sample": sum(w.sample(images, w.steps - s) for s in k), "train": 0, "theta": w.sample(images, max(k))}

    def _snapshots(self, ctx: ProbeContext, prompt: str, seeds: list[int]) -> tuple[dict, int]:
        """θ-prefix snapshots at every ψ, computed once per (model, prompt, seeds, protocol) and cached."""
        key = {**ctx.cache_key, "prompt": prompt, "seeds": seeds, "psi": self.psi, "split": self.split,
               "sampler": ctx.sampler.as_metadata()}

        def compute():
            before = ctx.counter.total
            with ctx.amp():
                snaps = prefix_snapshots(ctx.pipe, ctx.theta, prompt, seeds, self.psi, ctx.sampler, ctx.counter, split=self.split)
            tensors, meta = {}, {"nfe": ctx.counter.total - before, "snapshots": {}}
            for i, p in enumerate(self.psi):
                tensors.update({f"{i}/{k}": v for k, v in snaps[p].to_tensors().items()})
                meta["snapshots"][str(i)] = snaps[p].metadata
            return tensors, meta

        tensors, meta = ctx.cache.get_or_compute("prefix", key, compute)
        snaps = {}
        for i, p in enumerate(self.psi):
            sub = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
            snaps[p] = Snapshot.from_tensors(sub, meta["snapshots"][str(i)], ctx.device)
        return snaps, int(meta.get("nfe", 0))

    def _attack(self, ctx: ProbeContext, prompt: str, seeds: list[int], snaps: dict | None = None) -> dict[float, np.ndarray]:
        if snaps is None:
            snaps, _ = self._snapshots(ctx, prompt, seeds)
        with ctx.amp():
            return attack(ctx.pipe, ctx.theta, ctx.star, prompt, seeds, self.psi, ctx.sampler, snapshots=snaps,
                          counter=ctx.counter, split=self.split)

    def run(self, ctx: ProbeContext, prompt: str, cls: str, state: tuple[dict, dict]) -> ProbeOutput:
        n = self.seeds if cls == "forget" or self.retain_seeds is None else self.retain_seeds
        seeds = ctx.seeds(ATTACK_SEED_OFFSET, n)
        snaps, nfe_prefix = self._snapshots(ctx, prompt, seeds)  # θ's part: computed once, shared by every method
        t, before = time.time(), ctx.counter.total
        images = self._attack(ctx, prompt, seeds, snaps)
        meta = {"seconds": time.time() - t, "nfe": ctx.counter.total - before, "nfe_shared": nfe_prefix}
        extra = {}
        if self.paper_seed is not None:  # the authors' one image per ψ: a fixed seed, not moved by `seed`
            extra["seed42"] = self._attack(ctx, prompt, [int(self.paper_seed)])
        return ProbeOutput(images=images, extra=extra, meta=meta)
