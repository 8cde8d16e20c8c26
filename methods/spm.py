"""SPM — concept Semi-Permeable Membrane (Lyu, Yang, Hong, Chen, Jin, He, Xue, Han, Ding; "One-dimensional
Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications", CVPR 2024, arXiv 2312.16145).

A one-dimensional (rank-1) adapter, the "membrane", is attached to every linear and 1×1-conv layer of
the UNet's transformer blocks: W x → W x + (α/r)·u (dᵀ x) with d ∈ R^{in}, u ∈ R^{out}, r = 1, α = 1.
Only the membrane is trained; the base UNet θ* is frozen and is also the teacher (membrane switched off).
Training is data-free: z_t comes from the model's own sampler, the prompts are the concept's words and
random "latent anchors" in the text-embedding space. Per step, with x = z_t at timestep t,

    target   = ε*(x, c_s, t) − g · [ε*(x, c, t) − ε*(x, c_s, t)]            (ESD-style negative guidance)
    L_erase  = ‖ε_θ(x, c, t) − target‖²                                       (MSE, mean reduction)
    L_anchor = ‖ε_θ(x, a_i, t) − ε*(x, a_i, t)‖²   over N sampled anchors a_i (MSE, mean reduction)
    L        = L_erase + λ · L_anchor

where ε_θ is the UNet with the membrane, ε* without it, c the concept word, c_s the surrogate ("" by
default), g the erasing scale and λ the latent-anchoring strength. After training the membrane is merged
into the base weights, W ← W + s·(α/r)·u dᵀ (s = ``scale``), which is the delta the harness saves, and the
unmerged membrane itself is written as a safetensors file in the reference's key layout.

Reference implementation: github.com/Con6924/SPM at commit 3dd762e (3dd762e6895b23cd20cf1653a16addc5c16a12f3,
main). Line numbers are of that commit. Written from the reference; no code copied.
- Membrane layer ``src/models/spm.py`` L15–77: ``lora_down`` (in → r) and ``lora_up`` (r → out) without
  bias, a Conv2d ``lora_down`` with the wrapped conv's kernel/stride/padding and a 1×1 ``lora_up``
  (L39–53); scale α/r (L55–59); init kaiming-uniform(a=√5) for down, zeros for up (L61–63); output
  ``org(x) + up(down(x))·multiplier·scale`` (L73–77).
- Where it goes, L80–161: every ``Linear`` and ``Conv2d`` inside every ``Transformer2DModel`` of the UNet
  (proj_in, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_out); the saved keys are
  ``lora_unet_<module path, dots as underscores>.{lora_down.weight, lora_up.weight, alpha}`` (L90, L153–154,
  L176–192). The ``with network:`` switch sets the multiplier to 1, leaving it sets 0 (L194–200): inside,
  the adapted model; outside, the frozen original.
- Training loop ``train_spm.py`` L135–290: one prompt pair drawn at random per iteration (L146–148, so
  several concepts share one membrane); k ~ U{1..N−1} sampling steps (L150–152); a random resolution
  bucket (L154–161, ``src/engine/train_util.py`` L636–648: each side ∈ {256, 320, 384, 448} px for the
  512 px bucket); z_T ~ N(0, I)·init_noise_sigma (L171–173, train_util L50–64); k DDIM steps with the
  membrane on, CFG 3 on (∅, c) (L175–188, train_util L182–203); t = timesteps[⌊k·1000/N⌋] of a
  1000-step grid (L190–194); ε*(c) and ε*(c_s) with the membrane off (L196–219); ε_θ(c) with it on
  (L221–233); anchors on/off (L237–267); loss, optional grad clipping, optimiser and lr-scheduler step
  (L274–288).
- Loss ``src/configs/prompt.py`` L142–193: ``_erase`` (L142–160, MSE to neutral − g·(positive − neutral))
  and ``_erase_with_la`` (L162–182, + la_strength·MSE(anchor_on, anchor_off)).
- Anchor sampling ``src/engine/sampling.py`` L7–26: a Gaussian direction in the whole (tokens × width)
  text-embedding space, normalised, accepted with probability 1 − cos(target, direction), scaled to
  ‖target‖·U[0.8, 1.2]; ``sampling_batch_size`` anchors per iteration. (The reference samples anchors
  as random embeddings, not as words of a vocabulary.)
- Defaults ``configs/pikachu/config.yaml`` / ``configs/snoopy/config.yaml`` L10–26 and ``prompt.yaml``
  L2–12 (identical apart from the word; the demo notebook writes the same values): rank 1, α 1.0,
  3,000 iterations, batch 1, lr 1e-4, AdamW8bit, cosine_with_restarts (500 warm-up steps, 3 cycles),
  max_denoising_steps 30, fp32, DDIM; positive = target, neutral = unconditional = "", action
  ``erase_with_la``, guidance_scale 1.0, resolution 512 with dynamic_resolution, la_strength 1000,
  sampling_batch_size 4. ``max_grad_norm`` is not set there: TrainConfig's 0.0 (``src/configs/config.py``
  L43), no clipping. The lr schedule is diffusers' ``get_cosine_with_hard_restarts_schedule_with_warmup``
  (train_util L569–633), used here too.
- Inference ``infer_spm.py`` L28–153 (Facilitated Transport): each SPM's multiplier is set per prompt to
  the prompt's similarity to the erased concept; ``--spm_multiplier`` fixes it instead.

NFE: every UNet forward row counts — the sampler's 2 rows per CFG step (1 when ``sampling_guidance``
is 0 or 1), 2 frozen rows (ε*(c), ε*(c_s)), 1 trained row and, when λ > 0, N trained plus N frozen
anchor rows per iteration. With the SD defaults that is on average 2·15 + 11 = 41 rows per iteration.

Deliberate deviations from 3dd762e (every one):
1. The membrane is merged into the UNet at a fixed multiplier ``scale`` (default 1.0, the reference's
   ``--spm_multiplier 1``): the harness evaluates one set of weights, so Facilitated Transport (the
   per-prompt multiplier of infer_spm.py L28–51, L114–143) is not applied. The unmerged membrane is
   saved beside the run so that it can still be used that way.
2. The unconditional rows the reference computes and discards in every guidance-1 ``predict_noise``
   call (positive, neutral, target, anchors; train_util L152–178 always doubles the batch) are not
   computed: same loss, up to float round-off, and 2 + 1 + 2N fewer UNet rows per iteration. The two
   frozen predictions ε*(c), ε*(c_s) are one batched forward.
3. The sampler is diffusers' ``DDIMScheduler`` from the pipeline's scheduler config with η = 0 and
   ``clip_sample=False``, ``set_alpha_to_one=False`` forced, not a fresh DDIM with the library's
   defaults (``src/models/model_util.py`` L225–240): on SD v1.x this moves the 30-step grid by
   ``steps_offset`` = 1 (958, 925, …, 1 instead of 957, 924, …, 0); ``set_alpha_to_one`` never matters
   because the sampler stops before the last step.
4. ``timestep_rule="reference"`` (default) pairs the latent with t = T − 1 − ⌊k·T/N⌋ as L190–194 do —
   32–42 DDPM steps noisier than the grid timestep the latent sits at; ``timestep_rule="aligned"``
   uses that grid timestep instead.
5. Dynamic resolution is relative to the model: each latent side ∈ {4, 5, 6, 7}·s/8 with s the UNet's
   ``sample_size`` (64 on SD v1.x: 32–56 latents = 256–448 px, exactly the reference's bucket; 16 on
   the Shapes world: 8–14). The reference's bucket is in pixels of a 512 px model.
6. Optimiser: fp32 ``torch.optim.AdamW`` with bitsandbytes AdamW8bit's defaults (β (0.9, 0.999),
   ε 1e-8, weight decay 1e-2) instead of the 8-bit optimiser (no bitsandbytes dependency, CPU-capable).
7. Randomness comes from torch's global CPU RNG (seeded by the harness) instead of the CUDA RNG for
   anchor directions and Python's ``random`` for their acceptance and scale, so a seed fixes the result
   on any device.
8. Not exposed: rank and α (fixed at the "one-dimensional" 1 and 1.0; the reference's ``dim`` is an
   ablation knob), batch size (1, as every reference config), ``use_template``, optimisers and lr
   schedules other than the above, fp16/bf16, xformers.
9. ``modules="attention"`` (only attn1/attn2 q, k, v, out) is an option beside the reference's
   ``transformer`` set, for comparison with attention-only editing methods.
Several comma-separated targets share one membrane, one word drawn at random per iteration, as the
reference does with several prompt entries (L146–148). ``surrogate="anchor"`` uses ``concept.anchor``
as the neutral prompt (the demo notebook's ``surrogate_concept``); the default is the reference's "".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench import progress
from bench.context import MethodContext, context_or_default
from bench.hparams import ConfigError, Range, check_params, declared
from bench.record import subsample_curves
from bench.sampling import UNetRows, ddim_cfg_sample, ddim_sampler, embed_prompts

Modules = Literal["transformer", "attention"]

# src/models/spm.py L55–58 with configs/*/config.yaml `network: {rank: 1, alpha: 1.0}`: scale α/r = 1.
RANK = 1
ALPHA = 1.0
# bitsandbytes AdamW8bit's defaults (the reference's optimizer_type, no optimizer_args given).
_BETAS = (0.9, 0.999)
_EPS = 1e-8
_LOSS_POINTS = 50  # points kept in the report's subsampled loss curves (the record drops loss_history)
_FORMAT = "concealbench-spm-1"


def unlearn(
    pipe: Any,
    concept: Any,
    *,
    steps: Annotated[int, Range(ge=1)] = 3000,
    lr: Annotated[float, Range(gt=0)] = 1e-4,
    weight_decay: Annotated[float, Range(ge=0)] = 1e-2,
    warmup_steps: Annotated[int, Range(ge=0)] = 500,
    lr_cycles: Annotated[int, Range(ge=1)] = 3,
    grad_clip: Annotated[float, Range(ge=0)] = 0.0,
    denoising_steps: Annotated[int, Range(ge=2)] = 30,
    sampling_guidance: Annotated[float, Range(ge=0)] = 3.0,
    erase_guidance: Annotated[float, Range(ge=0)] = 1.0,
    la_strength: Annotated[float, Range(ge=0)] = 1000.0,
    num_anchors: Annotated[int, Range(ge=1)] = 4,
    surrogate: Literal["empty", "anchor"] = "empty",
    modules: Modules = "transformer",
    dynamic_resolution: bool = True,
    timestep_rule: Literal["reference", "aligned"] = "reference",
    scale: Annotated[float, Range(gt=0)] = 1.0,
    ctx: MethodContext | None = None,
) -> dict[str, Any]:
    """Train a rank-1 membrane on ``pipe.unet`` with erasure + latent anchoring, merge it in place
    (train_spm.py L135–290, prompt.py L142–182; 3dd762e) and save it under the cache.

    ``erase_guidance`` is g, ``la_strength`` λ (0 = the reference's ``erase`` action, no anchors),
    ``num_anchors`` the anchors per step, ``sampling_guidance`` the CFG scale of the z_t sampler,
    ``denoising_steps`` its grid, ``scale`` the multiplier the membrane is merged at (module docstring).
    """
    hp = {k: v for k, v in locals().items() if k in declared(unlearn)}
    check_params(unlearn, hp)
    words = concept.words_to_erase()
    surrogate_prompt = _surrogate(concept, surrogate)
    unet = pipe.unet
    size = unet.config.sample_size
    if dynamic_resolution and size % 8:
        raise ConfigError(f"`method.params.dynamic_resolution` needs a UNet sample_size divisible by 8, got {size}")
    sched = ddim_sampler(pipe.scheduler, denoising_steps, "method.params.denoising_steps")
    context = context_or_default(ctx)
    device = unet.device
    emb = embed_prompts(pipe, ["", surrogate_prompt, *words])
    e_null, e_sur, e_words = emb[:1], emb[1:2], emb[2:]

    targets = _target_modules(unet, modules)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    was_training = unet.training
    adapter = _Membrane(targets)
    history: dict[str, list[float]] = {"total": [], "erase": [], "anchor": []}
    nfe_sampling = 0
    try:
        unet.requires_grad_(False)  # train_spm.py L81: only the membrane learns
        opt = torch.optim.AdamW(adapter.parameters(), lr=lr, betas=_BETAS, eps=_EPS, weight_decay=weight_decay)
        lr_sched = _lr_schedule(opt, warmup_steps, steps, lr_cycles)
        with UNetRows(unet) as rows, progress.bar(steps, "SPM", unit="it", enabled=context.progress) as pbar:
            for _ in range(steps):
                i = int(torch.randint(len(words), (1,)))  # one prompt pair per iteration (L146–148)
                c = e_words[i : i + 1]
                k = int(torch.randint(1, denoising_steps, (1,)))  # L150–152
                h, w = _latent_size(size, dynamic_resolution)
                z = torch.randn((1, unet.config.in_channels, h, w)).to(device) * sched.init_noise_sigma
                with torch.no_grad():  # z_t from the model with its membrane (L175–188)
                    z_t, n = ddim_cfg_sample(unet, sched, z, sched.timesteps[:k], c, e_null, sampling_guidance)
                    nfe_sampling += n
                    t = _timestep(sched, k, timestep_rule).to(device)
                    with adapter.off():  # ε*(c), ε*(c_s) of the frozen model (L196–219)
                        e_pos, e_neu = unet(z_t.expand(2, -1, -1, -1), t, encoder_hidden_states=torch.cat([c, e_sur])).sample.chunk(2)
                    target = e_neu - erase_guidance * (e_pos - e_neu)
                erase = F.mse_loss(unet(z_t, t, encoder_hidden_states=c).sample, target)
                anchor = _anchoring_loss(unet, adapter, z_t, t, c, num_anchors) if la_strength > 0 else erase.new_zeros(())
                loss = erase + la_strength * anchor
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(adapter.parameters(), grad_clip)
                opt.step()
                lr_sched.step()
                for key, v in (("total", loss), ("erase", erase), ("anchor", anchor)):
                    history[key].append(v.item())
                pbar.update(1)
                pbar.set_postfix(loss=f"{history['total'][-1]:.4g}")
        nfe = rows.count
        merged = adapter.merge(scale)
    finally:  # also when training raises or is interrupted: no hooks, the UNet's flags and mode as they were
        adapter.remove()
        for n_, p in unet.named_parameters():
            p.requires_grad_(flags[n_])
            p.grad = None
        unet.train(was_training)
    saved = _save_adapter(adapter, context.cache("spm_adapters"), {
        "words": list(words), "surrogate": surrogate_prompt, "scale": scale, "modules": modules, "params": hp,
    })
    return {
        "steps": steps,
        "nfe": nfe,
        "nfe_sampling": nfe_sampling,
        "trained_parameters": merged,
        "merged_elements": sum(unet.get_parameter(n_).numel() for n_ in merged),
        "trained_elements": sum(p.numel() for p in adapter.parameters()),
        "loss_history": history["total"],
        "loss_subsampled": subsample_curves(history, _LOSS_POINTS),
        "variant": f"spm-{modules}",
        "words": list(words),
        "surrogate": surrogate_prompt,
        "scale": scale,
        "timestep_rule": timestep_rule,
        "adapter_path": str(saved),
        "adapter": adapter.summary(),
        "latent_size": size,
        "resolution": size * getattr(pipe, "vae_scale_factor", 8),
    }


class _Membrane:
    """Rank-1 adapters on ``modules`` of a UNet, attached with forward hooks (spm.py L15–77, L194–200).

    ``u[name]`` (out × 1[×1×1]) and ``d[name]`` (1 × in[×kh×kw]) are the reference's lora_up/lora_down
    weights; the base weights are untouched until ``merge``.
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules, self.on = modules, True
        self.d: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        for name, m in modules.items():
            conv = isinstance(m, torch.nn.Conv2d)
            n_in, n_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
            d = torch.empty((RANK, n_in, *m.kernel_size) if conv else (RANK, n_in))
            torch.nn.init.kaiming_uniform_(d, a=math.sqrt(5))  # L61–63, drawn on the CPU
            u = torch.zeros((n_out, RANK, 1, 1) if conv else (n_out, RANK))
            w = m.weight
            self.d[name] = d.to(w.device, w.dtype).requires_grad_(True)
            self.u[name] = u.to(w.device, w.dtype).requires_grad_(True)
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        m, d, u = self.modules[name], self.d[name], self.u[name]

        def add(_module, args, out):
            if not self.on:
                return None
            x = args[0]
            if isinstance(m, torch.nn.Conv2d):
                r = F.conv2d(F.conv2d(x, d, None, m.stride, m.padding, m.dilation), u)
            else:
                r = F.linear(F.linear(x, d), u)
            return out + (ALPHA / RANK) * r

        return add

    @contextlib.contextmanager
    def off(self):
        """The frozen original model (the reference's multiplier 0 outside ``with network``)."""
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in self.modules for t in (self.d[name], self.u[name])]

    def delta(self, name: str) -> torch.Tensor:
        """(α/r)·u dᵀ in the base weight's shape (a 1×1 up-conv after a k×k down-conv is one k×k conv)."""
        w = self.modules[name].weight
        return ((ALPHA / RANK) * (self.u[name].flatten(1) @ self.d[name].flatten(1))).view_as(w)

    def merge(self, scale: float) -> list[str]:
        """W ← W + scale·(α/r)·u dᵀ for every adapted module; returns the base tensors' names."""
        with torch.no_grad():
            for name, m in self.modules.items():
                m.weight.add_(scale * self.delta(name).detach())
        return sorted(f"{name}.weight" for name in self.modules)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference's saved layout (spm.py L90, L153–154, L176–192), on the CPU in fp32."""
        out = {}
        for name in sorted(self.modules):
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = self.d[name].detach().float().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = self.u[name].detach().float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(ALPHA)
        return out

    def summary(self) -> dict[str, Any]:
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in self.modules.values())
        return {"rank": RANK, "alpha": ALPHA, "modules": len(self.modules), "linear_modules": len(self.modules) - convs,
                "conv_modules": convs, "elements": sum(p.numel() for p in self.parameters())}


