"""Concealment probes: one seam for every way of asking "can the concept be brought back?" (DESIGN §5).

A probe is a component like a method: one file in this folder, one YAML in ``conf/probes/`` whose
``_target_`` names its class, and this small interface:

- ``__init__(**settings)`` validates its settings before any model loads (``ConfigError`` naming
  ``probes.<name>.<key>``, the value and what is allowed);
- ``check_world(concept, world)`` refuses a world that cannot serve it (e.g. no concept images);
- ``describe()`` is its protocol (joins the probe's protocol hash; ``protocol_fields`` places it);
- ``axis(ctx)`` is the axis of its recovery curve (ψ, inversion steps, relearning steps, …);
- ``prepare(ctx)`` does the per-unlearned-model work (learn an embedding, fine-tune) and returns
  ``(tensors, meta)``, which the harness stores as the probe's stage file and hands back to
  ``run``; a probe without such work returns ``({}, {})``;
- ``run(ctx, prompt, cls, state)`` returns the images along the axis for one prompt
  (``ProbeOutput``). Shared scorers (``bench.scorers``) turn them into metrics;
- ``rows(workload)`` counts the UNet rows it will spend (``Workload``; tests hold it to the NFE
  counter), so ``python -m bench.costs`` can price a probe suite on a model it has not loaded.

A job lists its probes (``probes=[partial_diffusion,inversion]``); each has its own stage files
under ``probes/<name>/`` in the job folder, so adding a probe to a finished job recomputes neither
λ_O, λ_U, the classifier nor the other probes. The gold-standard row (``method=retrain``) and the
original model (``method=noop``) run the same probes: every probe has its never-learned control.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bench.hparams import ConfigError

NAME_KEY = "probes"


@dataclass(frozen=True)
class Axis:
    """The axis of a probe's recovery curve: increasing ``values``; ``steps`` are the sampler steps
    they map to where that means something (partial diffusion), so the recovery point can be
    reported in steps too. ``unit`` names one value ("ψ", "steps")."""

    name: str
    label: str
    values: tuple[float, ...]
    unit: str = ""
    steps: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "label": self.label, "unit": self.unit, "values": [float(v) for v in self.values]}
        if self.steps is not None:
            d["steps"] = [int(s) for s in self.steps]
        return d


@dataclass(frozen=True)
class Workload:
    """What a probe's cost depends on, known from the config alone: the number of forget and retain
    prompts, target words and sampler steps, whether the sampler uses classifier-free guidance
    (two UNet rows per image and step), and whether concept images come from a renderer (Shapes)
    or from θ itself (SD)."""

    forget: int
    retain: int
    steps: int
    targets: int = 1
    cfg: bool = True
    renders: bool = True

    def sample(self, images: int, steps: int | None = None) -> int:
        """UNet rows to take ``images`` images through ``steps`` sampler steps (default: all)."""
        return int(images) * (self.steps if steps is None else int(steps)) * (2 if self.cfg else 1)


@dataclass
class ProbeOutput:
    """Images along the axis for one prompt: ``images[x]`` is uint8 (n_seeds, H, W, 3), the same
    seeds in the same order at every x. ``extra`` holds further image sets on the same axis that
    the scorers report with a suffix (partial diffusion's ``seed42``: the authors' single seed).
    ``data`` is JSON-able per-prompt output worth keeping (e.g. adversarial prompts found)."""

    images: dict[float, np.ndarray]
    extra: dict[str, dict[float, np.ndarray]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeContext:
    """Everything a probe may use, passed explicitly. ``theta`` is the original UNet, ``star`` the
    unlearned one (as re-loaded from the job's delta); ``images(unet, prompt, seeds)`` generates and
    decodes with the job's sampler; ``seeds(offset, n)`` gives the job's seed range for a probe, so
    ``seed`` moves every probe's random choices; ``amp()`` is the inference autocast."""

    pipe: Any
    theta: Any
    star: Any
    concept: Any
    sampler: Any
    cache: Any
    counter: Any
    device: Any
    seed: int
    amp: Callable[[], contextlib.AbstractContextManager]
    detector: Any = None
    progress: bool = True
    world: str = "shapes"
    cache_key: dict[str, Any] = field(default_factory=dict)  # what cached entries of this model are keyed by (its hash, kernels, precision)

    def seeds(self, offset: int, n: int) -> list[int]:
        from bench.run import job_seed_base

        base = job_seed_base(self.seed) + offset
        return list(range(base, base + n))

    def images(self, unet: Any, prompt: str, seeds: list[int], sampler: Any = None) -> np.ndarray:
        """Generate and decode ``seeds`` for ``prompt`` with ``unet`` (the job's sampler unless given)."""
        from bench.sampling import decode, generate

        sampler = sampler or self.sampler
        with self.amp():
            lat = generate(self.pipe, unet, prompt, seeds, sampler, self.counter)
            return decode(self.pipe, lat, sampler.batch_size)


class Probe:
    """Base class of every probe. Subclasses set ``classes`` and implement ``describe``, ``axis``
    and ``run`` (and ``prepare`` when they train something per unlearned model)."""

    name: str = ""
    classes: ClassVar[tuple[str, ...]] = ("forget", "retain")
    display: ClassVar[str] = ""
    reference: ClassVar[str] = ""

    def key(self, setting: str) -> str:
        return f"{NAME_KEY}.{self.name}.{setting}"

    def check_world(self, concept: Any, world: str) -> None:
        """Raise ``ConfigError`` when this world or concept cannot serve the probe (before loading)."""

    def check_tokenizer(self, tokenizer: Any, n: int = 1) -> None:
        """Raise ``ConfigError`` when a setting clashes with the model's tokenizer (checked before the
        model loads wherever the tokenizer is local, else at the probe's first use)."""

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def protocol_fields(self) -> dict[str, Any]:
        """What this probe adds to the shared protocol to form its own ranking protocol."""
        return {"probe": {"name": self.name, **self.describe()}}

    def axis(self, ctx: ProbeContext) -> Axis:
        raise NotImplementedError

    def prepare(self, ctx: ProbeContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}

    def run(self, ctx: ProbeContext, prompt: str, cls: str, state: tuple[dict, dict]) -> ProbeOutput:
        raise NotImplementedError

    def rows(self, w: Workload) -> dict[str, int]:
        """UNet rows per unlearned model, as the NFE counter counts them: ``sample`` (θ*'s images),
        ``train`` (optimisation steps: one forward and one backward pass per image, counted 2) and
        ``theta`` (θ's own images the probe needs: ψ-prefixes, SD's context images)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- config → probes

def _check_settings(cls: type, settings: dict, name: str) -> None:
    """Unknown settings get one message naming the key and the allowed ones (a typo must not pass)."""
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD)
    for k in settings:
        if k not in allowed:
            raise ConfigError(f"`{NAME_KEY}.{name}.{k}` is not a setting of the {name} probe; allowed: {', '.join(allowed)}")


def build_probes(node: Any) -> list[Probe]:
    """Instantiate the probes a config lists (``probes.<name>`` nodes with ``_target_``), in order."""
    from omegaconf import OmegaConf

    from bench.config import load_target

    if node is None:
        return []
    items = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    if not isinstance(items, dict):
        raise ConfigError(f"`{NAME_KEY}` must be a mapping of probe configs (choose them with probes=[partial_diffusion,...]), got {items!r}")
    probes = []
    for name, settings in items.items():
        if not isinstance(settings, dict) or "_target_" not in settings:
            raise ConfigError(f"`{NAME_KEY}.{name}` is not a probe config (no `_target_`); the probes are the files in conf/probes/ "
                              f"— select them with probes=[{name},...] before setting their keys")
        settings = dict(settings)
        target = settings.pop("_target_")
        cls = load_target(target, f"{NAME_KEY}.{name}._target_")
        if not (isinstance(cls, type) and issubclass(cls, Probe)):
            raise ConfigError(f"`{NAME_KEY}.{name}._target_` = {target!r} is not a bench.probes.Probe class")
        _check_settings(cls, settings, name)
        probe = cls.__new__(cls)
        probe.name = str(name)
        probe.__init__(**settings)
        probes.append(probe)
    return probes


def check_dir(path: str | None, key: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"`{key}` must be an existing directory of images, got {path!r}")
    return p


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image_folder(path: str | Path, k: int, size: int) -> np.ndarray:
    """The first ``k`` images of a folder (sorted by name), RGB, resized to ``size``² — uint8 (k, size, size, 3)."""
    from PIL import Image

    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:k]
    if len(files) < k:
        raise ConfigError(f"`concept.images_dir` = {str(path)!r} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); the probe needs {k}")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files])
