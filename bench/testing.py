"""Tiny random SD-1.x-shaped pipelines for tests and `python -m bench.perf --tiny`.

Every component has the real diffusers/transformers class (``UNet2DConditionModel`` with
cross-attention, ``AutoencoderKL``, ``CLIPTextModel``, an SD 1.x ``CLIPTokenizer``), so code that
runs on these runs unchanged on SD v1.4 and on the Shapes world (DESIGN §2.1, STYLE "tests run the
real code on tiny models"). Weights are random but seeded: the same ``seed`` gives the same weights.
"""
from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable

import torch

# SD v1.x noise schedule (the CompVis/stable-diffusion-v1-4 scheduler config).
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
SCHEDULERS = ("ddim", "pndm", "ddpm", "euler")


def sd_scheduler(name: str = "ddim"):
    """A fresh scheduler with SD v1.x betas: ``ddim`` | ``pndm`` (SD v1.4's own) | ``ddpm`` | ``euler``."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

    if name == "ddim":
        return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "pndm":
        return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    if name == "ddpm":
        return DDPMScheduler(**SD_BETAS, clip_sample=False, steps_offset=1)
    if name == "euler":
        return EulerDiscreteScheduler(**SD_BETAS, steps_offset=1)
    raise ValueError(f"`scheduler` must be one of {list(SCHEDULERS)}, got {name!r}")


@functools.cache
def _tokenizer(text_len: int):
    # Built once per process and length: deriving the 49408-token BPE vocabulary takes ~1 s.
    from bench.world.tokenizer import build_clip_tokenizer

    # The files are read into memory by from_pretrained, so the directory goes right after.
    with tempfile.TemporaryDirectory(prefix="concealbench-tok-") as tmp:
        return build_clip_tokenizer(tmp, model_max_length=text_len)


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim", text_len: int = 77):
    """A random tiny ``StableDiffusionPipeline`` (16×16 images, 4×8×8 latents, ~1 M parameters).

    Deterministic in ``seed``; does not touch the global torch RNG. ``text_len`` is the tokenizer's
    ``model_max_length`` (77 as in SD 1.x; the Shapes world uses 16).
    """
    from diffusers import StableDiffusionPipeline

    from bench.world.models import make_text_encoder, make_unet, make_vae

    sched = sd_scheduler(scheduler)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The Shapes world's architectures on an 8×8 latent with a 32-d text encoder: a world model in miniature.
        unet = make_unet(sample_size=8, cross_attention_dim=32)
        vae = make_vae(sample_size=16)
        text_encoder = make_text_encoder(hidden_size=32, max_positions=max(77, text_len))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=_tokenizer(text_len),
        unet=unet.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturbed_unet(unet, scale: float = 0.05, seed: int = 1):
    """A deep copy of ``unet`` with N(0, scale²) noise added to its cross-attention (``attn2``)
    weights: a stand-in unlearned model θ* that differs from θ where ESD-x / UCE edit it."""
    star = copy.deepcopy(unet)
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in star.named_parameters():
            if ".attn2." in name:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype))
    return star


def perturbed_text_encoder(text_encoder, scale: float = 0.05, seed: int = 1, layer: int = 0):
    """A deep copy of ``text_encoder`` with N(0, scale²) noise added to the MLP weights of one
    encoder layer: a stand-in for a text encoder an unlearning method (AdvUnlearn) has trained."""
    star = copy.deepcopy(text_encoder)
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in star.named_parameters():
            if f"encoder.layers.{layer}.mlp." in name:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype))
    return star


def weights(module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict, to compare before and after a method ran."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def pipe_weights(pipe) -> dict[str, torch.Tensor]:
    """``weights`` of the UNet, text encoder and VAE, keyed ``<component>.<tensor>``."""
    return {f"{m}.{k}": v for m in ("unet", "text_encoder", "vae") for k, v in weights(getattr(pipe, m)).items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The names whose tensors differ bit for bit."""
    return {k for k in before if not torch.equal(before[k], after[k])}


