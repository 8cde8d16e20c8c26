"""SPM (methods/spm.py) on tiny SD-shaped pipelines: which tensors change, the merged delta against the
saved rank-1 membrane, erasure vs latent anchoring, NFE accounting, determinism, hyperparameter
validation, clean-up on failure and the shipped configs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import methods.spm as spm
from bench.context import MethodContext
from bench.hparams import ConfigError
from bench.sampling import ddim_sampler, embed_prompts
from bench.testing import (
    assert_each_rejected,
    assert_seed_decides,
    changed,
    check_method_confs,
    pipe_weights,
    tiny_concept,
    tiny_sd_pipeline,
)
from methods.spm import unlearn

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = {"steps": 3, "denoising_steps": 4, "lr": 1e-3, "warmup_steps": 0, "dynamic_resolution": False}


def _run(pipe, tmp_path, seed: int = 0, words: str = "star", **kw) -> dict:
    torch.manual_seed(seed)
    ctx = MethodContext(cache_dir=tmp_path, progress=False)
    return unlearn(pipe, tiny_concept(target=words), **{**FAST, **kw}, ctx=ctx)


def _expected(names: list[str], modules: str) -> set[str]:
    """spm.py L81–91, L139–161 written out independently: the weights of every Linear/Conv2d inside a
    Transformer2DModel (diffusers' `attentions.N`) — everything there but the norms and the biases."""
    inside = {n for n in names if ".attentions." in n and n.endswith(".weight") and ".norm" not in n}
    if modules == "transformer":
        return inside
    return {n for n in inside if re.search(r"\.attn[12]\.to_(q|k|v|out\.0)\.weight$", n)}


@pytest.mark.parametrize("modules", ["transformer", "attention"])
def test_only_the_membrane_layers_change(tmp_path, modules):
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)  # as the harness hands the UNet over
    before = pipe_weights(pipe)
    names = [n for n, _ in pipe.unet.named_parameters()]
    report = _run(pipe, tmp_path, modules=modules)
    expected = _expected(names, modules)
    # 4 transformers × 12 layers (proj_in, 2 × 4 attention projections, 2 feed-forward, proj_out) or × 8
    assert len(expected) == (48 if modules == "transformer" else 32)
    assert report["trained_parameters"] == sorted(expected)
    assert changed(before, pipe_weights(pipe)) == {f"unet.{n}" for n in expected}  # text encoder, VAE bit-identical
    # handed back as it came: eval mode, original flags, no stale grads, no hooks left behind
    assert not pipe.unet.training
    assert all(not p.requires_grad and p.grad is None for p in pipe.unet.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())
    assert report["variant"] == f"spm-{modules}" and len(report["loss_history"]) == 3
    assert report["adapter"]["modules"] == len(expected) and report["adapter"]["rank"] == 1


def test_merged_delta_is_scale_times_the_saved_rank_one_membrane(tmp_path):
    pipe, base = tiny_sd_pipeline(), tiny_sd_pipeline().unet.state_dict()
    report = _run(pipe, tmp_path, scale=0.5)
    path = Path(report["adapter_path"])
    assert path.parent == (tmp_path / "spm_adapters").resolve() and re.fullmatch(r"[0-9a-f]{20}\.safetensors", path.name)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the temp file was renamed
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["concealbench"])
    assert (meta["rank"], meta["alpha"], meta["prompts"]) == ("1", "1.0", "star")
    assert info["scale"] == 0.5 and info["params"]["scale"] == 0.5
    after = pipe.unet.state_dict()
    assert sorted(f"{m}.weight" for m in info["keys"].values()) == report["trained_parameters"]
    convs = 0
    for key, module in info["keys"].items():
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        assert down.shape[0] == 1 and up.shape[1] == 1 and float(tensors[f"{key}.alpha"]) == 1.0  # rank 1, α 1
        delta = after[f"{module}.weight"] - base[f"{module}.weight"]
        convs += delta.dim() == 4
        expect = 0.5 * (up.flatten(1) @ down.flatten(1)).view_as(delta)  # scale · (α/r) · u ⊗ d
        torch.testing.assert_close(delta, expect, rtol=1e-4, atol=1e-7)
    assert convs == report["adapter"]["conv_modules"] == 8  # proj_in/proj_out are 1×1 convs here
    assert sum(t.numel() for k, t in tensors.items() if not k.endswith("alpha")) == report["trained_elements"]


