"""Concept Ablation on tiny SD-shaped pipelines: parameters touched, objective, determinism, config."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.context import MethodContext
from bench.hparams import ConfigError
from bench.sampling import UNetRows
from bench.testing import assert_each_rejected, check_method_confs, tiny_concept, tiny_sd_pipeline
from methods import concept_ablation as ca

ROOT = Path(__file__).resolve().parents[1]
# Fast settings: 4 anchor images of 2 sampler steps, 3 optimisation steps of batch 2.
MICRO = dict(num_anchor_images=4, anchor_steps=2, anchor_batch_size=4, steps=3, batch_size=2)


_CTX: dict[str, MethodContext] = {}


@pytest.fixture(autouse=True)
def _cache(tmp_path):
    _CTX["ctx"] = MethodContext(cache_dir=tmp_path / "cache")  # the harness passes its cache explicitly


def star(**kw):
    return tiny_concept(**{"anchor": "shape, object",
                           "anchor_prompts": ("a shape", "a red shape", "an object on a plain background"), **kw})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def run(pipe, concept, seed: int = 0, **kw) -> dict:
    torch.manual_seed(seed)
    return ca.unlearn(pipe, concept, ctx=_CTX["ctx"], **{**MICRO, **kw})


# --- configuration --------------------------------------------------------------------------


def test_signature_defaults_are_the_reference_sd_recipe():
    d = {n: p.default for n, p in inspect.signature(ca.unlearn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert d["loss"] == "model-based" and d["parameter_group"] == "cross-attn"
    assert (d["lr"], d["scale_lr"], d["batch_size"], d["steps"]) == (2e-6, True, 4, 200)
    assert (d["weight_decay"], d["grad_clip"], d["num_anchor_images"]) == (0.01, 1.0, 1000)
    assert (d["anchor_sampler"], d["anchor_steps"], d["anchor_guidance"]) == ("dpm-solver", 25, 6.0)
    assert (d["prior_loss_weight"], d["style_prompt"]) == (1.0, "template")


def test_bad_hyperparameters_raise_config_error():
    assert_each_rejected(ca.unlearn, {"loss": "bogus", "lr": -1e-5, "steps": 0, "parameter_group": "embedding",
                                      "learning_rate": 1e-5})


@pytest.mark.parametrize("name", ["concept_ablation", "ca_model", "ca_noise"])
def test_conf_files_validate(name):
    params = check_method_confs(ca.unlearn, name, same_defaults=False)
    assert params["loss"] == ("noise-based" if name == "ca_noise" else "model-based")


def test_missing_anchor_or_anchor_prompts_is_a_config_error():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ConfigError, match="concept.anchor"):
        ca.unlearn(pipe, star(anchor=""))
    with pytest.raises(ConfigError, match="concept.anchor_prompts"):
        ca.unlearn(pipe, star(anchor="gizmo", anchor_prompts=()))
    with pytest.raises(ConfigError, match="anchor word"):
        ca.unlearn(pipe, star(anchor_prompts=("a circle",)))


def test_shipped_anchor_prompt_list_is_used_when_the_preset_has_none():
    prompts = ca._anchor_prompts(star(anchor="robot", anchor_prompts=()), ("robot",))
    assert len(prompts) == 200 and prompts[0] == "a robot holding a sign that reads im with stupid"


# --- target prompts -------------------------------------------------------------------------


def test_target_prompt_rules():
    # object / attribute: every anchor word is replaced by the target (reference: c.replace(anchor, target))
    assert ca._target_prompt("a cyan object on a striped background", "star", ("shape", "object"), "replace", 0) == \
        "a cyan star on a striped background"
    assert ca._target_prompt("a coloured star", "red", ("coloured",), "replace", 2) == "a red star"
    # Shapes style: the grammar's own phrase, "patterned" → "striped"
    assert ca._target_prompt("a star on a patterned background", "striped", ("patterned",), "replace", 1) == \
        "a star on a striped background"
    # SD style: the reference's templates (its third branch repeats the second)
    assert ca._target_prompt("a painting of a tree", "van gogh", ("painting",), "template", 0) == \
        "a painting of a tree, in the style of van gogh"
    assert ca._target_prompt("a painting of a tree", "van gogh", ("painting",), "template", 2) == \
        "in van gogh's style, a painting of a tree"
    assert ca._target_prompt("a man", "nudity, nsfw", ("people",), "nudity", 1) == "in nudity, nsfw style, a man"


def test_prior_preservation_auto_follows_the_readme_rule():
    assert ca._overlaps(("grumpy cat",), ("cat",), "object")
    assert not ca._overlaps(("r2d2",), ("robot",), "object")
    assert not ca._overlaps(("star",), ("shape", "object"), "object")
    assert ca._overlaps(("nudity, nsfw",), ("people",), "nudity")


# --- the BOS stop-gradient ------------------------------------------------------------------


def test_bos_key_and_value_get_no_gradient():
    unet = tiny_sd_pipeline().unet
    enc = torch.zeros(1, 77, 32)
    enc[:, 0] = torch.randn(32)  # only the BOS row is non-zero: K/V weight gradients come from it alone
    lat = torch.randn(1, 4, 8, 8)
    kv = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]

    def grads():
        unet.zero_grad(set_to_none=True)
        unet(lat, torch.tensor([500]), enc).sample.square().sum().backward()
        return [0.0 if p.grad is None else float(p.grad.abs().sum()) for p in kv]

    assert any(g > 0 for g in grads())
    with ca._bos_stop_gradient(unet):
        assert all(g == 0 for g in grads())
    assert any(g > 0 for g in grads())  # hooks removed on exit
    assert all(not m._forward_hooks for n, m in unet.named_modules() if n.endswith(("to_k", "to_v")))


# --- runs on tiny pipelines -----------------------------------------------------------------


@pytest.mark.parametrize("group, text_len", [("cross-attn", 77), ("cross-attn", 16), ("attn", 16)])
def test_only_the_parameter_group_changes(group, text_len):
    pipe = tiny_sd_pipeline(text_len=text_len)
    unet0, te0, vae0 = state(pipe.unet), state(pipe.text_encoder), state(pipe.vae)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    report = run(pipe, star(), parameter_group=group, lr=1e-3, scale_lr=False)

    diff = changed(unet0, pipe.unet)
    expected = {n for n, _ in pipe.unet.named_parameters()
                if (("attn2.to_k" in n or "attn2.to_v" in n) if group == "cross-attn"
                    else any(k in n for k in ("to_q", "to_k", "to_v", "to_out")))}
    assert diff == expected == set(report["trained_parameters"])
    if group == "cross-attn":
        assert len(diff) == 8  # 4 attn2 modules × {to_k, to_v}, as the Shapes UNet has
    assert not changed(te0, pipe.text_encoder) and not changed(vae0, pipe.vae)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags and not pipe.unet.training
    # NFE: 4 anchor images × 2 sampler steps × 2 (CFG); 3 steps × (2 rows with grad + 2 target rows)
    assert report["anchor_nfe"] == 16 and report["nfe_train"] == 12 and report["nfe"] == 28
    assert report["steps"] == 3 and len(report["loss_history"]) == 3
    assert all(torch.isfinite(v).all() for v in pipe.unet.state_dict().values())
    assert all(torch.isfinite(torch.tensor(report["loss_history"])))


def test_deterministic_for_a_seed_and_anchor_images_are_cached(tmp_path):
    reports, weights = [], []
    for seed in (0, 0, 1):
        pipe = tiny_sd_pipeline()
        reports.append(run(pipe, star(), seed=seed, lr=1e-3, scale_lr=False))
        weights.append(state(pipe.unet))
    assert [r["anchor_cache_hit"] for r in reports] == [False, True, True]
    # The full cost is recorded either way (same job, same NFE); what the cache saved is beside it.
    assert [r["nfe"] for r in reports] == [28, 28, 28] and reports[1]["nfe_train"] == 12 and reports[1]["anchor_nfe"] == 16
    assert [r["nfe_saved_by_cache"] for r in reports] == [0, 16, 16]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert reports[0]["loss_history"] == reports[1]["loss_history"]
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    path = Path(reports[0]["anchor_cache_file"])
    assert path.parent == tmp_path / "cache" / "anchors" and path.suffix == ".safetensors"
    images = load_file(str(path))["images"]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 16, 16, 3)
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    # A different count is another cache entry.
    other = run(tiny_sd_pipeline(), star(), num_anchor_images=6, lr=1e-3, scale_lr=False)
    assert not other["anchor_cache_hit"] and other["anchor_cache_file"] != reports[0]["anchor_cache_file"]


def _objective(pipe, images: torch.Tensor, anchor: list[str], target: list[str]) -> float:
    """Model-based objective ‖ε(x_t, c*) − ε(x_t, c)‖² on a fixed batch of noised anchor latents."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        t = torch.tensor([100, 400, 700, 900][: len(lat)])
        noisy = ca._noise_scheduler(pipe).add_noise(lat, torch.randn(lat.shape, generator=g), t)
        e_star = pipe.unet(noisy, t, ca._embed(pipe, target, "cpu")).sample
        e = pipe.unet(noisy, t, ca._embed(pipe, anchor, "cpu")).sample
    return float((e_star - e).square().mean())


