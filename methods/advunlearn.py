"""AdvUnlearn — Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models (Zhang, Chen, Jia, Zhang, Fan, Liu, Hong, Ding, Liu; NeurIPS 2024, arXiv 2405.15234).

Adversarial training of the **text encoder**: ESD's erasure loss is minimised not on the concept
prompt c itself but on the adversarial prompt an attacker finds against the current encoder, and a
utility-retaining regulariser keeps the encoder's retain prompts doing what they did.

With ε_θ the (frozen) UNet, τ the original text encoder, τ_φ the one being trained, x_t a latent the
original model samples for c (DDIM with CFG ``start_guidance``, stopped at a random step) and t in
that step's DDPM bin:

    attack  (lower level):  δ* ≈ argmin_δ ‖ε_θ(x_t, τ_φ([δ; c]), t) − ε_θ(x_t, τ(c), t)‖²
            δ = ``adv_prompt_num`` token embeddings prepended to c's ("prefix_k"), ``attack_step``
            Adam steps of ``attack_lr`` on a fresh (x_t, t) each ("pgd"; "fast_at" steps on the
            gradient's sign), started from random vocabulary tokens (``attack_init=random``) or
            from the previous round's δ (``latest``)
    erase   (upper level):  ℓ_u(φ) = ‖ε_θ(x_t, τ_φ([δ*; c]), t) − (ε_θ(x_t, ∅, t) − η·[ε_θ(x_t, τ(c), t) − ε_θ(x_t, ∅, t)])‖²
            (ESD's negatively guided target, η = ``negative_guidance``; the first ``warmup_iter``
            iterations train on c itself, δ = ∅)
    retain:                 ℓ_r(φ) = E_{c̃ ∈ retain batch} ‖ε_θ(x̃_t, τ_φ(c̃), t) − ε_θ(x̃_t, τ(c̃), t)‖²
    step:                   φ ← Adam(ℓ_u + γ·ℓ_r), γ = ``retain_loss_weight``, lr = ``lr``

The attacker minimises the distance to the original model's concept prediction, i.e. maximises the
concept's return; the defender erases the concept under the attacker's best prompt. A new δ* is
found every ``adv_prompt_update_step`` iterations (with a newly drawn target word).

Reference implementation: github.com/OPTML-Group/AdvUnlearn, commit 9d23124 (9d231249f9af…,
2024-11-04). Read for this port, no code copied:
- ``train-scripts/AdvUnlearn.py``: the loop L72–163 (attack every ``adv_prompt_update_step``
  iterations L74–107, warm-up without attack L143–147, training on the adversarial prompt
  L148–152); defaults L226–261; the README's command (README.md L99: ``--attack_init random
  --attack_step 30 --retain_train reg --dataset_retain coco_object --train_method
  text_encoder_full --retain_loss_w 0.3``) overrides four of them — those are this file's defaults.
- ``train-scripts/utils/attack_util.py``: random init from vocabulary tokens L5–20; the attack
  loss and step L175–212 (``pgd`` = Adam on δ, ``fast_at`` = Adam on sign(∇δ)); ``prefix_k``
  layout L224–234, L273–275.
- ``train-scripts/utils/get_loss.py`` ``get_train_loss_retain`` L270–366: one t for the forget
  and retain latents L304–325, ESD target L352, retain MSE and weighting L354–360.
- ``train-scripts/utils/util.py`` ``param_choices`` L36–415 (``text_encoder_full``: every
  encoder layer plus the final layer norm, never the embeddings; ``component`` all | ffn | attn;
  ``text_encoder_layer…``: chosen layers, the final layer norm only with ``--norm_layer``).
- ``train-scripts/utils/text_encoder.py``: running CLIP on word embeddings instead of ids L35–115.

Deliberate deviations (every one):
1. Diffusers/transformers port: the original keeps two CompVis LDMs (``model`` and
   ``model_orig``) and a separate HF CLIP; here the pipeline's UNet is both (only the text encoder
   trains, so they are the same weights) and the original conditionings τ(∅), τ(c), τ(c̃) are
   encoded once, before training, with the untouched encoder.
2. x_t sampling follows ESD's ``aligned`` rule (methods/esd.py deviation 1) with diffusers'
   ``DDIMScheduler`` on the pipeline's grid: t is drawn in the DDPM bin of the latent's actual
   noise level, not the CompVis sampler's ~2-step offset (the reference's ddim.py drops the
   noisiest grid step, L155, and stops at ``index + 1 == till_T``, L194).
3. The attack zeroes δ's gradient before each step; the reference never calls
   ``attack_opt.zero_grad()`` (attack_util.py L168–212), so its "PGD" steps on the running sum of
   all earlier gradients of the round. Neither variant projects δ onto a norm ball.
4. The prompt's token count (not its word count, ``len(word.split())``, attack_util.py L144) places
   δ, so multi-token words keep all their tokens; the k positions δ takes are cut from the padding
   at the end, as the reference's ``prefix_k`` does.
5. Retain prompts: the reference draws ``retain_batch`` prompts per iteration from 243 "a photo of
   <COCO object>" prompts (data/prompts/train/coco_object_retain.csv), without replacement until
   fewer than a batch remain. That list is not shipped here: ``retain_prompts`` = null uses the
   concept preset's ``retain_prompts`` (the Shapes presets' neighbours, the SD presets' own), drawn
   the same way; give a list to train on other prompts. The batch is capped at the list's length.
6. Only the text-encoder parameter sets are ported (``text_encoder_full`` and
   ``text_encoder_layers`` with an explicit ``layers`` list, matched exactly: the reference's
   name prefixes make ``text_encoder_layer01`` train layers 0, 1, 10 and 11 on SD's 12-layer
   encoder). UNet sets (``noxattn``, ``xattn``, …), ``retain_train=iter``, the ``condition_embd``
   attack and other insertion layouts than ``prefix_k`` are not.
7. The reference's attack also computes ε(x_t, ∅) without using it; it is skipped here.
8. Randomness (words, retain draws, x_T, t, δ's initial tokens) comes from torch's global RNG,
   seeded by the harness, so a seed fixes the result (the reference mixes Python's ``random``).

NFE: every UNet forward row counts — the x_t samplers' CFG rows, the frozen rows (∅, c and the
retain prompts), the trained rows, and per attack step its sampler rows plus 2.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench import progress
from bench.context import MethodContext, context_or_default
from bench.hparams import ConfigError, Range, check_params, declared
from bench.sampling import ddim_cfg_sample, ddim_sampler

TrainMethod = Literal["text_encoder_full", "text_encoder_layers"]


def unlearn(
    pipe: Any,
    concept: Any,
    *,
    iterations: Annotated[int, Range(ge=1)] = 1000,
    lr: Annotated[float, Range(gt=0)] = 1e-5,
    train_method: TrainMethod = "text_encoder_full",
    layers: list[int] | None = None,
    component: Literal["all", "ffn", "attn"] = "all",
    norm_layer: bool = False,
    negative_guidance: Annotated[float, Range(gt=0)] = 1.0,
    start_guidance: Annotated[float, Range(ge=0)] = 3.0,
    ddim_steps: Annotated[int, Range(ge=2)] = 50,
    retain_loss_weight: Annotated[float, Range(ge=0)] = 0.3,
    retain_batch: Annotated[int, Range(ge=1)] = 5,
    retain_prompts: list[str] | None = None,
    adv_prompt_num: Annotated[int, Range(ge=1)] = 1,
    attack_method: Literal["pgd", "fast_at"] = "pgd",
    attack_step: Annotated[int, Range(ge=1)] = 30,
    attack_lr: Annotated[float, Range(gt=0)] = 1e-3,
    attack_init: Literal["random", "latest"] = "random",
    warmup_iter: Annotated[int, Range(ge=0)] = 200,
    adv_prompt_update_step: Annotated[int, Range(ge=1)] = 1,
    ctx: MethodContext | None = None,
) -> dict[str, Any]:
    """Adversarially train ``pipe.text_encoder`` in place to erase the concept (module docstring;
    AdvUnlearn.py L72–163 at 9d23124). ``pipe.unet`` is never changed.

    ``train_method``/``layers``/``component``/``norm_layer`` pick the trained encoder tensors,
    ``negative_guidance`` is η, ``start_guidance`` the CFG scale of the x_t sampler,
    ``retain_loss_weight`` γ, ``retain_prompts`` the retain set (null: ``concept.retain_prompts``),
    ``adv_prompt_num`` the number k of adversarial prefix tokens.
    """
    hp = {k: v for k, v in locals().items() if k in declared(unlearn)}
    check_params(unlearn, hp)
    words = concept.words_to_erase()
    te, unet, tok = pipe.text_encoder, pipe.unet, pipe.tokenizer
    names = _trainable_names(te, train_method, layers, component, norm_layer)
    retain = _retain_set(concept, retain_prompts, retain_loss_weight)
    word_ids = [_prefixed_ids(tok, w, 0) for w in words]
    adv_ids = [_prefixed_ids(tok, w, adv_prompt_num) for w in words]
    sched = ddim_sampler(pipe.scheduler, ddim_steps)
    show = context_or_default(ctx).progress
    device = unet.device

    with torch.no_grad():  # τ's conditionings, before τ_φ moves (deviation 1)
        e_null = _encode(te, _ids(tok, [""], device))
        e_words = _encode(te, _ids(tok, list(words), device))
        e_retain = _encode(te, _ids(tok, retain, device)) if retain else None
    table = te.get_input_embeddings().weight.detach()  # never trained: δ's random init draws from it

    te_flags = {n: p.requires_grad for n, p in te.named_parameters()}
    unet_flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    params = [p for n, p in te.named_parameters() if _canonical(n) in names]
    for n, p in te.named_parameters():
        p.requires_grad_(_canonical(n) in names)
    opt = torch.optim.Adam(params, lr=lr)
    draw = _RetainDraws(len(retain), retain_batch)
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    sampler = _Sampler(unet, sched, latent_shape, start_guidance, e_null)
    losses: list[float] = []
    attack_losses: list[list[float]] = []
    nfe = nfe_sampling = nfe_attack = 0
    adv = w = None

    try:
        with progress.bar(iterations, "AdvUnlearn", unit="it", enabled=show) as pbar:
            for i in range(iterations):
                if i % adv_prompt_update_step == 0:  # L74–107: a new word and, after warm-up, a new δ*
                    w = int(torch.randint(len(words), (1,)))
                    if i >= warmup_iter:
                        init = adv if attack_init == "latest" and adv is not None else _random_tokens(table, adv_prompt_num)
                        ids = adv_ids[w].to(device)
                        adv, history, rows = _attack(unet, te, sampler, ids, init, e_words[w : w + 1],
                                                     attack_step, attack_lr, attack_method)
                        attack_losses.append(history)
                        nfe_attack += rows
                batch = draw.next()
                k, t = sampler.draw_step()
                conds = [e_words[w : w + 1]] + ([e_retain[batch]] if batch else [])
                with torch.no_grad():
                    x, rows = sampler.sample(torch.cat(conds), k)
                    x_f, x_r = x[:1], x[1:]
                    eps = unet(torch.cat([x_f, x_f, x_r]), t, encoder_hidden_states=torch.cat([e_null, *conds])).sample
                    e_0, e_p, e_r = eps[:1], eps[1:2], eps[2:]
                    target = e_0 - negative_guidance * (e_p - e_0)
                prompt = _encode(te, word_ids[w].to(device)) if adv is None else _encode(te, adv_ids[w].to(device), adv)
                cond = torch.cat([prompt, _encode(te, _ids(tok, [retain[j] for j in batch], device))]) if batch else prompt
                pred = unet(torch.cat([x_f, x_r]), t, encoder_hidden_states=cond).sample
                loss = F.mse_loss(pred[:1], target)
                if batch:
                    loss = loss + retain_loss_weight * F.mse_loss(pred[1:], e_r)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                nfe_sampling += rows
                nfe += rows + 3 + 2 * len(batch)  # sampler, frozen ∅, c and retain rows, trained rows
                losses.append(loss.item())
                pbar.update(1)
                pbar.set_postfix(loss=f"{losses[-1]:.4g}", **({"attack": f"{attack_losses[-1][-1]:.4g}"} if attack_losses else {}))
    finally:  # also when training raises or is interrupted: flags as they were, no stray gradients
        for n, p in te.named_parameters():
            p.requires_grad_(te_flags[n])
            p.grad = None
        for p, f in zip(unet.parameters(), unet_flags, strict=True):
            p.requires_grad_(f)
    return {
        "steps": iterations,
        "nfe": nfe + nfe_attack,
        "nfe_sampling": nfe_sampling,
        "nfe_attack": nfe_attack,
        "attack_rounds": len(attack_losses),
        "attack_loss": {"first_step": [h[0] for h in attack_losses], "last_step": [h[-1] for h in attack_losses]},
        "trained_parameters": sorted(f"text_encoder.{n}" for n in names),
        "trained_elements": sum(p.numel() for p in params),
        "loss_history": losses,
        "variant": f"advunlearn-{train_method}" + (f"-{component}" if component != "all" else ""),
        "words": list(words),
        "retain_prompts": len(retain),
        "latent_size": unet.config.sample_size,
        "resolution": unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8),
    }


# ----------------------------------------------------------------------------- the attack
def _attack(unet, te, sampler: _Sampler, ids: torch.Tensor, init: torch.Tensor, e_word: torch.Tensor,
            steps: int, lr: float, method: str) -> tuple[torch.Tensor, list[float], int]:
    """δ* for one word (attack_util.py L175–212): ``steps`` Adam steps on the prefix embeddings δ
    minimising ``attack_loss`` on a fresh (x_t, t) each; returns (δ*, per-step losses, UNet rows)."""
    adv = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([adv], lr=lr)
    history, rows = [], 0
    for _ in range(steps):
        k, t = sampler.draw_step()
        with torch.no_grad():
            x_t, r = sampler.sample(e_word, k)
        loss = attack_loss(unet, te, x_t, t, ids, adv, e_word)
        (grad,) = torch.autograd.grad(loss, [adv])  # δ only: nothing accumulates in τ_φ or the UNet
        opt.zero_grad(set_to_none=True)
        adv.grad = grad.sign() if method == "fast_at" else grad
        opt.step()
        history.append(loss.item())
        rows += r + 2
    return adv.detach(), history, rows


def attack_loss(unet, te, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor,
                e_word: torch.Tensor) -> torch.Tensor:
    """‖ε_θ(x_t, τ_φ([δ; c]), t) − ε_θ(x_t, τ(c), t)‖² (attack_util.py L183–203): how far the prompt
    with prefix δ is from bringing the original model's concept prediction back (lower = closer)."""
    with torch.no_grad():
        e_p = unet(x_t, t, encoder_hidden_states=e_word.expand(len(x_t), -1, -1)).sample
    cond = _encode(te, ids, adv).expand(len(x_t), -1, -1)
    return F.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample, e_p)


