"""The probes behind the seam, on tiny SD-shaped pipelines: each changes the images it is meant to
change (and only those), step 0 is what it claims to be, and bad settings get one message."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bench.hparams import ConfigError
from bench.probes import build_probes
from bench.probes.inversion import ConceptInversion, placeholders, substitute
from bench.probes.relearn import Relearning
from bench.run import execute
from bench.testing import tiny_concept, tiny_probe_context, tiny_sd_pipeline
from tests.conftest import needs_world

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _probe(cls, name: str, **kw):
    p = cls.__new__(cls)
    p.name = name
    p.__init__(**kw)
    return p


def test_placeholder_carrying_a_word_embedding_is_that_word_bit_for_bit():
    """The injection hook is exact: the token carrying a word's embedding reads as that word."""
    from bench.probes import _fewshot as F
    from bench.sampling import generate

    pipe = tiny_sd_pipeline()
    ctx = tiny_probe_context(pipe)
    inv = _probe(ConceptInversion, "inversion")
    tokens = inv.tokens(ctx)
    vec = inv._init_vectors(ctx)  # init=concept: the embedding of "star"
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    circle = table[pipe.tokenizer("circle", add_special_tokens=False).input_ids].mean(0, keepdim=True)
    with placeholders(pipe, tokens, vec):
        as_star = F.encode_text(pipe, [f"a {tokens[0]}"])
        lat_star = generate(pipe, ctx.star, f"a {tokens[0]}", [1, 2], ctx.sampler)
    with placeholders(pipe, tokens, circle):
        as_circle = F.encode_text(pipe, [f"a {tokens[0]}"])
    assert torch.equal(as_star, F.encode_text(pipe, ["a star"])) and torch.equal(as_circle, F.encode_text(pipe, ["a circle"]))
    assert torch.equal(lat_star, generate(pipe, ctx.star, "a star", [1, 2], ctx.sampler))
    assert not torch.equal(as_star, as_circle)
    # outside the context the text encoder is untouched
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