def _text_sensitive_pipeline():
    """The tiny pipeline with 16-token prompts and cross-attention values ×10: a random UNet barely
    reads the prompt, and with 77 mostly-padding tokens all prompts look alike to it."""
    pipe = tiny_sd_pipeline(text_len=16)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".attn2.to_v." in name:
                p.mul_(10.0)
    return pipe


def _predict(pipe, emb: torch.Tensor, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)  # the same latents and timesteps for every call
    z, t = torch.randn(n, 4, 8, 8, generator=g), torch.randint(50, 950, (n,), generator=g)
    with torch.no_grad():
        return pipe.unet(z, t, encoder_hidden_states=emb.expand(n, -1, -1) if emb.shape[0] == 1 else emb).sample


def test_concept_moves_to_the_erasure_target_while_anchors_move_less(tmp_path):
    original = _text_sensitive_pipeline()
    emb = {p: embed_prompts(original, [p]) for p in ("", "star", "a circle")}
    torch.manual_seed(99)
    anchors = spm._sample_anchors(emb["star"], 16)  # fresh anchors, not the ones trained on
    before = {p: _predict(original, e) for p, e in emb.items()} | {"anchors": _predict(original, anchors)}
    target = 2 * before[""] - before["star"]  # ε*(∅) − 1·(ε*(c) − ε*(∅))

    def mse(a, b):
        return float((a - b).pow(2).mean())

    moved = {}
    for la in (100.0, 0.0):
        pipe = _text_sensitive_pipeline()
        report = _run(pipe, tmp_path, steps=30, lr=1e-2, la_strength=la)
        after = {p: _predict(pipe, e) for p, e in emb.items()} | {"anchors": _predict(pipe, anchors)}
        moved[la] = {k: mse(after[k], before[k]) for k in before}
        if la:
            assert mse(after["star"], target) < 0.6 * mse(before["star"], target)
            assert moved[la]["a circle"] < 0.5 * moved[la]["star"]
            assert moved[la]["anchors"] < 0.1 * moved[la]["star"]
            sub = report["loss_subsampled"]
            assert sub["step"][-1] == 29 and all(a > 0 for a in sub["anchor"][1:])
        else:
            assert set(report["loss_subsampled"]["anchor"]) == {0.0}
    assert moved[0.0]["anchors"] > 3 * moved[100.0]["anchors"]  # what latent anchoring buys


def test_anchors_are_random_embeddings_at_the_target_norm():
    target = torch.randn(1, 16, 32) * 3
    torch.manual_seed(0)
    a = spm._sample_anchors(target, 64)
    assert a.shape == (64, 16, 32)
    ratio = a.flatten(1).norm(dim=1) / target.norm()
    assert ratio.min() >= 0.8 and ratio.max() <= 1.2 and ratio.std() > 0.05
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), target.flatten(1))
    assert cos.abs().max() < 0.2  # directions uniform on the sphere, not near the concept


