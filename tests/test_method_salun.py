"""SalUn (methods/salun.py) on tiny SD-shaped pipelines: the mask, what changes, the conventions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import methods.salun as salun
from bench.context import MethodContext
from bench.hparams import ConfigError, check_params
from bench.testing import (
    changed,
    check_method_confs,
    tiny_concept,
    tiny_sd_pipeline,
    weights,
)
from methods.salun import unlearn

CONF = Path(__file__).resolve().parents[1] / "conf"
# A micro run: 8 renders, 4 generated retain images (2 sampler steps), 2 epochs of batch 4. The SD
# lr 1e-5 barely moves a random tiny UNet.
FAST = dict(num_forget_images=8, num_retain_images=4, image_steps=2, image_batch_size=4, batch_size=4, epochs=2, lr=1e-3)


def _render(n: int, seed: int, target: int | None = None) -> np.ndarray:
    """16×16 'concept images' (the tiny VAE's input size); ``target`` sets the square's brightness."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 120, (n, 16, 16, 3), dtype=np.uint8)
    img[:, 4:12, 4:12] = 230 if target is None else 150 + 40 * target
    return img


def _concept(**kw):
    return tiny_concept(**{"render": _render, **kw})


def _run(pipe, concept=None, seed: int = 0, tmp=None, **hp) -> dict:
    torch.manual_seed(seed)
    ctx = MethodContext(cache_dir=tmp, progress=False) if tmp is not None else None
    return unlearn(pipe, concept or _concept(), **{**FAST, **hp}, ctx=ctx)


@pytest.fixture
def spy_mask(monkeypatch):
    """Capture the saliency mask ``unlearn`` computes (the real function, only recorded)."""
    seen: dict[str, torch.Tensor] = {}
    real = salun._top_fraction

    def record(scores, fraction):
        masks = real(scores, fraction)
        seen.update(masks)
        return masks

    monkeypatch.setattr(salun, "_top_fraction", record)
    return seen


@pytest.mark.parametrize("train_method", ["full", "xattn"])
def test_only_masked_weights_change(train_method, spy_mask, tmp_path):
    pipe = tiny_sd_pipeline()
    unet0, te0, vae0 = weights(pipe.unet), weights(pipe.text_encoder), weights(pipe.vae)
    flags0 = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    report = _run(pipe, tmp=tmp_path, train_method=train_method)

    after = dict(pipe.unet.named_parameters())
    moved = 0
    for name, mask in spy_mask.items():
        before, now = unet0[name], after[name].detach()
        assert torch.equal(before[~mask], now[~mask]), f"{name}: a weight outside the saliency mask changed"
        moved += int((before != now).sum())
    assert moved > 0.5 * report["trained_elements"], "most salient weights should move under Adam"
    touched = changed(unet0, weights(pipe.unet))
    assert touched and touched <= set(report["trained_parameters"])
    if train_method == "xattn":
        assert all("attn2" in n for n in report["trained_parameters"])
    assert not changed(te0, weights(pipe.text_encoder)) and not changed(vae0, weights(pipe.vae))
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags0
    assert all(p.grad is None for p in pipe.unet.parameters()) and not pipe.unet.training
    # 2 epochs × 8 forget images / batch 4; NFE: 4 retain images × 2 CFG steps × 2 rows, the mask's
    # cond + uncond rows for 8 images, 3 rows per image and step (sg target, forget, retain).
    assert report["steps"] == 4 and len(report["loss_history"]) == 4
    assert report["nfe"] == 16 + 16 + 4 * 3 * 4 and report["nfe_images"] == 16 and report["nfe_mask"] == 16


@pytest.mark.parametrize("fraction", [0.5, 0.1, 1.0])
def test_mask_keeps_the_requested_fraction(fraction, spy_mask, tmp_path):
    pipe = tiny_sd_pipeline()
    report = _run(pipe, tmp=tmp_path, mask_fraction=fraction, epochs=1)
    total = sum(p.numel() for p in pipe.unet.parameters())
    kept = sum(int(m.sum()) for m in spy_mask.values())
    assert set(spy_mask) == {n for n, _ in pipe.unet.named_parameters()}  # ranked over the whole UNet
    assert kept == report["mask_elements"] == int(total * fraction) and report["mask_total"] == total
    assert report["mask_sparsity"] == pytest.approx(1 - fraction, abs=1e-6)


def test_top_fraction_is_exact_with_ties_and_keeps_the_largest():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 7, generator=g), "b": torch.zeros(33), "c": torch.rand(4, generator=g).round()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    for fraction in (0.05, 0.3, 0.5, 0.77, 1.0):
        masks = salun._top_fraction(scores, fraction)
        keep = torch.cat([m.flatten() for m in masks.values()])
        assert int(keep.sum()) == int(flat.numel() * fraction)
        if 0 < keep.sum() < flat.numel():
            assert flat[keep].min() >= flat[~keep].max()  # every kept score ≥ every dropped one
        assert all(masks[k].shape == scores[k].shape and masks[k].dtype == torch.bool for k in scores)


