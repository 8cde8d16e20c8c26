"""SDD — Safe self-Distillation Diffusion (Kim, Jung, Kim, Choi, Shin, Lee; ICML 2023 workshop
"Challenges in Deployable Generative AI", arXiv 2307.05977).

Objective ("guide the noise estimate conditioned on the removal concept to match the
unconditional one"): for a latent z_t that the model itself generates from the concept prompt,

    L = ‖ε_θ(z_t, c_s, t) − sg(ε(z_t, ∅, t))‖²         (MSE, mean reduction)

where θ is the student being fine-tuned, c_s the concept to remove, ∅ the empty prompt and sg a
stop-gradient. A teacher θ⁻ is kept as an exponential moving average of the student,
θ⁻ ← m·θ⁻ + (1 − m)·θ after every optimiser step; it samples z_t, and it is the model the reference
validates and saves. Unlike ESD there is no frozen copy of the original: the unconditional target
moves with the model ("self"-distillation).

Reference implementation: github.com/nannullna/safe-diffusion, ``train_sdd.py`` at commit a2e820c
(a2e820cccdd3073887992ebae4ac5da97287a6cc, main; the file was last changed in 046a493), and
``run_sdd_nudity.sh`` (``--removing_concepts "nudity"``, every other flag at its default). Line
numbers below are of that file. Written from the reference; no code copied.
- Objective L537–543: e_0 = student(z_t, t, ∅) under ``no_grad``, e_s = student(z_t, t, c_s),
  ``F.mse_loss(e_0.detach(), e_s)``.
- z_t L505–531, L430–471: z_T ~ N(0, I); k ~ U{0..N−1} with N = 50 DDIM steps (η = 0, L106);
  the EMA teacher runs k DDIM steps with classifier-free guidance 3.0 (L61) on the prompt
  c_p = ", ".join(concepts) (L704) against ∅; t ~ U[T − T(k+1)/N, T − Tk/N) (L513–516), the
  1000/50-wide DDPM bin that holds the latent's grid timestep (981 − 20k on SD's ``leading`` grid).
- Concepts L689–704: ``--concept_method iterative`` (default): step i removes concept i mod n.
- Optimiser L636–647, L727–762: AdamW(lr 1e-5, β (0.9, 0.999), ε 1e-8, weight decay 1e-4), grad
  norm clipped to 1.0, constant lr (diffusers' ``get_scheduler("constant")`` ignores the 500
  warm-up steps), 1,500 steps at batch 1, EMA decay 0.999 after every step.
- Parameter sets L246–283 (``--finetuning_method``, default ``xattn``), already diffusers names:
  ``xattn`` every tensor with ``attn2`` in its name; ``selfattn`` ``attn1``; ``noxattn`` all but
  ``attn2``, ``conv_out.*`` and ``time_embed*``; ``notime`` all but ``conv_out.*`` and
  ``time_embed*``; ``full`` everything.
- Output L773–823: the EMA teacher is what gets validated (``--eval_with teacher``) and saved.

Two places where the paper's wording and the code differ; the defaults follow the code:
- The target: the paper describes the unconditional prediction of the EMA teacher; the code takes
  it from the student itself under ``no_grad`` (L540). ``target="student"`` (default) is the
  code, ``target="ema"`` the paper's description.
- ``output="ema"`` (default) hands back the EMA teacher, as the reference saves it;
  ``output="student"`` the student.

NFE: every UNet forward row counts — the teacher's sampler (2 rows per CFG step, 1 when
``guidance_scale`` is 0 or 1), 1 no-grad target row and 1 trained row per step and batch element.
On average the sampler runs (N − 1)/2 steps: ~51 of the ~53 rows per step at N = 50.

Deliberate deviations from a2e820c (every one):
1. k = 0 is sampled as 0 DDIM steps (z_t = z_T, pure noise, paired with t in the noisiest bin).
   In the reference ``sample_until(until=0)`` never meets its ``i == until − 1`` break and runs
   all N steps, so 1/N of its steps pair an almost clean latent with t ≥ 980.
2. ``guidance_scale`` has the usual CFG meaning at every value: 1 samples from the concept prompt
   alone, 0 from the empty prompt alone. The reference samples from the empty prompt alone at any
   scale with |s| ≤ 1 (L442, L529); ``guidance_scale=0`` reproduces that. Its default 3.0 is
   unaffected.
3. The sampler is diffusers' ``DDIMScheduler`` from the pipeline's scheduler config with
   ``clip_sample=False`` and ``set_alpha_to_one=False`` forced — what SD v1.4's own config already
   says, which the reference reads (L606) — so a non-DDIM config (Euler) does not bring DDIM's
   clipping default along.
4. Resolution is implied by the model: latents are ``unet.config.sample_size`` square (64 on SD v1.x
   = 512 px, the reference's hard-coded 64×64; 16 on the Shapes world).
5. fp32 on one device (the reference can split student and teacher over two GPUs); no fp16/AMP.
6. The EMA runs over the trained tensors only. The reference's loop runs over every parameter, but
   the others are equal in student and teacher, so this is the same model without the float
   round-off that would otherwise touch untrained tensors.
7. Randomness comes from torch's global RNG (seeded by the harness) instead of a seeded CUDA
   generator for z_T and the unseeded-unless-``--seed`` global RNG for k and t, so a seed fixes the
   result; z_T is drawn on the CPU so it does not depend on the device.
8. ``batch_size`` > 1 (the reference's ``--train_batch_size`` is parsed but unused: one z_t per
   step) shares k across the rows; each row has its own z_T and its own t in the bin.
9. Not exposed: DDIM η (fixed 0), ``--concept_method`` other than ``iterative``, lr schedules other
   than constant, gradient accumulation, ``--scale_lr``; the Adam β and ε are the reference's.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench import progress
from bench.context import MethodContext, context_or_default
from bench.hparams import Range, check_params, declared
from bench.sampling import ddim_cfg_sample, ddim_sampler, embed_prompts

Trainable = Literal["xattn", "noxattn", "selfattn", "notime", "full"]

# train_sdd.py L122–124: AdamW's β and ε.
_BETAS = (0.9, 0.999)
_EPS = 1e-8


def unlearn(
    pipe: Any,
    concept: Any,
    *,
    steps: Annotated[int, Range(ge=1)] = 1500,
    lr: Annotated[float, Range(gt=0)] = 1e-5,
    weight_decay: Annotated[float, Range(ge=0)] = 1e-4,
    grad_clip: Annotated[float, Range(ge=0)] = 1.0,
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.999,
    guidance_scale: Annotated[float, Range(ge=0)] = 3.0,
    ddim_steps: Annotated[int, Range(ge=2)] = 50,
    batch_size: Annotated[int, Range(ge=1)] = 1,
    trainable: Trainable = "xattn",
    target: Literal["student", "ema"] = "student",
    output: Literal["ema", "student"] = "ema",
    ctx: MethodContext | None = None,
) -> dict[str, Any]:
    """Self-distil ``pipe.unet`` in place so that ε(·, c_s) follows ε(·, ∅) (train_sdd.py, a2e820c).

    ``trainable`` picks the tensors (``--finetuning_method``), ``ema_decay`` is m, ``guidance_scale``
    the CFG scale of the teacher's z_t sampler, ``grad_clip`` the max grad norm (0 = off),
    ``target`` which model gives the unconditional target and ``output`` which model ends up in
    ``pipe.unet`` (module docstring).
    """
    hp = {k: v for k, v in locals().items() if k in declared(unlearn)}
    check_params(unlearn, hp)
    words = concept.words_to_erase()
    unet = pipe.unet
    device = unet.device
    sched = ddim_sampler(pipe.scheduler, ddim_steps)
    names = _trainable_names(unet, trainable)
    show = context_or_default(ctx).progress
    sampling_prompt = ", ".join(words)  # c_p, L704
    emb = embed_prompts(pipe, ["", sampling_prompt, *words])
    e_null, e_prompt, e_words = emb[:1], emb[1:2], emb[2:]
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    teacher = copy.deepcopy(unet).requires_grad_(False).eval()
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    student = [p for n, p in unet.named_parameters() if n in names]
    ema = [p for n, p in teacher.named_parameters() if n in names]
    was_training = unet.training
    unet.train()  # L489, L706 (SD's UNet has no dropout, so this changes nothing numerically)

    opt = torch.optim.AdamW(student, lr=lr, betas=_BETAS, eps=_EPS, weight_decay=weight_decay)
    target_unet = unet if target == "student" else teacher
    losses: list[float] = []
    nfe = nfe_sampling = 0

    try:
        with progress.bar(steps, f"SDD ({trainable})", unit="it", enabled=show) as pbar:
            for i in range(steps):
                c_s = e_words[i % len(words)].unsqueeze(0).expand(batch_size, -1, -1)  # iterative, L698
                k = int(torch.randint(ddim_steps, (1,)))
                t_lo, t_hi = _bin(k, ddim_steps, sched.config.num_train_timesteps)
                z_T = torch.randn((batch_size, *latent_shape)).to(device)
                t = torch.randint(t_lo, t_hi, (batch_size,)).to(device)
                with torch.no_grad():
                    z_t, rows = ddim_cfg_sample(teacher, sched, z_T, sched.timesteps[:k], e_prompt, e_null, guidance_scale)
                    e_0 = target_unet(z_t, t, encoder_hidden_states=e_null.expand(batch_size, -1, -1)).sample
                loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=c_s).sample, e_0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(student, grad_clip)
                opt.step()
                with torch.no_grad():  # θ⁻ ← m·θ⁻ + (1 − m)·θ after every step (L759–762)
                    for q, p in zip(ema, student, strict=True):
                        q.lerp_(p, 1.0 - ema_decay)
                nfe_sampling += rows
                nfe += rows + 2 * batch_size
                losses.append(loss.item())
                pbar.update(1)
                pbar.set_postfix(loss=f"{losses[-1]:.4g}")
        gap = _relative_gap(student, ema)
        if output == "ema":  # the reference validates and saves the teacher (L773–823)
            with torch.no_grad():
                for p, q in zip(student, ema, strict=True):
                    p.copy_(q)
    finally:  # also when training raises or is interrupted: the UNet's flags and mode are as they were
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        unet.train(was_training)
    del teacher
    return {
        "steps": steps,
        "nfe": nfe,
        "nfe_sampling": nfe_sampling,
        "trained_parameters": sorted(names),
        "loss_history": losses,
        "variant": f"sdd-{trainable}",
        "target": target,
        "output": output,
        "words": list(words),
        "sampling_prompt": sampling_prompt,
        "student_ema_gap": gap,
        "latent_size": unet.config.sample_size,
        "resolution": unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8),
        "trained_elements": sum(p.numel() for p in student),
    }


def _trainable_names(unet: torch.nn.Module, trainable: str) -> set[str]:
    """Names of the tensors ``--finetuning_method`` trains (train_sdd.py L246–283)."""

    def keep(name: str) -> bool:
        head = name.startswith("conv_out.") or "time_embed" in name
        if trainable == "xattn":
            return "attn2" in name
        if trainable == "selfattn":
            return "attn1" in name
        if trainable == "noxattn":
            return not (head or "attn2" in name)
        if trainable == "notime":
            return not head
        return True  # full

    names = {n for n, _ in unet.named_parameters() if keep(n)}
    if not names:
        raise ValueError(f"SDD `trainable={trainable!r}` selects no parameter of this UNet (no `attn1`/`attn2` modules?)")
    return names


def _bin(k: int, n: int, T: int) -> tuple[int, int]:
    """The DDPM timestep range [lo, hi) paired with k DDIM steps from noise (L513–516)."""
    return round((1 - (k + 1) / n) * T), round((1 - k / n) * T)


def _relative_gap(student: list[torch.Tensor], ema: list[torch.Tensor]) -> float:
    """‖θ − θ⁻‖ / ‖θ‖ over the trained tensors: how far the EMA lags the student at the end."""
    with torch.no_grad():
        diff = sum(float((p - q).pow(2).sum()) for p, q in zip(student, ema, strict=True))
        norm = sum(float(p.pow(2).sum()) for p in student)
    return (diff / norm) ** 0.5 if norm > 0 else 0.0


