"""The sampling engine: our own classifier-free-guidance loop, the ψ split, prefix snapshots.

DESIGN §1.1. Stock SD-1.x pipelines silently ignore ``denoising_end``/``denoising_start``
(reference/environment.md, "diffusers traps"), so the engine owns the loop over
``scheduler.timesteps``. It reproduces ``pipe(prompt, generator=[one per seed], ...)`` on the
same seeds (tests/test_sampling.py) and uses only the pipeline's ``encode_prompt``, its UNet/VAE
and a fresh copy of its scheduler.

Partial-diffusion probe (paper 2409.05668 §2.3 of our notes): θ runs the first ``prefix_steps``
sampler steps, θ* the rest, with the *same* scheduler state (PNDM's ε history, Euler's step index,
DPM-Solver's past outputs) and the same per-seed random streams. The θ prefix does not depend on
θ*, so ``prefix_snapshots`` runs it once up to the largest ψ and keeps a ``Snapshot`` at every ψ;
``continue_from`` finishes a snapshot with θ*.

Conventions:
- Seeds: seed ``s`` draws its initial latent (and any sampler noise) from its own
  ``torch.Generator("cpu").manual_seed(s)``, so an image never depends on which batch it ran in.
- NFE (UNet evaluations) = UNet forward rows: one image at one step costs 2 with CFG (the
  unconditional and the conditional row) and 1 without. ``NFECounter`` adds them up by stage.
- T = ``len(scheduler.timesteps)`` (101 for PNDM at 100 steps: PLMS repeats one timestep).
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SPLITS = ("step", "timestep")
SNAPSHOT_FORMAT = "concealbench.snapshot/1"


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SamplerConfig:
    """How every image of a run is sampled (DESIGN §1.1; the ``eval`` config group).

    ``guidance`` is the classifier-free-guidance scale w (CFG with the empty prompt, as the stock
    pipeline; w ≤ 1 turns CFG off, as there). ``eta`` is DDIM's η, passed only to schedulers that
    take it. ``batch_size`` counts images (a CFG forward has twice as many rows). How a trajectory
    is split between two models (the partial-diffusion probe's ``split`` rule) is not a sampler
    setting: λ_O and λ_U do not depend on it.
    """

    steps: int
    guidance: float
    batch_size: int = 64
    eta: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"`eval.steps` must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"`eval.guidance` must be a finite number >= 0, got {self.guidance!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"`eval.batch_size` must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.eta, (int, float)) or not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"`eval.eta` must be in [0, 1], got {self.eta!r}")

    @property
    def uses_cfg(self) -> bool:
        """Whether classifier-free guidance runs (the stock pipeline's ``guidance_scale > 1``)."""
        return self.guidance > 1.0

    def as_metadata(self) -> dict[str, str]:
        return {"steps": str(self.steps), "guidance": repr(float(self.guidance)), "eta": repr(float(self.eta))}


PSI_KEY = "probes.partial_diffusion.psi"
SPLIT_KEY = "probes.partial_diffusion.split"


def check_psi_grid(psis: Sequence[float], key: str = PSI_KEY) -> list[float]:
    """Validate a ψ grid (DESIGN §1.1): non-empty, each ψ in [0, 1], strictly increasing."""
    values = list(psis)
    if not values:
        raise ValueError(f"`{key}` must be a non-empty list of ratios in [0, 1], got []")
    for p in values:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"`{key}` values must be numbers in [0, 1], got {p!r} in {values}")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"`{key}` must be sorted and without duplicates, got {values}")
    return [float(p) for p in values]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"`{SPLIT_KEY}` must be one of {list(SPLITS)}, got {split!r}")
    return split


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds are non-negative integers, at least one."""
    values = list(seeds)
    if not values or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in values):
        raise ValueError(f"`seeds` must be a non-empty list of integers >= 0, got {values[:8]}")
    return [int(s) for s in values]


# ----------------------------------------------------------------------------- the ψ split
def make_scheduler(pipe, steps: int, device: torch.device | str = "cpu"):
    """A fresh copy of the pipeline's scheduler with ``set_timesteps(steps)`` done; the
    pipeline's own scheduler object is never stepped."""
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=device)
    return sched


