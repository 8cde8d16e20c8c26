"""RECE (methods/rece.py) on tiny SD-shaped pipelines: what changes, the UCE stage, both closed forms
of every round against independent least-squares solves, and the configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.hparams import check_params
from bench.testing import (
    assert_each_rejected,
    changed,
    check_method_confs,
    pipe_weights,
    tiny_concept,
    tiny_sd_pipeline,
)
from methods import uce
from methods.rece import _derive, unlearn

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESERVE = ("circle", "square", "heart")


def _concept(**kw):
    return tiny_concept(**{"retain_concepts": PRESERVE, **kw})


def _kv(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().double() for n, p in unet.named_parameters() if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}


def _hidden(pipe, texts) -> torch.Tensor:
    """Independent key extraction: every token of each padded text, stacked (n·L, d), float64."""
    ids = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state.double().flatten(0, 1)


def _lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(a, b).solution


def _independent_round(w, w0, c_t, c_g, c_p, mu, lamb, s_e, s_p):
    """One RECE round by least squares on stacked systems (QR, no normal equations)."""
    names = sorted(w)
    d = c_t.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    # (a) min_x Σ_l ‖W_l x − W_l⁰ c‖² + μ‖x‖², every token c at once (columns).
    a = torch.cat([w[n] for n in names] + [mu**0.5 * eye])
    b = torch.cat([w0[n] @ c_t.T for n in names] + [torch.zeros(d, c_t.shape[0], dtype=torch.float64)])
    c_adv = _lstsq(a, b).T
    # (b) per matrix: λ‖W − W_cur‖² + s_e Σ‖W c' − W_cur g‖² + s_p Σ‖W p − W_cur p‖².
    new = {}
    for n in names:
        a = torch.cat([lamb**0.5 * eye, s_e**0.5 * c_adv, s_p**0.5 * c_p])
        b = torch.cat([lamb**0.5 * w[n].T, s_e**0.5 * c_g @ w[n].T, s_p**0.5 * c_p @ w[n].T])
        new[n] = _lstsq(a, b).T
    return c_adv, new


def _derivation_objective(x, w, w0, c, mu):
    return sum((x @ w[n].T - c @ w0[n].T).square().sum() for n in w) + mu * x.square().sum()


@pytest.mark.parametrize("text_len", [77, 16])
def test_only_cross_attention_kv_change(text_len):
    pipe = tiny_sd_pipeline(text_len=text_len)
    before = pipe_weights(pipe)
    report = unlearn(pipe, _concept(), rounds=2)
    expected = {f"unet.{n}" for n in _kv(pipe.unet)}
    assert len(expected) == 8  # 4 attn2 modules in the tiny UNet, to_k and to_v each
    assert changed(before, pipe_weights(pipe)) == expected
    assert report["trained_parameters"] == sorted(n.removeprefix("unet.") for n in expected)
    assert report["nfe"] == 0 and report["steps"] == 3
    assert len(report["loss_history"]) == 3 and len(report["rounds"]) == 2
    assert report["n_adv_keys"] == text_len and report["n_preserve_keys"] == 4 * text_len  # '' + 3 preserve texts


@pytest.mark.parametrize("uce_keys", ["last_token", "tail_span"])
def test_round_zero_is_exactly_uce(uce_keys):
    hp = dict(guide="", preserve=["circle"], erase_scale=2.0, expand_prompts=True)
    a, b = tiny_sd_pipeline(text_len=16), tiny_sd_pipeline(text_len=16)
    report = unlearn(a, _concept(), rounds=0, uce_keys=uce_keys, uce_lamb=0.3, uce_preserve_scale=0.7, **hp)
    reference = uce.unlearn(b, _concept(), keys=uce_keys, lamb=0.3, preserve_scale=0.7, **hp)
    wa, wb = pipe_weights(a), pipe_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert report["loss_history"] == [reference["objective_after"]] and report["rounds"] == []
    assert report["uce"]["erase"] == reference["erase"] and report["uce"]["variant"] == uce_keys


@pytest.mark.parametrize("target", ["star", "star, heart"])
def test_rounds_match_independent_least_squares(target):
    mu, lamb, s_e, s_p = 0.05, 0.2, 1.5, 0.3
    concept = _concept(target=target, retain_concepts=("circle", "square"))
    w0 = _kv(tiny_sd_pipeline(text_len=16).unet)
    start = tiny_sd_pipeline(text_len=16)
    uce.unlearn(start, concept, keys="tail_span", lamb=0.5, erase_scale=s_e, preserve_scale="auto")
    w = _kv(start.unet)
    targets = concept.targets
    c_t, c_g, c_p = _hidden(start, targets), _hidden(start, ["shape"] * len(targets)), _hidden(start, ["", "circle", "square"])
    for rounds in (1, 2):
        pipe = tiny_sd_pipeline(text_len=16)
        report = unlearn(pipe, concept, rounds=rounds, reg_scale=mu, lamb=lamb, erase_scale=s_e, preserve_scale=s_p)
        c_adv, w_next = _independent_round(w, w0, c_t, c_g, c_p, mu, lamb, s_e, s_p)
        got = _kv(pipe.unet)
        for n in w_next:
            assert torch.allclose(got[n], w_next[n], rtol=1e-4, atol=1e-6), (rounds, n)
        info = report["rounds"][-1]
        rms = float(c_adv.square().sum(1).mean().sqrt())
        assert info["adv_token_norm"] == pytest.approx(rms, rel=1e-6)
        assert info["adv_objective"] == pytest.approx(float(_derivation_objective(c_adv, w, w0, c_t, mu)), rel=1e-6)
        guide_gap = sum((c_adv @ got[n].T - c_g @ w[n].T).square().sum() for n in w) / sum((c_g @ w[n].T).square().sum() for n in w)
        assert info["guide_gap_after"] == pytest.approx(float(guide_gap), rel=1e-3)
        # The weights live in float32 between rounds, as in the UNet.
        w = {n: t.float().double() for n, t in w_next.items()}
    assert report["erase"] == list(targets) and report["preserve"] == ["", "circle", "square"]


def test_derived_embedding_minimises_its_objective():
    pipe = tiny_sd_pipeline(text_len=16)
    w0 = _kv(pipe.unet)
    uce.unlearn(pipe, _concept(), keys="tail_span", preserve_scale="auto")
    w = _kv(pipe.unet)
    c = _hidden(pipe, ["star"])
    mu = 0.1
    x = _derive([w[n] for n in sorted(w)], [w0[n] for n in sorted(w)], c, mu)
    grads = []
    for point in (x, c):
        v = point.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_derivation_objective(v, w, w0, c, mu), v)
        grads.append(g.norm())
    assert grads[0] < 1e-8 * grads[1]  # the gradient vanishes at c', not at the target's own c
    value = _derivation_objective(x, w, w0, c, mu)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        step = 1e-2 * x.abs().mean() * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        assert _derivation_objective(x + step, w, w0, c, mu) > value
    # The edited weights no longer reproduce the original outputs from c, but they do from c'.
    assert value < 0.5 * _derivation_objective(c, w, w0, c, mu)


def test_each_round_maps_the_derived_embedding_to_the_guide():
    report = unlearn(tiny_sd_pipeline(text_len=16), _concept(), rounds=3)
    for info in report["rounds"]:
        assert info["objective_after"] < 0.1 * info["objective_before"], info
        assert info["guide_gap_after"] < 0.1 * info["guide_gap_before"], info
        # c' was the best regenerating embedding before the round; after it, it regenerates worse.
        assert info["regen_error_after"] > 1.5 * info["regen_error_before"], info
    # Each round starts from a model harder to attack: the best embedding regenerates less well.
    regen = [info["regen_error_before"] for info in report["rounds"]]
    assert regen == sorted(regen)
    assert all(info["target_shift"] > 0.01 for info in report["rounds"])  # the bare target moved too
    assert report["loss_history"][1:] == [info["objective_after"] for info in report["rounds"]]


def test_deterministic_and_float32_agrees():
    weights = []
    for dtype in ("float64", "float64", "float32"):
        pipe = tiny_sd_pipeline(text_len=16)
        unlearn(pipe, _concept(target="star, heart", retain_concepts=("circle",)), rounds=2, solve_dtype=dtype)
        weights.append(_kv(pipe.unet))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert all((weights[0][k] - weights[2][k]).norm() < 1e-3 * weights[0][k].norm() for k in weights[0])


def test_preserve_clash_is_an_error():
    with pytest.raises(ValueError, match="must not contain a concept being erased"):
        unlearn(tiny_sd_pipeline(text_len=16), _concept(), preserve=["circle", "Star"])


def test_bad_hyperparameters_are_named():
    assert check_params(unlearn, {})["rounds"] == 3
    assert_each_rejected(unlearn, {"rounds": -1, "reg_scale": 0, "lamb": -0.1, "preserve_scale": "auto",
                                   "uce_keys": "first_token", "uce_preserve_scale": "sometimes",
                                   "solve_dtype": "float16", "epochs": 3})
    assert_each_rejected(unlearn, {"rounds": 1.5})


def test_configs_validate_and_match_the_code_defaults():
    check_method_confs(unlearn, "rece", display="RECE")  # the YAML states every default, and the same ones
