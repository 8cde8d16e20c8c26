"""MACE — Mass Concept Erasure (Lu, Wang, Li, Liu, Kong; CVPR 2024, arXiv 2403.06135).

MACE erases several concepts at once in three stages, all confined to the cross-attention key and
value projections (``attn2.to_k`` / ``attn2.to_v``) of the UNet:

1. Closed-form refinement (CFR). The text encoder is causal, so the words that follow a concept in a
   prompt (and the EOS/padding tokens) carry residual information about it. For each concept c with
   anchor a and each template prompt p, the tokens of p(c) that are *not* the concept's own tokens
   (the common prefix and suffix of p(c) and p(a), extended aligned through the padding) are keys
   k_j, mapped to what the original layer gives for the matching tokens of p(a), v_j = W_old k'_j:

       W = (λ W_old + Σ_j v_j k_jᵀ + s_p Σ_P W_old c cᵀ) (λI + Σ_j k_j k_jᵀ + s_p Σ_P c cᵀ)⁻¹.

2. One LoRA per concept (rank r on every attn2 ``to_k`` and ``to_v``), trained on the refined model
   so that the concept tokens' cross-attention maps inside the concept's image region are
   suppressed: for a noised latent x_t of a concept image and a template prompt,

       L = Σ_layers ‖A_l[head, pixel ∈ mask, token ∈ concept positions]‖_F

   (concept positions: the concept word's tokens plus, with ``use_pooler``, every EOS token). The
   ε-prediction loss is not used. Timesteps come from the paper's "relation-focal" importance
   sampling f(t) = σ(0.05(t − 200)) − σ(0.05(t − 400)).

3. Closed-form fusion of the LoRAs: every concept's prompts (all tokens c) should give, through the
   fused W, what the refined W_cfr plus that concept's LoRA Δ_i gives:

       W = (λ W_cfr + Σ_i Σ_c (W_cfr + Δ_i) c cᵀ + s_p Σ_P W_old c cᵀ) (λI + Σ_i Σ_c c cᵀ + s_p Σ_P c cᵀ)⁻¹.

Reference implementation: github.com/Shilin-LU/MACE at commit 057e7a6 (057e7a6edadc6bbb5ca94700f416372e35bed083,
main; the source files below were last changed in 7716f8d). Line numbers are of that commit. Written from
the paper and the reference; no code copied (the prompt templates are the reference's data).

- Driver ``training.py`` L11–19: stages 1 & 2 (``src/cfr_lora_training.py``), then stage 3
  (``src/fuse_lora_close_form.py``).
- Prompts ``src/dataset.py`` L112–152 and ``src/cfr_utils.py`` L257–343: ``aug_length`` (30) of the
  first ``prompt_len`` (30) templates, the same indices for concept and anchor (dataset L145–147);
  object templates for every kind but ``style`` (cfr_utils L260–294, L296–330).
- CFR keys/values ``src/cfr_utils.py`` L10–30 (common prefix/suffix of the unpadded token ids),
  L100–112 (extension through the padding, aligned at the end), L116–123 (keys from the concept
  prompt, values W_old(anchor-prompt states); the layers are reset to the original before each
  concept, L69–76); ``closed_form_refinement`` L153–204 (λW + Σ v kᵀ, λI + Σ k kᵀ, W = mat1·mat2⁻¹
  L199–202); its call with ``lamb`` and ``train_preserve_scale`` ``src/cfr_lora_training.py``
  L259–322. Matrices: ``to_v`` and ``to_k`` of every cross-attention (``get_ca_layers`` L33–56).
- LoRA ``src/cfr_lora_training.py`` L326–373: a fresh LoRA per concept (``train_seperate``) on
  attn2 ``to_k``/``to_v`` (``src/mace_lora_atten_processor.py`` L122–125: diffusers'
  ``LoRALinearLayer``, down ~ N(0, 1/r²), up = 0, no α scaling); AdamW(lr, β (0.9, 0.999), ε 1e-8,
  weight decay 0.01), constant lr, grad-norm clip 1.0 (L367–382, L545–553); ``max_train_steps`` per
  concept, batch 1. Training loop L460–553: VAE latents ``latent_dist.sample()`` × scaling factor
  (L486–487), noise and t (L489–508, importance sampling L437–452 and ``cfr_utils`` L207–209),
  attention loss only (L514–532).
- Attention loss ``src/cfr_utils.py`` L212–249 (``AttnController``: mask resized nearest to the
  layer's d×d and thresholded at 0.5, L223–235; probabilities of the first batch element's heads
  at the concept positions, L236; loss Σ ‖·‖_F over layers, L248–249), fed by every attention whose
  key length is the text length (``mace_lora_atten_processor.py`` L57–60). Concept positions
  ``src/dataset.py`` L227–243 (the concept's token ids, plus every ``<|endoftext|>`` with
  ``use_pooler``).
- Fusion ``src/fuse_lora_close_form.py`` L47–71 (each LoRA fused into the refined model; keys are
  all tokens of that concept's prompts, values through the fused layer: ``all_words=True``,
  ``prepare_k_v_for_lora=True``, ``cfr_utils`` L128–136), L95–110 (one closed form over all
  concepts with ``lamb`` and ``fuse_preserve_scale``, starting from the refined weights).
- Training images ``inference.py`` L16–38 and ``data_preparation.py`` L22–58: 8 images per concept
  from the original model ("a photo of the {c}"; style: "a photo in the style of {c}"; 30 steps, CFG
  7.5), object masks from Grounded-SAM; styles have no mask (the loss covers every pixel,
  ``cfr_lora_training.py`` L63–68, ``cfr_utils`` L236–238).
- Defaults: ``configs/object/erase_ship.yaml`` L7–24 and L79–82 (the paper's object setting).

Several targets: ``concept.targets`` (comma-separated) are the reference's ``multi_concept`` list,
all mapped to the one anchor (``concept.anchor`` unless ``anchor`` is set).

NFE: UNet rows — one per LoRA step and concept, plus the base model's image generations where the
world has no renderer (CFG rows counted by ``bench.sampling``). Closed forms and VAE encodes cost none.

Deliberate deviations from 057e7a6 (every one):
1. Masks. The reference segments SD generations with Grounded-SAM. On the Shapes world the concept
   images are the world's renders (``concept.render``), which return images only; the mask is
   derived from them exactly: shapes are drawn in saturated colours on a grey (R = G = B)
   background, so the concept region is the pixels whose channel spread (max − min) exceeds
   ``_SATURATION`` (anti-aliased edges below ~30 % coverage fall outside). ``style`` concepts (e.g.
   a background texture) use no mask, as the reference does for styles. On SD worlds there is no
   segmenter here: images are generated as the reference does and the loss covers every pixel (the
   reference's style branch) — ``report["masks"]`` says which. ``use_mask=False`` forces that.
2. Images are normalised to [−1, 1], what the VAE expects; the reference applies ImageNet's
   mean/std normalisation (``dataset.py`` L168–175) before the VAE. Generated images use the
   pipeline's own scheduler, not DPM-Solver++, with seeds drawn from the job's RNG.
3. Preservation. The reference's preservation terms are cached Gram matrices of COCO captions and of
   a celebrity list (``cache_coco.py``), scaled by ``train_preserve_scale`` twice in CFR
   (``cfr_lora_training.py`` L309–322 multiplies the cache by it and passes it again as
   ``preserve_scale``) and by ``fuse_preserve_scale`` once in fusion. Here the preserve set is
   ``concept.retain_prompts`` (or ``preserve``), all their tokens with the original weights'
   outputs, scaled once by one ``preserve_scale`` in both closed forms. The default 0 (the object
   setting) makes this moot.
4. The closed forms are ``torch.linalg.solve`` in float64 (the reference: ``mat1 @ inverse(mat2)``
   in float32), computed from Gram matrices in text space shared by every layer.
5. ``num_prompts`` < 30 samples templates with torch's RNG (the reference: ``random.sample``); each
   concept draws its own subset, as the reference does. The LoRA steps cycle through the concept's
   images in a fresh random order per pass, as its shuffled data loader does.
6. The LoRA is applied through forward hooks on ``to_k``/``to_v`` and the attention probabilities
   are recomputed from the captured queries and keys (softmax(q kᵀ·scale) per head), which equals
   the probabilities the processor uses; the reference swaps in a LoRA attention processor. The
   UNet's own processors are left untouched.
7. The VAE posterior of each image is computed once and sampled at every step (the reference
   re-encodes the image at every step; same distribution).
8. fp32 on one device, no AMP; randomness from torch's global RNG (seeded by the harness).
9. If a stage raises, the UNet's original weights (and flags) are restored, so a failed run leaves
   the pipeline as it came; the reference writes intermediate models to disk.
10. ``templates="shapes"`` (this file's extension, for the Shapes world whose text encoder only saw
    its caption grammar) replaces the reference's 30 photo/art templates by the world's captions
    with the concept's factor as the slot (``_shapes_templates``); ``reference`` is the default.
11. Not exposed: batch size (1), prior preservation by an ε-loss (``with_prior_preservation``, off in
    every reference config), GPT prompt augmentation (``use_gpt``), the memory-saving cache mode
    (``max_memory``), ``all_words`` CFR (off in every config), ``concept.images_dir``.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from bench import progress
from bench.context import MethodContext, context_or_default
from bench.hparams import ConfigError, Range, check_params, declared
from bench.record import subsample_curves
from bench.sampling import NFECounter, SamplerConfig, decode, generate

# src/cfr_utils.py L260–293 / L298–329: the first ``prompt_len`` = 30 templates of each list are the
# ones random.sample(range(30), 30) can pick.
_OBJECT_TEMPLATES = (
    "{} in a photo", "{} in a snapshot", "A snapshot of {}", "A photograph showcasing {}",
    "An illustration of {}", "A digital rendering of {}", "A visual representation of {}",
    "A graphic of {}", "A shot of {}", "A photo of {}", "A black and white image of {}",
    "A depiction in portrait form of {}", "A scene depicting {} during a public gathering",
    "{} captured in an image", "A depiction created with oil paints capturing {}", "An image of {}",
    "A drawing capturing the essence of {}", "An official photograph featuring {}",
    "A detailed sketch of {}", "{} during sunset/sunrise", "{} in a detailed portrait",
    "An official photo of {}", "Historic photo of {}", "Detailed portrait of {}", "A painting of {}",
    "HD picture of {}", "Magazine cover capturing {}", "Painting-like image of {}",
    "Hand-drawn art of {}", "An oil portrait of {}",
)
_STYLE_TEMPLATES = (
    "An artwork by {}", "Art piece by {}", "A recent creation by {}", "{}'s renowned art",
    "Latest masterpiece by {}", "A stunning image by {}", "An art in {}'s style",
    "Exhibition artwork of {}", "Art display by {}", "a beautiful painting by {}",
    "An image inspired by {}'s style", "A sketch by {}", "Art piece representing {}",
    "A drawing by {}", "Artistry showcasing {}", "An illustration by {}", "A digital art by {}",
    "A visual art by {}", "A reproduction inspired by {}'s colorful, expressive style",
    "Famous painting of {}", "A famous art by {}", "Artistic style of {}", "{}'s famous piece",
    "Abstract work of {}", "{}'s famous drawing", "Art from {}'s early period", "A portrait by {}",
    "An imitation reflecting the style of {}", "An painting from {}'s collection",
    "Vibrant reproduction of artwork by {}",
)
_BETAS = (0.9, 0.999)  # erase_ship.yaml L77–78 (adam_beta1/2)
_EPS = 1e-8  # erase_ship.yaml L81
_SATURATION = 0.25  # channel spread (of 1) above which a Shapes render pixel belongs to the shape
_LOSS_POINTS = 50  # loss values kept per concept in the report's subsampled curve


def unlearn(
    pipe: Any,
    concept: Any,
    *,
    anchor: str | None = None,
    lamb: Annotated[float, Range(ge=0)] = 1e3,
    preserve_scale: Annotated[float, Range(ge=0)] = 0.0,
    preserve: list[str] | None = None,
    augment: bool = True,
    templates: Literal["reference", "shapes"] = "reference",
    num_prompts: Annotated[int, Range(ge=1, le=30)] = 30,
    steps: Annotated[int, Range(ge=1)] = 50,
    lr: Annotated[float, Range(gt=0)] = 1e-5,
    rank: Annotated[int, Range(ge=1)] = 1,
    weight_decay: Annotated[float, Range(ge=0)] = 0.01,
    grad_clip: Annotated[float, Range(ge=0)] = 1.0,
    use_pooler: bool = True,
    importance_sampling: bool = True,
    use_mask: bool = True,
    num_images: Annotated[int, Range(ge=1)] = 8,
    image_steps: Annotated[int, Range(ge=1)] = 30,
    image_guidance: Annotated[float, Range(ge=0)] = 7.5,
    ctx: MethodContext | None = None,
) -> dict[str, Any]:
    """Erase ``concept.targets`` from ``pipe.unet`` in place: CFR, one LoRA per concept, fusion.

    ``anchor``: the mapping concept (``None`` = ``concept.anchor``). ``lamb`` = λ of both closed
    forms, ``preserve_scale`` = s_p over ``preserve`` (``None`` = ``concept.retain_prompts``).
    ``augment``/``num_prompts``: the reference's templates (off: "A photo of {}" only);
    ``templates="shapes"`` draws them from the Shapes caption grammar instead. ``steps``,
    ``lr``, ``rank``, ``weight_decay``, ``grad_clip``: each concept's LoRA training. ``num_images``,
    ``image_steps``, ``image_guidance``: the concept images generated where the world has no renderer.
    """
    hp = {k: v for k, v in locals().items() if k in declared(unlearn)}
    check_params(unlearn, hp)
    if lamb == 0 and preserve_scale == 0:
        raise ConfigError("`method.params.lamb` must be > 0 when `preserve_scale` is 0 (the closed forms would be singular), got 0")
    words = concept.words_to_erase()
    anchor = concept.anchor if anchor is None else anchor
    if anchor.strip().lower() in {w.lower() for w in words}:
        raise ConfigError(f"`method.params.anchor` must differ from the concepts being erased, got {anchor!r}")
    kept = list(concept.retain_prompts if preserve is None else preserve) if preserve_scale > 0 else []
    unet = pipe.unet
    layers = _cross_attention(unet)
    if not layers:
        raise ValueError("MACE edits cross-attention `attn2.to_k`/`attn2.to_v`, and this UNet has none")
    show = context_or_default(ctx).progress
    linears = [(f"{name}.{proj}", getattr(attn, proj)) for name, attn in layers for proj in ("to_k", "to_v")]

    t0 = time.perf_counter()
    chosen = [_templates(concept.kind, augment, num_prompts, templates) for _ in words]
    data, nfe_images, mask_kind = _concept_images(pipe, concept, words, num_images, image_steps, image_guidance, use_mask)
    t1 = time.perf_counter()

    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    originals = {name: lin.weight.detach().clone() for name, lin in linears}
    was_training = unet.training
    losses: dict[str, list[float]] = {}
    try:
        unet.requires_grad_(False)
        # Stage 1: closed-form refinement of the co-existing words (cfr_lora_training.py L259–322).
        prompts = [[t.format(w) for t in ts] for w, ts in zip(words, chosen, strict=True)]
        anchors = [[t.format(anchor) for t in ts] for ts in chosen]
        with torch.no_grad():
            k_old, k_new = _cfr_keys(pipe, prompts, anchors)
            g_keep = _gram(_all_tokens(pipe, kept)) if kept else None
            cfr = _refine(linears, k_old, k_new, lamb, preserve_scale, g_keep)
        t2 = time.perf_counter()

        # Stage 2: one LoRA per concept on the refined model (L326–598).
        deltas = []
        unet.train()  # L463 (SD's UNet has no dropout: numerically a no-op)
        for j, word in enumerate(words):
            delta, losses[word] = _train_lora(
                pipe, linears, layers, word, prompts[j], data[j], steps, lr, rank, weight_decay, grad_clip,
                use_pooler, importance_sampling, show,
            )
            deltas.append(delta)
        unet.train(was_training)
        t3 = time.perf_counter()

        # Stage 3: closed-form fusion of the LoRAs into the refined weights (fuse_lora_close_form.py).
        with torch.no_grad():
            grams = [_gram(_all_tokens(pipe, p)) for p in prompts]
            _fuse(linears, originals, deltas, grams, lamb, preserve_scale, g_keep)
        t4 = time.perf_counter()
    except BaseException:
        with torch.no_grad():  # a failed run leaves the UNet as it came (deviation 9)
            for name, lin in linears:
                lin.weight.copy_(originals[name])
        raise
    finally:
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        unet.train(was_training)

    history = [v for w in words for v in losses[w]]
    nfe_train = steps * len(words)
    return {
        "steps": steps,
        "nfe": nfe_train + nfe_images,
        "nfe_train": nfe_train,
        "nfe_images": nfe_images,
        "trained_parameters": sorted(f"{name}.weight" for name, _ in linears),
        "loss_history": history,
        "loss_subsampled": {w: subsample_curves({"loss": losses[w]}, _LOSS_POINTS) for w in words},
        "variant": "mace",
        "words": list(words),
        "anchor": anchor,
        "masks": mask_kind,
        "num_images": num_images,
        "prompts": prompts,
        "anchor_prompts": anchors,
        "preserve": kept,
        "n_cfr_keys": int(k_old.shape[0]),
        "cfr_objective_before": cfr["before"],
        "cfr_objective_after": cfr["after"],
        "lora_delta_norm": {w: float(sum(d.norm() ** 2 for d in delta.values()) ** 0.5) for w, delta in zip(words, deltas, strict=True)},
        "lamb": float(lamb),
        "preserve_scale": float(preserve_scale),
        "images_seconds": t1 - t0,
        "cfr_seconds": t2 - t1,
        "train_seconds": t3 - t2,
        "fuse_seconds": t4 - t3,
    }


# ----------------------------------------------------------------------------- text and keys
def _templates(kind: str, augment: bool, n: int, family: str) -> list[str]:
    """``n`` of the family's templates, in random order (dataset.py L145–147)."""
    if not augment:
        return ["A photo of {}"]  # cfr_utils.py L333–336
    if family == "shapes":
        pool = _shapes_templates(kind)
    else:
        pool = _STYLE_TEMPLATES if kind == "style" else _OBJECT_TEMPLATES
    return [pool[i] for i in torch.randperm(len(pool))[:n].tolist()]


