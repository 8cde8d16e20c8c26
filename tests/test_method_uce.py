"""UCE (methods/uce.py) on tiny SD-shaped pipelines: what changes, the closed form, the conventions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.hparams import ConfigError, check_params
from bench.testing import check_method_confs, tiny_concept, tiny_sd_pipeline
from methods.uce import unlearn

CONF = Path(__file__).resolve().parents[1] / "conf"
EOS = 49407


def _concept(**kw):
    return tiny_concept(**{"retain_concepts": ("circle", "square", "heart"), **kw})


def _kv(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}


def _hidden(pipe, text: str) -> tuple[torch.Tensor, int]:
    """Independent key extraction: the last word sits right before the first EOS id."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids).last_hidden_state[0].double()
    return hidden, int((ids[0] == EOS).nonzero()[0]) - 1


def _independent_keys(pipe, keys: str, target: str, guide: str, preserve: list[str]):
    h_t, i_t = _hidden(pipe, target)
    h_g, i_g = _hidden(pipe, guide)
    if keys == "last_token":
        return h_t[i_t : i_t + 1], h_g[i_g : i_g + 1], torch.stack([_hidden(pipe, p)[0][_hidden(pipe, p)[1]] for p in preserve])
    span = h_t.shape[0] - max(i_t, i_g)
    keep = torch.cat([_hidden(pipe, p)[0] for p in [""] + preserve])
    return h_t[i_t : i_t + span], h_g[i_g : i_g + span], keep


def _uce_objective(w, w_old, c_e, c_g, c_p, lamb, s_e, s_p):
    return (
        lamb * (w - w_old).square().sum()
        + s_e * (c_e @ w.T - c_g @ w_old.T).square().sum()
        + s_p * (c_p @ w.T - c_p @ w_old.T).square().sum()
    )


@pytest.mark.parametrize("text_len", [77, 16])
@pytest.mark.parametrize("keys", ["last_token", "tail_span"])
def test_only_cross_attention_kv_change(keys, text_len):
    pipe = tiny_sd_pipeline(text_len=text_len)
    before = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()} for part in ("unet", "text_encoder", "vae")}
    report = unlearn(pipe, _concept(), keys=keys)
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before["unet"][k])}
    expected = set(_kv(pipe.unet))
    assert len(expected) == 8  # 4 attn2 modules in the tiny UNet, to_k and to_v each
    assert changed == expected
    assert report["trained_parameters"] == sorted(expected)
    for part in ("text_encoder", "vae"):
        after = getattr(pipe, part).state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[part].items())
    assert report["nfe"] == 0 and report["steps"] == 1
    # Closed form: the objective at the solution is below its value at W_old.
    assert report["loss_history"][1] < report["loss_history"][0]
    assert report["objective_after"] < 0.5 * report["objective_before"]


@pytest.mark.parametrize("keys", ["last_token", "tail_span"])
def test_edit_minimises_the_uce_objective(keys):
    pipe = tiny_sd_pipeline(text_len=16)
    old = _kv(pipe.unet)
    lamb, s_e, s_p = 0.5, 1.0, 0.7
    unlearn(pipe, _concept(), keys=keys, lamb=lamb, erase_scale=s_e, preserve_scale=s_p)
    new = _kv(pipe.unet)
    c_e, c_g, c_p = _independent_keys(pipe, keys, "star", "shape", ["circle", "square", "heart"])
    d = c_e.shape[1]
    gen = torch.Generator().manual_seed(0)
    for name, w_old in old.items():
        w_old = w_old.double()
        # Independent solution: least squares on the stacked system (QR, no normal equations).
        a = torch.cat([lamb**0.5 * torch.eye(d, dtype=torch.float64), s_e**0.5 * c_e, s_p**0.5 * c_p])
        b = torch.cat([lamb**0.5 * w_old.T, s_e**0.5 * c_g @ w_old.T, s_p**0.5 * c_p @ w_old.T])
        w_ref = torch.linalg.lstsq(a, b).solution.T
        w = new[name].double()
        assert torch.allclose(w, w_ref, rtol=1e-4, atol=1e-5), name
        # Normal equations: the gradient vanishes at the edit (relative to its size at W_old) ...
        w_var = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_uce_objective(w_var, w_old, c_e, c_g, c_p, lamb, s_e, s_p), w_var)
        w_var0 = w_old.clone().requires_grad_(True)
        (grad0,) = torch.autograd.grad(_uce_objective(w_var0, w_old, c_e, c_g, c_p, lamb, s_e, s_p), w_var0)
        assert grad.norm() < 1e-4 * grad0.norm(), name
        # ... and every perturbation increases it.
        value = _uce_objective(w, w_old, c_e, c_g, c_p, lamb, s_e, s_p)
        for _ in range(5):
            step = 1e-2 * w.abs().mean() * torch.randn(w.shape, generator=gen, dtype=torch.float64)
            assert _uce_objective(w + step, w_old, c_e, c_g, c_p, lamb, s_e, s_p) > value
        assert value < _uce_objective(w_old, w_old, c_e, c_g, c_p, lamb, s_e, s_p)


