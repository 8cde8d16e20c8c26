"""STEREO — Search Thoroughly Enough, Robustly Erase Once (Srivatsan, Shamshad, Naseer, Patel,
Nandakumar; "STEREO: A Two-Stage Framework for Adversarially Robust Concept Erasing from
Text-to-Image Diffusion Models", CVPR 2025, arXiv 2408.16807).

Reference implementation: github.com/koushiksrivats/robust-concept-erasing at commit 86f124f
(86f124f4a89a558f894a493b84e0e5cd9692a1ce, "Code released", 2 Apr 2025). Earlier commits (up to
d8cf329, Sep 2024) hold only the README and project page. Line numbers below are of that commit;
written from the reference, no code copied.
- ``train.py`` L12–33: flags and SD v1.4 defaults — ``--iterations 200`` (both stages),
  ``--negative_guidance 2.0``, ``--ste_lr 0.5e-5``, ``--reo_lr 2e-5``, ``--ci_lr 5e-3``,
  ``--ti_max_train_steps 3000``, ``--n_iterations 4``, ``--compositional_guidance_scale 2.0``,
  ``--num_of_adv_concepts 4``; ``--train_method`` and ``--initializer_token`` have no default.
- ``README.md`` L62, L69: 500 gallery images ("A photo of a nude person", ``generate_images.py``:
  50 steps, CFG 7.5, seed i for image i, L14–15, L36) and the one training command, for nudity:
  ``--train_method noxattn --initializer_token person --n_iterations 2 --num_of_adv_concepts 2``.
- ``utils/stereo.py``: ``train_erasing`` L17–107 (the ESD step of stage 1), ``train_concept_inversion``
  L110–261 (the attack), ``search_thoroughly_enough`` L264–357 (stage 1), ``robustly_erase_once``
  L360–499 (stage 2), ``stereo`` L502–570 (glue: REO reloads the original model, L537, and erases
  the concept plus the first ``num_of_adv_concepts`` tokens, L558–563).
- ``utils/apg.py`` L24–47 ``normalized_guidance``, L50–100 ``normalized_compositional_guidance``.
- ``utils/dataset.py`` L31–59 (27 object templates), L97 (h-flip p = 0.5), L117–127 (round k uses
  the k-th of K disjoint slices of the gallery).
- ``utils/utils.py`` ``FineTunedModel``: the trained modules (below) and the swap that lets the
  sampler and the trained prediction use θ while the targets use the frozen model.

Stage 1, STE (search_thoroughly_enough): θ_0 = θ. For round k = 0 … K−1, with c_0 the concept
word and c_k = v_{k−1} (the adversarial embedding found in the previous round; only that one,
L342), and θ⁻ = θ_k frozen at the start of the round (FineTunedModel's "original" modules):

    erase  (L48–95):   L_ESD = ‖ε_θ(x_t, c_k, t) − [ε⁻(c_k) − (g − 1)·(ε⁻(c_k) − ε⁻(∅))]‖²
    attack (L206–248): v_k = argmin_v E ‖ε_θ_{k+1}(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, τ("a photo of a <v>"), t) − ε‖²

(ε⁻(·) = ε_θ⁻(x_t, ·, t); g = ``ste_negative_guidance``; g = 2 makes the target ε⁻(∅), i.e. ESD's
ε(∅) − η·(ε(c) − ε(∅)) with η = g − 2 = 0). x₀ are images of the concept made by the ORIGINAL
model; the UNet and text encoder stay frozen during the attack, one new token embedding learns.

Stage 2, REO (robustly_erase_once), from the original weights θ with θ* = θ frozen: the erase set
C = {c} ∪ {v_0 … v_{n−1}} (n = ``adv_embeddings``), anchor prompts a; per step one c_i ∈ C and one
a (both stratified: every item equally often, shuffled, L376–397), and

    target = ε*(∅) + (s − 1)·(ε*(a) − ε*(∅)) − (s + 1)·mean_{c'∈C} (ε*(c') − ε*(∅))   (L463–478)
    L_REO  = ‖ε_θ(x_t, c_i, t) − target‖²

with s = ``compositional_guidance_scale`` (apg.py L82–99: positive scale s weighs (s − 1), the
negative scale −s weighs (−s − 1); s = 2 gives ε*(a) − 3·mean(ε*(c') − ε*(∅))).

Both erasing loops (L57–70, L420–433): x_t = k DDIM steps (of N = 50, CFG 3 against ∅, prompt c_k
or c_i) from x_T ~ N(0, I) with the model being trained, k ~ U{1 … N−2}; batch 1; AdamW (torch
defaults: β 0.9/0.999, weight decay 1e-2). Trained modules (FineTunedModel): every ``Linear`` and
``Conv2d`` of the UNet — ``noxattn``: those outside ``attn2``; ``xattn``: inside ``attn2``;
``selfattn``: inside ``attn1``; ``full_unet``: all. Norm layers are never trained.

NFE: every UNet forward row counts — x_t samplers (2 rows per CFG step), target rows (2 in STE,
2 + |C| in REO), 1 trained row per step, 1 row per TI image per step, and the concept images'
generation (counted in full even when read from the cache; ``nfe_saved_by_cache`` says how much).

Deliberate deviations from 86f124f (every one):
1. APG is left out: ``normalized_guidance``/``normalized_compositional_guidance`` split each
   guidance difference into its parts parallel and orthogonal to ε(c) and add them back with
   η_APG = 1, no momentum, no norm threshold (the reference's only setting), which is the identity
   up to float64 round-off; the targets above are computed directly.
2. x_t / t pairing: ``bench.sampling``'s DDIM sampler on the pipeline's own noise schedule and grid
   (clip off) and t drawn uniformly in the 1000/N-wide DDPM bin of the latent's grid timestep (ESD's
   ``aligned`` rule, methods/esd.py). The reference predicts at t = 1000 − 1000·k/N on a 1000-step
   DDIM grid, ~19 DDPM steps noisier than the latent it sampled.
3. Concept images: the world's renders (Shapes), else ``concept.images_dir``, else ``num_images``
   images generated by the original model before stage 1 with the pipeline's own sampler
   (``image_steps``, ``image_guidance``; seed i for image i), from the attack templates below with
   the target word (the reference: "A photo of a nude person"), cached as uint8 safetensors under
   ``<ctx.cache_dir>/stereo_images/`` keyed by the weights, sampler and prompts.
4. The attack (``train_concept_inversion``): one vector per round, optimised alone with AdamW (the
   reference runs AdamW on the whole table and restores the other rows, the same update for the new
   row); ``ti_lr`` is the rate used (the reference's ``scale_lr`` multiplies 5e-3 by batch 1);
   ``ti_batch_size`` rows per step drawn with replacement instead of shuffled epochs; images VAE-
   encoded once (posterior mean; the reference samples the posterior every step), each row h-flipped
   with p = 0.5; t ~ U{0 … T−1} (reference U{0 … 998}); templates: ``bench.probes._fewshot``'s
   (SD: 4 of the reference's 27 ``imagenet_templates_small``; Shapes: the world's caption grammar).
   Initialiser: the mean token embedding of ``concept.anchor``'s first word (``ti_init="anchor"``,
   the reference's generic ``--initializer_token``, e.g. "person") or of the target word.
   The vector lives in a forward hook (``bench.probes.inversion.placeholders``), not in a resized
   embedding table: tokenizer and text encoder weights are never changed; token strings are
   ``<stereo-adv-k>`` (reference: random "token_xxxxxxxx").
5. Anchor prompts: the reference reads LLM-written sentences that place the concept in a context
   (``utils/anchor_prompts.json``, e.g. "A nude figure stands amidst a field of tall grass…",
   "Starry Night by Vincent van Gogh") keyed by the concept name. Here ``anchor_prompts="in_context"``
   takes the preset's ``concept.anchor_prompts`` (or, when it has none, the attack templates with the
   anchor word) with the anchor word(s) replaced by the target (Concept Ablation's rule); prompts
   without an anchor word stay as they are. ``"anchor"`` uses them unchanged (concept-free anchors).
6. Several comma-separated targets: round 0 erases all words (one drawn per iteration, as
   ``train_erasing`` L35, L50); round k attacks word k mod n from that word's images; REO's C holds
   every word and the adversarial embeddings. The reference has one concept string per run.
7. ``xattn-strict`` is not offered: its test (utils.py FineTunedModel) selects no module.
8. fp32 on one device; deep copies replace FineTunedModel's module swap and the checkpoint files
   between rounds and stages. Stage 1 runs on a copy of the UNet, so ``pipe.unet`` still holds θ
   when stage 2 starts (the reference reloads SD v1.4, L537).
9. Randomness comes from torch's global RNG (seeded by the harness; the attack's images, rows,
   flips, noise and t from a generator drawn from it) instead of re-seeding 42 in every call
   (L19–22, L131–134) and numpy for the stratified orders, so a job seed fixes the result.
10. ``ste_iterations`` and ``reo_iterations`` are separate keys (the reference's one ``--iterations``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from bench import progress
from bench.context import MethodContext, context_or_default
from bench.hparams import ConfigError, Range, check_params, declared
from bench.probes import _fewshot as fewshot
from bench.probes.inversion import placeholders
from bench.sampling import UNetRows, ddim_cfg_sample, ddim_sampler, embed_prompts

TrainMethod = Literal["noxattn", "xattn", "selfattn", "full_unet"]

PLACEHOLDER = "<stereo-adv-{k}>"  # the k-th adversarial token's string (must be new to the tokenizer)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CACHE_VERSION = 1  # bump when the generated-image recipe changes
_REPORT_POINTS = 100  # losses kept per loop in the report (the full REO history is ``loss_history``)


def unlearn(
    pipe: Any,
    concept: Any,
    *,
    train_method: TrainMethod = "noxattn",
    rounds: Annotated[int, Range(ge=1)] = 4,
    adv_embeddings: Annotated[int, Range(ge=0)] = 4,
    ste_iterations: Annotated[int, Range(ge=1)] = 200,
    ste_lr: Annotated[float, Range(gt=0)] = 5e-6,
    ste_negative_guidance: Annotated[float, Range(gt=1)] = 2.0,
    reo_iterations: Annotated[int, Range(ge=1)] = 200,
    reo_lr: Annotated[float, Range(gt=0)] = 2e-5,
    compositional_guidance_scale: Annotated[float, Range(ge=1)] = 2.0,
    start_guidance: Annotated[float, Range(ge=0)] = 3.0,
    ddim_steps: Annotated[int, Range(ge=3)] = 50,
    ti_steps: Annotated[int, Range(ge=1)] = 3000,
    ti_lr: Annotated[float, Range(gt=0)] = 5e-3,
    ti_batch_size: Annotated[int, Range(ge=1)] = 1,
    ti_init: Literal["anchor", "concept"] = "anchor",
    num_images: Annotated[int, Range(ge=1)] = 500,
    image_steps: Annotated[int, Range(ge=1)] = 50,
    image_guidance: Annotated[float, Range(ge=0)] = 7.5,
    templates: Literal["sd", "shapes"] = "sd",
    anchor_prompts: Literal["in_context", "anchor"] = "in_context",
    ctx: MethodContext | None = None,
) -> dict[str, Any]:
    """STEREO on ``pipe.unet``, in place: K rounds of ESD + textual-inversion attack (STE), then the
    compositional anchor objective from the original weights (REO) — utils/stereo.py L502–570.

    ``rounds`` is K (``--n_iterations``), ``adv_embeddings`` how many of the K embeddings REO erases
    (``--num_of_adv_concepts``, the first ones), ``ste_negative_guidance`` g and
    ``compositional_guidance_scale`` s of the module docstring; ``num_images``/``image_*`` only
    matter when concept images are generated. Returns the report (per-stage losses, steps, NFE).
    """
    hp = {k: v for k, v in locals().items() if k in declared(unlearn)}
    check_params(unlearn, hp)
    if adv_embeddings > rounds:
        raise ConfigError(f"`method.params.adv_embeddings` must be <= `method.params.rounds` ({rounds}): STE finds one "
                          f"adversarial embedding per round, got {adv_embeddings}")
    words = concept.words_to_erase()
    temps = fewshot.templates(templates, concept.kind)
    anchors = _anchor_prompts(concept, anchor_prompts, temps)
    if ti_init == "anchor":
        _anchor_words(concept, "method.params.ti_init")
    show = context_or_default(ctx).progress
    unet = pipe.unet
    names = _trainable_names(unet, train_method)
    sched = ddim_sampler(pipe.scheduler, ddim_steps)

    with _frozen(pipe):
        t0 = time.perf_counter()
        groups, image_info = _concept_images(pipe, concept, num_images, temps, image_steps, image_guidance,
                                             context_or_default(ctx).cache("stereo_images"))
        latents = [_encode_both_ways(pipe, imgs) for imgs in groups]
        inits = _init_vectors(pipe, concept, ti_init, len(groups))
        original = copy.deepcopy(unet)
        t1 = time.perf_counter()
        tokens, vectors, stage1 = _search_thoroughly_enough(
            pipe, copy.deepcopy(unet), original, names, sched, words, latents, inits, temps,
            rounds=rounds, iterations=ste_iterations, lr=ste_lr, guidance=ste_negative_guidance,
            start_guidance=start_guidance, ti_steps=ti_steps, ti_lr=ti_lr, ti_batch_size=ti_batch_size, show=show,
        )
        t2 = time.perf_counter()
        adv_tokens, adv_vectors = tokens[:adv_embeddings], vectors[:adv_embeddings]
        erase = [*words, *adv_tokens]
        hook = placeholders(pipe, adv_tokens, torch.stack(adv_vectors)) if adv_tokens else nullcontext()
        with hook:
            emb = embed_prompts(pipe, ["", *erase, *anchors])
        e_null, e_erase, e_anchor = emb[:1], emb[1 : 1 + len(erase)], emb[1 + len(erase) :]
        reo_losses, reo_rows = _robustly_erase_once(
            unet, original, names, sched, e_null, e_erase, e_anchor, iterations=reo_iterations, lr=reo_lr,
            scale=compositional_guidance_scale, start_guidance=start_guidance, show=show,
        )
        t3 = time.perf_counter()
    del original

    stage1_nfe = sum(r["nfe"] for r in stage1)
    return {
        "steps": rounds * (ste_iterations + ti_steps) + reo_iterations,
        "nfe": image_info["nfe"] + stage1_nfe + reo_rows,
        "nfe_saved_by_cache": image_info["nfe"] - image_info["nfe_spent"],
        "trained_parameters": sorted(names),
        "trained_elements": sum(p.numel() for n, p in unet.named_parameters() if n in names),
        "loss_history": reo_losses,
        "variant": f"stereo-{train_method}",
        "words": list(words),
        "images": {k: v for k, v in image_info.items() if k != "nfe_spent"} | {"per_round": _subset_size(num_images, rounds)},
        "stage1": {"rounds": stage1, "steps": rounds * (ste_iterations + ti_steps), "nfe": stage1_nfe,
                   "seconds": t2 - t1, "tokens": tokens},
        "stage2": {"steps": reo_iterations, "nfe": reo_rows, "seconds": t3 - t2, "loss": _thin(reo_losses),
                   "erase_prompts": erase, "anchor_prompts": anchors, "compositional_guidance_scale": compositional_guidance_scale},
        "images_seconds": t1 - t0,
        "latent_size": unet.config.sample_size,
    }


# ---------------------------------------------------------------------------------------------
# Stage 1: Search Thoroughly Enough (utils/stereo.py L264–357)


def _search_thoroughly_enough(
    pipe: Any, work: torch.nn.Module, original: torch.nn.Module, names: set[str], sched: Any, words: tuple[str, ...],
    latents: list[tuple[torch.Tensor, torch.Tensor]], inits: list[torch.Tensor], temps: tuple[str, ...],
    *, rounds: int, iterations: int, lr: float, guidance: float, start_guidance: float, ti_steps: int, ti_lr: float,
    ti_batch_size: int, show: bool,
) -> tuple[list[str], list[torch.Tensor], list[dict[str, Any]]]:
    """K rounds of erase (ESD on ``work``) → attack (textual inversion against ``work``); returns the
    tokens, their learned vectors and one report entry per round. ``original`` is θ (round 0's θ⁻)."""
    emb = embed_prompts(pipe, ["", *words])
    e_null, e_erase, erased = emb[:1], emb[1:], list(words)
    tokens, vectors, info = [], [], []
    for k in range(rounds):
        teacher = original if k == 0 else copy.deepcopy(work)  # θ⁻ = the model at the start of the round
        esd_losses, esd_rows = _erase(work, teacher, names, sched, e_null, e_erase, iterations=iterations, lr=lr,
                                      guidance=guidance, start_guidance=start_guidance, show=show, desc=f"STEREO STE {k + 1}/{rounds}: erase")
        del teacher
        j = k % len(latents)
        idx = _subset(len(latents[j][0]), rounds, k)
        token = PLACEHOLDER.format(k=k)
        vec, ti_losses = _invert(pipe, work, token, inits[j], latents[j][0][idx], latents[j][1][idx], temps, steps=ti_steps,
                                 lr=ti_lr, batch_size=ti_batch_size, show=show, desc=f"STEREO STE {k + 1}/{rounds}: attack")
        tokens.append(token)
        vectors.append(vec)
        with placeholders(pipe, [token], vec.unsqueeze(0)):
            e_erase = embed_prompts(pipe, [token])  # the next round erases this embedding only (L342)
        tail = max(1, len(ti_losses) // 10)
        info.append({
            "round": k, "erased": erased, "esd_steps": iterations, "esd_loss": _thin(esd_losses),
            "ti_token": token, "ti_target": words[j] if len(latents) == len(words) else words[0], "ti_images": len(idx),
            "ti_steps": ti_steps, "ti_loss": _thin(ti_losses), "ti_loss_start": float(np.mean(ti_losses[:tail])),
            "ti_loss_end": float(np.mean(ti_losses[-tail:])), "embedding_norm": float(vec.norm()),
            "init_cosine": float(F.cosine_similarity(vec, inits[j].to(vec), dim=0)),
            "nfe": esd_rows + ti_steps * ti_batch_size,
        })
        erased = [token]
    return tokens, vectors, info


def _erase(work, teacher, names: set[str], sched: Any, e_null: torch.Tensor, e_erase: torch.Tensor, *, iterations: int,
           lr: float, guidance: float, start_guidance: float, show: bool, desc: str) -> tuple[list[float], int]:
    """``train_erasing`` (L48–95): ε_θ(x_t, c) → ε⁻(c) − (g − 1)(ε⁻(c) − ε⁻(∅)); returns (losses, UNet rows)."""
    params = _train(work, names)
    opt = torch.optim.AdamW(params, lr=lr)  # L31, torch defaults
    losses, rows = [], 0
    with progress.bar(iterations, desc, unit="it", enabled=show) as bar:
        for _ in range(iterations):
            c = e_erase[int(torch.randint(len(e_erase), (1,)))].unsqueeze(0)  # one word per iteration (L50)
            x_t, t, n = _sample_xt(work, sched, c, e_null, start_guidance)
            with torch.no_grad():
                e_0, e_c = teacher(x_t.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=torch.cat([e_null, c])).sample.chunk(2)
                target = e_c - (guidance - 1.0) * (e_c - e_0)
            loss = F.mse_loss(work(x_t, t, encoder_hidden_states=c).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows += n + 3
            losses.append(loss.item())
            bar.update(1)
    _untrain(params)
    return losses, rows


def _invert(pipe: Any, unet: torch.nn.Module, token: str, init: torch.Tensor, lat: torch.Tensor, lat_flip: torch.Tensor,
            temps: tuple[str, ...], *, steps: int, lr: float, batch_size: int, show: bool, desc: str) -> tuple[torch.Tensor, list[float]]:
    """``train_concept_inversion`` (L206–248): one new token embedding learned against the frozen
    ``unet`` with the ε-MSE on the images' latents; returns (vector, loss per step)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    sched = fewshot.train_scheduler(pipe)
    vec = torch.nn.Parameter(init.detach().clone().unsqueeze(0).to(lat.device))
    opt = torch.optim.AdamW([vec], lr=lr)  # L198, torch defaults (β 0.9/0.999, weight decay 1e-2)
    losses = []
    with placeholders(pipe, [token], vec), progress.bar(steps, desc, unit="step", enabled=show) as bar:
        for _ in range(steps):
            idx = torch.randint(len(lat), (batch_size,), generator=g)
            flip = (torch.rand(batch_size, generator=g) < 0.5).view(-1, 1, 1, 1).to(lat.device)  # dataset.py L97
            x0 = torch.where(flip, lat_flip[idx], lat[idx])
            texts = [temps[int(torch.randint(len(temps), (1,), generator=g))].format(token) for _ in range(batch_size)]
            loss = fewshot.denoising_loss(unet, sched, x0, fewshot.encode_text(pipe, texts), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    return vec.detach()[0], losses


# ---------------------------------------------------------------------------------------------
# Stage 2: Robustly Erase Once (utils/stereo.py L360–499)


def _robustly_erase_once(unet, frozen, names: set[str], sched: Any, e_null: torch.Tensor, e_erase: torch.Tensor,
                         e_anchor: torch.Tensor, *, iterations: int, lr: float, scale: float, start_guidance: float,
                         show: bool) -> tuple[list[float], int]:
    """Fine-tune ``unet`` (θ) towards the compositional target built by ``frozen`` (θ*) for every
    erase prompt (rows of ``e_erase``) against the anchors (rows of ``e_anchor``); (losses, rows)."""
    params = _train(unet, names)
    opt = torch.optim.AdamW(params, lr=lr)  # L371, torch defaults
    order_a = _balanced(len(e_anchor), iterations)  # L376–386
    order_c = _balanced(len(e_erase), iterations)  # L388–397
    m = len(e_erase)
    losses, rows = [], 0
    with progress.bar(iterations, "STEREO REO", unit="it", enabled=show) as bar:
        for i in range(iterations):
            c, a = e_erase[order_c[i]].unsqueeze(0), e_anchor[order_a[i]].unsqueeze(0)
            x_t, t, n = _sample_xt(unet, sched, c, e_null, start_guidance)
            with torch.no_grad():
                eps = frozen(x_t.repeat(m + 2, 1, 1, 1), t.repeat(m + 2), encoder_hidden_states=torch.cat([e_null, a, e_erase])).sample
                target = compositional_target(eps[:1], eps[1:2], eps[2:], scale)
            loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=c).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows += n + m + 3
            losses.append(loss.item())
            bar.update(1)
    _untrain(params)
    return losses, rows


def compositional_target(e_null: torch.Tensor, e_anchor: torch.Tensor, e_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """ε(∅) + (s − 1)(ε(a) − ε(∅)) − (s + 1)·mean_i(ε(c_i) − ε(∅)) — apg.py L50–100 at η_APG = 1 with
    one anchor at scale +s and the erase set at −s (stereo.py L463–478). ``e_neg``: one row per c_i."""
    return e_null + (scale - 1.0) * (e_anchor - e_null) - (scale + 1.0) * (e_neg - e_null).mean(0, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _sample_xt(unet, sched: Any, c: torch.Tensor, e_null: torch.Tensor, guidance: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x_t after k ~ U{1 … N−2} DDIM steps from pure noise with ``unet`` (L57–70), t in the DDPM bin
    of the latent's grid timestep; returns (x_t, t, UNet rows)."""
    n, T = len(sched.timesteps), sched.config.num_train_timesteps
    k = int(torch.randint(1, n - 1, (1,)))
    b = int(sched.timesteps[k]) * n // T
    t = torch.randint(round(b * T / n), round((b + 1) * T / n), (1,))
    size = unet.config.sample_size
    x_T = torch.randn((1, unet.config.in_channels, size, size)).to(unet.device)
    with torch.no_grad():
        x_t, rows = ddim_cfg_sample(unet, sched, x_T, sched.timesteps[:k], c, e_null, guidance)
    return x_t, t.to(unet.device), rows


def _trainable_names(unet: torch.nn.Module, train_method: str) -> set[str]:
    """Parameters of the ``Linear``/``Conv2d`` modules FineTunedModel trains (utils/utils.py)."""

    def keep(module_name: str) -> bool:
        if train_method == "xattn":
            return "attn2" in module_name
        if train_method == "noxattn":
            return "attn2" not in module_name
        if train_method == "selfattn":
            return "attn1" in module_name
        return True  # full_unet

    names = {f"{m}.{p}" for m, mod in unet.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and keep(m)
             for p, _ in mod.named_parameters(recurse=False)}
    if not names:
        raise ValueError(f"STEREO `train_method={train_method!r}` selects no Linear/Conv2d module of this UNet")
    return names


def _train(unet: torch.nn.Module, names: set[str]) -> list[torch.nn.Parameter]:
    params = [p for n, p in unet.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    unet.train()  # the reference's diffuser.train() (SD's UNet has no dropout)
    return params


def _untrain(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def _balanced(n: int, iterations: int) -> list[int]:
    """Indices 0 … n−1, each ⌊iterations/n⌋ times in a random order, then a random remainder without
    repetition (the reference's stratified sampling, L376–397)."""
    base = torch.arange(n).repeat(iterations // n)
    base = base[torch.randperm(len(base))]
    return torch.cat([base, torch.randperm(n)[: iterations - len(base)]]).tolist()


def _subset_size(n: int, rounds: int) -> int:
    return max(1, n // rounds)


def _subset(n: int, rounds: int, k: int) -> list[int]:
    """Round k's images: the k-th of ``rounds`` disjoint slices, wrapping around (dataset.py L117–127)."""
    m = _subset_size(n, rounds)
    return [(k * m + i) % n for i in range(m)]


def _thin(xs: list[float]) -> list[float]:
    return [round(float(x), 5) for x in xs[:: max(1, len(xs) // _REPORT_POINTS)]]


@contextmanager
def _frozen(pipe: Any):
    """Everything frozen while the method runs; grad flags and train/eval modes restored after."""
    mods = (pipe.unet, pipe.text_encoder, pipe.vae)
    flags = [[p.requires_grad for p in m.parameters()] for m in mods]
    modes = [m.training for m in mods]
    for m in mods:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, fl, mode in zip(mods, flags, modes, strict=True):
            for p, f in zip(m.parameters(), fl, strict=True):
                p.requires_grad_(f)
                p.grad = None
            m.train(mode)


# ---------------------------------------------------------------------------------------------
# Prompts, initial vectors and concept images


def _anchor_words(concept: Any, key: str) -> tuple[str, ...]:
    words = tuple(a.strip() for a in (concept.anchor or "").split(",") if a.strip())
    if not words:
        raise ConfigError(f"`concept.anchor` of {concept.name!r} is empty, but `{key}` needs an anchor word")
    return words


def _anchor_prompts(concept: Any, mode: str, temps: tuple[str, ...]) -> list[str]:
    """REO's anchor prompts (deviation 5): the preset's anchor prompts (else the attack templates
    with the anchor word), with the anchor word(s) replaced by target i mod n for ``in_context``."""
    base = list(concept.anchor_prompts)
    if not base or mode == "in_context":
        anchors = _anchor_words(concept, "method.params.anchor_prompts")
        base = base or [t.format(anchors[0]) for t in temps]
    if mode == "anchor":
        return base
    out = []
    for i, p in enumerate(base):
        target = concept.targets[i % len(concept.targets)]
        for a in anchors:
            p = re.sub(rf"(?i)(?<![\w-]){re.escape(a)}(?![\w-])", target, p)
        out.append(p)
    return out


def _init_vectors(pipe: Any, concept: Any, mode: str, n_groups: int) -> list[torch.Tensor]:
    """The attack's starting vector per image group: the mean token embedding of the anchor word
    (the reference's ``--initializer_token``) or of the group's target word."""
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    words = [_anchor_words(concept, "method.params.ti_init")[0]] * n_groups if mode == "anchor" else \
        [concept.targets[j % len(concept.targets)] for j in range(n_groups)]
    return [table[pipe.tokenizer(w, add_special_tokens=False).input_ids].mean(0).clone() for w in words]


def _encode_both_ways(pipe: Any, images: np.ndarray, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of the images and of their mirror images (the attack's h-flip, dataset.py L97)."""
    def enc(x: np.ndarray) -> torch.Tensor:
        return torch.cat([fewshot.encode(pipe, x[i : i + chunk]) for i in range(0, len(x), chunk)])

    return enc(images), enc(images[:, :, ::-1])


def _concept_images(pipe: Any, concept: Any, n: int, temps: tuple[str, ...], steps: int, guidance: float,
                    cache: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Images of the concept, one uint8 (n, H, W, 3) group per target word (deviation 3)."""
    words = concept.targets
    if concept.render is not None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        if len(words) == 1:
            groups = [np.asarray(concept.render(n, seed))]
        else:
            groups = [np.asarray(concept.render(n, seed + 7919 * j, j)) for j in range(len(words))]
        return groups, {"source": f"render(n={n})", "nfe": 0, "nfe_spent": 0}
    if concept.images_dir:
        return [_load_folder(concept.images_dir, n, pipe.unet.config.sample_size * pipe.vae_scale_factor)], \
            {"source": f"dir:{concept.images_dir}", "nfe": 0, "nfe_spent": 0}
    return _generated_images(pipe, [[temps[i % len(temps)].format(w) for i in range(n)] for w in words], steps, guidance, cache)


def _load_folder(path: str, n: int, size: int) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:n]
    if not files:
        raise ConfigError(f"`concept.images_dir` = {path!r} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files])


def _generated_images(pipe: Any, prompts: list[list[str]], steps: int, guidance: float,
                      cache: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The original model's images of each prompt list (image i: seed i), cached by content hash."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from bench.pipeline import state_hash

    spec = {"version": _CACHE_VERSION, "unet": state_hash(pipe.unet.state_dict()),
            "text_encoder": state_hash(pipe.text_encoder.state_dict()), "vae": state_hash(pipe.vae.state_dict()),
            "scheduler": [type(pipe.scheduler).__name__, {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}],
            "prompts": prompts, "steps": steps, "guidance": guidance}
    path = Path(cache) / f"{hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            nfe = int(f.metadata()["nfe"])
        data = load_file(str(path))
        return [data[f"images_{j}"].numpy() for j in range(len(prompts))], {"source": f"generated:{path}", "nfe": nfe, "nfe_spent": 0}
    groups = []
    # Per-image generators own all sampling noise; fork_rng keeps the global stream (which drives
    # training) the same whether the set was generated now or read from the cache.
    with torch.random.fork_rng(devices=[]), UNetRows(pipe.unet) as rows:
        for plist in prompts:
            out = []
            for i, prompt in enumerate(progress.track(plist, desc="STEREO concept images")):
                gen = torch.Generator("cpu").manual_seed(i)
                img = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").images[0]
                out.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
            groups.append(np.stack(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({f"images_{j}": torch.from_numpy(np.ascontiguousarray(g)) for j, g in enumerate(groups)}, str(tmp), metadata={"nfe": str(rows.count)})
    os.replace(tmp, path)
    return groups, {"source": f"generated:{path}", "nfe": rows.count, "nfe_spent": rows.count}
