"""STEREO (methods/stereo.py) on tiny SD-shaped pipelines: the STE attack lowers its loss, REO starts
from the original weights and depends on the adversarial embeddings, the trained parameter sets,
the compositional target, NFE accounting, determinism and hyperparameter validation."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.stereo as stereo
from bench.context import MethodContext
from bench.hparams import ConfigError, check_params
from bench.probes import _fewshot as fewshot
from bench.probes.inversion import placeholders
from bench.sampling import embed_prompts
from bench.testing import (
    assert_each_rejected,
    assert_seed_decides,
    changed,
    pipe_weights,
    tiny_concept,
    tiny_sd_pipeline,
    weights,
)

FAST = {"rounds": 2, "adv_embeddings": 2, "ste_iterations": 2, "reo_iterations": 3, "ddim_steps": 4, "ti_steps": 3,
        "ti_batch_size": 2, "ti_lr": 0.05, "num_images": 4, "ste_lr": 1e-3, "reo_lr": 1e-3}


def _render(n: int, seed: int, target: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _concept(**kw):
    return tiny_concept(**{"render": _render, **kw})


def _run(pipe, seed: int = 0, concept=None, **kw) -> dict:
    torch.manual_seed(seed)
    return stereo.unlearn(pipe, concept or _concept(), **{**FAST, **kw})


def _expected(unet, train_method: str) -> set[str]:
    """The reference's FineTunedModel rule, written out independently: Linear/Conv2d modules only."""
    out = set()
    for m, mod in unet.named_modules():
        if type(mod) not in (torch.nn.Linear, torch.nn.Conv2d):
            continue
        if (train_method == "xattn" and ".attn2." not in f"{m}.") or (train_method == "noxattn" and ".attn2." in f"{m}.") \
                or (train_method == "selfattn" and ".attn1." not in f"{m}."):
            continue
        out |= {f"{m}.weight"} | ({f"{m}.bias"} if mod.bias is not None else set())
    return out


@pytest.mark.parametrize("train_method", ["noxattn", "xattn", "selfattn", "full_unet"])
def test_only_the_train_methods_parameters_change(train_method):
    pipe = tiny_sd_pipeline()
    before = pipe_weights(pipe)
    expected = _expected(pipe.unet, train_method)
    report = _run(pipe, train_method=train_method)
    assert set(report["trained_parameters"]) == expected and report["trained_parameters"] == sorted(expected)
    assert not any("norm" in n.split(".")[-2] for n in expected)  # norm layers are never trained (FineTunedModel)
    assert changed(before, pipe_weights(pipe)) == {f"unet.{n}" for n in expected}  # text encoder, VAE bit-identical
    assert not pipe.unet.training and not pipe.text_encoder.training
    assert all(p.requires_grad and p.grad is None for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters())


def test_attack_finds_an_embedding_that_lowers_the_inversion_loss():
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    lat, lat_flip = stereo._encode_both_ways(pipe, _render(8, 3))
    temps = fewshot.templates("sd", "object")
    [init] = stereo._init_vectors(pipe, _concept(), "anchor", 1)
    torch.manual_seed(0)
    vec, losses = stereo._invert(pipe, pipe.unet, "<stereo-adv-0>", init, lat, lat_flip, temps, steps=60, lr=0.05,
                                 batch_size=4, show=False, desc="test")
    assert len(losses) == 60 and all(np.isfinite(losses)) and not torch.allclose(vec, init)

    def objective(v: torch.Tensor) -> float:  # fixed images, templates, t and noise for both vectors
        g = torch.Generator().manual_seed(7)
        with placeholders(pipe, ["<stereo-adv-0>"], v.unsqueeze(0)), torch.no_grad():
            cond = fewshot.encode_text(pipe, [temps[i % len(temps)].format("<stereo-adv-0>") for i in range(8)])
            return sum(fewshot.denoising_loss(pipe.unet, fewshot.train_scheduler(pipe), lat, cond, g).item() for _ in range(16))

    assert objective(vec) < objective(init)


def test_stage2_starts_from_the_original_weights_while_stage1_erased_its_copy(monkeypatch):
    pipe = tiny_sd_pipeline()
    original = weights(pipe.unet)
    seen: dict[str, list] = {"attacked": [], "reo": [], "frozen": []}
    invert, reo = stereo._invert, stereo._robustly_erase_once

    def spy_invert(pipe_, unet, *a, **kw):
        seen["attacked"].append(weights(unet))
        return invert(pipe_, unet, *a, **kw)

    def spy_reo(unet, frozen, *a, **kw):
        seen["reo"].append(unet is pipe.unet)
        seen["frozen"].append(weights(frozen))
        assert all(torch.equal(original[k], v) for k, v in weights(unet).items())  # θ, not the STE model
        return reo(unet, frozen, *a, **kw)

    monkeypatch.setattr(stereo, "_invert", spy_invert)
    monkeypatch.setattr(stereo, "_robustly_erase_once", spy_reo)
    _run(pipe)
    assert seen["reo"] == [True]
    assert all(torch.equal(original[k], v) for k, v in seen["frozen"][0].items())  # θ* = θ
    # every attack ran against an erased model, the second against a further-erased one
    first, second = seen["attacked"]
    assert any(not torch.equal(original[k], first[k]) for k in original)
    assert any(not torch.equal(first[k], second[k]) for k in original)