def assert_seed_decides(train: Callable, component: str = "unet") -> None:
    """Train fresh tiny pipelines under seeds 0, 0 and 1 and check the seed decides the run.

    ``train(pipe, seed)`` trains ``pipe`` and returns a tuple of outputs to compare (the loss history, a saved file's path,
    …). Seed 0 twice must give bit-identical ``component`` weights and equal outputs; seed 1 must change the weights and
    every output.
    """
    runs = []
    for seed in (0, 0, 1):
        pipe = tiny_sd_pipeline()
        outputs = tuple(train(pipe, seed))
        runs.append((weights(getattr(pipe, component)), outputs))
    (a, out_a), (b, out_b), (c, out_c) = runs
    assert not changed(a, b) and out_a == out_b, "seed 0 twice gave different weights or outputs"
    assert changed(a, c), "seeds 0 and 1 gave the same weights"
    assert all(x != y for x, y in zip(out_a, out_c, strict=True)), "seeds 0 and 1 gave an identical output"


def assert_each_rejected(fn: Callable, bad: dict) -> None:
    """Every ``{key: value}`` of ``bad``, alone, fails hyperparameter validation with a message naming
    ``method.params.<key>``."""
    import pytest

    from bench.hparams import ConfigError, check_params

    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"`method.params.{key}`"):
            check_params(fn, {key: value})


def check_method_confs(fn: Callable, name: str, display: str | None = None, same_defaults: bool = True) -> dict:
    """The shipped configs of method ``name`` validate against ``fn``'s signature and return its
    resolved defaults: ``conf/method/<name>.yaml`` (its ``_target_``, ``name`` and, if given,
    ``display``) and ``conf/method_model/<name>_shapes.yaml`` where it exists. With
    ``same_defaults`` the method YAML's params are the signature's own defaults (the SD
    configuration is the code's). Every point of ``conf/sweep/<name>.yaml`` is composed and
    validated as a job by ``tests/test_sweeps.py``."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from bench.hparams import check_params

    conf = Path(__file__).resolve().parents[1] / "conf"
    cfg = OmegaConf.load(conf / "method" / f"{name}.yaml")
    assert cfg._target_ == f"{fn.__module__}.{fn.__name__}" and cfg.name == name, (cfg._target_, cfg.name)
    if display is not None:
        assert cfg.display == display, cfg.display
    params = OmegaConf.to_container(cfg).get("params") or {}
    defaults = check_params(fn, params)
    if same_defaults:
        assert defaults == check_params(fn, {}), "conf/method params differ from the signature's defaults"
    shapes = conf / "method_model" / f"{name}_shapes.yaml"
    if shapes.exists():
        check_params(fn, OmegaConf.to_container(OmegaConf.load(shapes)).get("params") or {})
    return defaults


def tiny_concept(**overrides):
    """The ``star`` concept the method tests unlearn from tiny pipelines (fields overridable)."""
    from bench.concepts import Concept

    fields = dict(
        name="star",
        kind="object",
        target="star",
        anchor="shape",
        forget_prompts=("a star",),
        retain_prompts=("a circle",),
        retain_concepts=("circle", "square"),
        anchor_prompts=("a shape", "a red shape"),
    )
    return Concept(**{**fields, **overrides})


def tiny_probe_context(pipe, star=None, concept=None, seed: int = 0, cache_dir=None, steps: int = 4):
    """A ``ProbeContext`` over a tiny pipeline (θ = ``pipe.unet``, θ* = ``star``) for the probe tests:
    a 4-step sampler, an NFE counter, a cache in ``cache_dir`` and a concept that renders random
    16×16 "concept images" when the test gives none."""
    import contextlib
    import tempfile

    import numpy as np

    from bench.cache import Cache
    from bench.probes import ProbeContext
    from bench.sampling import NFECounter, SamplerConfig

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def render(n: int, s: int, target: int | None = None) -> np.ndarray:
        return np.random.default_rng(s).integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    concept = concept or tiny_concept(render=render)
    ctx = ProbeContext(pipe=pipe, theta=pipe.unet, star=star if star is not None else perturbed_unet(pipe.unet), concept=concept,
                       sampler=SamplerConfig(steps=steps, guidance=7.5, batch_size=8), cache=Cache(cache_dir or tempfile.mkdtemp()),
                       counter=NFECounter(), device=pipe.unet.device, seed=seed, amp=contextlib.nullcontext, world="sd",
                       cache_key={"model": "tiny"})
    return ctx
