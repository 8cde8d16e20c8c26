"""SDD (methods/sdd.py) on tiny SD-shaped pipelines: what changes, the distillation objective, the
EMA teacher's roles, NFE accounting, determinism, hyperparameter validation and the shipped configs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import methods.sdd as sdd
from bench.hparams import ConfigError
from bench.sampling import ddim_cfg_sample, ddim_sampler, embed_prompts
from bench.testing import (
    assert_each_rejected,
    assert_seed_decides,
    changed,
    check_method_confs,
    pipe_weights,
    sd_scheduler,
    tiny_concept,
    tiny_sd_pipeline,
)
from methods.sdd import unlearn

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = {"steps": 3, "ddim_steps": 4, "lr": 1e-3}


def _run(pipe, seed: int = 0, words: str = "star", **kw) -> dict:
    torch.manual_seed(seed)
    return unlearn(pipe, tiny_concept(target=words), **{**FAST, **kw})


def _expected(names: list[str], trainable: str) -> set[str]:
    """train_sdd.py L246–283, written out independently."""
    head = [n for n in names if n.startswith("conv_out.") or n.startswith("time_embedding.")]
    if trainable == "xattn":
        return {n for n in names if ".attn2." in n}
    if trainable == "noxattn":
        return {n for n in names if ".attn2." not in n and n not in head}
    if trainable == "full":
        return set(names)
    raise AssertionError(trainable)


@pytest.mark.parametrize("output", ["ema", "student"])
@pytest.mark.parametrize("trainable", ["xattn", "noxattn", "full"])
def test_only_the_trained_tensors_change(trainable, output):
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)  # as the harness hands the UNet over
    before = pipe_weights(pipe)
    names = [n for n, _ in pipe.unet.named_parameters()]
    report = _run(pipe, trainable=trainable, output=output)
    expected = _expected(names, trainable)
    assert report["trained_parameters"] == sorted(expected)
    assert changed(before, pipe_weights(pipe)) == {f"unet.{n}" for n in expected}  # text encoder, VAE bit-identical
    # the pipeline is handed back as it came: eval mode, original grad flags, no stale grads
    assert not pipe.unet.training
    assert all(not p.requires_grad and p.grad is None for p in pipe.unet.parameters())
    assert report["variant"] == f"sdd-{trainable}" and report["steps"] == 3 and len(report["loss_history"]) == 3


def test_parameter_sets_follow_the_reference_rules():
    names = [n for n, _ in tiny_sd_pipeline().unet.named_parameters()]
    x = sdd._trainable_names(tiny_sd_pipeline().unet, "xattn")
    assert x == _expected(names, "xattn") and len({n.split(".attn2.")[0] for n in x}) == 4
    no = sdd._trainable_names(tiny_sd_pipeline().unet, "noxattn")
    # unlike ESD-u's CompVis rule, the reference keeps conv_norm_out in `noxattn`
    assert "conv_norm_out.weight" in no and "conv_in.weight" in no and not (no & x)
    assert not any(n.startswith(("conv_out.", "time_embedding.")) for n in no)
    assert all(".attn1." in n for n in sdd._trainable_names(tiny_sd_pipeline().unet, "selfattn"))


def _text_sensitive_pipeline():
    """The tiny pipeline with its cross-attention values ×10: a random UNet barely reads the prompt
    (‖ε(c) − ε(∅)‖² ~ 3e-5), so the distillation signal would drown in Adam's first-step noise."""
    pipe = tiny_sd_pipeline()
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".attn2.to_v." in name:
                p.mul_(10.0)
    return pipe