def _random_tokens(table: torch.Tensor, k: int) -> torch.Tensor:
    """Embeddings of k random vocabulary tokens (attack_util.py L13–17)."""
    return table[torch.randint(table.shape[0], (k,)).to(table.device)].clone()


# ----------------------------------------------------------------------------- x_t
class _Sampler:
    """x_t as the original model samples it: DDIM (η = 0, CFG ``guidance`` with ∅) for a random
    number of grid steps; t drawn in the DDPM bin of the step reached (ESD's ``aligned`` rule)."""

    def __init__(self, unet, sched, latent_shape: tuple[int, int, int], guidance: float, e_null: torch.Tensor):
        self.unet, self.sched, self.shape, self.guidance, self.e_null = unet, sched, latent_shape, guidance, e_null

    def draw_step(self) -> tuple[int, torch.Tensor]:
        grid, T = self.sched.timesteps, self.sched.config.num_train_timesteps
        k = int(torch.randint(len(grid), (1,)))
        b = int(grid[k]) * len(grid) // T
        lo, hi = round(b * T / len(grid)), round((b + 1) * T / len(grid))
        return k, torch.randint(lo, hi, (1,)).to(self.unet.device)

    def sample(self, conds: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
        z = torch.randn((len(conds), *self.shape)).to(self.unet.device)
        return ddim_cfg_sample(self.unet, self.sched, z, self.sched.timesteps[:k], conds, self.e_null, self.guidance)


class _RetainDraws:
    """``batch`` retain-prompt indices per call, without replacement until fewer than a batch remain
    (the reference's ``PromptDataset``, prompt_dataset.py L9–31; AdvUnlearn.py L77–78)."""

    def __init__(self, n: int, batch: int):
        self.n, self.batch, self.unseen = n, min(batch, n), list(range(n))

    def next(self) -> list[int]:
        if not self.n:
            return []
        if len(self.unseen) < self.batch:
            self.unseen = list(range(self.n))
        picks = torch.randperm(len(self.unseen))[: self.batch].tolist()
        out = [self.unseen[p] for p in picks]
        self.unseen = [u for u in self.unseen if u not in out]
        return out


# ----------------------------------------------------------------------------- the text encoder
def _canonical(name: str) -> str:
    return name.removeprefix("text_model.")  # transformers 4.x names carry a text_model level, 5.x not


def _trainable_names(te: torch.nn.Module, train_method: str, layers: list[int] | None, component: str,
                     norm_layer: bool) -> set[str]:
    """Encoder tensors ``train_method`` trains (util.py ``param_choices`` L36–415, deviation 6)."""
    n_layers = int(te.config.num_hidden_layers)
    if train_method == "text_encoder_full":
        if layers:
            raise ConfigError(f"`method.params.layers` is only read with train_method=text_encoder_layers, got {layers} "
                              "with text_encoder_full (which trains every layer)")
        chosen, norm = set(range(n_layers)), component == "all" or norm_layer  # L44–45
    elif train_method == "text_encoder_layers":
        bad = [i for i in (layers or []) if not 0 <= i < n_layers]
        if not layers or bad:
            raise ConfigError(f"`method.params.layers` must list encoder layers in 0..{n_layers - 1} for "
                              f"train_method=text_encoder_layers, got {layers}")
        chosen, norm = set(layers), norm_layer
    else:
        raise ConfigError(f"`method.params.train_method` must be text_encoder_full or text_encoder_layers, got {train_method!r}")
    part = {"all": "", "ffn": ".mlp.", "attn": ".self_attn."}[component]
    names = set()
    for n, _ in te.named_parameters():
        c = _canonical(n)
        if c.startswith("final_layer_norm.") and norm:
            names.add(c)
        elif c.startswith("encoder.layers.") and int(c.split(".")[2]) in chosen and part in c:
            names.add(c)
    return names


def _retain_set(concept: Any, prompts: list[str] | None, weight: float) -> list[str]:
    """The retain prompts (deviation 5); none are needed when γ = 0."""
    if weight == 0:
        return []
    if prompts is not None:
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"`method.params.retain_prompts` must be null or a non-empty list of non-empty prompts, got {prompts!r}")
        return list(prompts)
    if not concept.retain_prompts:
        raise ConfigError(f"`concept.retain_prompts` of {concept.name!r} is empty, but `method.params.retain_loss_weight` = "
                          f"{weight} needs retain prompts: give `method.params.retain_prompts` or set the weight to 0")
    return list(concept.retain_prompts)


