"""FMN (methods/fmn.py) on tiny SD-shaped pipelines: what changes, the loss, the conventions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import methods.fmn as fmn
from bench.context import MethodContext
from bench.hparams import ConfigError, check_params
from bench.testing import (
    changed,
    check_method_confs,
    tiny_concept,
    tiny_sd_pipeline,
    weights,
)
from methods.fmn import unlearn

CONF = Path(__file__).resolve().parents[1] / "conf"
EOS = 49407
FAST = dict(steps=4, lr=1e-3)  # a micro run: the SD lr 2e-6 barely moves a random tiny UNet


def _render(n: int, seed: int) -> np.ndarray:
    """16×16 'concept images': a bright square on a random background (the tiny VAE's input size)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 120, (n, 16, 16, 3), dtype=np.uint8)
    img[:, 4:12, 4:12] = 230
    return img


def _concept(**kw):
    return tiny_concept(**{"render": _render, **kw})


def _run(pipe, concept=None, seed: int = 0, **hp) -> dict:
    torch.manual_seed(seed)
    return unlearn(pipe, concept or _concept(), **{**FAST, **hp})


@pytest.mark.parametrize("text_len", [77, 16])
@pytest.mark.parametrize("trainable", ["attn2", "unet"])
def test_only_intended_parameters_change(trainable, text_len):
    pipe = tiny_sd_pipeline(text_len=text_len)
    unet0, te0, vae0 = weights(pipe.unet), weights(pipe.text_encoder), weights(pipe.vae)
    procs0 = dict(pipe.unet.attn_processors)
    grads0 = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    n_tok = len(pipe.tokenizer)
    report = _run(pipe, trainable=trainable)

    moved = changed(unet0, weights(pipe.unet))
    assert moved, "FMN changed nothing"
    assert moved <= set(report["trained_parameters"])
    if trainable == "attn2":
        assert all(".attn2." in n for n in report["trained_parameters"])
        assert {n.rsplit(".", 2)[0] for n in moved} >= {n.rsplit(".", 2)[0] for n in report["trained_parameters"] if "to_q" in n}
    else:
        assert report["trained_parameters"] == sorted(n for n, _ in pipe.unet.named_parameters())
        assert any(".attn2." not in n for n in moved)  # the whole UNet trains, not only attn2
    assert not changed(te0, weights(pipe.text_encoder)) and not changed(vae0, weights(pipe.vae))
    assert len(pipe.tokenizer) == n_tok
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in procs0.items()}
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads0
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert report["steps"] == 4 and report["nfe"] == 4 and len(report["loss_history"]) == 4


def _objective(pipe, concept, eos="first", loss="l2") -> float:
    """The FMN loss on one fixed noised batch (same latents, t and prompt before and after)."""
    prompts = fmn._concept_prompts(pipe.tokenizer, concept, fmn._templates(concept, "photo"), eos, False, 4)
    pixels = [fmn._resize_short_side(im, 16) for im in _render(4, seed=7)]
    torch.manual_seed(123)
    x, t, _, _ = fmn._noised_inputs(pipe, pixels, torch.arange(4), fmn._ddpm(pipe))
    ids = prompts[0].ids[None].repeat(4, 1)
    with torch.no_grad(), fmn._attention_probe(pipe.unet) as probe:
        cond = pipe.text_encoder(ids)[0]
        probe.start()
        pipe.unet(x, t, encoder_hidden_states=cond)
        return float(fmn._attention_loss(probe.stop(), prompts[0].positions[None].repeat(4, 1), loss))


@pytest.mark.parametrize("loss", ["l2", "rms"])
def test_loss_decreases(loss):
    pipe, concept = tiny_sd_pipeline(), _concept()
    before = _objective(pipe, concept, loss=loss)
    report = _run(pipe, concept, steps=12, lr=3e-3 if loss == "l2" else 3e-2, loss=loss)
    assert _objective(pipe, concept, loss=loss) < 0.5 * before
    hist = report["loss_history"]
    assert np.mean(hist[-3:]) < np.mean(hist[:3])


def test_deterministic():
    a, b, c = tiny_sd_pipeline(), tiny_sd_pipeline(), tiny_sd_pipeline()
    ra, rb = _run(a, seed=3), _run(b, seed=3)
    _run(c, seed=4)
    assert ra["loss_history"] == rb["loss_history"]
    assert not changed(weights(a.unet), weights(b.unet))
    assert changed(weights(a.unet), weights(c.unet))


def test_l2_is_the_unaveraged_norm_and_rms_its_mean():
    """train_attn.py L285: `torch.cat(attn_probs).norm()`; RMS = that / sqrt(#elements)."""
    maps = [torch.rand(2 * 4, 16, 77), torch.rand(2 * 2, 4, 77)]  # two layers, batch 2, 4 and 2 heads
    pos = torch.zeros(2, 77, dtype=torch.bool)
    pos[0, [4, 5]] = True
    pos[1, [3]] = True
    ref = []
    for m in maps:  # independent: per image, per head, every query, the chosen keys
        per = m.reshape(2, -1, *m.shape[1:])
        ref += [per[b][..., pos[b]].flatten() for b in range(2)]
    ref = torch.cat(ref)
    assert torch.allclose(fmn._attention_loss(maps, pos, "l2"), ref.norm())
    assert torch.allclose(fmn._attention_loss(maps, pos, "rms"), ref.norm() / ref.numel() ** 0.5)