def test_inversion_learns_only_its_vector_and_moves_the_images():
    pipe = tiny_sd_pipeline()
    ctx = tiny_probe_context(pipe)
    before = {k: v.clone() for m in (ctx.star, pipe.text_encoder, pipe.vae) for k, v in m.state_dict().items()}
    inv = _probe(ConceptInversion, "inversion", checkpoints=[0, 3, 6], images=2, batch_size=2, lr=0.05, seeds=2)
    state = inv.prepare(ctx)
    assert set(state[0]) == {"embeds/0", "embeds/3", "embeds/6"} and not torch.equal(state[0]["embeds/0"], state[0]["embeds/6"])
    after = {k: v for m in (ctx.star, pipe.text_encoder, pipe.vae) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the models are frozen
    out = inv.run(ctx, "a star", "forget", state)
    assert list(out.images) == [0.0, 3.0, 6.0] and out.data["prompt"].startswith("a <concealbench-0")
    assert np.array_equal(out.images[0.0], ctx.images(ctx.star, "a star", ctx.seeds(200_000, 2)))  # step 0 = the plain prompt
    # the learned token moves what the UNet is conditioned on (the images themselves: the Shapes test below)
    from bench.probes import _fewshot as F

    enc = []
    for step in (0, 6):
        with placeholders(pipe, tokens := inv.tokens(ctx), state[0][f"embeds/{step}"]):
            enc.append(F.encode_text(pipe, [f"a {tokens[0]}"]))
    assert not torch.equal(enc[0], enc[1])


def test_relearning_trains_a_copy_and_its_step_zero_is_the_unlearned_model():
    pipe = tiny_sd_pipeline()
    ctx = tiny_probe_context(pipe)
    star0 = copy.deepcopy(ctx.star.state_dict())
    rel = _probe(Relearning, "relearn", checkpoints=[0, 4], images=2, batch_size=2, lr=1e-2, seeds=2)
    state = rel.prepare(ctx)
    names = {k.split("/", 1)[1] for k in state[0]}
    assert names and all(".attn2." in n for n in names)  # trainable: attn2 only
    assert all(torch.equal(star0[k], v) for k, v in ctx.star.state_dict().items())  # θ* itself is untouched
    out = rel.run(ctx, "a star", "forget", state)
    assert np.array_equal(out.images[0.0], ctx.images(ctx.star, "a star", ctx.seeds(300_000, 2)))
    work = copy.deepcopy(ctx.star)
    work.load_state_dict({k.split("/", 1)[1]: v for k, v in state[0].items() if k.startswith("4/")}, strict=False)
    assert any(not torch.equal(a, b) for a, b in zip(work.state_dict().values(), ctx.star.state_dict().values(), strict=True))
    full = _probe(Relearning, "relearn", checkpoints=[0, 1], images=2, batch_size=2, trainable="unet", seeds=2)
    assert any(".attn2." not in k for k in full.prepare(ctx)[0])


def test_seed_moves_the_probe_seeds_and_images():
    pipe = tiny_sd_pipeline()
    a, b = tiny_probe_context(pipe, seed=0), tiny_probe_context(pipe, seed=1)
    assert a.seeds(200_000, 2) != b.seeds(200_000, 2)
    assert not np.array_equal(a.concept.render(2, 5), a.concept.render(2, 6))


def test_substitution_maps_paraphrases_to_the_token():
    c = tiny_concept(synonyms=("five-pointed star", "pentagram"))
    assert substitute("a red five-pointed star on a dotted background", c, ["<t0>"], "sd") == "a red <t0> on a dotted background"
    assert substitute("a Pentagram", c, ["<t0>"], "sd") == "a <t0>"
    two = tiny_concept(name="star_heart", target="star, heart", synonyms=("pentagram", "valentine"))
    assert substitute("a star and a valentine", two, ["<a>", "<b>"], "shapes") == "a <a> and a <b>"


@pytest.mark.parametrize(("cls", "kw", "message"), [
    (ConceptInversion, {"checkpoints": [0, -5]}, "`probes.inversion.checkpoints` must be a non-empty, increasing list of step counts >= 0"),
    (ConceptInversion, {"checkpoints": []}, "`probes.inversion.checkpoints` must be a non-empty"),
    (ConceptInversion, {"images": 0}, "`probes.inversion.images` must be an integer >= 1, got 0"),
    (ConceptInversion, {"placeholder": ""}, "`probes.inversion.placeholder` must be a non-empty token"),
    (ConceptInversion, {"lr": 0}, "`probes.inversion.lr` must be a number > 0, got 0"),
    (Relearning, {"trainable": "vae"}, "`probes.relearn.trainable` must be one of attn2, unet, got 'vae'"),
    (Relearning, {"seeds": 1}, "`probes.relearn.seeds` must be an integer >= 2, got 1"),
])
def test_bad_probe_settings_are_one_clear_message(cls, kw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _probe(cls, "inversion" if cls is ConceptInversion else "relearn", **kw)


def test_a_placeholder_the_tokenizer_knows_is_refused():
    pipe = tiny_sd_pipeline()
    inv = _probe(ConceptInversion, "inversion", placeholder="star{i}")
    inv.placeholder = "star"  # a word of the vocabulary
    with pytest.raises(ConfigError, match="a token the tokenizer already knows"):
        inv.check_tokenizer(pipe.tokenizer)


def cfg_with(tmp_path, *overrides):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        return compose(config_name="config", overrides=["logger=none", "eval=smoke", f"out_dir={tmp_path}/runs",
                                                        f"cache_dir={tmp_path}/cache", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["probes=[inversion]", "probes.inversion.placeholder=star"], "`probes.inversion.placeholder` must be a non-empty token without spaces containing {i}"),
    (["probes=[relearn]", "concept.detect=null"], "`probes.relearn.images`: concept 'star' has no renderer"),
    (["probes=[inversion]", "probes.inversion.checkpoints=[0,-1]"], "`probes.inversion.checkpoints` must be a non-empty, increasing list"),
])
def test_probe_config_errors_exit_2_before_loading(tmp_path, capsys, overrides, message):
    cfg = cfg_with(tmp_path, "method=noop", "concept=star", *overrides)
    assert execute(cfg) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err
    assert not (tmp_path / "runs").exists()


def test_build_probes_refuses_a_probe_config_without_target():
    with pytest.raises(ConfigError, match="`probes.inversion` is not a probe config"):
        build_probes({"inversion": {"lr": 1}})


@needs_world
def test_inversion_and_relearning_on_the_shapes_world(tmp_path):
    fast = ["probes=[inversion,relearn]", "probes.inversion.checkpoints=[0,5]", "probes.relearn.checkpoints=[0,5]",
            "probes.inversion.seeds=2", "probes.relearn.seeds=2", "probes.inversion.images=2", "probes.relearn.images=2"]
    assert execute(cfg_with(tmp_path, "method=uce", "concept=star", *fast)) == 0
    path = next((tmp_path / "runs").rglob("record.json"))
    rec = json.loads(path.read_text())
    for name, axis in (("inversion", "inversion_steps"), ("relearn", "relearn_steps")):
        block = rec["probes"][name]
        assert block["axis"]["name"] == axis and block["axis"]["values"] == [0.0, 5.0]
        assert "recover" in block["metrics"] and block["retain"] == {}  # forget prompts only
        assert block["cost"]["prepare_seconds"] > 0 and block["cost"]["nfe"] > 0
        assert (path.parent / "probes" / name / block["protocol"]["hash"] / "state.safetensors").exists()
        assert rec["artifacts"][f"curve_{name}"] == f"curve_{name}.png" and (path.parent / f"grid_{name}.png").exists()
    assert rec["prompts"][0]["probes"]["inversion"]["data"]["prompt"] == "a <concealbench-0>"
    from bench.cache import load_entry

    for name in ("inversion", "relearn"):  # the probe changes the images it is meant to change
        imgs = load_entry(path.parent / "probes" / name / rec["probes"][name]["protocol"]["hash"] / "images-0.safetensors")[0]
        assert not torch.equal(imgs["x0"], imgs["x1"]), name


# --------------------------------------------------------------------------- noise, completion, inpainting

def test_noisy_ddim_at_scale_one_is_the_stock_sampler_bit_for_bit():
    from bench.probes.noise import NoisyDDIMScheduler
    from bench.sampling import SamplerConfig, generate

    pipe = tiny_sd_pipeline(scheduler="ddim")
    ctx = tiny_probe_context(pipe)
    for eta in (0.0, 0.5, 1.0):
        cfg = SamplerConfig(steps=4, guidance=7.5, batch_size=8, eta=eta)
        stock = generate(pipe, ctx.star, "a star", [3, 4], cfg)
        ours = generate(pipe, ctx.star, "a star", [3, 4], ctx.sampler, scheduler_class=NoisyDDIMScheduler,
                        step_kwargs={"eta": eta, "variance_scale": 1.0})
        assert torch.equal(stock, ours), eta
    louder = generate(pipe, ctx.star, "a star", [3, 4], ctx.sampler, scheduler_class=NoisyDDIMScheduler,
                      step_kwargs={"eta": 1.0, "variance_scale": 1.04})
    above = generate(pipe, ctx.star, "a star", [3, 4], ctx.sampler, scheduler_class=NoisyDDIMScheduler,
                     step_kwargs={"eta": 1.5, "variance_scale": 1.0})
    assert not torch.equal(louder, ours) and torch.isfinite(above).all() and not torch.equal(above, ours)


def test_noise_probe_keeps_the_detectors_best_variant():
    from bench.probes.noise import NoiseBased

    class Det:  # prefers bright images: the probe must keep, per seed, the variant it scores highest
        def concept_scores(self, images, concept):
            return images.reshape(len(images), -1).mean(1)

    pipe = tiny_sd_pipeline()
    ctx = tiny_probe_context(pipe)
    ctx.detector = Det()
    probe = _probe(NoiseBased, "noise", etas=[1.0, 1.5], variance_scales=[1.0, 1.04, 1.3], seeds=2)
    out = probe.run(ctx, "a star", "forget", ({}, {}))
    assert list(out.images) == [1.0, 1.5] and set(out.data["picked_scale"]) == {"1", "1.5"}


def test_completion_keeps_the_image_at_one_and_is_a_plain_sample_at_zero():
    from bench.probes.context import Completion, finish_latents
    from bench.sampling import generate

    pipe = tiny_sd_pipeline()
    ctx = tiny_probe_context(pipe)
    probe = _probe(Completion, "completion", kept=[0.0, 0.5, 1.0], seeds=2)
    out = probe.run(ctx, "a star", "forget", ({}, {}))
    seeds = ctx.seeds(500_000, 2)
    source = ctx.images(ctx.theta, "a star", seeds)  # SD worlds: θ's own images are the context
    assert np.array_equal(out.images[1.0], source)  # context strength 0 returns the input image
    assert not np.array_equal(out.images[0.5], source)
    lat0 = finish_latents(ctx, ctx.star, "a star", source, seeds, 0)
    assert torch.equal(lat0, generate(pipe, ctx.star, "a star", seeds, ctx.sampler))  # no context: θ*'s plain sample


def test_inpainting_holds_the_unmasked_latents_to_the_image():
    from bench.probes import _fewshot as F
    from bench.probes.context import Inpainting, centre_mask, finish_latents

    pipe = tiny_sd_pipeline()
    ctx = tiny_probe_context(pipe)
    seeds = [7, 8]
    source = ctx.images(ctx.theta, "a star", seeds)
    mask = centre_mask(pipe.unet.config.sample_size, 0.25)
    assert float(mask.mean()) == pytest.approx(0.25, abs=0.05)
    lat = finish_latents(ctx, ctx.star, "a star", source, seeds, 0, mask)
    x0 = F.encode(pipe, source)
    keep = mask == 0
    assert torch.equal(lat[..., keep], x0[..., keep]) and not torch.equal(lat[..., ~keep], x0[..., ~keep])
    probe = _probe(Inpainting, "inpainting", mask_fractions=[0.25, 0.9], seeds=2)
    assert probe.axis(ctx).values == (0.1, 0.75)


@pytest.mark.parametrize(("cls", "name", "kw", "message"), [
    ("NoiseBased", "noise", {"etas": [1.0, 20.0]}, "`probes.noise.etas` must be a non-empty, increasing list of DDIM η values in [0, 10]"),
    ("NoiseBased", "noise", {"variance_scales": [0.0]}, "`probes.noise.variance_scales` must be a non-empty list of numbers in (0, 2]"),
    ("Inpainting", "inpainting", {"mask_fractions": [0.5, 1.0]}, "`probes.inpainting.mask_fractions` must be a non-empty list of distinct fractions in (0, 1)"),
    ("Inpainting", "inpainting", {"mask_fractions": [0.0]}, "`probes.inpainting.mask_fractions` must be"),
    ("Completion", "completion", {"kept": [0.5, 1.5]}, "`probes.completion.kept` must be a non-empty, increasing list of shares in [0, 1]"),
])
def test_bad_context_and_noise_settings(cls, name, kw, message):
    import bench.probes.context as C
    import bench.probes.noise as N

    klass = getattr(C, cls, None) or getattr(N, cls)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        _probe(klass, name, **kw)


# --------------------------------------------------------------------------- adversarial prompts

def test_simplex_projection_is_exact():
    from bench.probes.adversarial_prompt import project_simplex

    v = torch.tensor([[0.5, 0.6, -0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [3.0, 0.0, 0.0, 0.0]])
    p = project_simplex(v)
    assert torch.allclose(p.sum(-1), torch.ones(3)) and (p >= 0).all()
    theta = (0.6 + 0.5 + 0.1 - 1) / 3  # three entries stay positive
    assert torch.allclose(p[0], torch.tensor([0.5 - theta, 0.6 - theta, 0.0, 0.1 - theta])) and torch.equal(p[1], v[1]) and torch.equal(p[2], torch.tensor([1.0, 0, 0, 0]))


def test_adversarial_prompt_keeps_its_prompts_and_starts_from_the_forget_prompt():
    from bench.probes.adversarial_prompt import AdversarialPrompt

    pipe = tiny_sd_pipeline()
    ctx = tiny_probe_context(pipe)
    star0 = copy.deepcopy(ctx.star.state_dict())
    probe = _probe(AdversarialPrompt, "adversarial_prompt", tokens=2, timesteps=2, iterations=2, seeds=2)
    probe._prompts = ("a star",)
    out = probe.run(ctx, "a star", "forget", ({}, {}))
    assert list(out.images) == [0.0, 2.0, 4.0] == list(probe.axis(ctx).values)
    assert np.array_equal(out.images[0.0], ctx.images(ctx.star, "a star", ctx.seeds(700_000, 2)))  # pre-attack = the forget prompt
    found = out.data["found"]
    assert found["0"] == "a star" and all(p.endswith("a star") and p != "a star" for k, p in found.items() if k != "0")
    assert all(torch.equal(star0[k], v) for k, v in ctx.star.state_dict().items())  # θ* is not trained


@pytest.mark.parametrize(("kw", "message"), [
    ({"iterations": 0}, "`probes.adversarial_prompt.iterations` must be an integer >= 1, got 0"),
    ({"timesteps": 0}, "`probes.adversarial_prompt.timesteps` must be an integer >= 1, got 0"),
    ({"tokens": 0}, "`probes.adversarial_prompt.tokens` must be an integer >= 1, got 0"),
])
def test_bad_attack_settings(kw, message):
    from bench.probes.adversarial_prompt import AdversarialPrompt

    with pytest.raises(ConfigError, match=message):
        _probe(AdversarialPrompt, "adversarial_prompt", **kw)


def test_a_prompt_budget_beyond_the_context_exits_2_before_loading(tmp_path, capsys):
    cfg = cfg_with(tmp_path, "method=noop", "concept=star", "probes=[adversarial_prompt]", "probes.adversarial_prompt.tokens=9")
    assert execute(cfg) == 2
    err = capsys.readouterr().err
    assert "`probes.adversarial_prompt.tokens` = 9 adversarial tokens do not fit" in err and "allowed: at most 4" in err


def test_probes_all_is_every_probe_file():
    """`probes=all` must name every probe in conf/probes/ (a new probe's YAML that is missing from it fails here)."""
    files = {p.stem for p in (Path(CONF) / "probes").glob("*.yaml")} - {"all"}
    with initialize_config_dir(version_base=None, config_dir=CONF):
        cfg = compose("config", overrides=["probes=all"])
    probes = build_probes(cfg.probes)
    assert {p.name for p in probes} == files
    assert probes[0].name == "partial_diffusion"


@pytest.mark.parametrize(("module", "cls", "kw"), [
    ("partial_diffusion", "PartialDiffusion", {"psi": [0.0, 0.25, 0.5], "seeds": 2, "retain_seeds": 3, "paper_seed": 42}),
    ("inversion", "ConceptInversion", {"checkpoints": [0, 2, 3], "images": 2, "batch_size": 2, "seeds": 2}),
    ("relearn", "Relearning", {"checkpoints": [0, 2], "images": 3, "batch_size": 2, "seeds": 2}),
    ("noise", "NoiseBased", {"etas": [1.0, 1.5], "variance_scales": [1.0, 1.02], "seeds": 2}),
    ("context", "Completion", {"kept": [0.0, 0.5, 1.0], "seeds": 2}),
    ("context", "Inpainting", {"mask_fractions": [0.5, 0.25], "seeds": 2}),
    ("adversarial_prompt", "AdversarialPrompt", {"tokens": 1, "timesteps": 2, "iterations": 2, "seeds": 2}),
])
def test_a_probes_row_count_is_what_the_nfe_counter_counts(module, cls, kw):
    """``rows()`` prices a probe on a model that is not loaded (python -m bench.costs): it must equal
    the UNet rows the probe really spends, θ's context images and training steps included."""
    import importlib

    from bench.probes import Workload

    klass = getattr(importlib.import_module(f"bench.probes.{module}"), cls)
    probe = _probe(klass, {"NoiseBased": "noise", "Completion": "completion", "Inpainting": "inpainting"}.get(cls, module), **kw)

    class Det:
        def concept_scores(self, images, concept):
            return images.reshape(len(images), -1).mean(1)

        def concept_hits(self, images, concept):
            return self.concept_scores(images, concept) > 127

    pipe = tiny_sd_pipeline()
    concept = tiny_concept(forget_prompts=("a star", "a red star"), retain_prompts=("a circle",))  # no renderer: θ's images
    ctx = tiny_probe_context(pipe, concept=concept)
    ctx.detector = Det()
    state = probe.prepare(ctx)
    for c in probe.classes:
        for prompt in concept.forget_prompts if c == "forget" else concept.retain_prompts:
            probe.run(ctx, prompt, c, state)
    plan = probe.rows(Workload(forget=2, retain=1, steps=ctx.sampler.steps, renders=False))
    assert sum(plan.values()) == ctx.counter.total > 0, (plan, ctx.counter.by_stage)
    assert plan["train"] > 0 or cls not in ("ConceptInversion", "Relearning", "AdversarialPrompt")
