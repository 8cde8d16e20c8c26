"""MACE (methods/mace.py) on tiny SD-shaped pipelines: what changes, the closed-form refinement, the
attention-suppressing LoRAs and their fusion, several targets, determinism, hyperparameter validation,
failure handling and the shipped configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import methods.mace as mace
from bench.hparams import ConfigError
from bench.testing import (
    assert_each_rejected,
    assert_seed_decides,
    changed,
    check_method_confs,
    pipe_weights,
    tiny_concept,
    tiny_sd_pipeline,
)
from methods.mace import unlearn

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = {"steps": 3, "lr": 1e-2, "num_prompts": 4, "num_images": 2}
BOTH = [{"factor": "shape", "value": "star"}, {"factor": "shape", "value": "heart"}]


def _render(n: int, seed: int, target: int | None = None) -> np.ndarray:
    """Shapes-like 16×16 renders: a saturated square (red for target 0/None, blue for 1) on grey."""
    rng = np.random.default_rng(seed)
    img = np.repeat(rng.integers(40, 200, (n, 1, 1, 1)), 3, axis=-1) * np.ones((n, 16, 16, 3))
    img[:, 4:12, 3:11] = [30, 30, 220] if target == 1 else [220, 30, 30]
    return img.astype(np.uint8)


def _concept(words: str = "star", **kw):
    detect = BOTH if "," in words else {"factor": "shape", "value": "star"}
    return tiny_concept(target=words, render=_render, detect=detect, **kw)


def _run(pipe, seed: int = 0, words: str = "star", concept=None, **kw) -> dict:
    torch.manual_seed(seed)
    return unlearn(pipe, concept or _concept(words), **{**FAST, **kw})


def _kv_names(pipe) -> set[str]:
    return {n for n, _ in pipe.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}


def test_only_cross_attention_keys_and_values_change():
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)  # as the harness hands the UNet over
    before = pipe_weights(pipe)
    report = _run(pipe)
    expected = _kv_names(pipe)
    assert len(expected) == 8 and report["trained_parameters"] == sorted(expected)
    assert changed(before, pipe_weights(pipe)) == {f"unet.{n}" for n in expected}  # text encoder, VAE bit-identical
    assert not pipe.unet.training
    assert all(not p.requires_grad and p.grad is None for p in pipe.unet.parameters())
    assert report["variant"] == "mace" and report["masks"] == "render-saturation"
    assert report["nfe"] == report["nfe_train"] == 3 and len(report["loss_history"]) == 3


def test_closed_form_refinement_maps_coexisting_words_to_the_anchor():
    pipe = tiny_sd_pipeline()
    layers = mace._cross_attention(pipe.unet)
    linears = [(f"{n}.{p}", getattr(a, p)) for n, a in layers for p in ("to_k", "to_v")]
    old_w = {n: lin.weight.detach().clone().double() for n, lin in linears}
    prompts, anchors = ["A photo of star", "star in a photo"], ["A photo of shape", "shape in a photo"]
    with torch.no_grad():
        k_old, k_new = mace._cfr_keys(pipe, [prompts], [anchors])
        report = mace._refine(linears, k_old, k_new, 1.0, 0.0, None)
    assert report["after"] < 0.5 * report["before"]
    ko, kn = k_old.double(), k_new.double()
    for name, lin in linears:
        w, w0 = lin.weight.detach().double(), old_w[name]
        # the normal equations of λ‖W − W_old‖² + Σ‖W k − W_old k'‖² hold at the solution (to the
        # float32 round-off of the stored weight, relative to the size of the terms)
        grad = 1.0 * (w - w0) + (w @ ko.T - w0 @ kn.T) @ ko
        assert grad.abs().max() < 1e-5 * (w0 @ kn.T @ ko).abs().max()
        # the words after "star" (and the EOS padding) now project like those after "shape"
        assert (ko @ w.T - kn @ w0.T).norm() < (ko @ w0.T - kn @ w0.T).norm()


def test_matching_indices_skip_the_concept_and_align_the_padding():
    # BOS a photo of STAR EOS (len 6) vs BOS a photo of SHA PE EOS (len 7), padded to 10
    i_old, i_new = mace._matching([0, 1, 2, 3, 9, 5], [0, 1, 2, 3, 7, 8, 5], 10)
    assert i_old == [0, 1, 2, 3, 5, 6, 7, 8] and i_new == [0, 1, 2, 3, 6, 7, 8, 9]


def _attention_mass(unet, pipe, concept, prompts: list[str]) -> float:
    """Σ‖A_concept‖ inside the mask over fixed x_t, prompts and t: what the LoRA stage suppresses."""
    layers = mace._cross_attention(unet)
    records = {n: [None, None] for n, _ in layers}
    hooks = [h for n, a in layers for h in (a.to_q.register_forward_hook(mace._capture(records[n], 0)),
                                             a.to_k.register_forward_hook(mace._capture(records[n], 1)))]
    images = _render(4, 7)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks = torch.from_numpy(mace._saturated(images)).float()[:, None]
    pos = mace._concept_positions(pipe, prompts, "star", True)
    emb = mace._hidden(pipe, prompts)
    g = torch.Generator().manual_seed(3)
    total = 0.0
    with torch.no_grad():
        lat = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        for i in range(4):
            for p in range(len(prompts)):
                t = torch.tensor([200 + 50 * i])
                unet(lat[i : i + 1] + 0.5 * torch.randn(1, 4, 8, 8, generator=g), t, encoder_hidden_states=emb[p : p + 1])
                total += float(mace._attention_loss(records, layers, pos[p], masks[i : i + 1]))
    for h in hooks:
        h.remove()
    return total


def test_concept_attention_inside_the_mask_is_suppressed():
    pipe, base = tiny_sd_pipeline(), tiny_sd_pipeline()
    prompts = ["A photo of star", "An image of star"]
    before = _attention_mass(base.unet, base, _concept(), prompts)
    report = _run(pipe, steps=25, lr=3e-2, lamb=10.0)
    assert _attention_mass(pipe.unet, pipe, _concept(), prompts) < 0.9 * before
    hist = report["loss_history"]
    assert np.mean(hist[-5:]) < np.mean(hist[:5]) and all(np.isfinite(hist))


def test_two_targets_are_both_erased_with_their_own_renders():
    pipe = tiny_sd_pipeline()
    calls = []

    def render(n, seed, target=None):
        calls.append(target)
        return _render(n, seed, target)

    concept = tiny_concept(target="star, heart", render=render, detect=BOTH)
    report = _run(pipe, concept=concept)
    assert calls == [0, 1] and report["words"] == ["star", "heart"]
    assert [p[0].count("star") for p in report["prompts"]] == [1, 0] and "heart" in report["prompts"][1][0]
    assert set(report["lora_delta_norm"]) == {"star", "heart"} and all(v > 0 for v in report["lora_delta_norm"].values())
    assert len(report["loss_history"]) == 6 and report["nfe"] == 6
    assert set(report["loss_subsampled"]) == {"star", "heart"}
    # the concept positions of each concept's prompts are its own word's tokens (plus EOS)
    pos = mace._concept_positions(pipe, report["prompts"][1][:1], "heart", use_pooler=False)
    ids = pipe.tokenizer(report["prompts"][1][:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[pos].tolist() == pipe.tokenizer("heart", add_special_tokens=False).input_ids


def test_fusion_solves_the_multi_lora_normal_equations():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=False)
    w_cfr = lin.weight.detach().clone().double()
    keys = [torch.randn(20, 6).double(), torch.randn(15, 6).double()]
    deltas = [{"l": torch.randn(5, 6).double()}, {"l": torch.randn(5, 6).double()}]
    with torch.no_grad():
        mace._fuse([("l", lin)], {"l": w_cfr}, deltas, [k.T @ k for k in keys], 2.0, 0.0, None)
    w = lin.weight.detach().double()
    grad = 2.0 * (w - w_cfr) + sum((w - w_cfr - d["l"]) @ k.T @ k for d, k in zip(deltas, keys, strict=True))
    assert grad.abs().max() < 1e-4


def test_without_a_renderer_images_are_generated_and_unmasked():
    pipe = tiny_sd_pipeline()
    report = _run(pipe, concept=tiny_concept(), image_steps=2)
    assert report["masks"] == "none" and report["nfe_images"] == 2 * 2 * 2  # 2 images, 2 CFG steps
    assert report["nfe"] == report["nfe_images"] + 3


def test_same_seed_same_weights_other_seed_other_weights():
    assert_seed_decides(lambda pipe, seed: (_run(pipe, seed=seed)["loss_history"],))


def test_flags_and_weights_restored_when_training_fails(monkeypatch):
    pipe = tiny_sd_pipeline()
    next(pipe.unet.parameters()).requires_grad_(True)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    before = pipe_weights(pipe)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(mace, "_attention_loss", boom)  # after the refinement has edited the UNet
    with pytest.raises(RuntimeError, match="boom"):
        _run(pipe)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags and not pipe.unet.training
    assert not changed(before, pipe_weights(pipe))
    assert all(not a.to_k._forward_hooks and not a.to_q._forward_hooks for _, a in mace._cross_attention(pipe.unet))


def test_bad_hyperparameters_are_one_config_error_naming_the_key():
    bad = {
        "lamb": -1.0,
        "preserve_scale": -0.1,
        "num_prompts": 31,
        "steps": 0,
        "lr": 0.0,
        "rank": 0,
        "weight_decay": -1.0,
        "grad_clip": -1.0,
        "num_images": 0,
        "image_steps": 0,
        "image_guidance": -1.0,
        "templates": "coco",
        "use_mask": "yes",
        "learning_rate": 1e-5,
    }
    assert_each_rejected(unlearn, bad)
    pipe = tiny_sd_pipeline()
    before = pipe_weights(pipe)
    with pytest.raises(ConfigError, match=r"`method.params.rank` must be .*>= 1.*got 0"):
        _run(pipe, rank=0)
    with pytest.raises(ConfigError, match=r"`method.params.lamb` must be > 0 when `preserve_scale` is 0"):
        _run(pipe, lamb=0.0)
    with pytest.raises(ConfigError, match=r"`method.params.anchor`"):
        _run(pipe, anchor="star")
    assert not changed(before, pipe_weights(pipe))


def test_shapes_templates_put_the_concept_in_the_world_grammar():
    objects = mace._shapes_templates("object")
    assert len(objects) >= 30 and "a {}" in objects and "a red {} on a striped background" in objects
    assert "a {} star" in mace._shapes_templates("attribute")
    assert "a star on a {} background" in mace._shapes_templates("style")
    torch.manual_seed(0)
    assert len(set(mace._templates("object", True, 30, "shapes"))) == 30
    assert mace._templates("object", False, 30, "reference") == ["A photo of {}"]


def test_configs_validate():
    assert OmegaConf.load(CONF / "method" / "mace.yaml").reference is None
    # The conf's SD defaults are the signature's defaults (configs/object/erase_ship.yaml, 057e7a6).
    defaults = check_method_confs(unlearn, "mace", "MACE")
    assert (defaults["lamb"], defaults["lr"], defaults["steps"], defaults["rank"]) == (1e3, 1e-5, 50, 1)
    assert (defaults["preserve_scale"], defaults["num_prompts"], defaults["weight_decay"]) == (0.0, 30, 0.01)
