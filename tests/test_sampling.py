"""The sampling engine and the partial-diffusion probe's attack on tiny random SD-shaped pipelines
(DESIGN §1.1; bench/sampling.py, bench/probes/partial_diffusion.py)."""
from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from bench.probes.partial_diffusion import attack, attack_latents, naive_attack
from bench.sampling import (
    NFECounter,
    SamplerConfig,
    Snapshot,
    continue_from,
    decode,
    generate,
    make_scheduler,
    prefix_snapshots,
    prefix_steps,
    split_generate,
)
from bench.testing import SD_BETAS, perturbed_unet, sd_scheduler, tiny_sd_pipeline

PROMPT = "a red star on a striped background"
SEEDS = [3, 11, 42]
STEPS = 8


@functools.cache
def _pipe(scheduler: str):
    pipe = tiny_sd_pipeline(seed=0, scheduler=scheduler)
    return pipe, perturbed_unet(pipe.unet)


def _cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{"steps": STEPS, "guidance": 7.5, "batch_size": 2, **kw})


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _stock(pipe, seeds, steps, guidance, output_type="latent"):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(PROMPT, generator=gens, num_images_per_prompt=len(seeds), num_inference_steps=steps,
                guidance_scale=guidance, output_type=output_type).images


# ----------------------------------------------------------------------------- split rule
def test_timestep_split_reproduces_authors_table_for_sd14_pndm():
    # paper notes §2.3: SD v1.4's PNDM, 100 steps -> 101 timesteps 991, 981, 981, 971, ...
    from diffusers import PNDMScheduler

    sched = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    sched.set_timesteps(100)
    assert sched.timesteps[:4].tolist() == [991, 981, 981, 971] and len(sched.timesteps) == 101
    grid = [0.001, 0.01, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55]
    assert [prefix_steps(sched, p, "timestep") for p in grid] == [0, 1, 6, 16, 26, 36, 46, 56]
    assert prefix_steps(sched, 0.0, "timestep") == 0 and prefix_steps(sched, 1.0, "timestep") == 101


def test_step_split_is_floor_of_psi_times_timesteps():
    sched = sd_scheduler("ddim")
    sched.set_timesteps(100)
    assert [prefix_steps(sched, p, "step") for p in (0.0, 0.001, 0.29, 0.5, 0.999, 1.0)] == [0, 0, 29, 50, 99, 100]
    pndm = sd_scheduler("pndm")
    pndm.set_timesteps(100)
    assert prefix_steps(pndm, 1.0, "step") == 101  # T counts PLMS's repeated timestep


# ----------------------------------------------------------------------------- plain sampling
@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "ddpm", "euler"])
def test_generate_matches_stock_pipeline(scheduler):
    pipe, _ = _pipe(scheduler)
    ours = generate(pipe, pipe.unet, PROMPT, SEEDS, _cfg(batch_size=len(SEEDS)))
    assert torch.equal(ours, _stock(pipe, SEEDS, STEPS, 7.5))


def test_decode_matches_stock_pipeline_images():
    pipe, _ = _pipe("ddim")
    images = decode(pipe, generate(pipe, pipe.unet, PROMPT, SEEDS, _cfg(batch_size=len(SEEDS))))
    stock = _stock(pipe, SEEDS, STEPS, 7.5, output_type="np")
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    assert np.array_equal(images, (stock * 255).round().astype(np.uint8))


def test_seed_latents_do_not_depend_on_batch_composition():
    pipe, _ = _pipe("ddim")
    seeds = [5, 6, 7, 8]
    by2 = generate(pipe, pipe.unet, PROMPT, seeds, _cfg(batch_size=2))
    by4 = generate(pipe, pipe.unet, PROMPT, seeds, _cfg(batch_size=4))
    alone = generate(pipe, pipe.unet, PROMPT, seeds[2:], _cfg(batch_size=2))
    assert torch.equal(by2[2:], alone)  # same batch -> bit-identical, wherever the seed sits
    # Across batch sizes only float summation order differs (CPU kernels block by batch size).
    assert _maxdiff(by2, by4) <= 1e-5 * by4.abs().max().item()
    # Initial noise is drawn per seed, so it is exactly batch-independent (ψ = 0: no UNet call).
    init1 = prefix_snapshots(pipe, pipe.unet, PROMPT, seeds, [0.0], _cfg(batch_size=1))[0.0].latents
    init4 = prefix_snapshots(pipe, pipe.unet, PROMPT, seeds[::-1], [0.0], _cfg(batch_size=4))[0.0].latents
    assert torch.equal(init1, init4.flip(0))


