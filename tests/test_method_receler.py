"""Receler (methods/receler.py) on tiny SD-shaped pipelines: which tensors change under each deployment, the delta
round trip through ``attach_erasers``, the erasers as attention processors (off / zero-init = the original UNet, the
captured maps = the attention), the concept mask and the localisation regulariser, the attack on P, the linearised
merge against the affine-eraser model, NFE accounting, determinism, clean-up on failure, validation and the configs."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors import safe_open

import methods.receler as rc
from bench.context import MethodContext
from bench.hparams import ConfigError
from bench.pipeline import DeltaError, check_fits, read_delta, save_delta, snapshot_state
from bench.sampling import embed_prompts
from bench.testing import (
    assert_each_rejected,
    assert_seed_decides,
    changed,
    check_method_confs,
    pipe_weights,
    tiny_concept,
    tiny_sd_pipeline,
)
from methods.receler import ERASER_KEY, EraserProcessor, attach_erasers, unlearn

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The tiny UNet has its four cross-attentions (down 1, mid, up 0 × 2) all at 4×4 (8² latents).
FAST = {"iterations": 3, "ddim_steps": 4, "lr": 1e-2, "adv_iters": 2, "num_adv_prompts": 4, "mask_resolution": 4}
ATTN2 = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
]
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def _run(pipe, tmp_path, seed: int = 0, **kw) -> dict:
    torch.manual_seed(seed)
    return unlearn(pipe, kw.pop("concept", tiny_concept()), **{**FAST, **kw}, ctx=MethodContext(cache_dir=tmp_path, progress=False))


def _predict(unet, emb: torch.Tensor, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)  # the same latents and timesteps for every call
    z, t = torch.randn(n, 4, 8, 8, generator=g), torch.randint(50, 950, (n,), generator=g)
    with torch.no_grad():
        return unet(z, t, encoder_hidden_states=emb.expand(n, -1, -1)).sample


def _processors(unet) -> dict[str, object]:
    return {name: m.processor for name, m in unet.named_modules() if hasattr(m, "set_processor")}


def test_adapter_deploy_adds_eraser_processors_and_changes_no_existing_tensor(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)  # as the harness hands the UNet over
    before = pipe_weights(pipe)
    report = _run(pipe, tmp_path)
    after = pipe_weights(pipe)
    expected = sorted(f"{a}.processor.eraser.{p}" for a in ATTN2 for p in PARTS)
    assert not changed(before, {k: after[k] for k in before})  # UNet, text encoder, VAE bit-identical
    assert sorted(k.removeprefix("unet.") for k in set(after) - set(before)) == expected == report["trained_parameters"]
    assert all(ERASER_KEY.match(k) for k in expected)
    procs = _processors(pipe.unet)
    assert {n for n, p in procs.items() if isinstance(p, EraserProcessor)} == set(ATTN2)  # attn1 untouched
    assert any(float(after[f"unet.{a}.processor.eraser.up.weight"].abs().max()) > 0 for a in ATTN2)  # it trained
    # handed back as it came: eval mode, no grads, nothing trainable, no hooks, no training state kept
    assert not pipe.unet.training
    assert all(not p.requires_grad and p.grad is None for p in pipe.unet.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())
    assert all(procs[a].out is None and procs[a].maps is None and procs[a].enabled for a in ATTN2)
    assert report["variant"] == "receler-adapter" and report["eraser"]["erasers"] == 4 and report["eraser"]["rank"] == 128
    assert report["trained_elements"] == 4 * (64 * 128 + 128 + 128 * 64 + 64) and 0 < report["mask_coverage"] <= 1


def test_linearised_deploy_changes_only_the_cross_attention_output_projections(tmp_path):
    pipe = tiny_sd_pipeline()
    original = {n: type(p) for n, p in _processors(pipe.unet).items()}
    before = pipe_weights(pipe)
    report = _run(pipe, tmp_path, deploy="linearised")
    expected = sorted(f"{a}.to_out.0.{k}" for a in ATTN2 for k in ("weight", "bias"))
    assert changed(before, pipe_weights(pipe)) == {f"unet.{n}" for n in expected}
    assert set(pipe_weights(pipe)) == set(before) and report["trained_parameters"] == expected
    assert {n: type(p) for n, p in _processors(pipe.unet).items()} == original  # stock processors back
    lin = report["linearisation"]
    assert 0 <= lin["relative_error_mean"] <= lin["relative_error_max"] < 1 and lin["samples_per_layer"] >= 65


def test_adapter_delta_round_trip_needs_attach_erasers(tmp_path):
    """What the harness does with the delta (bench/pipeline.py save_delta → apply_delta), with the one extra call
    apply_delta needs: attach_erasers before the state dict is loaded."""
    pipe = tiny_sd_pipeline()
    base = snapshot_state(pipe.unet)
    _run(pipe, tmp_path, iterations=4)
    names = save_delta(tmp_path / "delta.safetensors", base, pipe.unet, {"method": "receler"})
    tensors, _ = read_delta(tmp_path / "delta.safetensors")
    assert names == sorted(tensors) and len(names) == 16 and all(ERASER_KEY.match(n) for n in names)
    fresh = tiny_sd_pipeline().unet
    with pytest.raises(DeltaError, match="foreign to this UNet"):  # the stock loader alone rejects it
        check_fits(fresh.state_dict(), tensors, "delta")
    state = torch.random.get_rng_state()
    assert attach_erasers(fresh, tensors) == ATTN2
    assert torch.equal(state, torch.random.get_rng_state())  # attaching draws nothing from the global RNG
    check_fits(fresh.state_dict(), tensors, "delta")
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)
    assert not unexpected
    emb = embed_prompts(pipe, ["star"])
    assert torch.equal(_predict(fresh, emb), _predict(pipe.unet, emb))
    copy.deepcopy(fresh)  # the evaluator copies θ*: no graph-carrying state may be left in the processors


def test_adapter_delta_loads_through_apply_delta_and_method_weights(tmp_path):
    """The harness's own loaders build the erasers (bench.pipeline.attach_modules): θ* re-loaded from the delta
    and a pipeline given the delta by ``method=weights`` both equal the trained UNet, base hash checked."""
    from bench.pipeline import apply_delta, state_hash
    from methods.weights import unlearn as load_weights

    pipe = tiny_sd_pipeline()
    base = snapshot_state(pipe.unet)
    _run(pipe, tmp_path, iterations=4)
    save_delta(tmp_path / "delta.safetensors", base, pipe.unet, {"method": "receler"})
    emb = embed_prompts(pipe, ["star"])
    fresh = tiny_sd_pipeline().unet
    apply_delta(fresh, tmp_path / "delta.safetensors", base_hash=state_hash(base))
    assert torch.equal(_predict(fresh, emb), _predict(pipe.unet, emb))
    other = tiny_sd_pipeline()
    report = load_weights(other, tiny_concept(), path=str(tmp_path / "delta.safetensors"))
    assert report["source"]["components"] == {"unet": 16, "text_encoder": 0}
    assert torch.equal(_predict(other.unet, emb), _predict(pipe.unet, emb))


def test_erasers_are_cached_in_the_reference_layout(tmp_path):
    pipe = tiny_sd_pipeline()
    report = _run(pipe, tmp_path)
    path = Path(report["eraser_path"])
    assert path.parent == (tmp_path / "receler_erasers").resolve() and re.fullmatch(r"[0-9a-f]{20}\.safetensors", path.name)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["eraser_config"]) == {"eraser_type": "adapter", "eraser_rank": 128}  # utils.py L42–45
    info = json.loads(meta["concealbench"])
    prefixes = {a.removesuffix(".transformer_blocks.0.attn2") for a in ATTN2}  # utils.py L15–26: transformer prefixes
    assert info["keys"] == {p: f"{p}.transformer_blocks.0.attn2" for p in prefixes} and info["deploy"] == "adapter"
    assert set(tensors) == {f"{p}.{part}" for p in prefixes for part in PARTS}
    state = pipe.unet.state_dict()
    for p in prefixes:
        for part in PARTS:
            assert torch.equal(tensors[f"{p}.{part}"], state[f"{p}.transformer_blocks.0.attn2.processor.eraser.{part}"])


def test_processors_off_or_untrained_are_the_original_unet_and_capture_the_attention():
    pipe = tiny_sd_pipeline(text_len=16)
    unet, emb = pipe.unet, embed_prompts(pipe, ["a star"])
    reference = _predict(unet, emb)
    inputs = {}
    hooks = [unet.get_submodule(a).register_forward_pre_hook(
        lambda m, args, kw, a=a: inputs.__setitem__(a, (args[0], kw["encoder_hidden_states"])), with_kwargs=True) for a in ATTN2]
    torch.manual_seed(0)
    erasers = rc._Erasers(unet, 8)
    assert torch.equal(_predict(unet, emb), reference)  # up-projection zero-initialised: E ≡ 0 exactly
    for p in erasers.procs.values():
        torch.nn.init.normal_(p.eraser.up.weight)
    assert not torch.allclose(_predict(unet, emb), reference)
    with erasers.off(), erasers.capture() as maps:
        off = _predict(unet, emb)
    assert torch.equal(off, reference)  # DisableEraser: the frozen θ
    for name in ATTN2:  # softmax(q kᵀ/√d_head), averaged over heads, computed here independently
        attn, (x, ctx) = unet.get_submodule(name), inputs[name]
        q, k = attn.to_q(x), attn.to_k(ctx)
        b, n, d = q.shape
        q, k = q.view(b, n, attn.heads, -1).transpose(1, 2), k.view(b, ctx.shape[1], attn.heads, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) / (d // attn.heads) ** 0.5).softmax(-1).mean(1)
        torch.testing.assert_close(maps[name], probs, rtol=1e-5, atol=1e-6)
        assert maps[name].shape == (4, 16, 16)
    erasers.remove()
    assert not any(isinstance(p, EraserProcessor) for p in _processors(unet).values())
    for h in hooks:
        h.remove()


def test_concept_mask_uses_the_word_tokens_of_the_chosen_resolution():
    grid = torch.zeros(4, 4)
    grid[:2, :2] = 1.0  # the word's attention: the top-left quarter
    word = torch.stack([grid.flatten(), 0.5 * grid.flatten()], -1) + 0.2  # two word tokens, min 0.2
    other = torch.zeros(16, 1)
    other[-1] = 50.0  # a non-word token: ignored
    maps = {"a": torch.cat([torch.full((16, 1), 0.1), word, other], -1),  # (h·w, tokens): bos, word × 2, other
            "b": torch.cat([torch.full((16, 1), 0.1), word.flip(0), other], -1),  # the mirror image
            "c": torch.rand(4, 4)}  # a 2×2 layer: not used to build the mask, receives it resized
    masks = rc._concept_mask(maps, torch.tensor([1, 2]), 0.5, 4)
    # average of the two 4×4 layers: 0.95 (+0.2) in both corners, min–max normalised → 1 there, 0 elsewhere
    expect = torch.zeros(4, 4)
    expect[:2, :2] = expect[2:, 2:] = 1
    assert torch.equal(masks["a"], expect.flatten()) and torch.equal(masks["b"], expect.flatten())
    assert torch.equal(masks["c"], torch.tensor([1.0, 0.0, 0.0, 1.0]))  # nearest resize to 2×2 (concept_reg.py L42)
    assert torch.equal(rc._concept_mask(maps, torch.tensor([1, 2]), 1.0, 4)["a"], expect.flatten())  # ≥ τ is inside
    assert rc._concept_mask({"a": torch.ones(16, 3)}, torch.tensor([1]), 0.1, 4)["a"].sum() == 0  # constant map
    with pytest.raises(ConfigError, match=r"`method.params.mask_resolution` must be the side of a cross-attention map of this UNet \(2, 4\), got 16"):
        rc._concept_mask(maps, torch.tensor([1, 2]), 0.5, 16)


def test_localisation_loss_is_the_eraser_energy_outside_the_mask_only():
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    inside = torch.zeros(1, 4, 3)
    inside[0, :2] = torch.randn(2, 3) * 10
    out = inside.clone().requires_grad_(True)
    loss = rc._localisation_loss({"l": out}, {"l": mask})
    assert loss.item() == 0.0  # any output inside the concept is free
    loss.backward()
    assert torch.equal(out.grad, torch.zeros_like(out))
    spill = inside.clone()
    spill[0, 2:] = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, 0.0]])
    # (mean_d 3 + mean_d 3) / 2 positions outside, averaged with a second layer at 0 → 1.5
    both = rc._localisation_loss({"l": spill, "m": torch.zeros(1, 4, 3)}, {"l": mask, "m": mask})
    assert float(both) == pytest.approx(1.5, rel=1e-6)


def _text_sensitive_pipeline():
    """16-token prompts and cross-attention values ×10: a random UNet barely reads the prompt otherwise."""
    pipe = tiny_sd_pipeline(text_len=16)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".attn2.to_v." in name:
                p.mul_(10.0)
    return pipe


def test_regulariser_keeps_the_trained_eraser_inside_the_concept_mask(tmp_path):
    ratio = {}
    for alpha in (0.0, 100.0):
        pipe = _text_sensitive_pipeline()
        _run(pipe, tmp_path, iterations=25, adv_iters=0, concept_reg_weight=alpha)
        procs = {a: pipe.unet.get_submodule(a).processor for a in ATTN2}
        emb = embed_prompts(pipe, ["", "star"])
        g = torch.Generator().manual_seed(3)
        outside = inside = 0.0
        for _ in range(4):
            z, t = torch.randn(1, 4, 8, 8, generator=g), torch.randint(100, 900, (1,), generator=g)
            for p in procs.values():  # the frozen model's maps, as in training
                p.enabled, p.capture = False, True
            with torch.no_grad():
                pipe.unet(z, t, encoder_hidden_states=emb[1:])
            masks = rc._concept_mask({a: p.maps[0] for a, p in procs.items()}, torch.tensor([1]), 0.1, 4)
            for p in procs.values():
                p.enabled, p.capture, p.maps, p.record = True, False, None, True
            with torch.no_grad():
                pipe.unet(z, t, encoder_hidden_states=emb[1:])
            for a, p in procs.items():
                e = p.out.pow(2).mean(-1)[0]
                outside += float((e * (1 - masks[a])).sum() / (1 - masks[a]).sum().clamp_min(1))
                inside += float((e * masks[a]).sum() / masks[a].sum().clamp_min(1))
                p.record, p.out = False, None
        ratio[alpha] = outside / inside
    assert ratio[100.0] < 0.5 * ratio[0.0]


def test_attack_steps_make_the_erased_model_regenerate_the_concept():
    pipe = _text_sensitive_pipeline()
    unet = pipe.unet.requires_grad_(False)
    emb = embed_prompts(pipe, ["star"])
    word, start = rc._token_span(pipe.tokenizer, "star", emb.shape[1], 6)
    assert word.tolist() == [1] and start == 2  # L121–123: the word after <bos>, P right after it
    torch.manual_seed(0)
    erasers = rc._Erasers(unet, 16)
    for p in erasers.procs.values():  # an eraser that changes the concept's prediction
        torch.nn.init.normal_(p.eraser.up.weight, std=0.5)
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        with erasers.off():
            e_p = unet(z, t, encoder_hidden_states=emb).sample
        plain = float(F.mse_loss(unet(z, t, encoder_hidden_states=emb).sample, e_p))  # the eraser model on c alone
    frozen = [p.detach().clone() for p in erasers.parameters()]
    prompt = torch.rand(1, 6, emb.shape[2]).requires_grad_(True)  # L104's U[0, 1) init
    opt = torch.optim.Adam([prompt], lr=0.01)  # the reference's 0.1 oscillates on this random tiny model
    first = prompt.detach().clone()
    losses = [float(rc._attack_step(unet, z, t, emb, prompt, opt, start, e_p, keep_graph=False)[1]) for _ in range(30)]
    # the attacker's objective (regenerate ε_θ(c)) improves step by step, past what the plain word achieves
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 0.8 * losses[0] and losses[-1] < 0.9 * plain
    assert not torch.equal(prompt.detach(), first)
    assert all(torch.equal(a, b) for a, b in zip(frozen, erasers.parameters(), strict=True))  # only P moved
    spliced = rc._insert(emb, prompt.detach(), start)
    assert torch.equal(spliced[:, :2], emb[:, :2]) and torch.equal(spliced[:, 2:8], prompt.detach())
    assert torch.equal(spliced[:, 8:], emb[:, 8:])
    erasers.remove()


def test_the_attack_prompt_reaches_the_unet_in_training(tmp_path):
    """Deviation 1: every eraser-model forward sees c ⊕ P (the reference's L149 writes into a copy)."""
    pipe = tiny_sd_pipeline(text_len=16)
    seen = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled() and args[0].shape[0] == 1:  # the trained rows ε_θ'(x_t, c ⊕ P, t)
            seen.append(kwargs["encoder_hidden_states"].detach().clone())

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    _run(pipe, tmp_path, iterations=2, adv_iters=3)
    c = embed_prompts(pipe, ["star"])
    assert len(seen) == 6
    for s in seen:
        assert torch.equal(s[:, :2], c[:, :2]) and torch.equal(s[:, 6:], c[:, 6:]) and not torch.allclose(s[:, 2:6], c[:, 2:6])
    assert not torch.equal(seen[0][:, 2:6], seen[1][:, 2:6])  # P moves between attack steps
    seen.clear()
    pipe = tiny_sd_pipeline(text_len=16)
    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    _run(pipe, tmp_path, iterations=2, adv_iters=0)
    assert len(seen) == 2 and all(torch.equal(s, c) for s in seen)


def test_training_moves_the_concept_to_the_erasure_target_and_other_prompts_less(tmp_path):
    original = _text_sensitive_pipeline()
    emb = {p: embed_prompts(original, [p]) for p in ("", "star", "a circle")}
    before = {p: _predict(original.unet, e, 16) for p, e in emb.items()}
    target = 2 * before[""] - before["star"]  # ε(∅) − 1·(ε(c) − ε(∅))
    pipe = _text_sensitive_pipeline()
    _run(pipe, tmp_path, iterations=30, adv_iters=1, lr=3e-3)
    after = {p: _predict(pipe.unet, e, 16) for p, e in emb.items()}
    # seeds 0–2 give 0.56–0.78 of the original distance here; an untrained eraser gives 1
    assert F.mse_loss(after["star"], target) < 0.85 * F.mse_loss(before["star"], target)
    moved = {p: float(F.mse_loss(after[p], before[p])) for p in emb}
    assert moved[""] < 0.5 * moved["star"] and moved["a circle"] < moved["star"]


def test_linearised_merge_equals_the_model_with_affine_erasers():
    pipe = tiny_sd_pipeline()
    unet = pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    erasers = rc._Erasers(unet, 16)
    for p in erasers.procs.values():
        torch.nn.init.normal_(p.eraser.up.weight, std=0.3)
        torch.nn.init.normal_(p.eraser.up.bias, std=0.1)
    erasers.clear()
    emb = embed_prompts(pipe, ["", "star", "a circle"])
    fit = {}
    for name, p in erasers.procs.items():  # any sample set: the merge must reproduce the fitted affine map exactly
        fit[name] = rc._affine(p.eraser, torch.randn(300, 64) * 3)
        assert 0 < fit[name]["relative_error"] < 1
        affine = torch.nn.Linear(64, 64).double()
        with torch.no_grad():
            affine.weight.copy_(fit[name]["A"])
            affine.bias.copy_(fit[name]["b"])
        p.eraser = torch.nn.Sequential(affine, torch.nn.Identity()).float()
    with_affine = {k: _predict(unet, emb[i : i + 1]) for i, k in enumerate(("", "star", "a circle"))}
    erasers.remove()
    assert rc._merge_affine(unet, fit) == sorted(f"{a}.to_out.0.{k}" for a in ATTN2 for k in ("weight", "bias"))
    for i, k in enumerate(("", "star", "a circle")):
        torch.testing.assert_close(_predict(unet, emb[i : i + 1]), with_affine[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"adv_iters": 0}, {"start_guidance": 1.0, "adv_iters": 3}, {"deploy": "linearised"}])