@pytest.mark.parametrize("kw", [{}, {"la_strength": 0.0}, {"sampling_guidance": 1.0, "num_anchors": 2}])
def test_nfe_counts_every_unet_row(tmp_path, kw):
    pipe = tiny_sd_pipeline()
    rows = [0]
    pipe.unet.register_forward_pre_hook(lambda m, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    report = _run(pipe, tmp_path, steps=4, **kw)
    n = kw.get("num_anchors", 4)
    per_step = 3 + (2 * n if kw.get("la_strength", 1000.0) > 0 else 0)  # ε*(c), ε*(c_s), ε_θ(c), anchors on/off
    assert report["nfe"] == rows[0] == report["nfe_sampling"] + 4 * per_step
    assert report["nfe_sampling"] % (1 if kw.get("sampling_guidance") == 1.0 else 2) == 0


def test_timestep_rules_and_dynamic_resolution():
    sched = ddim_sampler(tiny_sd_pipeline().scheduler, 30)
    assert int(spm._timestep(sched, 1, "reference")) == 966 and int(spm._timestep(sched, 29, "reference")) == 33
    assert int(spm._timestep(sched, 1, "aligned")) == int(sched.timesteps[1])
    torch.manual_seed(0)
    sides = {s for _ in range(200) for s in spm._latent_size(64, True)}
    assert sides == {32, 40, 48, 56}  # 256–448 px on SD v1.x, the reference's 512 px bucket
    assert spm._latent_size(16, False) == (16, 16)


def test_several_targets_share_one_membrane(tmp_path):
    pipe = tiny_sd_pipeline(text_len=16)
    seen = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled() and args[0].shape[0] == 1:  # the trained concept row ε_θ(z_t, c, t)
            seen.append(kwargs["encoder_hidden_states"][0].clone())

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    report = _run(pipe, tmp_path, steps=8, words="star, pentagram", dynamic_resolution=True)
    words = embed_prompts(pipe, ["star", "pentagram"])
    nearest = [int((s - words).flatten(1).norm(dim=1).argmin()) for s in seen]
    assert len(seen) == 8 and set(nearest) == {0, 1}  # a word drawn at random per step (train_spm.py L146–148)
    assert all(torch.allclose(s, words[i], atol=1e-5) for s, i in zip(seen, nearest, strict=True))
    assert report["words"] == ["star", "pentagram"] and json.loads(
        safe_open(report["adapter_path"], "pt").metadata()["concealbench"])["words"] == ["star", "pentagram"]


def test_surrogate_anchor_is_the_neutral_prompt(tmp_path):
    report = _run(tiny_sd_pipeline(), tmp_path, surrogate="anchor")
    assert report["surrogate"] == "shape"
    with pytest.raises(ConfigError, match=r"`method.params.surrogate`"):
        torch.manual_seed(0)
        unlearn(tiny_sd_pipeline(), tiny_concept(anchor=""), **FAST, surrogate="anchor",
                ctx=MethodContext(cache_dir=tmp_path, progress=False))


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    def train(pipe, seed):
        report = _run(pipe, tmp_path, seed=seed, dynamic_resolution=True)
        return report["loss_history"], report["adapter_path"]

    assert_seed_decides(train)


def test_flags_hooks_and_weights_restored_when_training_fails(tmp_path, monkeypatch):
    pipe = tiny_sd_pipeline()
    pipe.unet.conv_in.weight.requires_grad_(False)  # a mixed set of flags survives as it was
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    before = pipe_weights(pipe)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(spm, "_anchoring_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(pipe, tmp_path)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags and not pipe.unet.training
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())
    assert not changed(before, pipe_weights(pipe))
    assert not (tmp_path / "spm_adapters").exists()  # nothing saved from a failed run


def test_bad_hyperparameters_are_one_config_error_naming_the_key(tmp_path):
    bad = {
        "steps": 0,
        "lr": 0.0,
        "weight_decay": -1.0,
        "warmup_steps": -1,
        "lr_cycles": 0,
        "grad_clip": -1.0,
        "denoising_steps": 1,
        "sampling_guidance": -3.0,
        "erase_guidance": -1.0,
        "la_strength": -1.0,
        "num_anchors": 0,
        "surrogate": "shape",
        "modules": "xattn",
        "dynamic_resolution": 1,
        "timestep_rule": "compvis",
        "scale": 0.0,
        "rank": 4,
    }
    assert_each_rejected(unlearn, bad)
    # called directly, the method checks before it touches anything
    pipe = tiny_sd_pipeline()
    before = pipe_weights(pipe)
    with pytest.raises(ConfigError, match=r"`method.params.la_strength` must be .*>= 0.*got -5"):
        _run(pipe, tmp_path, la_strength=-5.0)
    with pytest.raises(ConfigError, match=r"`method.params.denoising_steps` must be <= 1000, got 2000"):
        _run(pipe, tmp_path, denoising_steps=2000)
    assert not changed(before, pipe_weights(pipe)) and not (tmp_path / "spm_adapters").exists()


def test_configs_validate():
    assert OmegaConf.load(CONF / "method" / "spm.yaml").reference is None
    # The conf's SD defaults are the signature's defaults (configs/*/config.yaml + prompt.yaml, 3dd762e).
    defaults = check_method_confs(unlearn, "spm", "SPM")
    assert (defaults["steps"], defaults["lr"], defaults["warmup_steps"], defaults["lr_cycles"]) == (3000, 1e-4, 500, 3)
    assert (defaults["denoising_steps"], defaults["la_strength"], defaults["num_anchors"], defaults["erase_guidance"]) == (30, 1000.0, 4, 1.0)
    sweep = OmegaConf.load(CONF / "sweep" / "spm.yaml")
    assert {"override /method": "spm"} in list(sweep.defaults)
