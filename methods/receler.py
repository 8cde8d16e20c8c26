"""Receler — Reliable Concept Erasing via Lightweight Erasers (Huang, Chang, Tsai, Lai, Yang, Wang; ECCV 2024,
arXiv 2311.17717).

A small nonlinear adapter, the *eraser*, sits after every cross-attention of the UNet and adds its output to
the attention output o of that layer:

    E(o) = W_up · GELU(W_down · o + b_down) + b_up          (rank r = dim of W_down's output; W_up, b_up start at 0)
    o    ← o + E(o)

Only the erasers train; the UNet θ with the erasers off is the frozen teacher. Per iteration, with c the concept
word, ∅ the empty prompt, x_t sampled by the eraser-equipped model θ' and t its timestep:

    target  = ε_θ(x_t, ∅, t) − η · [ε_θ(x_t, c, t) − ε_θ(x_t, ∅, t)]                    (ESD's negative guidance)
    L_adv   = ‖ε_θ'(x_t, c ⊕ P, t) − ε_θ(x_t, c, t)‖²       (P: learned prompt vectors after the word; the attack
                                                            minimises it: it makes θ' regenerate the concept)
    M       = 1[ minmax( mean over the concept tokens, heads and the s×s cross-attention layers of θ's
                 attention maps for c ) ≥ τ ],  nearest-resized to every layer       (concept mask)
    L_reg   = mean over layers l of  Σ_p (1 − M_p) · mean_d E^l(o^l)²_{p,d} / Σ_p (1 − M_p)
                                                            (the eraser's output should vanish outside the concept)
    L       = ‖ε_θ'(x_t, c ⊕ P, t) − target‖² + α · L_reg                              (MSE, mean reduction)

Each iteration takes ``adv_iters`` Adam steps on P (the same P per word across iterations, as the reference keeps
one per word); the eraser takes one Adam step on L, computed from the forward of the last attack step.

Reference implementation: github.com/jasper0314-huang/Receler at commit 3ccedc9
(3ccedc9aa1c2a2644258edf67e564a07447019c0, main, 2 Mar 2025; the code is unchanged since the initial commit
00ba63e). Line numbers are of that commit. Written from the reference; no code copied.
- Eraser ``receler/erasers/utils.py`` L97–105: ``AdapterEraser`` = Linear(dim, rank) with bias, GELU, Linear(rank,
  dim) with bias zeroed by ``zero_module`` (L74–80, L102); ``DisableEraser`` (L51–71) switches every eraser off
  for the frozen predictions.
- Placement ``receler/erasers/ldm_erasers.py`` L16–24, L42–57: one eraser per ``BasicTransformerBlock``,
  x ← E(attn2(norm2(x))) + attn2(norm2(x)) + x; at inference ``receler/erasers/diffusers_erasers.py`` L17–40 wraps
  each diffusers ``attn2`` as adapter(out) + out — what ``EraserProcessor`` below is.
- Checkpoint ``receler/erasers/utils.py`` L10–48: ``eraser_weights.pt`` maps the diffusers transformer prefix
  (``down_blocks.1.attentions.0``, ``mid_block.attentions.0``, …) to the eraser's state dict (down/up weight/bias);
  ``eraser_config.json`` = {"eraser_type": "adapter", "eraser_rank": r}.
- Training loop ``train_receler.py`` L27–227: eraser Adam (L71); per word a prompt P ~ U[0, 1)^(16 × 768) and its
  own Adam(lr 0.1, weight_decay 0.1) (L103–107); a word drawn per iteration (L114); the word's token positions
  1..n and the attack positions n+1..n+16 right after it (L121–123); ESD's timestep draw (L125–130); x_t sampled by
  the eraser model with CFG 3 on c (L132–136, DDIM ``receler/ldm/models/diffusion/ddim.py`` L135–196, ESD's
  sampler); ε_θ(∅), ε_θ(c) with the erasers off and the attention maps of the c forward captured (L138–141); mask
  (L143); ``advrs_iters`` attack steps (L145–161); on the last one the eraser step on L_erase + α·L_reg (L164–191).
- Mask ``receler/concept_reg.py`` L11–45: maps averaged over the word's tokens and the heads (L21), only 16×16 maps
  "following MasaCtrl" (L24), averaged, min–max normalised per image (L29–32), thresholded (L33–34), nearest-resized
  to every layer (L36–44); maps from ``attn2`` of the transformer blocks (L48–67; the CompVis ``CrossAttention``
  returns its softmax, ``receler/ldm/modules/attention.py`` L173–198); eraser outputs captured by hooks (L70–90);
  L_reg per layer (train_receler.py L173–186).
- Defaults, the argparse of train_receler.py L236–261 (what ``python train_receler.py --concept X``, the README's
  command, runs on SD v1.4): iterations 500, lr 3e-4, concept_reg_weight 0.1, mask_thres 0.1, advrs_iters 50,
  num_advrs_prompts 16, start_guidance 3, negative_guidance 1, eraser_rank 128, image_size 512, ddim_steps 50.
  The function's own ``iterations=1000`` (L31) is always overridden by the argparse value.
- The paper's sections "Lightweight Eraser", "Concept-Localized Regularization" and "Adversarial Prompt Learning"
  state the equations above (erasing objective, masked regulariser, attack prompt concatenated to c).

Deployment and the delta format (``deploy``). The eraser is nonlinear (GELU between two biased projections), so
no exact merge into the UNet's existing tensors exists. Two deployments:
- ``adapter`` (default, the method as published): every ``attn2`` keeps an ``EraserProcessor`` — a diffusers
  attention processor (an ``nn.Module``, so its weights are UNet state-dict entries, like diffusers' IP-Adapter
  processors) that runs the original processor and adds E(o). The harness's delta then holds only new tensors,
  ``<block>.attn2.processor.eraser.{down,up}.{weight,bias}``, and no existing tensor changes. Loading such a delta
  needs ``attach_erasers(unet, tensors)`` before the state dict is loaded (see that function).
- ``linearised`` (CHANGES THE METHOD): after training, each eraser is replaced by its least-squares affine fit
  E(o) ≈ A·o + b on attention outputs of the trained model (``_FIT_LATENTS`` sampled latents × the prompts ∅, the
  words, the words ⊕ P and ``concept.anchor_prompts``), folded exactly into the layer's output projection:
  W_out ← (I + A)·W_out, b_out ← (I + A)·b_out + b. The delta is then 2 tensors per cross-attention in the stock
  format. The fit's relative error is reported (``linearisation``); what the GELU gating did selectively
  (respond to concept features, stay near zero elsewhere) an affine map can only do on average.
The unmerged, nonlinear erasers are saved under ``<cache_dir>/receler_erasers/`` in either case, in the
reference's checkpoint layout (safetensors instead of a pickle).

NFE: every UNet forward row counts — the sampler's 2 rows per CFG step (1 at guidance 0 or 1), 2 frozen rows
(ε_θ(∅), ε_θ(c)) and max(1, ``adv_iters``) eraser-model rows per iteration, each of those with a backward pass;
``linearised`` adds the fit's sampling and one forward of all fit prompts per latent. With the SD defaults that is
on average ≈ 50 + 2 + 50 = 102 rows per iteration, 50 of them with a backward.

Deliberate deviations from 3ccedc9 (every one):
1. The attack prompt reaches the UNet. Reference L149, ``emb_n[:, advrs_indices, :].data = P.data``, indexes with a
   tensor, so it writes into a temporary copy and ``emb_n`` stays the plain concept embedding: the released code
   computes the attack gradient at positions of ε_θ'(c) that P never enters, P never changes a forward, and the
   eraser trains on plain c (the 49 earlier inner forwards/backwards change nothing). Here c ⊕ P is fed, as the
   paper describes. ``adv_iters: 0`` gives what the released code computes (ESD + L_reg on plain c) with one
   eraser forward per iteration; in the reference ``advrs_iters 0`` would train nothing (the eraser step sits
   inside the attack loop).
2. ``deploy`` (above): ``adapter`` needs the harness to rebuild the processors from the delta; ``linearised``
   approximates the eraser and so is a different, weaker method.
3. ``timestep_rule="aligned"`` (default, as methods/esd.py, deviation 1 there) pairs x_t with a t in the DDIM bin of
   its real noise level; ``"compvis"`` reproduces the reference's ESD sampler pairing (ddim.py L135–196 drops the
   noisiest grid step and stops ~2 DDIM steps early; train_receler.py L126–130).
4. The sampler is diffusers' ``DDIMScheduler`` from the pipeline's config with η = 0 (``bench.sampling.ddim_sampler``);
   on SD v1.x its 50-step grid is CompVis' (methods/esd.py, deviation 2).
5. ``mask_resolution`` makes the reference's constant 16 (16×16 maps, concept_reg.py L24) a hyperparameter: the
   sizes are model-relative (SD v1.x latents 64: cross-attentions at 64, 32, 16, 8; the Shapes UNet has them all at
   8). A constant attention map (max = min) gives an empty mask instead of the reference's NaN.
6. Resolution is the UNet's ``sample_size`` (64 latents = the reference's 512 px on SD v1.x).
7. Randomness comes from torch's global CPU RNG (seeded by the harness) for the word (reference: Python ``random``),
   P's initialisation (reference: on the CUDA device), the latents and t, so a seed fixes the result on any device.
8. fp32, UNet in eval mode (the reference's ``model.train()`` changes nothing: SD's UNet has no dropout).
9. The ε_θ(∅), ε_θ(c) predictions are one batched forward; the attention maps are recomputed from q and k inside
   that forward (diffusers' fused attention does not return them): same numbers up to float round-off.
10. Not exposed: ``start_advrs_train`` (parsed, never read by the reference), visualisation and checkpoint
   intervals, the ``i2p`` word list (a concept config's ``target`` lists words instead), ``--seperator`` (a
   comma-separated ``concept.target`` is the same: one word per iteration, one P per word).
The attack positions must fit in the text context: 1 + (the word's tokens) + ``num_adv_prompts`` ≤ context length
(77 on SD; 16 on the Shapes world), otherwise a ConfigError names ``num_adv_prompts``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench import progress
from bench.context import MethodContext, context_or_default
from bench.hparams import ConfigError, Range, check_params, declared
from bench.record import subsample_curves
from bench.sampling import UNetRows, ddim_cfg_sample, ddim_sampler, embed_prompts

Deploy = Literal["adapter", "linearised"]

_FORMAT = "concealbench-receler-1"
# Delta / state-dict keys of a deployed eraser: ``<attn2 path>.processor.eraser.{down,up}.{weight,bias}``.
ERASER_KEY = re.compile(r"^(?P<attn>.+)\.processor\.eraser\.(?P<part>down|up)\.(?P<kind>weight|bias)$")
_LOSS_POINTS = 50  # points kept in the report's subsampled loss curves (the record drops loss_history)
_FIT_LATENTS = 8  # ``linearised``: sampled latents the affine fit sees (× every fit prompt, × every token)
_FIT_ROWS = 16384  # ``linearised``: at most this many attention-output rows per layer (≥ 12·(d + 1) on SD's d ≤ 1280)
_MASK_EPS = 1e-9  # train_receler.py L184: Σ(1 − M) + 1e-9


def unlearn(
    pipe: Any,
    concept: Any,
    *,
    iterations: Annotated[int, Range(ge=1)] = 500,
    lr: Annotated[float, Range(gt=0)] = 3e-4,
    eraser_rank: Annotated[int, Range(ge=1)] = 128,
    negative_guidance: Annotated[float, Range(ge=0)] = 1.0,
    start_guidance: Annotated[float, Range(ge=0)] = 3.0,
    ddim_steps: Annotated[int, Range(ge=2)] = 50,
    concept_reg_weight: Annotated[float, Range(ge=0)] = 0.1,
    mask_threshold: Annotated[float, Range(ge=0, le=1)] = 0.1,
    mask_resolution: Annotated[int, Range(ge=1)] = 16,
    adv_iters: Annotated[int, Range(ge=0)] = 50,
    num_adv_prompts: Annotated[int, Range(ge=1)] = 16,
    adv_lr: Annotated[float, Range(gt=0)] = 0.1,
    adv_weight_decay: Annotated[float, Range(ge=0)] = 0.1,
    timestep_rule: Literal["aligned", "compvis"] = "aligned",
    deploy: Deploy = "adapter",
    ctx: MethodContext | None = None,
) -> dict[str, Any]:
    """Train Receler's erasers on ``pipe.unet`` (train_receler.py L109–193, 3ccedc9) and deploy them in place
    (``adapter``: as attention processors; ``linearised``: folded into ``attn2.to_out.0``); save them in the cache.

    ``negative_guidance`` is η, ``concept_reg_weight`` α, ``mask_threshold`` τ, ``mask_resolution`` the side of the
    attention maps the mask is built from, ``adv_iters`` the attack steps per iteration (0: no attack),
    ``num_adv_prompts`` the length of P, ``start_guidance``/``ddim_steps`` the x_t sampler (module docstring).
    """
    hp = {k: v for k, v in locals().items() if k in declared(unlearn)}
    check_params(unlearn, hp)
    words = concept.words_to_erase()
    unet = pipe.unet
    sched = ddim_sampler(pipe.scheduler, ddim_steps)
    context = context_or_default(ctx)
    device = unet.device
    emb = embed_prompts(pipe, ["", *words])
    e_null, e_words = emb[:1], emb[1:]
    spans = [_token_span(pipe.tokenizer, w, emb.shape[1], num_adv_prompts if adv_iters else 0) for w in words]
    size, channels = unet.config.sample_size, unet.config.in_channels

    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    was_training = unet.training
    history: dict[str, list[float]] = {"total": [], "erase": [], "reg": []} | ({"adv": []} if adv_iters else {})
    coverage: list[float] = []
    nfe_sampling, fit, erasers = 0, None, None
    try:
        unet.requires_grad_(False)  # L66–67: only the erasers learn (installed after this, so they stay trainable)
        erasers = _Erasers(unet, eraser_rank)
        opt = torch.optim.Adam(erasers.parameters(), lr=lr)  # L71
        prompts = [torch.rand((1, num_adv_prompts, emb.shape[2])).to(device, emb.dtype).requires_grad_(True)
                   for _ in words] if adv_iters else []  # L104: P ~ U[0, 1), one per word
        adv_opts = [torch.optim.Adam([p], lr=adv_lr, weight_decay=adv_weight_decay) for p in prompts]  # L106
        with UNetRows(unet) as rows, progress.bar(iterations, "Receler", unit="it", enabled=context.progress) as pbar:
            for _ in range(iterations):
                i = int(torch.randint(len(words), (1,)))  # L114
                c = e_words[i : i + 1]
                run, t_lo, t_hi = _plan(sched, int(torch.randint(ddim_steps, (1,))), timestep_rule)  # L126–130
                z = torch.randn((1, channels, size, size)).to(device)
                t = torch.randint(t_lo, t_hi, (1,)).to(device)
                with torch.no_grad():
                    z_t, n = ddim_cfg_sample(unet, sched, z, run, c, e_null, start_guidance)  # θ' samples (L136)
                    nfe_sampling += n
                    with erasers.off(), erasers.capture() as maps:  # θ's ε(∅), ε(c) and c's maps (L138–141)
                        e_0, e_p = unet(z_t.expand(2, -1, -1, -1), t, encoder_hidden_states=torch.cat([e_null, c])).sample.chunk(2)
                masks = _concept_mask({k: v[1] for k, v in maps.items()}, spans[i][0], mask_threshold, mask_resolution)
                target = e_0 - negative_guidance * (e_p - e_0)  # L168
                if adv_iters:
                    for k in range(adv_iters):  # L145–161; the eraser step uses the last attack forward (L164)
                        e_n, adv = _attack_step(unet, z_t, t, c, prompts[i], adv_opts[i], spans[i][1], e_p, keep_graph=k == adv_iters - 1)
                    history["adv"].append(adv.item())
                else:  # what the released code computes (deviation 1)
                    e_n = unet(z_t, t, encoder_hidden_states=c).sample
                erase = F.mse_loss(e_n, target)
                reg = _localisation_loss(erasers.outputs(), masks)
                loss = erase + concept_reg_weight * reg  # L165–186
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=erasers.parameters())
                opt.step()
                for key, v in (("total", loss), ("erase", erase), ("reg", reg)):
                    history[key].append(v.item())
                coverage.append(float(torch.stack([m.mean() for m in masks.values()]).mean()))
                pbar.update(1)
                pbar.set_postfix(loss=f"{history['total'][-1]:.4g}")
            erasers.clear()
            if deploy == "linearised":
                fit, n = _fit_affine(pipe, unet, erasers, sched, concept, e_words, e_null, prompts, spans, start_guidance, timestep_rule)
                nfe_sampling += n
        nfe = rows.count
    except BaseException:  # a failed run leaves the UNet as it came: original processors, flags, mode
        if erasers is not None:
            erasers.remove()
        raise
    finally:  # the UNet's own tensors get their flags back; the erasers end frozen (clear) or removed
        for n_, p in unet.named_parameters():
            p.requires_grad_(flags.get(n_, False))
            p.grad = None
        unet.train(was_training)
    saved = _save_erasers(erasers, context.cache("receler_erasers"), eraser_rank, {
        "words": list(words), "deploy": deploy, "params": hp,
    })
    if deploy == "linearised":
        erasers.remove()
        changed = _merge_affine(unet, fit)
    else:
        changed = erasers.deployed_names()
    return {
        "steps": iterations,
        "nfe": nfe,
        "nfe_sampling": nfe_sampling,
        "trained_parameters": changed,
        "trained_elements": sum(p.numel() for p in erasers.parameters()),
        "loss_history": history["total"],
        "loss_subsampled": subsample_curves(history, _LOSS_POINTS),
        "mask_coverage": sum(coverage) / len(coverage),
        "variant": f"receler-{deploy}",
        "deploy": deploy,
        "words": list(words),
        "timestep_rule": timestep_rule,
        "eraser_path": str(saved),
        "eraser": erasers.summary(),
        "linearisation": None if fit is None else {
            "relative_error_mean": sum(f["relative_error"] for f in fit.values()) / len(fit),
            "relative_error_max": max(f["relative_error"] for f in fit.values()),
            "samples_per_layer": min(f["samples"] for f in fit.values()),
        },
        "latent_size": size,
        "resolution": size * getattr(pipe, "vae_scale_factor", 8),
    }


# ----------------------------------------------------------------------------- the eraser
class _Eraser(torch.nn.Module):
    """E(o) = up(GELU(down(o))), ``up`` zero-initialised (utils.py L97–105): E ≡ 0 before training."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank)
        self.act = torch.nn.GELU()
        self.up = torch.nn.Linear(rank, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(o)))