def test_model_based_objective_decreases():
    pipe = tiny_sd_pipeline()
    prompts = ["a shape", "a red shape"]
    with UNetRows(pipe.unet) as nfe:
        images, _ = ca._anchor_images(pipe, prompts, 4, "dpm-solver", 2, 6.0, 4, None, nfe=nfe, cache=_CTX["ctx"].cache("anchors"))
    anchor = [prompts[i % 2] for i in range(4)]
    target = [p.replace("shape", "star") for p in anchor]
    before = _objective(pipe, images, anchor, target)
    run(pipe, star(anchor_prompts=tuple(prompts)), steps=25, lr=3e-3, scale_lr=False, augment="off", hflip=False)
    after = _objective(pipe, images, anchor, target)
    assert after < 0.5 * before, (before, after)


def test_noise_based_with_prior_preservation_and_style_templates():
    pipe = tiny_sd_pipeline()
    concept = star(name="vangogh", kind="style", target="van gogh", anchor="painting",
                   anchor_prompts=("a painting of a tree", "a painting of a house"))
    report = run(pipe, concept, loss="noise-based", prior_preservation="on", lr=1e-5)
    assert report["variant"] == "noise-based" and report["target_prompt_rule"] == "template"
    assert report["prior_preservation"] and not report["augment"]
    assert report["lr_effective"] == pytest.approx(1e-5 * 2 * 2)  # × batch × 2 for prior preservation
    assert report["nfe_train"] == 3 * 4  # 2 ablation + 2 prior rows, no stop-gradient target pass
    assert all(torch.isfinite(torch.tensor(report["loss_history"])))