def prefix_steps(scheduler, psi: float, split: str) -> int:
    """How many leading sampler steps θ runs at ratio ψ (DESIGN §1.1); needs ``set_timesteps``.

    ``step``: ⌊ψ·T⌋ with T = len(scheduler.timesteps); ψ·T is rounded to 9 decimals before the
    floor so that 0.29·100 gives 29, not 28. ``timestep`` (the authors' fork, SDXL's
    ``denoising_end``): the steps with t ≥ round(N − N·ψ), N = ``num_train_timesteps``.
    """
    check_psi_grid([psi])
    timesteps = scheduler.timesteps
    if split == "step":
        return math.floor(round(psi * len(timesteps), 9))
    if split == "timestep":
        n_train = scheduler.config.num_train_timesteps
        cutoff = int(round(n_train - psi * n_train))
        return sum(1 for t in timesteps.tolist() if t >= cutoff)
    raise ValueError(f"`{SPLIT_KEY}` must be one of {list(SPLITS)}, got {split!r}")


# ----------------------------------------------------------------------------- NFE
@dataclass
class NFECounter:
    """UNet evaluations (DESIGN §1.3 ``cost``): every UNet forward adds its row count, so one
    image at one CFG step counts 2. ``by_stage`` splits the total into ``generate``, ``prefix``
    (θ up to the largest ψ), ``continue`` (θ* continuations) and ``naive``."""

    total: int = 0
    calls: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)

    def add(self, rows: int, stage: str) -> None:
        self.total += rows
        self.calls += 1
        self.by_stage[stage] = self.by_stage.get(stage, 0) + rows


def ddim_sampler(scheduler: Any, steps: int, key: str = "method.params.ddim_steps"):
    """A deterministic DDIM sampler (η = 0) on the pipeline's noise schedule and timestep grid, for
    methods that sample their own training latents (ESD, SDD, SPM). ``clip_sample`` and
    ``set_alpha_to_one`` are off, as SD v1.4's own scheduler config says, so a non-DDIM config
    (PNDM, Euler) does not bring DDIM's clipping default along. ``key`` names ``steps`` in errors."""
    from diffusers import DDIMScheduler

    from bench.hparams import ConfigError

    sched = DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=False)
    if steps > sched.config.num_train_timesteps:
        raise ConfigError(f"`{key}` must be <= {sched.config.num_train_timesteps}, got {steps}")
    sched.set_timesteps(steps)
    return sched


def ddim_cfg_sample(unet, sched, z: torch.Tensor, run: torch.Tensor, cond: torch.Tensor, null: torch.Tensor,
                    guidance: float) -> tuple[torch.Tensor, int]:
    """DDIM (η = 0) through the grid timesteps ``run`` with classifier-free guidance, for methods that
    sample their own training latents (SDD, SPM); returns (latent, UNet rows). At guidance 0 or 1 one
    branch is the whole prediction (∅ alone, c alone), so only that branch runs."""
    b, rows = z.shape[0], 0
    single = guidance in (0.0, 1.0)
    if single:
        text = (null if guidance == 0.0 else cond).expand(b, -1, -1)
    else:
        text = torch.cat([null.expand(b, -1, -1), cond.expand(b, -1, -1)])
    for t in run:
        inp = z if single else torch.cat([z, z])
        eps = unet(inp, t, encoder_hidden_states=text).sample
        rows += inp.shape[0]
        if not single:
            e_null, e_cond = eps.chunk(2)
            eps = e_null + guidance * (e_cond - e_null)
        z = sched.step(eps, t, z, eta=0.0).prev_sample
    return z, rows


class UNetRows:
    """Counts a UNet's evaluations inside a ``with`` block as batch rows (a CFG forward of batch b
    counts 2b), for methods that run the UNet themselves (Concept Ablation's anchor images,
    SalUn's mask and training)."""

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.count, self._handle = unet, 0, None

    def __enter__(self) -> UNetRows:
        self._handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, _module, args, kwargs):
        self.count += int((args[0] if args else kwargs["sample"]).shape[0])