def _sdd_objective(pipe, null_unet, ddim_steps: int = 4) -> float:
    """mean ‖ε_θ(z_t, c, t) − ε'(z_t, ∅, t)‖² over fixed z_t drawn as the method draws them
    (``null_unet`` samples z_t and gives ε'), one batch per DDIM stopping step."""
    sched = ddim_sampler(pipe.scheduler, ddim_steps)
    e = embed_prompts(pipe, ["", "star"])
    null, word = e[:1], e[1:]
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for k in range(ddim_steps):
            z, _ = ddim_cfg_sample(null_unet, sched, torch.randn(8, 4, 8, 8, generator=g), sched.timesteps[:k], word, null, 3.0)
            t = torch.randint(*sdd._bin(k, ddim_steps, 1000), (8,), generator=g)
            e_word = pipe.unet(z, t, encoder_hidden_states=word.expand(8, -1, -1)).sample
            e_null = null_unet(z, t, encoder_hidden_states=null.expand(8, -1, -1)).sample
            total += float((e_word - e_null).pow(2).mean())
    return total / ddim_steps


@pytest.mark.parametrize("target", ["student", "ema"])
def test_concept_prediction_moves_to_the_unconditional_one(target):
    # target="student": towards the model's own ε(∅); "ema": towards the teacher's, which at decay
    # 0.999 after 20 steps is still ≈ the original model's (the student's own ε(∅) may drift).
    pipe, original = _text_sensitive_pipeline(), _text_sensitive_pipeline().unet
    before = _sdd_objective(pipe, pipe.unet if target == "student" else original)
    report = _run(pipe, steps=20, lr=3e-4, target=target, output="student")
    assert _sdd_objective(pipe, pipe.unet if target == "student" else original) < 0.5 * before
    hist = report["loss_history"]
    assert np.mean(hist[-5:]) < np.mean(hist[:5]) and all(np.isfinite(hist))


def test_released_model_is_the_ema_of_the_student():
    # decay 0: the teacher is the student after every step, so every target/output choice is one model
    runs = []
    for target, output in [("student", "student"), ("student", "ema"), ("ema", "ema")]:
        pipe = tiny_sd_pipeline()
        report = _run(pipe, ema_decay=0.0, target=target, output=output)
        runs.append((pipe.unet.state_dict(), report["loss_history"]))
        assert report["student_ema_gap"] == 0.0
    (a, la), *rest = runs
    for b, lb in rest:
        assert la == lb and all(torch.equal(a[k], b[k]) for k in a)
    # decay 0.999 after 3 steps: the EMA has moved ~0.3 % of the student's way from the original
    base, stu, ema = tiny_sd_pipeline(), tiny_sd_pipeline(), tiny_sd_pipeline()
    _run(stu, output="student")
    report = _run(ema, output="ema")
    name = report["trained_parameters"][0]
    w0, ws, we = (m.unet.state_dict()[name] for m in (base, stu, ema))
    frac = float((we - w0).norm() / (ws - w0).norm())
    assert 0.0005 < frac < 0.01 and report["student_ema_gap"] > 0


@pytest.mark.parametrize(
    "kw",
    [
        {"target": "student"},
        {"target": "ema", "batch_size": 2},
        {"target": "student", "guidance_scale": 1.0},
        {"target": "ema", "guidance_scale": 0.0},
    ],
)
def test_nfe_counts_every_unet_row_and_the_teacher_samples(kw):
    pipe = tiny_sd_pipeline()
    rows: dict[int, int] = {}
    pipe.unet.register_forward_pre_hook(lambda m, args: rows.__setitem__(id(m), rows.get(id(m), 0) + args[0].shape[0]))
    report = _run(pipe, steps=4, **kw)  # the hook travels with the deep-copied teacher
    b = kw.get("batch_size", 1)
    student = rows.pop(id(pipe.unet))
    (teacher,) = rows.values()
    assert report["nfe"] == student + teacher
    if kw["target"] == "student":
        assert student == 2 * 4 * b and teacher == report["nfe_sampling"]
    else:
        assert student == 4 * b and teacher == report["nfe_sampling"] + 4 * b
    per_step = 1 if kw.get("guidance_scale", 3.0) in (0.0, 1.0) else 2
    assert report["nfe_sampling"] % (per_step * b) == 0


