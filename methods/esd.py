"""ESD — Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau;
ICCV 2023, arXiv 2303.07345).

Objective ("negative guidance as a teacher", paper Eq. 4–5): the fine-tuned UNet θ, conditioned on
the concept c, is trained towards the frozen original θ*'s negatively guided prediction

    target = ε_θ*(x_t, ∅, t) − η · [ε_θ*(x_t, c, t) − ε_θ*(x_t, ∅, t)]
    L      = ‖ε_θ(x_t, c, t) − target‖²          (MSE, mean reduction; Adam, no weight decay)

and with ``erase_from`` = c' (erase c from a broader prompt c', the later reference's option) the
model is queried with c' and the target is ε_θ*(x_t, c') − η·[ε_θ*(x_t, c) − ε_θ*(x_t, ∅)].

Reference implementation: github.com/rohitgandikota/erasing.
- Original CompVis code, commit a2189e9, ``train-scripts/train-esd.py`` — the code behind the
  paper's models: objective L239–247, parameter sets L164–201, x_t sampling L205–237 (with the
  early-stopping DDIM loop in ``ldm/models/diffusion/ddim.py`` L149–196), defaults L296–307
  (1000 iterations, lr 1e-5, η = 1, start_guidance 3, 50 DDIM steps, 512 px, batch 1).
- Diffusers rewrite, commit 25613d2, ``esd_sd.py``: ``--erase_from`` L55, L112–119, L165–191;
  x_t sampled with the frozen UNet L127–141; ``esd-x-strict`` L44.
This file follows a2189e9 (paper defaults) and takes ``erase_from`` and the ``frozen`` x_t source
from 25613d2. No code is copied.

How x_t is produced (per iteration): a fresh x_T ~ N(0, I) at the UNet's latent size is denoised
by a deterministic DDIM sampler (50 steps, classifier-free guidance ``start_guidance`` with the
empty prompt as the unconditional branch, prompt = the concept word, or ``erase_from``) for a
random number of steps, without gradients, and the training timestep t is drawn uniformly inside
the 1000/50-wide DDPM bin that belongs to the stopping step. Two pairing rules
(``timestep_rule``):

- ``compvis`` reproduces a2189e9 exactly. It draws t_enc ~ U{0..49} and t ~ U[20·t_enc,
  20·(t_enc+1)) (L226–231), but its DDIM loop drops the noisiest grid timestep (``timesteps[:-1]``,
  ddim.py L155, so sampling starts at t = 961 from pure noise) and stops after the step whose
  index + 1 == t_enc (L194–195). The latent it returns therefore sits at noise level
  20·(t_enc − 2) + 1, i.e. 39–58 DDPM steps (~2 DDIM steps) *less* noisy than the t it is paired
  with; t_enc ∈ {0, 1} run the sampler to the end and pair an almost clean latent with t < 40.
- ``aligned`` (the harness default) keeps "t drawn inside the DDIM bin" but pairs it with the
  latent's real noise level: after i ~ U{0..49} DDIM steps from pure noise the latent is at the
  grid timestep τ_i, and t is drawn in the bin [20·k, 20·(k+1)) that contains τ_i (so t − τ_i is
  in [−1, 18]). This is what the rewrite (25613d2 L128–141, t = τ_i exactly) also intends.

NFE: every UNet forward row counts — the x_t sampler's 2 rows per CFG step (1 when
start_guidance == 1, as in CompVis ``sample_model``), 2 frozen rows (3 with ``erase_from``) and
1 trained row per iteration and batch element. The sampler dominates: on average ~25 CFG steps
(~50 rows) of the 53–54 rows per iteration.

Parameter sets (``variant``; names are diffusers', the resolved list is returned):
- ``esd-x``: every tensor with ``attn2`` in its name — to_q, to_k, to_v, to_out.0 of every
  cross-attention (CompVis ``xattn``; 16 modules × 5 tensors on SD v1.x).
- ``esd-u``: everything except ``attn2``, the time embedding (``time_embedding.*``) and the output
  head (``conv_norm_out.*``, ``conv_out.*``) — the CompVis ``noxattn`` rule (``out.*``,
  ``attn2``, ``time_embed`` excluded) mapped to diffusers names.
- ``esd-x-strict``: only ``attn2.to_k``/``attn2.to_v`` (25613d2 L44).
- ``full``: every UNet tensor.

Deliberate deviations from a2189e9 (every one):
1. Default ``timestep_rule="aligned"`` instead of the CompVis offset described above;
   ``timestep_rule="compvis"`` reproduces the original pairing (including the dropped first grid
   step and the t_enc ∈ {0, 1} cases).
2. The sampler is diffusers' ``DDIMScheduler`` built from the pipeline's scheduler config with
   η = 0, ``clip_sample=False`` and ``set_alpha_to_one=False`` forced (CompVis' DDIMSampler clips
   nothing and ends at ᾱ_0). On SD v1.x (``leading`` spacing, ``steps_offset=1``) its 50-step
   grid, 981, 961, …, 1, is CompVis' ``range(0, 1000, 20) + 1``. Other spacings use the
   pipeline's grid; bins are always [k·T/N, (k+1)·T/N).
3. Resolution is implied by the model: latents are ``unet.config.sample_size`` square (64 on
   SD v1.x = 512 px, the paper's setting; 16 on the Shapes world = 32 px).
4. fp32 on one device with a deep copy of the UNet as θ* (the original keeps two whole LDMs).
5. Randomness comes from torch's global RNG (seeded by the harness), not Python's ``random`` plus
   an unseeded CUDA RNG, so a seed fixes the result.
6. ``batch_size`` > 1 (not in the original, which is batch 1) shares one DDIM stopping step per
   iteration across the rows; each row has its own x_T and its own t in the bin.
7. The target is computed from one batched θ* forward over [∅, c(, c')] instead of separate calls
   (same numbers up to float round-off).
8. ``xt_source="frozen"`` samples x_t with θ* like 25613d2, but with this file's DDIM sampler and
   pairing rule rather than the rewrite's default-scheduler sampler (PNDM on SD v1.4).
Several comma-separated targets are erased one word per iteration, drawn at random, as with the
original's ``--seperator`` option (L152–156, L218).
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench import progress
from bench.hparams import ConfigError, Range
from bench.sampling import ddim_sampler, embed_prompts

Variant = Literal["esd-x", "esd-u", "esd-x-strict", "full"]


def unlearn(
    pipe: Any,
    concept: Any,
    *,
    variant: Variant = "esd-x",
    iterations: Annotated[int, Range(ge=1)] = 1000,
    lr: Annotated[float, Range(gt=0)] = 1e-5,
    negative_guidance: Annotated[float, Range(gt=0)] = 1.0,
    start_guidance: Annotated[float, Range(ge=0)] = 3.0,
    ddim_steps: Annotated[int, Range(ge=2)] = 50,
    batch_size: Annotated[int, Range(ge=1)] = 1,
    xt_source: Literal["trained", "frozen"] = "trained",
    timestep_rule: Literal["aligned", "compvis"] = "aligned",
    erase_from: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``pipe.unet`` in place with the ESD objective (paper Eq. 5; a2189e9 L205–253).

    ``variant`` picks the trained tensors, ``negative_guidance`` is η, ``start_guidance`` the CFG
    scale of the x_t sampler, ``xt_source`` which UNet samples x_t (``trained``: the model being
    fine-tuned, as in the paper's code; ``frozen``: the original, as in the diffusers rewrite),
    ``timestep_rule`` how t is paired with x_t (module docstring), ``erase_from`` a broader prompt
    to erase the concept from (None: the concept word itself).
    """
    words = concept.words_to_erase()
    if erase_from is not None and not erase_from.strip():
        raise ConfigError("`method.params.erase_from` must be null or a non-empty prompt, got ''")
    unet = pipe.unet
    device = unet.device
    sched = ddim_sampler(pipe.scheduler, ddim_steps)

    names = _trainable_names(unet, variant)
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    params = [p for n, p in unet.named_parameters() if n in names]
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    was_training = unet.training
    unet.train()  # a2189e9 L203 (SD's UNet has no dropout, so this changes nothing numerically)

    emb = embed_prompts(pipe, ["", *words] + ([erase_from] if erase_from else []))
    e_null, e_words = emb[:1], emb[1 : 1 + len(words)]
    e_from = emb[-1:] if erase_from else None
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    opt = torch.optim.Adam(params, lr=lr)
    sampler_unet = unet if xt_source == "trained" else frozen
    losses: list[float] = []
    nfe = nfe_sampling = 0

    try:
        with progress.bar(iterations, f"ESD ({variant})", unit="it") as pbar:
            for _ in range(iterations):
                c = e_words[int(torch.randint(len(words), (1,)))].unsqueeze(0).expand(batch_size, -1, -1)
                c_query = c if e_from is None else e_from.expand(batch_size, -1, -1)
                run, t_lo, t_hi = _plan(sched, int(torch.randint(ddim_steps, (1,))), timestep_rule)
                x_T = torch.randn((batch_size, *latent_shape)).to(device)
                t = torch.randint(t_lo, t_hi, (batch_size,)).to(device)
                with torch.no_grad():
                    x_t, rows_sampling = _sample(sampler_unet, sched, x_T, run, c_query, e_null, start_guidance)
                    target, rows_target = _target(frozen, x_t, t, e_null, c, c_query if e_from is not None else None, negative_guidance)
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=c_query).sample, target)
                loss.backward()
                opt.step()
                nfe_sampling += rows_sampling
                nfe += rows_sampling + rows_target + batch_size
                losses.append(loss.item())
                pbar.update(1)
                pbar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:  # also when training raises or is interrupted: the UNet's flags and mode are as they were
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        unet.train(was_training)
    del frozen
    return {
        "steps": iterations,
        "nfe": nfe,
        "nfe_sampling": nfe_sampling,
        "trained_parameters": sorted(names),
        "loss_history": losses,
        "variant": variant,
        "xt_source": xt_source,
        "timestep_rule": timestep_rule,
        "erase_from": erase_from,
        "words": list(words),
        "latent_size": unet.config.sample_size,
        "resolution": unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8),
        "trained_elements": sum(p.numel() for p in params),
    }