# ----------------------------------------------------------------------------- scheduler state
def _per_sample(value, chw: tuple[int, ...]) -> bool:
    # Scheduler tensors shaped like the latents (PNDM's ets/cur_sample, DPM's model_outputs)
    # carry one row per image; everything else (timesteps, sigmas, counters) is shared.
    return isinstance(value, torch.Tensor) and value.dim() == len(chw) + 1 and tuple(value.shape[1:]) == chw


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _combine_rows(scheds: list, chw: tuple[int, ...], rows: Callable[[list[torch.Tensor]], torch.Tensor]):
    """A new scheduler whose per-sample tensors are ``rows([that tensor of each scheduler])``
    (concatenate batches, or slice one) and whose other state is a deep copy of ``scheds[0]``'s,
    which all schedulers must share."""
    first = scheds[0]
    new = copy.copy(first)
    for name, value in vars(first).items():
        others = [vars(s)[name] for s in scheds]
        if _per_sample(value, chw):
            setattr(new, name, rows(others))
        elif isinstance(value, list) and any(_per_sample(v, chw) for v in value):
            setattr(new, name, [rows([o[j] for o in others]) if _per_sample(v, chw) else copy.deepcopy(v)
                                for j, v in enumerate(value)])
        else:
            if not all(_same(value, o) for o in others[1:]):
                raise RuntimeError(f"scheduler attribute {name!r} differs between batches; cannot merge")
            setattr(new, name, copy.deepcopy(value))
    return new


def _state_diff(sched, steps: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The scheduler's mutable state as (JSON-able spec, tensors): every attribute that differs
    from a fresh ``from_config`` + ``set_timesteps(steps)`` scheduler."""
    fresh = type(sched).from_config(sched.config)
    fresh.set_timesteps(steps)
    spec, tensors = {}, {}

    def encode(key: str, v):
        if v is None:
            return {"kind": "none"}
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            return {"kind": "tensor"}
        if isinstance(v, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(v))
            return {"kind": "ndarray"}
        if isinstance(v, (np.integer, np.floating, np.bool_)):
            v = v.item()
        if isinstance(v, (bool, int, float, str)):
            return {"kind": "scalar", "value": v}
        if isinstance(v, list):
            return {"kind": "list", "items": [encode(f"{key}.{j}", e) for j, e in enumerate(v)]}
        raise TypeError(f"cannot serialise scheduler attribute {key!r} of type {type(v).__name__}")

    for name, value in vars(sched).items():
        if name == "_internal_dict" or (name in vars(fresh) and _same(value, vars(fresh)[name])):
            continue
        spec[name] = encode(f"scheduler.{name}", value)
    return spec, tensors


def _state_restore(class_name: str, config: dict, steps: int, spec: dict,
                   tensors: dict[str, torch.Tensor], device: torch.device | str):
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"snapshot names an unknown scheduler class {class_name!r}")
    sched = cls.from_config(config)
    sched.set_timesteps(steps, device=device)

    def decode(key: str, s: dict):
        kind = s["kind"]
        if kind == "none":
            return None
        if kind == "tensor":
            return tensors[key].to(device)
        if kind == "ndarray":
            return tensors[key].numpy()
        if kind == "scalar":
            return s["value"]
        if kind == "list":
            return [decode(f"{key}.{j}", e) for j, e in enumerate(s["items"])]
        raise ValueError(f"snapshot has an unknown scheduler value kind {kind!r} for {key!r}")

    for name, s in spec.items():
        value = decode(f"scheduler.{name}", s)
        # Shared tensors (timesteps, sigmas) live where a fresh scheduler keeps them.
        old = vars(sched).get(name)
        if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor):
            value = value.to(old.device)
        setattr(sched, name, value)
    return sched


# ----------------------------------------------------------------------------- snapshots
@dataclass
class Snapshot:
    """The θ-prefix of one prompt and a list of seeds at one ψ (DESIGN §1.1): the latents after
    ``step`` sampler steps, the scheduler with its internal state after them (per-sample tensors
    stacked in seed order), and each seed's generator state. Nothing in it depends on θ*."""

    psi: float
    step: int
    seeds: list[int]
    prompt: str
    latents: torch.Tensor
    scheduler: object
    generator_states: torch.Tensor  # uint8 (N, state bytes), one CPU generator per seed
    sampler: dict[str, str]  # SamplerConfig.as_metadata() of the run that made it
    split: str = "step"  # the split rule that placed ψ at ``step`` (provenance; continuing needs only ``step``)

    def rows(self, lo: int, hi: int, device: torch.device | str):
        """Latents, an independent scheduler copy and generators for seeds ``lo:hi``."""
        chw = tuple(self.latents.shape[1:])
        sched = _combine_rows([self.scheduler], chw, lambda ts: ts[0][lo:hi].to(device).clone())
        gens = []
        for state in self.generator_states[lo:hi]:
            g = torch.Generator("cpu")
            g.set_state(state.clone())
            gens.append(g)
        return self.latents[lo:hi].to(device).clone(), sched, gens

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors for a safetensors file (``latents``, ``generators``, ``scheduler.*``)."""
        _, sched_tensors = _state_diff(self.scheduler, int(self.sampler["steps"]))
        return {"latents": self.latents.detach().cpu().contiguous(),
                "generators": self.generator_states.cpu().contiguous(), **sched_tensors}

    @property
    def metadata(self) -> dict[str, str]:
        """String metadata for a safetensors header; with ``to_tensors`` it rebuilds the snapshot."""
        spec, _ = _state_diff(self.scheduler, int(self.sampler["steps"]))
        return {"format": SNAPSHOT_FORMAT, "psi": repr(self.psi), "step": str(self.step),
                "seeds": json.dumps(self.seeds), "prompt": self.prompt, **self.sampler, "split": self.split,
                "scheduler_class": type(self.scheduler).__name__,
                "scheduler_config": json.dumps(dict(self.scheduler.config)),
                "scheduler_state": json.dumps(spec)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     device: torch.device | str = "cpu") -> Snapshot:
        """Inverse of ``to_tensors`` + ``metadata``."""
        if metadata.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"not a {SNAPSHOT_FORMAT} snapshot: format={metadata.get('format')!r}")
        steps = int(metadata["steps"])
        sched = _state_restore(metadata["scheduler_class"], json.loads(metadata["scheduler_config"]),
                               steps, json.loads(metadata["scheduler_state"]), tensors, device)
        sampler = {k: metadata[k] for k in ("steps", "guidance", "eta")}
        return cls(psi=float(metadata["psi"]), step=int(metadata["step"]), seeds=json.loads(metadata["seeds"]),
                   prompt=metadata["prompt"], latents=tensors["latents"].to(device), scheduler=sched,
                   generator_states=tensors["generators"].clone(), sampler=sampler, split=metadata.get("split", "step"))

    def save(self, path) -> None:
        """Write one safetensors file (no pickle)."""
        from safetensors.torch import save_file

        save_file(self.to_tensors(), str(path), metadata=self.metadata)

    @classmethod
    def load(cls, path, device: torch.device | str = "cpu") -> Snapshot:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return cls.from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata(), device)


# ----------------------------------------------------------------------------- the loop
def _device(pipe) -> torch.device:
    return pipe._execution_device


def _embeddings(pipe, prompt: str, cfg: SamplerConfig, device, unet=None) -> torch.Tensor:
    """(uncond, cond) text embeddings of one image, stacked; "" is the unconditional prompt. The
    text encoder is ``unet``'s own when one is paired with it (an unlearned text encoder,
    ``bench.pipeline.pair_text_encoder``), else the pipeline's."""
    from bench.pipeline import text_encoder_for, using_text_encoder

    with using_text_encoder(pipe, text_encoder_for(pipe, unet)):
        cond, uncond = pipe.encode_prompt(prompt, device, 1, cfg.uses_cfg, None)
    return torch.cat([uncond, cond]) if cfg.uses_cfg else cond