@pytest.mark.parametrize("adv_embeddings", [2, 0])
def test_adversarial_embeddings_enter_the_stage2_objective(monkeypatch, adv_embeddings):
    """Swap what the attack returns: REO's result moves with it iff REO erases the embeddings."""
    results = []
    for scale in (1.0, -1.0):
        def fixed_invert(pipe_, unet, token, init, *a, scale=scale, **kw):
            v = torch.randn(init.shape, generator=torch.Generator().manual_seed(int(token[-2]) + 1)) * scale
            return v, [0.0]

        monkeypatch.setattr(stereo, "_invert", fixed_invert)
        pipe = tiny_sd_pipeline()
        _run(pipe, adv_embeddings=adv_embeddings)
        results.append(weights(pipe.unet))
    a, b = results
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (adv_embeddings == 0)


def test_compositional_target_is_the_references_apg_formula_at_eta_1():
    g = torch.Generator().manual_seed(0)
    e_null, e_anchor = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    e_neg = torch.randn(3, 4, 8, 8, generator=g)

    def apg(conds, uncond, scales):  # utils/apg.py normalized_compositional_guidance, η = 1, no momentum/threshold
        pos, neg, n_pos, n_neg = torch.zeros_like(uncond), torch.zeros_like(uncond), 0, 0
        for cond, s in zip(conds, scales, strict=True):
            diff, unit = (cond - uncond).double(), F.normalize(cond.double(), dim=[-1, -2, -3])
            par = (diff * unit).sum(dim=[-1, -2, -3], keepdim=True) * unit
            upd = ((diff - par) + 1.0 * par).float()
            if s > 0:
                pos, n_pos = pos + (s - 1) * upd, n_pos + 1
            else:
                neg, n_neg = neg + (s - 1) * upd, n_neg + 1
        return uncond + pos / n_pos + neg / n_neg

    for s in (2.0, 3.0):
        ref = apg(list(e_neg.unsqueeze(1)) + [e_anchor], e_null, [-s] * 3 + [s])
        assert torch.allclose(stereo.compositional_target(e_null, e_anchor, e_neg, s), ref, atol=1e-5)
    # s = 2 (the reference default): the anchor prediction minus 3 × the mean concept direction
    pinned = e_anchor - 3 * (e_neg - e_null).mean(0, keepdim=True)
    assert torch.allclose(stereo.compositional_target(e_null, e_anchor, e_neg, 2.0), pinned, atol=1e-6)


def test_ste_erasure_lowers_its_objective():
    pipe = tiny_sd_pipeline()
    teacher = copy.deepcopy(pipe.unet).requires_grad_(False)
    work = copy.deepcopy(pipe.unet).requires_grad_(False)
    sched = stereo.ddim_sampler(pipe.scheduler, 4)
    emb = embed_prompts(pipe, ["", "star"])
    names = stereo._trainable_names(work, "xattn")
    g_neg = 12.0  # η = 10: a target far from the text-insensitive random UNet's prediction

    def objective(unet) -> float:
        gen, total = torch.Generator().manual_seed(3), 0.0
        with torch.no_grad():
            for t in (100, 400, 700, 900):
                x, tt = torch.randn(8, 4, 8, 8, generator=gen), torch.full((8,), t)
                e0 = teacher(x, tt, encoder_hidden_states=emb[:1].expand(8, -1, -1)).sample
                ec = teacher(x, tt, encoder_hidden_states=emb[1:].expand(8, -1, -1)).sample
                total += F.mse_loss(unet(x, tt, encoder_hidden_states=emb[1:].expand(8, -1, -1)).sample, ec - (g_neg - 1) * (ec - e0)).item()
        return total

    before = objective(work)
    torch.manual_seed(0)
    losses, rows = stereo._erase(work, teacher, names, sched, emb[:1], emb[1:], iterations=20, lr=3e-4, guidance=g_neg,
                                 start_guidance=3.0, show=False, desc="test")
    assert objective(work) < 0.9 * before and len(losses) == 20 and rows > 20 * 3