def test_timestep_bins_hold_the_latents_grid_timestep():
    for steps in (50, 20):  # SD v1.4's (PNDM config) grid and the Shapes world's 20-step DDIM grid
        sched = ddim_sampler(sd_scheduler("pndm"), steps)
        for k in range(steps):
            lo, hi = sdd._bin(k, steps, 1000)
            assert lo <= int(sched.timesteps[k]) < hi and hi - lo == 1000 // steps
    assert ddim_sampler(sd_scheduler("pndm"), 50).timesteps[0] == 981  # CompVis/diffusers leading grid


def test_several_targets_are_removed_in_turn_and_sampled_together():
    pipe = tiny_sd_pipeline(text_len=16)
    seen = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():  # the trained row: ε_θ(z_t, c_s, t)
            seen.append(kwargs["encoder_hidden_states"][0].clone())

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    report = _run(pipe, steps=4, words="star, pentagram", batch_size=2)
    words = embed_prompts(pipe, ["star", "pentagram"])
    nearest = [int((s - words).flatten(1).norm(dim=1).argmin()) for s in seen]
    assert nearest == [0, 1, 0, 1]  # iterative: step i removes word i mod n (L698)
    assert all(torch.allclose(s, words[i % 2], atol=1e-5) for i, s in enumerate(seen))
    assert report["words"] == ["star", "pentagram"] and report["sampling_prompt"] == "star, pentagram"
    assert report["latent_size"] == 8 and report["resolution"] == 16


def test_same_seed_same_weights_other_seed_other_weights():
    assert_seed_decides(lambda pipe, seed: (_run(pipe, seed=seed)["loss_history"],))


def test_flags_and_mode_restored_when_training_fails(monkeypatch):
    pipe = tiny_sd_pipeline()
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    before = pipe_weights(pipe)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(sdd, "ddim_cfg_sample", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(pipe)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags and not pipe.unet.training
    assert not changed(before, pipe_weights(pipe))


def test_bad_hyperparameters_are_one_config_error_naming_the_key():
    bad = {
        "steps": 0,
        "lr": -1e-5,
        "weight_decay": -1.0,
        "grad_clip": -1.0,
        "ema_decay": 1.0,
        "guidance_scale": -3.0,
        "ddim_steps": 1,
        "batch_size": 0,
        "trainable": "attn2",
        "target": "teacher",
        "output": "both",
        "learning_rate": 1e-5,
    }
    assert_each_rejected(unlearn, bad)
    # called directly, the method checks before it touches anything
    pipe = tiny_sd_pipeline()
    before = pipe_weights(pipe)
    with pytest.raises(ConfigError, match=r"`method.params.ema_decay` must be .*< 1.*got 1.5"):
        _run(pipe, ema_decay=1.5)
    with pytest.raises(ConfigError, match=r"`method.params.ddim_steps` must be <= 1000, got 2000"):
        _run(pipe, ddim_steps=2000)
    assert not changed(before, pipe_weights(pipe))


def test_configs_validate():
    # The conf's SD defaults are the signature's defaults (train_sdd.py argparse, a2e820c).
    defaults = check_method_confs(unlearn, "sdd", "SDD")
    assert (defaults["steps"], defaults["lr"], defaults["ema_decay"], defaults["guidance_scale"]) == (1500, 1e-5, 0.999, 3.0)
    assert (defaults["trainable"], defaults["weight_decay"], defaults["grad_clip"]) == ("xattn", 1e-4, 1.0)


def test_pair_prompts_are_the_authors_sdd_rows():
    with (ROOT / "bench" / "data" / "prompts" / "paper_2409.05668.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "Safe Self-Distillation"]
    pair = OmegaConf.load(CONF / "pair" / "sdd_nudity.yaml")
    assert list(pair.concept.forget_prompts) == [r["prompt"] for r in rows if r["class"] == "Forget"]
    assert list(pair.concept.retain_prompts) == [r["prompt"] for r in rows if r["class"] == "Retain"]
    assert {r["concept"] for r in rows} == {"Nudity"}