def test_exact_fit_keeps_preserved_outputs_as_lambda_vanishes():
    # last_token: 1 erase key + 3 preserve keys ≤ 32 dimensions, so the constraints can all hold.
    pipe = tiny_sd_pipeline()
    old = _kv(pipe.unet)
    unlearn(pipe, _concept(), keys="last_token", lamb=1e-6)
    new = _kv(pipe.unet)
    c_e, c_g, c_p = _independent_keys(pipe, "last_token", "star", "shape", ["circle", "square", "heart"])
    for name, w_old in old.items():
        w_old, w = w_old.double(), new[name].double()
        kept, kept_old = c_p @ w.T, c_p @ w_old.T
        assert (kept - kept_old).norm() < 1e-3 * kept_old.norm(), name
        erased, guided = c_e @ w.T, c_g @ w_old.T  # the target now reads like the guide
        assert (erased - guided).norm() < 1e-3 * guided.norm(), name
        assert (erased - c_e @ w_old.T).norm() > 1e-2 * guided.norm(), name


def test_deterministic():
    weights = []
    for _ in range(2):
        pipe = tiny_sd_pipeline()
        torch.manual_seed(0)
        unlearn(pipe, _concept(), keys="tail_span", expand_prompts=True)
        weights.append(_kv(pipe.unet))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_float32_solve_agrees_with_float64():
    w = {}
    for dtype in ("float64", "float32"):
        pipe = tiny_sd_pipeline()
        unlearn(pipe, _concept(), solve_dtype=dtype)
        w[dtype] = _kv(pipe.unet)
    assert all(torch.allclose(w["float64"][k], w["float32"][k], rtol=1e-3, atol=1e-5) for k in w["float64"])


def test_conventions_texts_and_defaults():
    pipe = tiny_sd_pipeline(text_len=16)
    r = unlearn(pipe, _concept(), keys="last_token", expand_prompts=True)
    assert r["erase"] == ["star", "image of star", "photo of star", "portrait of star", "picture of star", "painting of star"]
    assert r["guide"][:2] == ["shape", "image of shape"]  # HEAD expands the guide too
    assert r["preserve"] == ["circle", "square", "heart"] and r["n_erase_keys"] == 6 and r["n_preserve_keys"] == 3
    r = unlearn(tiny_sd_pipeline(text_len=16), _concept(anchor="", kind="style"), keys="tail_span", expand_prompts=True, preserve_scale="auto")
    assert r["erase"][1] == "painting by star" and set(r["guide"]) == {""}  # 2023: bare guide
    assert r["preserve"] == ["", "circle", "square", "heart"]  # '' always preserved
    assert r["preserve_scale"] == pytest.approx(0.25)  # max(0.1, 1/N)
    assert r["n_preserve_keys"] == 4 * 16
    # Tail span of "star" (1 word) against guide '' (BOS at 0): 15 aligned keys at text_len 16.
    r = unlearn(tiny_sd_pipeline(text_len=16), _concept(anchor=""), keys="tail_span", preserve=[])
    assert r["n_erase_keys"] == 15 and r["preserve"] == [""]
    with pytest.raises(ValueError, match="must not contain a concept being erased"):
        unlearn(tiny_sd_pipeline(text_len=16), _concept(), preserve=["circle", "Star"])


def test_bad_hyperparameters_are_named():
    assert check_params(unlearn, {})["lamb"] == 0.5
    bad = {
        "keys": {"keys": "first_token"},
        "lamb": {"lamb": -0.5},
        "erase_scale": {"erase_scale": 0},
        "preserve_scale": {"preserve_scale": "sometimes"},
        "preserve": {"preserve": "circle"},
        "lr": {"lr": 1e-5},
    }
    for key, params in bad.items():
        with pytest.raises(ConfigError, match=key):
            check_params(unlearn, params)


def test_configs_validate():
    check_method_confs(unlearn, "uce", same_defaults=False)