def test_nfe_counts_every_unet_row():
    pipe = tiny_sd_pipeline()
    rows: dict[int, int] = {}
    pipe.unet.register_forward_pre_hook(lambda m, args: rows.__setitem__(id(m), rows.get(id(m), 0) + args[0].shape[0]))
    report = _run(pipe)  # the hook travels with every deep copy (the STE model, its teachers, θ*)
    assert report["nfe"] == sum(rows.values()) == report["stage1"]["nfe"] + report["stage2"]["nfe"]
    assert report["steps"] == 2 * (2 + 3) + 3 and report["nfe_saved_by_cache"] == 0


def test_several_targets_on_a_short_text_encoder():
    pipe = tiny_sd_pipeline(text_len=16)
    report = _run(pipe, concept=_concept(target="star, heart", anchor_prompts=("a shape", "a red shape", "an object")))
    r0, r1 = report["stage1"]["rounds"]
    assert r0["erased"] == ["star", "heart"] and r1["erased"] == ["<stereo-adv-0>"]
    assert (r0["ti_target"], r1["ti_target"]) == ("star", "heart") and r0["ti_images"] == 2
    assert report["stage2"]["erase_prompts"] == ["star", "heart", "<stereo-adv-0>", "<stereo-adv-1>"]
    assert report["stage2"]["anchor_prompts"] == ["a star", "a red heart", "an object"]


def test_anchor_prompts_in_context_as_given_and_from_templates():
    temps = fewshot.templates("shapes", "object")
    c = _concept(anchor_prompts=("a shape", "a Shape on a plain background", "a shapeless thing"))
    assert stereo._anchor_prompts(c, "in_context", temps) == ["a star", "a star on a plain background", "a shapeless thing"]
    assert stereo._anchor_prompts(c, "anchor", temps) == list(c.anchor_prompts)
    assert stereo._anchor_prompts(_concept(anchor_prompts=()), "in_context", temps) == ["a star"]
    with pytest.raises(ConfigError, match="concept.anchor"):
        stereo._anchor_prompts(_concept(anchor="", anchor_prompts=()), "anchor", temps)


def test_generated_concept_images_are_cached(tmp_path):
    concept = _concept(render=None)
    kw = {"num_images": 2, "image_steps": 2, "ctx": MethodContext(cache_dir=tmp_path, progress=False)}
    runs = []
    for _ in range(2):
        pipe = tiny_sd_pipeline()
        runs.append((_run(pipe, concept=concept, **kw), weights(pipe.unet)))
    (first, wa), (second, wb) = runs
    assert first["images"]["source"] == second["images"]["source"] and "generated:" in first["images"]["source"]
    assert first["images"]["nfe"] == 2 * 2 * 2 and first["nfe_saved_by_cache"] == 0  # 2 images × 2 steps × CFG
    assert second["nfe"] == first["nfe"] and second["nfe_saved_by_cache"] == 8
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the cache does not move the training RNG stream
    assert len(list((tmp_path / "stereo_images").glob("*.safetensors"))) == 1


def test_same_seed_same_weights_other_seed_other_weights():
    def train(pipe, seed):
        report = _run(pipe, seed=seed)
        return report["loss_history"], report["stage1"]["rounds"][1]["ti_loss"]

    assert_seed_decides(train)


def test_hyperparameters_are_validated_before_loading():
    d = check_params(stereo.unlearn, {})
    assert (d["rounds"], d["adv_embeddings"], d["ste_iterations"], d["reo_iterations"]) == (4, 4, 200, 200)
    assert (d["ste_lr"], d["reo_lr"], d["ti_lr"], d["ti_steps"]) == (5e-6, 2e-5, 5e-3, 3000)
    assert (d["ste_negative_guidance"], d["compositional_guidance_scale"], d["start_guidance"], d["ddim_steps"]) == (2.0, 2.0, 3.0, 50)
    assert (d["train_method"], d["num_images"], d["ti_batch_size"]) == ("noxattn", 500, 1)
    bad = {"train_method": "xattn-strict", "rounds": 0, "adv_embeddings": -1, "ste_lr": 0.0, "ste_negative_guidance": 1.0,
           "compositional_guidance_scale": 0.5, "ddim_steps": 2, "ti_steps": 0, "ti_init": "random", "templates": "photo",
           "anchor_prompts": "none", "image_guidance": -1.0, "iterations": 200}
    assert_each_rejected(stereo.unlearn, bad)
    pipe = tiny_sd_pipeline()
    with pytest.raises(ConfigError, match=r"adv_embeddings.*rounds"):
        stereo.unlearn(pipe, _concept(), rounds=1, adv_embeddings=2)
    with pytest.raises(ConfigError, match=r"concept.anchor.*ti_init"):
        stereo.unlearn(pipe, _concept(anchor=""), anchor_prompts="anchor")
    with pytest.raises(ConfigError, match="concept.target"):
        stereo.unlearn(pipe, _concept(target=" , "))