def _trainable_names(unet: torch.nn.Module, variant: str) -> set[str]:
    """Diffusers names of the tensors ``variant`` trains (a2189e9 L164–201; 25613d2 L44)."""

    def keep(name: str) -> bool:
        if variant == "esd-x":
            return "attn2" in name
        if variant == "esd-x-strict":
            return "attn2.to_k." in name or "attn2.to_v." in name
        if variant == "esd-u":
            # CompVis ``noxattn``: not out.* (= conv_norm_out, conv_out), not time_embed, not attn2.
            head = name.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))
            return not (head or "attn2" in name)
        if variant == "full":
            return True
        raise ConfigError(f"`method.params.variant` must be one of esd-x, esd-u, esd-x-strict, full, got {variant!r}")

    names = {n for n, _ in unet.named_parameters() if keep(n)}
    if not names:
        raise ValueError(f"ESD variant {variant!r} selects no parameter of this UNet (no cross-attention `attn2`?)")
    return names


def _plan(sched: Any, index: int, rule: str) -> tuple[torch.Tensor, int, int]:
    """For a drawn step index, the grid timesteps to sample through and the bin [lo, hi) of t.

    ``aligned``: ``index`` = number of DDIM steps from pure noise; the latent ends at grid timestep
    τ_index and t is drawn in the bin containing it. ``compvis``: ``index`` = t_enc of a2189e9
    L226–231; the grid's noisiest step is skipped and the loop stops after the step with CompVis
    index t_enc − 1 (ddim.py L155, L171, L194), i.e. it runs grid steps 1 … min(N − t_enc, N − 1).
    """
    grid = sched.timesteps  # descending, length N
    n_steps, T = len(grid), sched.config.num_train_timesteps
    if rule == "aligned":
        run = grid[:index]
        k = int(grid[index]) * n_steps // T
    elif rule == "compvis":
        run = grid[1 : 1 + min(n_steps - index, n_steps - 1)]
        k = index
    else:
        raise ConfigError(f"`method.params.timestep_rule` must be 'aligned' or 'compvis', got {rule!r}")
    return run, round(k * T / n_steps), round((k + 1) * T / n_steps)