class EraserProcessor(torch.nn.Module):
    """A diffusers attention processor for one ``attn2``: the original processor's output o, plus E(o)
    (diffusers_erasers.py L27–40). Its ``eraser`` weights are UNet state-dict entries
    ``<attn2>.processor.eraser.{down,up}.{weight,bias}``.

    Training switches: ``enabled`` (False = the frozen θ, DisableEraser), ``capture`` (store the head-averaged
    attention probabilities in ``maps``), ``record`` (keep E(o) in ``out``), ``collect`` (a list receiving o).
    """

    def __init__(self, base: Any, dim: int, rank: int):
        super().__init__()
        self.base = base
        self.eraser = _Eraser(dim, rank)
        self.enabled, self.capture, self.record = True, False, False
        self.maps: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.collect: list[torch.Tensor] | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.capture:
            self.maps = _attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask)
        o = self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs)
        if not self.enabled:
            return o
        if self.collect is not None:
            self.collect.append(o.detach().flatten(0, -2))
        e = self.eraser(o)
        if self.record:
            self.out = e
        return o + e


def attach_erasers(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Give every ``attn2`` named by eraser keys in ``tensors`` (``ERASER_KEY``) an ``EraserProcessor`` of the
    rank and width those tensors have, wrapping the processor it has now; returns the attention modules' names.

    What a harness calls before ``unet.load_state_dict(tensors, strict=False)`` to load a Receler delta made with
    ``deploy="adapter"`` (the new modules hold zeros until the state dict fills them)."""
    found: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = ERASER_KEY.match(key)
        if m and m["part"] == "down" and m["kind"] == "weight":
            found[m["attn"]] = value
    for name, down in sorted(found.items()):
        attn = unet.get_submodule(name)
        w, width = attn.to_out[0].weight, attn.to_out[0].out_features
        if down.dim() != 2 or down.shape[1] != width:
            raise ValueError(f"eraser `{name}.processor.eraser.down.weight` has shape {tuple(down.shape)}, but this "
                             f"attention's output width is {width}")
        with torch.random.fork_rng(devices=[]):  # the init is overwritten by the loaded weights: leave the RNG alone
            proc = EraserProcessor(attn.processor, width, down.shape[0])
        attn.set_processor(proc.to(w.device, w.dtype))
    return sorted(found)


class _Erasers:
    """Receler's erasers installed on every transformer block's ``attn2`` of a UNet (ldm_erasers.py L42–57)."""

    def __init__(self, unet: torch.nn.Module, rank: int):
        self.attn: dict[str, Any] = {}
        self.base: dict[str, Any] = {}
        self.procs: dict[str, EraserProcessor] = {}
        for name, block in unet.named_modules():
            if type(block).__name__ == "BasicTransformerBlock" and getattr(block, "attn2", None) is not None:
                self.attn[f"{name}.attn2"] = block.attn2
        if not self.attn:
            raise ValueError("Receler finds no cross-attention (`attn2` of a BasicTransformerBlock) in this UNet")
        for name, attn in self.attn.items():  # CPU init from the global RNG, in module order, then moved
            w = attn.to_out[0].weight
            self.base[name] = attn.processor
            self.procs[name] = EraserProcessor(attn.processor, attn.to_out[0].out_features, rank).to(w.device, w.dtype)
            attn.set_processor(self.procs[name])
            self.procs[name].record = True

    def parameters(self) -> list[torch.Tensor]:
        return [p for proc in self.procs.values() for p in proc.eraser.parameters()]

    @contextlib.contextmanager
    def off(self):
        """The frozen θ (DisableEraser, utils.py L51–71)."""
        for p in self.procs.values():
            p.enabled = False
        try:
            yield
        finally:
            for p in self.procs.values():
                p.enabled = True

    @contextlib.contextmanager
    def capture(self):
        """Yields ``{attn2 name: (batch, h·w, tokens)}`` head-averaged attention maps of the forwards inside."""
        maps: dict[str, torch.Tensor] = {}
        for p in self.procs.values():
            p.capture = True
        try:
            yield maps
        finally:
            for name, p in self.procs.items():
                p.capture = False
                if p.maps is not None:
                    maps[name] = p.maps
                p.maps = None

    def outputs(self) -> dict[str, torch.Tensor]:
        """E(o) of every eraser in the last forward with the erasers on (EraserOutputsCapture, L70–90)."""
        return {name: p.out for name, p in self.procs.items() if p.out is not None}

    def clear(self) -> None:
        """Training state off: what is deployed holds only the weights."""
        for p in self.procs.values():
            p.record, p.out, p.maps, p.collect = False, None, None, None
            p.eraser.requires_grad_(False)

    def remove(self) -> None:
        """The original processors back on every ``attn2``."""
        for name, attn in self.attn.items():
            attn.set_processor(self.base[name])

    def deployed_names(self) -> list[str]:
        return sorted(f"{name}.processor.eraser.{k}" for name, p in self.procs.items() for k in p.eraser.state_dict())

    def reference_keys(self) -> dict[str, str]:
        """attn2 path → the reference's checkpoint key, the block's transformer prefix (utils.py L15–34), or the
        block path where a transformer holds several blocks (the reference assumes one)."""
        prefixes = {name: name.rsplit(".transformer_blocks.", 1)[0] for name in self.procs}
        counts = {p: list(prefixes.values()).count(p) for p in prefixes.values()}
        return {name: prefix if counts[prefix] == 1 else name.removesuffix(".attn2") for name, prefix in prefixes.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys = self.reference_keys()
        return {f"{keys[name]}.{k}": v.detach().float().cpu().contiguous()
                for name, p in sorted(self.procs.items()) for k, v in p.eraser.state_dict().items()}

    def summary(self) -> dict[str, Any]:
        rank = next(iter(self.procs.values())).eraser.down.out_features
        return {"rank": rank, "erasers": len(self.procs), "elements": sum(p.numel() for p in self.parameters()),
                "widths": sorted({p.eraser.down.in_features for p in self.procs.values()})}


def _attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask) -> torch.Tensor:
    """softmax(q kᵀ·scale) of one cross-attention, averaged over heads: (batch, h·w, tokens) (the CompVis
    CrossAttention's second output, attention.py L183–197, which concept_reg.py L65–66 captures)."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q = attn.head_to_batch_dim(attn.to_q(hidden_states))
    k = attn.head_to_batch_dim(attn.to_k(context))
    probs = attn.get_attention_scores(q, k, attention_mask)  # (batch·heads, h·w, tokens)
    return probs.view(hidden_states.shape[0], attn.heads, *probs.shape[1:]).mean(1).detach()


# ----------------------------------------------------------------------------- losses
def _token_span(tokenizer: Any, word: str, length: int, n_adv: int) -> tuple[torch.Tensor, int]:
    """The word's token positions 1..n and the first attack position n+1 (train_receler.py L121–123)."""
    n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
    if 1 + n > length - 1:
        raise ConfigError(f"`concept.target` word {word!r} takes {n} tokens, more than the {length - 2} a "
                          f"{length}-token text context holds between its start and end tokens")
    if 1 + n + n_adv > length:
        raise ConfigError(f"`method.params.num_adv_prompts` must be <= {length - 1 - n} for the word {word!r} ({n} "
                          f"tokens in a {length}-token context), got {n_adv}")
    return torch.arange(1, 1 + n), 1 + n


def _concept_mask(maps: dict[str, torch.Tensor], words: torch.Tensor, threshold: float, resolution: int) -> dict[str, torch.Tensor]:
    """Binary concept mask per layer, flattened (h·w,) (concept_reg.py L11–45).

    ``maps``: {layer: (h·w, tokens)} of one image. The word tokens' maps of the ``resolution``² layers are
    averaged, min–max normalised, thresholded at ``threshold`` (≥ → 1) and nearest-resized to every layer."""
    sides = {name: _side(m.shape[0], name) for name, m in maps.items()}
    chosen = [m[:, words.to(m.device)].mean(-1) for name, m in maps.items() if sides[name] == resolution]
    if not chosen:
        have = ", ".join(str(s) for s in sorted(set(sides.values())))
        raise ConfigError(f"`method.params.mask_resolution` must be the side of a cross-attention map of this UNet "
                          f"({have}), got {resolution}")
    avg = torch.stack(chosen).mean(0).view(resolution, resolution)
    lo, hi = avg.min(), avg.max()
    norm = (avg - lo) / (hi - lo).clamp_min(torch.finfo(avg.dtype).tiny)  # a constant map → empty mask (deviation 5)
    mask = (norm >= threshold).to(avg.dtype)
    return {name: F.interpolate(mask[None, None], size=(s, s), mode="nearest").flatten() for name, s in sides.items()}


def _side(tokens: int, name: str) -> int:
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise ValueError(f"Receler needs square attention maps; `{name}` has {tokens} positions")
    return side


def _localisation_loss(outputs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_reg: mean over layers of Σ_p (1 − M_p)·mean_d E(o)²_{p,d} / (Σ_p (1 − M_p) + 1e-9) (L173–186).

    ``outputs``: {layer: (batch, h·w, d)} eraser outputs; ``masks``: {layer: (h·w,)}."""
    per_layer = []
    for name, out in outputs.items():
        outside = 1.0 - masks[name].to(out.device, out.dtype)
        per_layer.append((out.pow(2).mean(-1) * outside).sum() / (outside.sum() * out.shape[0] + _MASK_EPS))
    return torch.stack(per_layer).mean()


def _insert(c: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
    """c ⊕ P: the text embedding with positions start..start+len(P)−1 replaced by P (L122–123, L149 as intended)."""
    return torch.cat([c[:, :start], prompt, c[:, start + prompt.shape[1]:]], dim=1)


def _attack_step(unet, z_t, t, c, prompt, opt, start: int, e_p: torch.Tensor, keep_graph: bool):
    """One Adam step of the attack on P: minimise ‖ε_θ'(x_t, c ⊕ P, t) − ε_θ(x_t, c, t)‖² (L152–161).

    Returns ε_θ'(x_t, c ⊕ P, t) before the step (with its graph if ``keep_graph``, for the eraser step) and the loss."""
    e_n = unet(z_t, t, encoder_hidden_states=_insert(c, prompt, start)).sample
    loss = F.mse_loss(e_n, e_p)
    (grad,) = torch.autograd.grad(loss, [prompt], retain_graph=keep_graph)
    prompt.grad = grad
    opt.step()
    opt.zero_grad(set_to_none=True)
    return e_n, loss.detach()


# ----------------------------------------------------------------------------- x_t sampling
def _plan(sched: Any, index: int, rule: str) -> tuple[torch.Tensor, int, int]:
    """Grid timesteps to sample through and the DDPM bin [lo, hi) of t for a drawn step index (L125–130).

    ``aligned``: ``index`` DDIM steps from noise, t in the bin holding the latent's grid timestep.
    ``compvis``: ``index`` = t_enc; the reference's sampler skips the noisiest grid step and stops after the step
    with index t_enc − 1 (ddim.py L155, L170, L194), t ∈ [t_enc·T/N, (t_enc+1)·T/N) — as methods/esd.py."""
    grid = sched.timesteps
    n, T = len(grid), sched.config.num_train_timesteps
    if rule == "aligned":
        run, k = grid[:index], int(grid[index]) * n // T
    else:
        run, k = grid[1 : 1 + min(n - index, n - 1)], index
    return run, round(k * T / n), round((k + 1) * T / n)


# ----------------------------------------------------------------------------- deploy: linearised
def _fit_affine(pipe, unet, erasers: _Erasers, sched, concept, e_words, e_null, prompts, spans, guidance, rule) -> tuple[dict[str, dict], int]:
    """Least-squares affine fit E(o) ≈ A·o + b of every trained eraser, on the attention outputs o of the trained
    model for ``_FIT_LATENTS`` latents sampled as in training × the fit prompts (∅, words, words ⊕ P, anchors).
    Returns the fits and the sampler's UNet rows."""
    with torch.no_grad():
        texts = [e_null, e_words] + [_insert(e_words[i : i + 1], p, spans[i][1]) for i, p in enumerate(prompts)]
        if concept.anchor_prompts:
            texts.append(embed_prompts(pipe, list(concept.anchor_prompts)))
        text = torch.cat(texts)
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in erasers.procs}
        sampling = 0
        for _ in range(_FIT_LATENTS):
            i = int(torch.randint(len(e_words), (1,)))
            run, t_lo, t_hi = _plan(sched, int(torch.randint(len(sched.timesteps), (1,))), rule)
            z = torch.randn((1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)).to(unet.device)
            t = torch.randint(t_lo, t_hi, (1,)).to(unet.device)
            z_t, n = ddim_cfg_sample(unet, sched, z, run, e_words[i : i + 1], e_null, guidance)
            sampling += n
            seen: dict[str, list[torch.Tensor]] = {name: [] for name in erasers.procs}
            for name, p in erasers.procs.items():
                p.collect = seen[name]
            unet(z_t.expand(text.shape[0], -1, -1, -1), t, encoder_hidden_states=text)
            for name, p in erasers.procs.items():
                p.collect = None
                rows = torch.cat(seen[name])
                keep = _FIT_ROWS // _FIT_LATENTS  # a random subset on SD's 64² layers keeps the fit's memory bounded
                inputs[name].append(rows if rows.shape[0] <= keep else rows[torch.randperm(rows.shape[0])[:keep].to(rows.device)])
        return {name: _affine(erasers.procs[name].eraser, torch.cat(xs)) for name, xs in inputs.items()}, sampling


def _affine(eraser: _Eraser, x: torch.Tensor) -> dict[str, Any]:
    """A, b minimising Σ‖E(x) − (A x + b)‖² over the rows of ``x`` (float64 lstsq) and the relative error."""
    y = eraser(x).double()
    design = torch.cat([x.double(), torch.ones_like(x[:, :1], dtype=torch.float64)], dim=1)
    coef = torch.linalg.lstsq(design.cpu(), y.cpu(), driver="gelsd").solution.to(y.device)  # (d + 1, d)
    fit = design @ coef
    err = float((y - fit).norm() / y.norm().clamp_min(1e-30))
    return {"A": coef[:-1].T, "b": coef[-1], "relative_error": err, "samples": x.shape[0]}


def _merge_affine(unet: torch.nn.Module, fit: dict[str, dict]) -> list[str]:
    """W_out ← (I + A) W_out, b_out ← (I + A) b_out + b on every ``attn2.to_out.0``: o + A o + b exactly."""
    names = []
    with torch.no_grad():
        for name, f in fit.items():
            out = unet.get_submodule(name).to_out[0]
            if out.bias is None:
                raise ValueError(f"`{name}.to_out.0` has no bias to take the affine eraser's offset")
            a = f["A"]
            w, b = out.weight.double(), out.bias.double()
            out.weight.copy_((w + a @ w).to(out.weight.dtype))
            out.bias.copy_((b + a @ b + f["b"]).to(out.bias.dtype))
            names += [f"{name}.to_out.0.weight", f"{name}.to_out.0.bias"]
    return sorted(names)


# ----------------------------------------------------------------------------- saving, reporting
def _save_erasers(erasers: _Erasers, folder: Path, rank: int, info: dict[str, Any]) -> Path:
    """Write the erasers as ``<folder>/<content hash>.safetensors``, atomically (temp file + rename), keyed like the
    reference's ``eraser_weights.pt`` (``<transformer prefix>.{down,up}.{weight,bias}``, utils.py L30–39) with its
    ``eraser_config.json`` as metadata; ``concealbench`` holds this run and ``keys`` (prefix → attn2 module)."""
    from safetensors.torch import save_file

    tensors = erasers.state_dict()
    h = hashlib.sha256()
    for key, v in tensors.items():
        h.update(f"{key}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes())
    path = Path(folder) / f"{h.hexdigest()[:20]}.safetensors"
    keys = {prefix: name for name, prefix in erasers.reference_keys().items()}
    meta = {
        "eraser_config": json.dumps({"eraser_type": "adapter", "eraser_rank": rank}),
        "concealbench": json.dumps({**info, "format": _FORMAT, "keys": keys}, sort_keys=True, default=str),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path.resolve()