# ----------------------------------------------------------------------------- ψ endpoints
@pytest.mark.parametrize("scheduler", ["ddim", "pndm"])
def test_psi_zero_is_theta_star_and_psi_one_is_theta(scheduler):
    pipe, star = _pipe(scheduler)
    cfg = _cfg()
    out = attack_latents(pipe, pipe.unet, star, PROMPT, SEEDS, [0.0, 1.0], cfg)
    assert torch.equal(out[0.0], generate(pipe, star, PROMPT, SEEDS, cfg))
    assert torch.equal(out[1.0], generate(pipe, pipe.unet, PROMPT, SEEDS, cfg))
    assert _maxdiff(out[0.0], out[1.0]) > 1e-3  # θ* really differs from θ


# ----------------------------------------------------------------------------- snapshots vs naive
GRID = [0.0, 0.13, 0.3, 0.55, 1.0]  # PNDM, 8 steps: timesteps 876, 751, 751, 626, ...


@pytest.mark.parametrize("scheduler", ["ddim", "pndm"])
@pytest.mark.parametrize("split", ["step", "timestep"])
def test_snapshot_path_equals_naive_path(scheduler, split):
    pipe, star = _pipe(scheduler)
    cfg = _cfg()
    ours = attack_latents(pipe, pipe.unet, star, PROMPT, SEEDS, GRID, cfg, split=split)
    for psi in GRID:  # θ from scratch for the prefix, then θ*, same batching
        assert _maxdiff(ours[psi], split_generate(pipe, pipe.unet, star, PROMPT, SEEDS, psi, cfg, split=split)) <= 1e-6
    if (scheduler, split) == ("pndm", "timestep"):  # the authors' setting, their way: batch 1 from scratch
        naive = naive_attack(pipe, pipe.unet, star, PROMPT, SEEDS, GRID, cfg, split=split)
        for psi in GRID:  # only the float summation order differs (batch 1 vs 2)
            assert _maxdiff(ours[psi], naive[psi]) <= 1e-5 * naive[psi].abs().max().item()


def test_split_rules_differ_on_pndm_grid():
    # Guards the test above: on PNDM the two rules hand over at different steps for this grid.
    pipe, _ = _pipe("pndm")
    sched = make_scheduler(pipe, STEPS)
    step = [prefix_steps(sched, p, "step") for p in GRID]
    timestep = [prefix_steps(sched, p, "timestep") for p in GRID]
    assert step != timestep and 1 in timestep  # one hand-over inside PLMS's warm-up (cur_sample set)


@pytest.mark.parametrize("scheduler", ["euler", "ddpm"])
def test_snapshot_path_equals_naive_path_stateful_and_stochastic(scheduler):
    # Euler carries a step index; DDPM draws fresh noise each step from the per-seed generators.
    pipe, star = _pipe(scheduler)
    cfg = _cfg()
    ours = attack_latents(pipe, pipe.unet, star, PROMPT, SEEDS, [0.1, 0.5], cfg, split="timestep")
    for psi in (0.1, 0.5):
        assert _maxdiff(ours[psi], split_generate(pipe, pipe.unet, star, PROMPT, SEEDS, psi, cfg, split="timestep")) <= 1e-6


def test_snapshots_are_reusable_and_unchanged_by_continuation():
    pipe, star = _pipe("pndm")
    cfg = _cfg()
    snaps = prefix_snapshots(pipe, pipe.unet, PROMPT, SEEDS, [0.3], cfg)
    before = snaps[0.3].latents.clone()
    a = continue_from(pipe, star, snaps[0.3], PROMPT, cfg)
    b = continue_from(pipe, star, snaps[0.3], PROMPT, _cfg(batch_size=3))
    c = continue_from(pipe, star, snaps[0.3], PROMPT, cfg)
    assert torch.equal(a, c) and torch.equal(snaps[0.3].latents, before)
    assert _maxdiff(a, b) <= 1e-5 * a.abs().max().item()  # continuation batch size is free


# ----------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("scheduler", ["pndm", "euler", "ddpm"])
def test_snapshot_round_trip_gives_identical_continuations(scheduler, tmp_path):
    pipe, star = _pipe(scheduler)
    cfg = _cfg()
    snaps = prefix_snapshots(pipe, pipe.unet, PROMPT, SEEDS, [0.13, 0.3], cfg, split="timestep")  # PNDM: steps 1 and 3
    for psi, snap in snaps.items():
        meta = snap.metadata
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        rebuilt = Snapshot.from_tensors(snap.to_tensors(), meta)
        snap.save(tmp_path / f"{psi}.safetensors")
        loaded = Snapshot.load(tmp_path / f"{psi}.safetensors")
        want = continue_from(pipe, star, snap, PROMPT, cfg)
        for other in (rebuilt, loaded):
            assert (other.psi, other.step, other.seeds, other.prompt, other.split) == (snap.psi, snap.step, snap.seeds, snap.prompt, "timestep")
            assert torch.equal(continue_from(pipe, star, other, PROMPT, cfg), want)