def _shapes_templates(kind: str) -> list[str]:
    """Shapes caption grammar (bench/world/captions.py) with the concept's factor as the slot and the
    other factors' canonical words around it: shape concepts "a {}", "a red {} on a striped background";
    colours "a {} star"; textures (``style``) "a star on a {} background"."""
    from bench.world.captions import COLOUR_WORDS, SHAPE_WORDS, TEXTURE_WORDS

    colours = [w[0] for w in COLOUR_WORDS.values()]
    textures = [w[0] for w in TEXTURE_WORDS.values()]
    shapes = [w[0] for w in SHAPE_WORDS.values()] + ["shape"]
    if kind == "style":
        return [f"a {s} on a {{}} background" for s in shapes] + [f"a {c} {s} on a {{}} background" for c in colours for s in shapes]
    if kind == "attribute":
        return [f"a {{}} {s}" for s in shapes] + [f"a {{}} {s} on a {t} background" for s in shapes for t in textures]
    return (["a {}"] + [f"a {c} {{}}" for c in colours] + [f"a {{}} on a {t} background" for t in textures]
            + [f"a {c} {{}} on a {t} background" for c in colours for t in textures])


def _tokenize(pipe: Any, texts: list[str]):
    tok = pipe.tokenizer
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")


def _hidden(pipe: Any, texts: list[str]) -> torch.Tensor:
    """Text-encoder output hidden states (n, L, d): what SD feeds to cross-attention."""
    ids = _tokenize(pipe, texts).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0].float()