def _sample(unet, sched, x: torch.Tensor, run: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, guidance: float):
    """DDIM (η = 0) through the grid timesteps ``run`` with CFG; returns (latent, UNet rows)."""
    b, rows = x.shape[0], 0
    ctx = cond if guidance == 1.0 else torch.cat([null.expand(b, -1, -1), cond])
    for t in run:
        inp = x if guidance == 1.0 else torch.cat([x, x])
        eps = unet(inp, t, encoder_hidden_states=ctx).sample
        rows += inp.shape[0]
        if guidance != 1.0:
            e_null, e_cond = eps.chunk(2)
            eps = e_null + guidance * (e_cond - e_null)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x, rows


def _target(frozen, x_t, t, null, c, c_from, eta: float) -> tuple[torch.Tensor, int]:
    """ε*(c_from) − η·(ε*(c) − ε*(∅)) from one batched θ* forward (c_from = c when None)."""
    conds = [null.expand(x_t.shape[0], -1, -1), c] + ([c_from] if c_from is not None else [])
    k = len(conds)
    eps = frozen(x_t.repeat(k, 1, 1, 1), t.repeat(k), encoder_hidden_states=torch.cat(conds)).sample
    eps_null, eps_c, *eps_from = eps.chunk(k)
    return (eps_from[0] if eps_from else eps_c) - eta * (eps_c - eps_null), k * x_t.shape[0]