def test_snapshot_refuses_other_sampler_settings():
    pipe, star = _pipe("ddim")
    snaps = prefix_snapshots(pipe, pipe.unet, PROMPT, SEEDS, [0.5], _cfg())
    with pytest.raises(ValueError, match="sampler settings"):
        continue_from(pipe, star, snaps[0.5], PROMPT, _cfg(guidance=3.0))
    with pytest.raises(ValueError, match="missing `probes.partial_diffusion.psi`"):
        attack_latents(pipe, pipe.unet, star, PROMPT, SEEDS, [0.25], _cfg(), snapshots=snaps)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("grid", [[0.1, 0.1], [0.5, 0.2], [1.5], [-0.1, 0.5], [], [True]])
def test_bad_psi_grid_is_rejected_naming_the_key(grid):
    pipe, star = _pipe("ddim")
    with pytest.raises(ValueError, match="`probes.partial_diffusion.psi`"):
        attack(pipe, pipe.unet, star, PROMPT, SEEDS, grid, _cfg())
    with pytest.raises(ValueError, match="`probes.partial_diffusion.psi`"):
        prefix_snapshots(pipe, pipe.unet, PROMPT, SEEDS, grid, _cfg())


def test_duplicate_grid_message():
    pipe, star = _pipe("ddim")
    with pytest.raises(ValueError, match=r"`probes.partial_diffusion.psi` must be sorted and without duplicates, got \[0.1, 0.1\]"):
        attack(pipe, pipe.unet, star, PROMPT, SEEDS, [0.1, 0.1], _cfg())


@pytest.mark.parametrize(("kw", "key"), [({"steps": 0}, "eval.steps"), ({"batch_size": 0}, "eval.batch_size"),
                                         ({"guidance": -1.0}, "eval.guidance")])
def test_bad_sampler_config_is_rejected(kw, key):
    with pytest.raises(ValueError, match=f"`{key}`"):
        _cfg(**kw)


def test_bad_split_rule_is_rejected_naming_the_probe_key():
    pipe, _ = _pipe("ddim")
    with pytest.raises(ValueError, match="`probes.partial_diffusion.split` must be one of"):
        prefix_snapshots(pipe, pipe.unet, PROMPT, SEEDS, [0.5], _cfg(), split="half")


# ----------------------------------------------------------------------------- NFE
def test_nfe_counts_unet_rows():
    pipe, star = _pipe("pndm")
    n, cfg = len(SEEDS), _cfg()
    T = len(make_scheduler(pipe, STEPS).timesteps)
    c = NFECounter()
    generate(pipe, pipe.unet, PROMPT, SEEDS, cfg, counter=c)
    assert (c.total, c.calls) == (2 * n * T, 2 * T)  # 2 per image per CFG step; batches of 2 + 1

    nocfg = NFECounter()
    generate(pipe, pipe.unet, PROMPT, SEEDS, _cfg(guidance=1.0), counter=nocfg)
    assert nocfg.total == n * T  # w <= 1: no CFG, as the stock pipeline

    grid = [0.0, 0.3, 0.55]
    ks = [prefix_steps(make_scheduler(pipe, STEPS), p, "timestep") for p in grid]
    ours, naive = NFECounter(), NFECounter()
    attack_latents(pipe, pipe.unet, star, PROMPT, SEEDS, grid, cfg, counter=ours, split="timestep")
    naive_attack(pipe, pipe.unet, star, PROMPT, SEEDS, grid, cfg, counter=naive, split="timestep")
    assert ours.by_stage == {"prefix": 2 * n * max(ks), "continue": 2 * n * sum(T - k for k in ks)}
    assert naive.by_stage == {"naive": 2 * n * T * len(grid)} and naive.calls == T * len(grid) * n


def test_attack_returns_uint8_images_per_psi():
    pipe, star = _pipe("ddim")
    images = attack(pipe, pipe.unet, star, PROMPT, SEEDS, [0.0, 0.5], _cfg())
    assert list(images) == [0.0, 0.5]
    assert all(im.dtype == np.uint8 and im.shape == (len(SEEDS), 16, 16, 3) for im in images.values())
