"""The partial-diffusion attack over a ψ grid (DESIGN §1.1; paper 2409.05668, notes §2.2–2.3).

For each ψ, θ (the original model) denoises the first part of the trajectory and θ* (the
unlearned model) finishes it; λ_P(ψ) is the decoded result. ψ = 0 is a plain θ* generation,
ψ = 1 a plain θ generation. ``attack`` computes the θ prefix once per prompt (or takes cached
snapshots) and only continues it with θ* per ψ; ``naive_attack`` is the authors' way (per ψ, per
seed, from scratch), kept as the reference that ``bench.perf`` and the tests compare against.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bench.sampling import (
    NFECounter,
    SamplerConfig,
    Snapshot,
    check_psi_grid,
    check_seeds,
    check_snapshot,
    continue_from,
    decode,
    prefix_snapshots,
    split_generate,
)


def _check_snapshots(snapshots: dict[float, Snapshot], psis: list[float], seeds: list[int], prompt: str,
                     cfg: SamplerConfig) -> None:
    missing = [p for p in psis if p not in snapshots]
    if missing:
        raise ValueError(f"snapshots are missing `attack.psi` values {missing} (have {sorted(snapshots)})")
    for p in psis:
        snap = snapshots[p]
        if snap.seeds != seeds or snap.prompt != prompt:
            raise ValueError(f"snapshot for ψ={p} was made for prompt {snap.prompt!r} and seeds "
                             f"{snap.seeds[:8]}…, not for prompt {prompt!r} and seeds {seeds[:8]}…")
        check_snapshot(snap, cfg)


def attack_latents(pipe, unet_theta, unet_star, prompt: str, seeds: Sequence[int], psis: Sequence[float],
                   cfg: SamplerConfig, snapshots: dict[float, Snapshot] | None = None,
                   counter: NFECounter | None = None, progress: bool = False) -> dict[float, torch.Tensor]:
    """Final latents of λ_P(ψ) for every ψ on the grid, from θ-prefix snapshots (DESIGN §1.1).

    ``snapshots`` (from ``prefix_snapshots``, e.g. out of the stage cache) must cover every ψ for
    this prompt, these seeds and this sampler; if None they are computed here with θ.
    """
    psis, seeds = check_psi_grid(psis), check_seeds(seeds)
    if snapshots is None:
        snapshots = prefix_snapshots(pipe, unet_theta, prompt, seeds, psis, cfg, counter, progress)
    _check_snapshots(snapshots, psis, seeds, prompt, cfg)
    return {p: continue_from(pipe, unet_star, snapshots[p], prompt, cfg, counter, progress) for p in psis}


def attack(pipe, unet_theta, unet_star, prompt: str, seeds: Sequence[int], psis: Sequence[float],
           cfg: SamplerConfig, snapshots: dict[float, Snapshot] | None = None,
           counter: NFECounter | None = None, progress: bool = False) -> dict[float, np.ndarray]:
    """λ_P(ψ) images, uint8 (N,H,W,3) in seed order, for every ψ on the grid (DESIGN §1.1 step 4)."""
    latents = attack_latents(pipe, unet_theta, unet_star, prompt, seeds, psis, cfg, snapshots, counter, progress)
    return {p: decode(pipe, lat, cfg.batch_size) for p, lat in latents.items()}


def naive_attack(pipe, unet_theta, unet_star, prompt: str, seeds: Sequence[int], psis: Sequence[float],
                 cfg: SamplerConfig, counter: NFECounter | None = None) -> dict[float, torch.Tensor]:
    """Final latents of λ_P(ψ) the way the authors' notebook does it: for each ψ and each seed,
    θ from scratch for the prefix, then θ*, one image at a time (no snapshots, no batching).
    Reference for ``bench.perf`` and the tests; the benchmark uses ``attack``."""
    psis, seeds = check_psi_grid(psis), check_seeds(seeds)
    one = SamplerConfig(steps=cfg.steps, guidance=cfg.guidance, batch_size=1, split=cfg.split, eta=cfg.eta)
    return {p: torch.cat([split_generate(pipe, unet_theta, unet_star, prompt, [s], p, one, counter)
                          for s in seeds])
            for p in psis}