def _all_tokens(pipe: Any, texts: list[str]) -> torch.Tensor:
    """Every token's hidden state of ``texts`` as keys (M, d) (``all_words=True``, cfr_utils L128–145)."""
    h = _hidden(pipe, texts)
    return h.reshape(-1, h.shape[-1])


def _matching(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """Aligned positions of ``old``/``new`` outside the part where they differ (cfr_utils L10–30, L100–112):
    the common prefix, the common suffix, then the padding, aligned at the end and cut to equal length."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    a, b = len(old) - 1, len(new) - 1
    while a >= start and b >= start and old[a] == new[b]:
        a, b = a - 1, b - 1
    i_old = list(range(start)) + list(range(a + 1, len(old)))
    i_new = list(range(start)) + list(range(b + 1, len(new)))
    tail = length - 1 - max(len(old) - 1, len(new) - 1)
    i_old += range(len(old), len(old) + tail)
    i_new += range(len(new), len(new) + tail)
    return i_old, i_new


def _cfr_keys(pipe: Any, prompts: list[list[str]], anchors: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys k_j (concept prompts' co-existing tokens) and the anchor prompts' matching states k'_j."""
    tok, length = pipe.tokenizer, pipe.tokenizer.model_max_length
    olds, news = [], []
    for p_old, p_new in zip(prompts, anchors, strict=True):
        h_old, h_new = _hidden(pipe, p_old), _hidden(pipe, p_new)
        for i, (a, b) in enumerate(zip(p_old, p_new, strict=True)):
            ids_a = tok(a, truncation=True, max_length=length).input_ids
            ids_b = tok(b, truncation=True, max_length=length).input_ids
            i_old, i_new = _matching(ids_a, ids_b, length)
            olds.append(h_old[i, i_old])
            news.append(h_new[i, i_new])
    return torch.cat(olds).cpu(), torch.cat(news).cpu()


def _gram(keys: torch.Tensor) -> torch.Tensor:
    k = keys.double().cpu()
    return k.T @ k


# ----------------------------------------------------------------------------- closed forms
def _cross_attention(unet) -> list[tuple[str, torch.nn.Module]]:
    """Every cross-attention module (``get_ca_layers``, cfr_utils L33–56)."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith(".attn2") and isinstance(getattr(m, "to_k", None), torch.nn.Linear)]


def _refine(linears, k_old: torch.Tensor, k_new: torch.Tensor, lamb: float, s_p: float, g_keep) -> dict[str, float]:
    """Stage 1 in place: W = W_old (λI + K'ᵀK + s_p G_P)(λI + KᵀK + s_p G_P)⁻¹ for every matrix.

    Σ_j v_j k_jᵀ = W_old Σ_j k'_j k_jᵀ, so both factors are text-space matrices shared by all layers."""
    ko, kn = k_old.double(), k_new.double()
    eye = torch.eye(ko.shape[1], dtype=torch.float64)
    keep = s_p * g_keep if g_keep is not None else 0.0
    rhs_right = lamb * eye + kn.T @ ko + keep
    gram = lamb * eye + ko.T @ ko + keep
    before = after = 0.0
    for _, lin in linears:
        w_old = lin.weight.detach().double().cpu()
        w = torch.linalg.solve(gram, w_old @ rhs_right, left=False)  # W·gram = rhs
        target = kn @ w_old.T
        before += float((ko @ w_old.T - target).square().sum())
        after += float((ko @ w.T - target).square().sum())
        lin.weight.copy_(w.to(lin.weight.device, lin.weight.dtype))
    return {"before": before, "after": after}


def _fuse(linears, originals, deltas, grams, lamb: float, s_p: float, g_keep) -> None:
    """Stage 3 in place: W = (λW_cfr + Σ_i (W_cfr + Δ_i) G_i + s_p W_old G_P)(λI + Σ_i G_i + s_p G_P)⁻¹."""
    eye = torch.eye(grams[0].shape[0], dtype=torch.float64)
    total = lamb * eye + sum(grams)
    if g_keep is not None:
        total = total + s_p * g_keep
    for name, lin in linears:
        w_cfr = lin.weight.detach().double().cpu()
        rhs = lamb * w_cfr + sum((w_cfr + d[name].double().cpu()) @ g for d, g in zip(deltas, grams, strict=True))
        if g_keep is not None:
            rhs = rhs + s_p * originals[name].double().cpu() @ g_keep
        lin.weight.copy_(torch.linalg.solve(total, rhs, left=False).to(lin.weight.device, lin.weight.dtype))


# ----------------------------------------------------------------------------- images and masks
def _concept_images(pipe, concept, words, n: int, steps: int, guidance: float, use_mask: bool):
    """Per target: (pixels in [−1, 1] (n,3,H,W), masks (n,1,H,W) or None); UNet rows spent; mask kind."""
    size = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
    data, nfe = [], 0
    masked = use_mask and concept.kind != "style" and concept.render is not None
    for j, word in enumerate(words):
        if concept.render is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
            if len(words) == 1:
                images = np.asarray(concept.render(n, seed))
            else:
                images = np.asarray(concept.render(n, seed, target=_render_index(concept, words, j)))
        else:  # inference.py L27–38: the original model's images of the concept
            template = "a photo in the style of {}" if concept.kind == "style" else "a photo of the {}"
            seeds = torch.randint(0, 2**31 - 1, (n,)).tolist()
            counter = NFECounter()
            latents = generate(pipe, pipe.unet, template.format(word), seeds, SamplerConfig(steps, guidance, batch_size=n), counter)
            images = decode(pipe, latents)
            nfe += counter.total
        if images.shape[1:3] != (size, size):
            raise ValueError(f"MACE: concept images are {images.shape[1]}×{images.shape[2]}, the model makes {size}×{size}")
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = torch.from_numpy(_saturated(images)).float()[:, None] if masked else None
        data.append((pixels, masks))
    return data, nfe, "render-saturation" if masked else "none"


def _render_index(concept, words, j: int) -> int:
    """Which of a several-concept preset's renders shows target j: the ``detect`` value equal to the
    word, else the j-th ``detect`` entry when there is one per target."""
    detect = concept.detect if isinstance(concept.detect, (list, tuple)) else [concept.detect]
    values = [str(d.get("value", "")).lower() for d in detect]
    if words[j].lower() in values:
        return values.index(words[j].lower())
    if len(values) == len(words):
        return j
    raise ValueError(f"MACE: cannot tell which render shows target {words[j]!r} of {concept.name!r} (detect values {values})")


def _saturated(images: np.ndarray) -> np.ndarray:
    """The Shapes renders' concept region: coloured pixels on the grey background (deviation 1)."""
    rgb = images.astype(np.float32) / 255.0
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > _SATURATION


# ----------------------------------------------------------------------------- LoRA training
def _importance(t: torch.Tensor) -> torch.Tensor:
    """f(t) = σ(0.05(t − 200)) − σ(0.05(t − 400)) (cfr_utils.py L207–209)."""
    return torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))


