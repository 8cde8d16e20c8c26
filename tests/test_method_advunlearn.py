"""AdvUnlearn (methods/advunlearn.py) on tiny SD-shaped pipelines: only the text encoder trains, the
attack finds prompts that bring the concept back, the retain regulariser, validation, determinism,
and the delta it leaves (text-encoder tensors) through method=weights; the shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import methods.advunlearn as adv
from bench.hparams import ConfigError, check_params
from bench.pipeline import read_delta, save_delta, snapshot_state
from bench.sampling import SamplerConfig, ddim_sampler, generate
from bench.testing import (
    assert_seed_decides,
    changed,
    check_method_confs,
    pipe_weights,
    tiny_concept,
    tiny_sd_pipeline,
)
from methods import weights
from methods.advunlearn import unlearn

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = {"iterations": 4, "warmup_iter": 2, "attack_step": 2, "ddim_steps": 4, "lr": 1e-3, "retain_batch": 2}


def _run(pipe, seed: int = 0, **kw) -> dict:
    torch.manual_seed(seed)
    return unlearn(pipe, tiny_concept(), **{**FAST, **kw})


def test_default_train_method_changes_only_the_text_encoder_layers():
    pipe = tiny_sd_pipeline(text_len=16)
    before = pipe_weights(pipe)
    report = _run(pipe)
    te = [n for n, _ in pipe.text_encoder.named_parameters()]
    expected = {f"text_encoder.{n}" for n in te if n.startswith(("encoder.layers.", "final_layer_norm."))}  # util.py L41–67
    assert changed(before, pipe_weights(pipe)) == expected  # UNet, VAE and the embeddings bit-identical
    assert report["trained_parameters"] == sorted(expected)
    assert report["attack_rounds"] == 2 and report["nfe"] > report["nfe_attack"] > 0
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    assert all(p.requires_grad for p in pipe.text_encoder.parameters())  # flags handed back as they came


def test_layer_and_component_choices():
    pipe = tiny_sd_pipeline()
    before = pipe_weights(pipe)
    _run(pipe, train_method="text_encoder_layers", layers=[1], component="ffn", warmup_iter=4)
    assert changed(before, pipe_weights(pipe)) == {f"text_encoder.{n}" for n, _ in pipe.text_encoder.named_parameters()
                                                   if n.startswith("encoder.layers.1.mlp.")}
    names = adv._trainable_names(pipe.text_encoder, "text_encoder_layers", [0], "attn", True)
    assert names == {n for n, _ in pipe.text_encoder.named_parameters()
                     if n.startswith(("encoder.layers.0.self_attn.", "final_layer_norm."))}


def test_the_attack_brings_the_concepts_prediction_back():
    """δ after the attack scores better on the attack objective −ℓ_atk than δ before, on latents it never saw."""
    pipe = tiny_sd_pipeline(seed=3)
    te, unet, tok = pipe.text_encoder, pipe.unet, pipe.tokenizer
    te.requires_grad_(False)
    sched = ddim_sampler(pipe.scheduler, 4)
    with torch.no_grad():
        e_null, e_word = adv._encode(te, adv._ids(tok, [""], "cpu")), adv._encode(te, adv._ids(tok, ["star"], "cpu"))
    sampler = adv._Sampler(unet, sched, (4, 8, 8), 3.0, e_null)
    ids = adv._prefixed_ids(tok, "star", 2)
    torch.manual_seed(0)
    held_out = []
    for _ in range(6):
        k, t = sampler.draw_step()
        held_out.append((sampler.sample(e_word, k)[0], t))
    init = adv._random_tokens(te.get_input_embeddings().weight.detach(), 2)

    def objective(delta):
        with torch.no_grad():
            return -sum(float(adv.attack_loss(unet, te, x, t, ids, delta, e_word)) for x, t in held_out)

    found, history, rows = adv._attack(unet, te, sampler, ids, init, e_word, steps=25, lr=0.05, method="pgd")
    assert len(history) == 25 and rows >= 25 * 2
    assert objective(found) > objective(init) * 0.8  # −ℓ_atk rises: at least 20% of the distance closed
    assert not torch.equal(found, init)
    signed, _, _ = adv._attack(unet, te, sampler, ids, init, e_word, steps=5, lr=0.05, method="fast_at")
    assert torch.allclose((signed - init).abs().max(), torch.tensor(5 * 0.05), rtol=0.05)  # Adam on sign(∇): ~lr per step


def test_prefix_ids_and_embeddings():
    pipe = tiny_sd_pipeline(text_len=16)
    tok, te = pipe.tokenizer, pipe.text_encoder
    plain = adv._ids(tok, ["a red star"], "cpu")[0].tolist()
    n = len(tok("a red star", add_special_tokens=False).input_ids)
    ids = adv._prefixed_ids(tok, "a red star", 2)[0].tolist()
    assert len(ids) == 16 and ids[0] == plain[0] and ids[3 : 3 + n] == plain[1 : 1 + n]  # [sot, δ, δ, words, eot…]
    with torch.no_grad():
        tokens = te.get_input_embeddings().weight[torch.tensor(ids[1:3])]
        same = adv._encode(te, torch.tensor([ids]), tokens)  # δ = the slots' own embeddings: the plain encoding
        assert torch.allclose(same, te(torch.tensor([ids]))[0], atol=1e-6)
        other = adv._encode(te, torch.tensor([ids]), torch.zeros_like(tokens))
        assert torch.allclose(other[:, 0], same[:, 0]) and not torch.allclose(other[:, 1:], same[:, 1:])  # causal: sot unchanged


def test_retain_regulariser_pulls_retain_outputs_towards_the_original():
    def retain_drift(weight: float) -> float:
        pipe = tiny_sd_pipeline(seed=1)
        tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
        prompts = ["a circle", "a blue square", "a red heart"]
        with torch.no_grad():
            before = te(adv._ids(tok, prompts, "cpu"))[0]
        _run(pipe, iterations=12, warmup_iter=12, lr=3e-3, retain_loss_weight=weight, retain_prompts=prompts, retain_batch=3)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn((3, 4, 8, 8), generator=g), torch.tensor([500])
        with torch.no_grad():
            after = te(adv._ids(tok, prompts, "cpu"))[0]
            return float((unet(x, t, encoder_hidden_states=after).sample - unet(x, t, encoder_hidden_states=before).sample).pow(2).mean())

    free, held = retain_drift(0.0), retain_drift(1.0)
    assert held < 0.5 * free, (held, free)


def test_deterministic_under_a_seed():
    assert_seed_decides(lambda pipe, seed: (_run(pipe, seed=seed)["loss_history"],), component="text_encoder")


@pytest.mark.parametrize(("params", "message"), [
    ({"attack_step": 0}, "`method.params.attack_step` must be int and >= 1, got 0"),
    ({"attack_method": "multi_pgd"}, "`method.params.attack_method` must be one of 'pgd', 'fast_at', got 'multi_pgd'"),
    ({"retain_loss_w": 0.3}, "`method.params.retain_loss_w` is not a hyperparameter of methods.advunlearn"),
    ({"train_method": "text_encoder_layers"}, "`method.params.layers` must list encoder layers in 0..1"),
    ({"train_method": "text_encoder_layers", "layers": [2]}, "`method.params.layers` must list encoder layers in 0..1"),
    ({"layers": [0]}, "`method.params.layers` is only read with train_method=text_encoder_layers"),
    ({"adv_prompt_num": 14}, "`method.params.adv_prompt_num` = 14 does not fit: 'star' takes 1 tokens"),
    ({"retain_prompts": []}, "`method.params.retain_prompts` must be null or a non-empty list"),
])
def test_config_errors_name_the_key(params, message):
    with pytest.raises(ConfigError) as e:
        check_params(unlearn, params)  # the harness, before any model loads: one key at a time
        unlearn(tiny_sd_pipeline(text_len=16), tiny_concept(), **{**FAST, **params})  # rules across keys and the model
    assert message in str(e.value), str(e.value)


def test_empty_retain_set_is_refused_unless_the_weight_is_zero():
    with pytest.raises(ConfigError, match=r"`concept.retain_prompts` of 'star' is empty, but `method.params.retain_loss_weight` = 0.3"):
        unlearn(tiny_sd_pipeline(), tiny_concept(retain_prompts=()), **FAST)
    torch.manual_seed(0)
    assert unlearn(tiny_sd_pipeline(), tiny_concept(retain_prompts=()), **{**FAST, "retain_loss_weight": 0.0})["retain_prompts"] == 0


def test_delta_holds_the_text_encoder_and_reloads_through_method_weights(tmp_path):
    pipe = tiny_sd_pipeline()
    base, te_base = snapshot_state(pipe.unet), snapshot_state(pipe.text_encoder)
    _run(pipe)
    delta = tmp_path / "delta.safetensors"
    names = save_delta(delta, base, pipe.unet, {"method": "advunlearn", "concept": "star"}, text_encoder_base=te_base,
                       text_encoder=pipe.text_encoder)
    tensors, meta = read_delta(delta)
    assert names and all(n.startswith("text_encoder.encoder.") or n.startswith("text_encoder.final_layer_norm.") for n in tensors)
    assert "text_encoder_base_hash" in meta
    fresh = tiny_sd_pipeline()
    report = weights.unlearn(fresh, None, path=str(delta))
    assert report["source"]["components"] == {"unet": 0, "text_encoder": len(names)}
    sampler = SamplerConfig(steps=3, guidance=7.5, batch_size=2)
    assert torch.equal(generate(fresh, fresh.unet, "a star", [0, 1], sampler), generate(pipe, pipe.unet, "a star", [0, 1], sampler))


def test_shipped_configs_validate_and_state_the_reference_defaults():
    check_method_confs(unlearn, "advunlearn")
    cfg = OmegaConf.load(CONF / "method" / "advunlearn.yaml")
    assert cfg.reference is None
    assert OmegaConf.to_container(cfg.params) == {k: p.default for k, p in adv.declared(unlearn).items()}  # every default, nothing else