def _ids(tok: Any, prompts: list[str], device) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


def _prefixed_ids(tok: Any, word: str, k: int) -> torch.Tensor:
    """(1, L) ids of ``word`` with k prefix slots after the start token (``prefix_k``, attack_util.py
    L224–234, L273–275): [sot, k slots, word tokens, eot/padding cut by k]; the slots hold the ids
    that followed the word (the reference's ``replace_id``) — δ replaces their embeddings."""
    ids = _ids(tok, [word], "cpu")[0]
    n = len(tok(word, add_special_tokens=False).input_ids)
    L = tok.model_max_length
    if 1 + k + n + 1 > L:
        raise ConfigError(f"`method.params.adv_prompt_num` = {k} does not fit: {word!r} takes {n} tokens and the "
                          f"tokenizer holds {L} (start and end tokens included)")
    return torch.cat([ids[:1], ids[1 + n : 1 + n + k], ids[1 : 1 + n], ids[1 + n + k :]]).unsqueeze(0)


def _encode(te: Any, ids: torch.Tensor, adv: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states of ``ids``; with ``adv`` (k, d) the token embeddings at positions 1..k are
    δ (text_encoder.py L35–115 runs CLIP on embeddings; a forward hook does it for any CLIP here)."""
    if adv is None:
        return te(ids)[0]
    k = adv.shape[0]

    def prefix(module, args, out):
        return torch.cat([out[:, :1], adv.to(out.dtype).expand(len(out), -1, -1), out[:, 1 + k :]], dim=1)

    handle = te.get_input_embeddings().register_forward_hook(prefix)
    try:
        return te(ids)[0]
    finally:
        handle.remove()