def _concept_positions(pipe, prompts: list[str], word: str, use_pooler: bool) -> torch.Tensor:
    """(n, L) bool: the word's tokens in each prompt, plus every EOS with ``use_pooler`` (dataset.py L227–243)."""
    tok = pipe.tokenizer
    ids = _tokenize(pipe, prompts).input_ids
    word_ids = torch.tensor(tok(word, add_special_tokens=False).input_ids)
    pos = torch.zeros_like(ids, dtype=torch.bool)
    k = len(word_ids)
    for r in range(ids.shape[0]):
        for i in range(ids.shape[1] - k + 1):
            if k and torch.equal(ids[r, i : i + k], word_ids):
                pos[r, i : i + k] = True
    if use_pooler:
        pos |= ids == tok.eos_token_id
    return pos


def _attention_loss(records: dict, layers, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_layers ‖A[heads, pixels in mask, concept positions]‖_F of the first batch element (L212–249)."""
    total = 0.0
    for name, attn in layers:
        q, k = records[name]
        b, n, _ = q.shape
        h = attn.heads
        qh = q[:1].view(1, n, h, -1).transpose(1, 2)
        kh = k[:1].view(1, k.shape[1], h, -1).transpose(1, 2)
        probs = ((qh @ kh.transpose(-1, -2)) * attn.scale).softmax(-1)[0]  # (heads, pixels, tokens)
        if mask is not None:
            d = int(round(n**0.5))
            keep = F.interpolate(mask, size=(d, d), mode="nearest").view(-1) > 0.5
            probs = probs[:, keep.to(probs.device)]
        total = total + probs[..., positions.to(probs.device)].norm()
    return total


def _train_lora(pipe, linears, layers, word, prompts, data, steps, lr, rank, weight_decay, grad_clip,
                use_pooler, importance_sampling, show):
    """One concept's LoRA on the refined model; returns ({matrix: Δ = up·down}, losses)."""
    from diffusers import DDPMScheduler

    unet, vae = pipe.unet, pipe.vae
    device = unet.device
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    T = sched.config.num_train_timesteps
    t_prob = _importance(torch.arange(T, dtype=torch.float64)) if importance_sampling else torch.ones(T, dtype=torch.float64)
    pixels, masks = data
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        emb = _hidden(pipe, prompts).to(device)
    positions = _concept_positions(pipe, prompts, word, use_pooler)

    lora = {}
    for name, lin in linears:  # diffusers LoRALinearLayer: down ~ N(0, 1/r²), up = 0
        down = (torch.randn(rank, lin.in_features) / rank).to(device).requires_grad_(True)
        up = torch.zeros(lin.out_features, rank, device=device, requires_grad=True)
        lora[name] = (down, up)
    params = [p for pair in lora.values() for p in pair]
    records: dict[str, list] = {name: [None, None] for name, _ in layers}
    handles = []
    for name, attn in layers:
        handles.append(attn.to_q.register_forward_hook(_capture(records[name], 0)))
        handles.append(attn.to_k.register_forward_hook(_lora_hook(*lora[f"{name}.to_k"], records[name], 1)))
        handles.append(attn.to_v.register_forward_hook(_lora_hook(*lora[f"{name}.to_v"], None, None)))
    opt = torch.optim.AdamW(params, lr=lr, betas=_BETAS, eps=_EPS, weight_decay=weight_decay)
    losses: list[float] = []
    order: list[int] = []
    try:
        with progress.bar(steps, f"MACE LoRA ({word})", unit="it", enabled=show) as pbar:
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(pixels)).tolist()
                i = order.pop(0)
                p = int(torch.randint(len(prompts), (1,)))
                latents = (mean[i : i + 1] + std[i : i + 1] * torch.randn(mean[i : i + 1].shape).to(device)) * vae.config.scaling_factor
                t = torch.multinomial(t_prob, 1).to(device)
                noise = torch.randn(latents.shape).to(device)
                x_t = sched.add_noise(latents, noise, t)
                unet(x_t, t, encoder_hidden_states=emb[p : p + 1])
                loss = _attention_loss(records, layers, positions[p], None if masks is None else masks[i : i + 1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                losses.append(loss.item())
                pbar.update(1)
                pbar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:
        for hnd in handles:
            hnd.remove()
    return {name: (up @ down).detach() for name, (down, up) in lora.items()}, losses


def _capture(slot: list, index: int):
    def hook(_module, _args, out):
        slot[index] = out

    return hook


def _lora_hook(down: torch.Tensor, up: torch.Tensor, slot: list | None, index: int | None):
    def hook(_module, args, out):
        out = out + F.linear(F.linear(args[0], down), up)
        if slot is not None:
            slot[index] = out
        return out

    return hook


