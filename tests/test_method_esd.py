"""ESD (methods/esd.py) on tiny SD-shaped pipelines: parameter sets, objective, x_t/t pairing,
NFE accounting, determinism and hyperparameter validation."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.hparams import check_params
from bench.sampling import ddim_sampler, embed_prompts
from bench.testing import (
    assert_each_rejected,
    assert_seed_decides,
    pipe_weights,
    sd_scheduler,
    tiny_concept,
    tiny_sd_pipeline,
)
from methods.esd import _plan, _sample, unlearn

FAST = {"iterations": 3, "ddim_steps": 4, "lr": 1e-3}


def _concept(target: str = "star"):
    return tiny_concept(target=target, render=lambda n, seed: np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))


def _run(pipe, seed: int = 0, target: str = "star", **kw) -> dict:
    torch.manual_seed(seed)
    return unlearn(pipe, _concept(target), **{**FAST, **kw})


def _expected(names: list[str], variant: str) -> set[str]:
    if variant == "esd-x":
        return {n for n in names if ".attn2." in n}
    if variant == "esd-x-strict":
        return {n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n}
    if variant == "esd-u":
        head = ("time_embedding.", "conv_norm_out.", "conv_out.")
        return {n for n in names if ".attn2." not in n and not n.startswith(head)}
    return set(names)


@pytest.mark.parametrize("variant", ["esd-x", "esd-u", "esd-x-strict", "full"])
def test_only_the_variants_parameters_change(variant):
    pipe = tiny_sd_pipeline()
    before = pipe_weights(pipe)
    unet_names = [n for n, _ in pipe.unet.named_parameters()]
    report = _run(pipe, variant=variant)
    after = pipe_weights(pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = _expected(unet_names, variant)
    assert set(report["trained_parameters"]) == expected
    assert report["trained_parameters"] == sorted(expected)
    assert changed == {f"unet.{n}" for n in expected}  # text encoder, VAE and the rest bit-identical
    # the pipeline is handed back as it came: eval mode, original grad flags, no stale grads
    assert not pipe.unet.training
    assert all(p.requires_grad and p.grad is None for p in pipe.unet.parameters())


def test_parameter_sets_follow_the_compvis_rules():
    names = [n for n, _ in tiny_sd_pipeline().unet.named_parameters()]
    x = _expected(names, "esd-x")
    # every cross-attention contributes to_q, to_k, to_v, to_out.0.weight, to_out.0.bias
    n_attn2 = len({n.split(".attn2.")[0] for n in x})
    assert n_attn2 == 4 and len(x) == 5 * n_attn2
    u = _expected(names, "esd-u")
    assert "conv_in.weight" in u and any(".attn1." in n for n in u) and any(".norm2." in n for n in u)
    assert not any(n.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")) for n in u)
    assert x | u | {n for n in names if n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))} == set(names)


def _esd_objective(unet, frozen, pipe, eta: float, steps: int = 4) -> float:
    """The ESD loss averaged over a fixed set of (x_t, t) drawn as the method draws them."""
    sched = ddim_sampler(pipe.scheduler, steps)
    emb = embed_prompts(pipe, ["", "star"])
    null, word = emb[:1].expand(8, -1, -1), emb[1:].expand(8, -1, -1)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for i in range(steps):
            run, lo, hi = _plan(sched, i, "aligned")
            x, _ = _sample(frozen, sched, torch.randn(8, 4, 8, 8, generator=g), run, word, null[:1], 3.0)
            t = torch.randint(lo, hi, (8,), generator=g)
            e_null = frozen(x, t, encoder_hidden_states=null).sample
            e_word = frozen(x, t, encoder_hidden_states=word).sample
            total += F.mse_loss(unet(x, t, encoder_hidden_states=word).sample, e_null - eta * (e_word - e_null)).item()
    return total / steps


@pytest.mark.parametrize(("variant", "lr"), [("esd-x", 3e-4), ("esd-u", 1e-4)])
def test_micro_run_lowers_the_esd_objective(variant, lr):
    # η = 10 makes the target far from the random tiny UNet's text-insensitive prediction, so the
    # decrease is well above the noise of 20 single-sample Adam steps.
    pipe = tiny_sd_pipeline()
    frozen = copy.deepcopy(pipe.unet)
    before = _esd_objective(pipe.unet, frozen, pipe, eta=10.0)
    report = _run(pipe, variant=variant, iterations=20, lr=lr, negative_guidance=10.0, xt_source="frozen")
    after = _esd_objective(pipe.unet, frozen, pipe, eta=10.0)
    assert after < 0.9 * before
    assert len(report["loss_history"]) == 20 and all(np.isfinite(report["loss_history"]))


def test_same_seed_same_weights_other_seed_other_weights():
    assert_seed_decides(lambda pipe, seed: (_run(pipe, seed=seed, timestep_rule="compvis")["loss_history"],))


@pytest.mark.parametrize("text_len", [77, 16])
def test_runs_on_sd_and_shapes_text_lengths(text_len):
    pipe = tiny_sd_pipeline(text_len=text_len)
    report = _run(pipe, target="star, pentagram", erase_from="a yellow star", batch_size=2)
    assert report["words"] == ["star", "pentagram"] and report["steps"] == 3
    assert report["latent_size"] == 8 and report["resolution"] == 16


@pytest.mark.parametrize(
    "kw",
    [
        {"xt_source": "trained", "timestep_rule": "aligned"},
        {"xt_source": "frozen", "timestep_rule": "compvis", "batch_size": 2},
        {"xt_source": "trained", "timestep_rule": "compvis", "start_guidance": 1.0},
        {"xt_source": "frozen", "timestep_rule": "aligned", "erase_from": "a yellow star"},
    ],
)
def test_nfe_counts_every_unet_row_and_the_sampler_uses_the_chosen_unet(kw):
    pipe = tiny_sd_pipeline()
    rows: dict[int, int] = {}
    pipe.unet.register_forward_pre_hook(lambda m, args: rows.__setitem__(id(m), rows.get(id(m), 0) + args[0].shape[0]))
    report = _run(pipe, iterations=4, **kw)  # the hook travels with the deep-copied frozen UNet
    b, n_frozen = kw.get("batch_size", 1), (3 if "erase_from" in kw else 2)
    trained = rows.pop(id(pipe.unet))
    (frozen,) = rows.values()
    assert report["nfe"] == trained + frozen
    if kw["xt_source"] == "trained":
        assert trained == report["nfe_sampling"] + 4 * b and frozen == 4 * n_frozen * b
    else:
        assert trained == 4 * b and frozen == report["nfe_sampling"] + 4 * n_frozen * b


def test_compvis_rule_reproduces_the_original_offset_and_aligned_removes_it():
    sched = ddim_sampler(sd_scheduler("pndm"), 50)  # SD v1.4's own scheduler config
    assert sched.timesteps[0] == 981 and sched.timesteps[-1] == 1  # CompVis range(0, 1000, 20) + 1
    # a2189e9: t_enc = 10 pairs t in [200, 220) with a latent left at 161 by a step at 181
    run, lo, hi = _plan(sched, 10, "compvis")
    assert (lo, hi) == (200, 220) and int(run[0]) == 961 and int(run[-1]) == 181 and len(run) == 40
    for t_enc in range(2, 50):
        run, lo, hi = _plan(sched, t_enc, "compvis")
        level = int(run[-1]) - 20  # DDIM moves the latent one grid step down
        assert 39 <= lo - level and hi - 1 - level <= 58
    assert len(_plan(sched, 0, "compvis")[0]) == len(_plan(sched, 1, "compvis")[0]) == 49  # run to the end
    for i in range(50):
        run, lo, hi = _plan(sched, i, "aligned")
        assert len(run) == i and lo <= int(sched.timesteps[i]) < hi and hi - lo == 20


def test_hyperparameters_are_validated_before_loading():
    defaults = check_params(unlearn, {})
    assert defaults["iterations"] == 1000 and defaults["lr"] == 1e-5 and defaults["negative_guidance"] == 1.0
    assert defaults["start_guidance"] == 3.0 and defaults["ddim_steps"] == 50 and defaults["batch_size"] == 1
    assert defaults["xt_source"] == "trained" and defaults["erase_from"] is None
    bad = {
        "variant": "esd-y",
        "lr": -1e-5,
        "iterations": 0,
        "ddim_steps": 1,
        "negative_guidance": 0.0,
        "xt_source": "teacher",
        "timestep_rule": "offset",
        "erase_from": 3,
        "learning_rate": 1e-5,
    }
    assert_each_rejected(unlearn, bad)