def _target_modules(unet: torch.nn.Module, modules: str) -> dict[str, torch.nn.Module]:
    """Linear/Conv2d layers inside every ``Transformer2DModel`` (spm.py L81–91, L139–161), or only the
    attention projections for ``modules="attention"``."""
    out = {}
    for name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for child, m in block.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            full = f"{name}.{child}"
            attention = any(f".{a}.{p}" in f".{child}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
            if modules == "transformer" or attention:
                out[full] = m
    if not out:
        raise ValueError(f"SPM `modules={modules!r}` finds no layer to adapt in this UNet (no Transformer2DModel?)")
    return out


def _surrogate(concept: Any, surrogate: str) -> str:
    """The neutral prompt c_s: "" (prompt.yaml `neutral: ""`) or the concept's anchor (the demo's surrogate)."""
    if surrogate == "empty":
        return ""
    if not concept.anchor.strip():
        raise ConfigError(f"`method.params.surrogate` = 'anchor' needs `concept.anchor`, but {concept.name!r} has none")
    return concept.anchor


def _lr_schedule(opt: torch.optim.Optimizer, warmup: int, steps: int, cycles: int):
    """cosine_with_restarts with linear warm-up, stepped after every optimiser step (train_util L569–633)."""
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    return get_cosine_with_hard_restarts_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=steps, num_cycles=cycles)