@pytest.mark.parametrize("text_len", [77, 16])
def test_concept_positions_and_eos(text_len):
    """Every token of the concept word, plus none / the first / every EOS (SD 1.x pads with EOS)."""
    pipe = tiny_sd_pipeline(text_len=text_len)
    concept = _concept(target="van gogh", kind="style")

    def positions(eos, family="photo"):
        (p,) = fmn._concept_prompts(pipe.tokenizer, concept, fmn._templates(concept, family), eos, False, 4)
        return p, p.positions.nonzero().flatten().tolist()

    p, none = positions("none")
    assert p.text == "a photo in the style of van gogh"
    ids = p.ids.tolist()
    word = pipe.tokenizer("van gogh", add_special_tokens=False).input_ids
    assert [ids[i] for i in none] == word and len(ids) == text_len
    first_eos = ids.index(EOS)
    assert positions("first")[1] == none + [first_eos]
    assert positions("all")[1] == none + list(range(first_eos, text_len))
    assert positions("none", "shapes")[0].text == "a shape on a van gogh background"


def test_shapes_templates():
    t = fmn._templates
    assert t(_concept(), "shapes")[0].format("star") == "a star"
    assert t(_concept(kind="attribute", target="red"), "shapes")[0].format("red") == "a red shape"
    assert t(_concept(kind="object", target="apple"), "photo")[0].format("apple") == "a photo of apple"
    assert [s.format("x") for s in t(_concept(target="star, pentagon"), "shapes")] == ["a x", "a x"]


def test_missing_concept_token_is_a_clear_error_and_processors_are_restored():
    pipe = tiny_sd_pipeline(text_len=16)
    long_word = " ".join(["big"] * 14) + " star"  # "a photo of …" is truncated at 16 tokens
    procs0 = {k: id(v) for k, v in pipe.unet.attn_processors.items()}
    with pytest.raises(ValueError, match="do not occur"):
        _run(pipe, _concept(target=long_word))
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == procs0


def test_processors_and_flags_restored_on_exception(monkeypatch):
    pipe = tiny_sd_pipeline()
    procs0 = {k: id(v) for k, v in pipe.unet.attn_processors.items()}
    flags0 = [p.requires_grad for p in pipe.unet.parameters()] + [p.requires_grad for p in pipe.text_encoder.parameters()]

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(fmn, "_attention_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(pipe)
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == procs0
    assert [p.requires_grad for p in pipe.unet.parameters()] + [p.requires_grad for p in pipe.text_encoder.parameters()] == flags0
    assert not pipe.unet.training


def test_textual_inversion_stage_does_not_leak():
    pipe = tiny_sd_pipeline(text_len=16)
    te0, n_tok = weights(pipe.text_encoder), len(pipe.tokenizer)
    report = _run(pipe, ti=True, ti_steps=6, ti_tokens=3, trainable="attn2")
    assert report["concept_prompts"] == ["a photo of <s1><s2><s3>"]
    assert report["concept_positions"] == [[4, 5, 6, 7]]  # the 3 learned tokens + the real EOS
    assert len(report["ti_loss_history"]) == 6 and report["nfe"] == 6 + 4
    assert not changed(te0, weights(pipe.text_encoder)) and len(pipe.tokenizer) == n_tok
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


def test_generated_images_are_cached(tmp_path):
    """SD worlds: no renderer, no folder → images from the base model, cached as PNG in the job's cache."""
    concept = _concept(render=None)
    ctx = MethodContext(cache_dir=tmp_path)
    r1 = _run(tiny_sd_pipeline(), concept, num_images=2, image_steps=2, ctx=ctx)
    assert r1["nfe_images"] == 2 * 2 * 2 and r1["nfe"] == 8 + 4
    folder = Path(r1["images"].split(":", 1)[1])
    assert folder.parent == tmp_path / "fmn_images" and len(list(folder.glob("*.png"))) == 2
    r2 = _run(tiny_sd_pipeline(), concept, num_images=2, image_steps=2, ctx=ctx)
    assert r2["nfe_images"] == 0 and r2["images"] == r1["images"] and r2["loss_history"] == r1["loss_history"]


def test_images_dir_any_size(tmp_path):
    from PIL import Image

    for i, size in enumerate([(20, 16), (16, 40), (64, 64)]):
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
    report = _run(tiny_sd_pipeline(), _concept(render=None, images_dir=str(tmp_path)), batch_size=2)
    # 4 steps over 3 images at batch 2: batches of 2, 1, 2, 1 (a DataLoader with drop_last=False)
    assert report["num_images"] == 3 and report["nfe"] == 6 and report["images"] == f"dir:{tmp_path}"


def test_bad_hyperparameters_are_named():
    for params, key in [
        ({"lr": -1e-6}, "lr"),
        ({"steps": 0}, "steps"),
        ({"eos": "last"}, "eos"),
        ({"loss": "l1"}, "loss"),
        ({"trainable": "attn1"}, "trainable"),
        ({"templates": "sd"}, "templates"),
        ({"learning_rate": 1e-5}, "learning_rate"),
    ]:
        with pytest.raises(ConfigError, match=f"`method.params.{key}`"):
            check_params(unlearn, params)


def test_configs_validate():
    # The conf's SD defaults are the signature's defaults (configs/attn.yaml, a4a81e8).
    check_method_confs(unlearn, "fmn")