def _batch_embeddings(emb: torch.Tensor, rows: int, cfg: SamplerConfig) -> torch.Tensor:
    # The stock pipeline's layout: [uncond × rows, cond × rows], each repeated per image.
    parts = emb.chunk(2) if cfg.uses_cfg else (emb,)
    return torch.cat([p.repeat(rows, 1, 1) for p in parts])


def _initial(unet, sched, seeds: list[int], dtype, device):
    """Per-seed initial latents (the stock ``prepare_latents`` with a list of CPU generators)."""
    from diffusers.utils.torch_utils import randn_tensor

    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    size = unet.config.sample_size
    shape = (len(seeds), unet.config.in_channels, size, size)
    latents = randn_tensor(shape, generator=gens, device=device, dtype=dtype)
    return latents * sched.init_noise_sigma, gens


def _step_kwargs(sched, gens: list[torch.Generator], eta: float) -> dict:
    params = inspect.signature(sched.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = gens
    return kwargs


def _denoise(unet, sched, latents, emb, gens, start: int, stop: int, cfg: SamplerConfig,
             counter: NFECounter | None, stage: str, bar, extra: dict | None = None) -> torch.Tensor:
    """Sampler steps ``start:stop`` with ``unet`` and CFG; mirrors the stock pipeline's loop.
    ``extra``: further ``scheduler.step`` arguments (the noise probe's η and variance scale)."""
    kwargs = {**_step_kwargs(sched, gens, cfg.eta), **(extra or {})}
    for i in range(start, stop):
        t = sched.timesteps[i]
        x = torch.cat([latents] * 2) if cfg.uses_cfg else latents
        x = sched.scale_model_input(x, t)
        eps = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        if counter is not None:
            counter.add(x.shape[0], stage)
        if cfg.uses_cfg:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + cfg.guidance * (eps_text - eps_uncond)
        latents = sched.step(eps, t, latents, **kwargs, return_dict=False)[0]
        if bar is not None:
            bar.update()
    return latents


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _bar(progress: bool, total: int, desc: str):
    from bench.progress import bar

    return bar(total, desc, unit="step") if progress else None


# ----------------------------------------------------------------------------- public API
@torch.no_grad()
def generate(pipe, unet, prompt: str, seeds: Sequence[int], cfg: SamplerConfig,
             counter: NFECounter | None = None, progress: bool = False, *, scheduler_class: type | None = None,
             step_kwargs: dict | None = None) -> torch.Tensor:
    """Plain generation with ``unet`` (λ_O with θ, λ_U with θ*; DESIGN §1.2): final latents (N,C,h,w).

    ``scheduler_class`` (built from the pipeline's scheduler config) and ``step_kwargs`` let a probe
    sample another way (the noise probe's DDIM with η > 1); by default the pipeline's own sampler."""
    seeds = check_seeds(seeds)
    device = _device(pipe)
    emb = _embeddings(pipe, prompt, cfg, device, unet)

    def new_scheduler(dev=None):
        if scheduler_class is None:
            return make_scheduler(pipe, cfg.steps, dev or "cpu")
        sched = scheduler_class.from_config(pipe.scheduler.config)
        sched.set_timesteps(cfg.steps, device=dev or "cpu")
        return sched

    T = len(new_scheduler().timesteps)
    bar, out = _bar(progress, T * len(_batches(len(seeds), cfg.batch_size)), "generate"), []
    for lo, hi in _batches(len(seeds), cfg.batch_size):
        sched = new_scheduler(device)
        latents, gens = _initial(unet, sched, seeds[lo:hi], emb.dtype, device)
        e = _batch_embeddings(emb, hi - lo, cfg)
        out.append(_denoise(unet, sched, latents, e, gens, 0, T, cfg, counter, "generate", bar, step_kwargs))
    if bar is not None:
        bar.close()
    return torch.cat(out)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """VAE-decode latents to uint8 images (N,H,W,3), rounded as the stock pipeline's PIL output."""
    vae, out = pipe.vae, []
    for chunk in latents.split(batch_size):
        chunk = chunk.to(_device(pipe), vae.dtype) / vae.config.scaling_factor
        image = vae.decode(chunk, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="np")
        out.append((image * 255).round().astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def prefix_snapshots(pipe, unet_theta, prompt: str, seeds: Sequence[int], psis: Sequence[float],
                     cfg: SamplerConfig, counter: NFECounter | None = None,
                     progress: bool = False, *, split: str = "step") -> dict[float, Snapshot]:
    """Run θ once up to the largest ψ and snapshot the trajectory at every ψ (DESIGN §1.1).

    Cost: max_ψ prefix_steps(ψ) steps per seed, instead of Σ_ψ prefix_steps(ψ) for the naive
    attack. Snapshots that fall on the same step share their tensors (read-only).
    """
    seeds, psis = check_seeds(seeds), check_psi_grid(psis)
    device = _device(pipe)
    emb = _embeddings(pipe, prompt, cfg, device, unet_theta)
    template = make_scheduler(pipe, cfg.steps)
    steps_of = {p: prefix_steps(template, p, check_split(split)) for p in psis}
    stops = sorted(set(steps_of.values()))
    batches = _batches(len(seeds), cfg.batch_size)
    parts: dict[int, list] = {k: [] for k in stops}  # step → [(latents, scheduler copy, generator states)]
    bar = _bar(progress, stops[-1] * len(batches), "θ prefix")
    for lo, hi in batches:
        sched = make_scheduler(pipe, cfg.steps, device)
        latents, gens = _initial(unet_theta, sched, seeds[lo:hi], emb.dtype, device)
        e, done = _batch_embeddings(emb, hi - lo, cfg), 0
        for k in stops:
            latents = _denoise(unet_theta, sched, latents, e, gens, done, k, cfg, counter, "prefix", bar)
            parts[k].append((latents.clone(), copy.deepcopy(sched), torch.stack([g.get_state() for g in gens])))
            done = k
    if bar is not None:
        bar.close()
    merged = {}
    for k, batch_parts in parts.items():
        lat = torch.cat([p[0] for p in batch_parts])
        sched = _combine_rows([p[1] for p in batch_parts], tuple(lat.shape[1:]), torch.cat)
        merged[k] = (lat, sched, torch.cat([p[2] for p in batch_parts]))
    return {p: Snapshot(psi=p, step=k, seeds=seeds, prompt=prompt, latents=merged[k][0], scheduler=merged[k][1],
                        generator_states=merged[k][2], sampler=cfg.as_metadata(), split=split)
            for p, k in steps_of.items()}


def check_snapshot(snapshot: Snapshot, cfg: SamplerConfig) -> None:
    """A snapshot can only be continued under the sampler settings that made it."""
    if snapshot.sampler != cfg.as_metadata():
        raise ValueError(f"snapshot (ψ={snapshot.psi}) was made with sampler settings {snapshot.sampler}, "
                         f"cannot continue it with {cfg.as_metadata()}")


@torch.no_grad()
def continue_from(pipe, unet_star, snapshot: Snapshot, prompt: str, cfg: SamplerConfig,
                  counter: NFECounter | None = None, progress: bool = False) -> torch.Tensor:
    """Finish a θ-prefix snapshot with θ*'s UNet (DESIGN §1.1 step 3): final latents (N,C,h,w).

    The snapshot is not modified; each batch continues from its own copy of the scheduler state
    and generators, so one snapshot serves every method evaluated on the prompt.
    """
    check_snapshot(snapshot, cfg)
    device = _device(pipe)
    emb = _embeddings(pipe, prompt, cfg, device, unet_star)
    T = len(snapshot.scheduler.timesteps)
    batches = _batches(len(snapshot.seeds), cfg.batch_size)
    bar, out = _bar(progress, (T - snapshot.step) * len(batches), f"θ* from ψ={snapshot.psi:g}"), []
    for lo, hi in batches:
        latents, sched, gens = snapshot.rows(lo, hi, device)
        e = _batch_embeddings(emb, hi - lo, cfg)
        out.append(_denoise(unet_star, sched, latents, e, gens, snapshot.step, T, cfg, counter, "continue", bar))
    if bar is not None:
        bar.close()
    return torch.cat(out)


@torch.no_grad()
def split_generate(pipe, unet_theta, unet_star, prompt: str, seeds: Sequence[int], psi: float,
                   cfg: SamplerConfig, counter: NFECounter | None = None, stage: str = "naive", *,
                   split: str = "step") -> torch.Tensor:
    """λ_P(ψ) the direct way, without snapshots: θ from scratch for the prefix, then θ* on the
    same scheduler object (paper §2.3's two pipeline calls, minus the fork's scheduler reset)."""
    seeds = check_seeds(seeds)
    device = _device(pipe)
    from bench.pipeline import text_encoder_for

    emb = _embeddings(pipe, prompt, cfg, device, unet_theta)
    own = text_encoder_for(pipe, unet_star) is not text_encoder_for(pipe, unet_theta)  # θ* has its own text encoder
    emb_star = _embeddings(pipe, prompt, cfg, device, unet_star) if own else emb
    out = []
    for lo, hi in _batches(len(seeds), cfg.batch_size):
        sched = make_scheduler(pipe, cfg.steps, device)
        k, T = prefix_steps(sched, psi, check_split(split)), len(sched.timesteps)
        latents, gens = _initial(unet_theta, sched, seeds[lo:hi], emb.dtype, device)
        e, e_star = _batch_embeddings(emb, hi - lo, cfg), _batch_embeddings(emb_star, hi - lo, cfg)
        latents = _denoise(unet_theta, sched, latents, e, gens, 0, k, cfg, counter, stage, None)
        out.append(_denoise(unet_star, sched, latents, e_star, gens, k, T, cfg, counter, stage, None))
    return torch.cat(out)


def embed_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states of ``prompts`` with the pipeline's own tokenisation, no CFG pair
    (what the training methods condition on; ESD, SDD, SPM, STEREO, Receler)."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, pipe.unet.device, 1, False)[0]