def test_nfe_counts_every_unet_row(tmp_path, kw):
    pipe = tiny_sd_pipeline()
    rows = [0]
    pipe.unet.register_forward_pre_hook(lambda m, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    report = _run(pipe, tmp_path, iterations=4, **kw)
    per_iteration = 2 + max(1, kw.get("adv_iters", FAST["adv_iters"]))  # ε(∅), ε(c), the eraser-model rows
    fit = 8 * (3 + 2) if kw.get("deploy") == "linearised" else 0  # 8 latents × (∅, c, c ⊕ P, 2 anchor prompts)
    assert report["nfe"] == rows[0] == report["nfe_sampling"] + 4 * per_iteration + fit
    assert report["nfe_sampling"] % (1 if kw.get("start_guidance") == 1.0 else 2) == 0


def test_several_targets_one_attack_prompt_each(tmp_path):
    pipe = tiny_sd_pipeline(text_len=16)
    report = _run(pipe, tmp_path, iterations=6, concept=tiny_concept(target="star, pentagram"))
    assert report["words"] == ["star", "pentagram"] and len(report["loss_subsampled"]["adv"]) == 6


def test_same_seed_same_erasers_other_seed_other_erasers(tmp_path):
    def train(pipe, seed):
        report = _run(pipe, tmp_path, seed=seed)
        return report["loss_history"], report["eraser_path"]

    assert_seed_decides(train)


def test_processors_flags_and_weights_restored_when_training_fails(tmp_path, monkeypatch):
    pipe = tiny_sd_pipeline()
    pipe.unet.conv_in.weight.requires_grad_(False)  # a mixed set of flags survives as it was
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    original = {n: type(p) for n, p in _processors(pipe.unet).items()}
    before = pipe_weights(pipe)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(rc, "_localisation_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(pipe, tmp_path)
    assert {n: type(p) for n, p in _processors(pipe.unet).items()} == original
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags and not pipe.unet.training
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert pipe_weights(pipe).keys() == before.keys() and not changed(before, pipe_weights(pipe))
    assert not (tmp_path / "receler_erasers").exists()


def test_bad_hyperparameters_are_one_config_error_naming_the_key(tmp_path):
    bad = {
        "iterations": 0,
        "lr": 0.0,
        "eraser_rank": 0,
        "negative_guidance": -1.0,
        "start_guidance": -3.0,
        "ddim_steps": 1,
        "concept_reg_weight": -0.1,
        "mask_threshold": 1.5,
        "mask_resolution": 0,
        "adv_iters": -1,
        "num_adv_prompts": 0,
        "adv_lr": 0.0,
        "adv_weight_decay": -0.1,
        "timestep_rule": "reference",
        "deploy": "merged",
        "seperator": ",",
    }
    assert_each_rejected(unlearn, bad)
    pipe = tiny_sd_pipeline(text_len=16)
    before, procs = pipe_weights(pipe), {n: type(p) for n, p in _processors(pipe.unet).items()}
    with pytest.raises(ConfigError, match=r"`method.params.num_adv_prompts` must be <= 14 for the word 'star' .*got 15"):
        _run(pipe, tmp_path, num_adv_prompts=15)
    _run(tiny_sd_pipeline(text_len=16), tmp_path, iterations=1, num_adv_prompts=14)  # 14 fits
    with pytest.raises(ConfigError, match=r"`method.params.mask_resolution` .*\(4\), got 16"):
        _run(pipe, tmp_path, mask_resolution=16)
    with pytest.raises(ConfigError, match=r"`method.params.ddim_steps` must be <= 1000, got 2000"):
        _run(pipe, tmp_path, ddim_steps=2000)
    assert not changed(before, pipe_weights(pipe)) and {n: type(p) for n, p in _processors(pipe.unet).items()} == procs


def test_configs_validate():
    assert OmegaConf.load(CONF / "method" / "receler.yaml").reference is None
    # The conf's SD defaults are the signature's defaults (train_receler.py L236–261, 3ccedc9).
    defaults = check_method_confs(unlearn, "receler", "Receler")
    assert (defaults["iterations"], defaults["lr"], defaults["eraser_rank"], defaults["adv_iters"]) == (500, 3e-4, 128, 50)
    assert (defaults["concept_reg_weight"], defaults["mask_threshold"], defaults["num_adv_prompts"]) == (0.1, 0.1, 16)
    assert (defaults["mask_resolution"], defaults["ddim_steps"], defaults["deploy"]) == (16, 50, "adapter")
    shapes = OmegaConf.load(CONF / "method_model" / "receler_shapes.yaml").params
    assert shapes.mask_resolution == 8 and 1 + 1 + shapes.num_adv_prompts <= 16  # Shapes: 8×8 maps, 16-token context
    sweep = OmegaConf.load(CONF / "sweep" / "receler.yaml")
    assert {"override /method": "receler"} in list(sweep.defaults)