def test_deterministic(tmp_path):
    a, b, c = tiny_sd_pipeline(), tiny_sd_pipeline(), tiny_sd_pipeline()
    ra, rb = _run(a, seed=3, tmp=tmp_path), _run(b, seed=3, tmp=tmp_path)  # b reads a's cached retain images
    _run(c, seed=4, tmp=tmp_path)
    assert ra["images_cache_hit"] == [None, False] and rb["images_cache_hit"] == [None, True]
    assert ra["loss_history"] == rb["loss_history"] and ra["nfe"] == rb["nfe"]
    assert not changed(weights(a.unet), weights(b.unet))
    assert changed(weights(a.unet), weights(c.unet))


def test_generated_forget_images_are_cached(tmp_path):
    """SD worlds: no renderer, no folder → concept images from the base model, in the job's cache."""
    concept = _concept(render=None)
    r1 = _run(tiny_sd_pipeline(), concept, tmp=tmp_path, num_forget_images=4, epochs=1)
    assert r1["forget_images"].startswith(f"generated:{tmp_path / 'salun_images'}")
    assert r1["nfe_images"] == 2 * 4 * 2 * 2 and r1["nfe_saved_by_cache"] == 0
    r2 = _run(tiny_sd_pipeline(), concept, tmp=tmp_path, num_forget_images=4, epochs=1)
    assert r2["images_cache_hit"] == [True, True] and r2["nfe_saved_by_cache"] == r1["nfe_images"]
    assert r2["loss_history"] == r1["loss_history"] and r2["nfe"] == r1["nfe"]


def test_several_targets_and_prompts(tmp_path):
    concept = _concept(target="star, heart", detect=[{"factor": "shape", "value": "star"}, {"factor": "shape", "value": "heart"}],
                       retain_concepts=("circle", "square"))
    r = _run(tiny_sd_pipeline(), concept, tmp=tmp_path, templates="shapes", epochs=1)
    assert r["forget_prompts"] == ["a heart", "a star"] and r["pseudo_prompts"] == ["a circle"]
    rand = _run(tiny_sd_pipeline(), concept, tmp=tmp_path, pseudo="random", epochs=1)
    assert rand["pseudo_prompts"] == ["an image of a circle", "an image of a square"]
    anchor = _run(tiny_sd_pipeline(), concept, tmp=tmp_path, pseudo="anchor", templates="shapes", epochs=1, alpha=0.0)
    assert anchor["pseudo_prompts"] == ["a shape"] and anchor["num_retain_images"] == 0 and anchor["retain_images"] is None


def test_render_order_follows_the_targets():
    concept = _concept(target="heart, star", detect=[{"factor": "shape", "value": "star"}, {"factor": "shape", "value": "heart"}])
    images = salun._render(concept, concept.targets, 6, 0).numpy()
    assert (images[0::2, 8, 8] == 190).all() and (images[1::2, 8, 8] == 150).all()  # heart = index 1, star = 0
    with pytest.raises(ValueError, match="which render"):
        salun._render(_concept(target="star, moon", detect=[{"factor": "shape", "value": "star"}]), ("star", "moon"), 2, 0)


def test_nudity_uses_the_reference_prompts():
    concept = _concept(kind="nudity", target="nudity", retain_concepts=())
    assert salun._forget_prompt(concept, "reference", "nudity") == "a photo of a nude person"
    assert salun._pseudo_prompts(concept, "auto", "reference") == ["a photo of a person wearing clothes"]


def test_bad_hyperparameters_are_named():
    for params, key in [
        ({"mask_fraction": 0.0}, "mask_fraction"),
        ({"mask_fraction": 1.5}, "mask_fraction"),
        ({"lr": -1e-5}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"alpha": -0.1}, "alpha"),
        ({"train_method": "noxattn"}, "train_method"),
        ({"pseudo": "next"}, "pseudo"),
        ({"templates": "photo"}, "templates"),
        ({"threshold": 0.5}, "threshold"),
    ]:
        with pytest.raises(ConfigError, match=f"`method.params.{key}`"):
            check_params(unlearn, params)


def test_direct_calls_are_checked_before_any_work():
    pipe = tiny_sd_pipeline()
    unet0 = weights(pipe.unet)
    with pytest.raises(ConfigError, match=r"`method.params.mask_fraction` must be float and > 0 and <= 1, got 1.5"):
        unlearn(pipe, _concept(), mask_fraction=1.5)
    with pytest.raises(ConfigError, match=r"`method.params.pseudo` = 'first'.*retain_concepts"):
        unlearn(pipe, _concept(retain_concepts=()), pseudo="first")
    with pytest.raises(ConfigError, match=r"`concept.retain_prompts`.*`method.params.alpha`"):
        unlearn(pipe, _concept(retain_prompts=()))
    assert not changed(unet0, weights(pipe.unet))


def test_flags_restored_on_exception(monkeypatch, tmp_path):
    pipe = tiny_sd_pipeline()
    flags0 = [p.requires_grad for p in pipe.unet.parameters()]

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(salun, "_train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(pipe, tmp=tmp_path)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags0
    assert all(p.grad is None for p in pipe.unet.parameters()) and not pipe.unet.training


def test_configs_validate():
    # The conf's SD defaults are the signature's defaults (README / random_label.py / generate_mask.py).
    check_method_confs(unlearn, "salun", "SalUn")
    assert OmegaConf.load(CONF / "sweep" / "salun.yaml").defaults == [{"override /method": "salun"}]