def _latent_size(size: int, dynamic: bool) -> tuple[int, int]:
    """Height and width of z_T: each side drawn from {4, 5, 6, 7}·size/8 (train_util L636–648), or ``size``."""
    if not dynamic:
        return size, size
    step = size // 8
    return int(torch.randint(4, 8, (1,))) * step, int(torch.randint(4, 8, (1,))) * step


def _timestep(sched: Any, k: int, rule: str) -> torch.Tensor:
    """The training timestep for a latent after k sampler steps (L190–194, or the latent's grid step)."""
    if rule == "aligned":
        return sched.timesteps[k].clone()
    T, n = sched.config.num_train_timesteps, len(sched.timesteps)
    return torch.tensor(T - 1 - (k * T) // n)


def _sample_anchors(target: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` random text embeddings shaped like ``target`` (sampling.py L7–26): a uniform direction in
    the flattened embedding space, kept with probability 1 − cos(target, direction), scaled to
    ‖target‖·U[0.8, 1.2]. Drawn on the CPU from torch's global RNG."""
    flat = target.detach().float().cpu().flatten()
    out = []
    while len(out) < n:
        while True:
            v = torch.randn(flat.shape)
            v = v / v.norm()
            if float(torch.rand(())) < 1.0 - float(F.cosine_similarity(flat, v, dim=0)):
                break
        out.append((float(torch.rand(())) * 0.4 + 0.8) * flat.norm() * v)
    return torch.stack(out).view(n, *target.shape[1:]).to(target.device, target.dtype)


def _anchoring_loss(unet, adapter: _Membrane, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, n: int) -> torch.Tensor:
    """MSE between the membrane model's and the frozen model's predictions on sampled anchors (L237–267)."""
    anchors = _sample_anchors(c, n)
    z = z_t.expand(n, -1, -1, -1)
    pred = unet(z, t, encoder_hidden_states=anchors).sample
    with torch.no_grad(), adapter.off():
        ref = unet(z, t, encoder_hidden_states=anchors).sample
    return F.mse_loss(pred, ref)


def _save_adapter(adapter: _Membrane, folder: Path, info: dict[str, Any]) -> Path:
    """Write the membrane as ``<folder>/<content hash>.safetensors``, atomically (temp file + rename).

    Keys and the ``prompts``/``rank``/``alpha`` metadata are the reference's (train_spm.py L44–48), so its
    tools load the file; ``concealbench`` holds what this run was and ``keys`` → diffusers module (JSON)."""
    from safetensors.torch import save_file

    tensors = adapter.state_dict()
    h = hashlib.sha256()
    for key, v in tensors.items():
        h.update(f"{key}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes())
    path = Path(folder) / f"{h.hexdigest()[:20]}.safetensors"
    meta = {
        "prompts": ",".join(info["words"]),
        "rank": str(RANK),
        "alpha": str(ALPHA),
        "concealbench": json.dumps({**info, "format": _FORMAT,
                                    "keys": {f"lora_unet_{n.replace('.', '_')}": n for n in sorted(adapter.modules)}},
                                   sort_keys=True, default=str),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path.resolve()


