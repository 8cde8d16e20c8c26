"""World-specific pieces: concept detectors, gold-standard models, concept renders.

A world = a base model + a way to tell whether an image shows a concept. The Shapes world's
oracle detector reads shape, colour and texture; a prompt's own concept is every factor the
prompt names (``captions.parse``). SD worlds plug in NudeNet / ImageNet / CLIP detectors.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from bench.concepts import Concept, concept_from_cfg
from bench.pipeline import SHAPES_DIR, model_path


def detect_specs(concept: Concept) -> list[tuple[str, str]]:
    """The (factor, value) pairs whose presence means "the concept is shown" (any of them)."""
    d = concept.detect
    parts = d if isinstance(d, (list, tuple)) else [d]
    return [(p["factor"], p["value"]) for p in parts]


@dataclass
class ShapesDetector:
    """The Shapes oracle as a concept detector (DESIGN §2.1)."""

    det: Any  # bench.world.detector.Detector
    name: str = "shapes-oracle"

    def concept_hits(self, images: np.ndarray, concept: Concept) -> np.ndarray:
        """Per image: does it show the concept (detector argmax == one of the concept's values)?"""
        from bench.world.fidelity import factor_hits

        hits = factor_hits(images, self.det)
        out = np.zeros(len(images), dtype=bool)
        for factor, value in detect_specs(concept):
            out |= hits[factor] == value
        return out

    def concept_scores(self, images: np.ndarray, concept: Concept) -> np.ndarray:
        """Per image: the oracle's probability of the concept's value (the highest over its values)."""
        from bench.world.render import FACTORS

        probs = self.det.predict(images)
        return np.max([probs[f][:, FACTORS[f].index(v)] for f, v in detect_specs(concept)], axis=0)

    def prompt_hits(self, images: np.ndarray, prompt: str) -> np.ndarray:
        """Per image: does it show every factor value the prompt names (the prompt's own concept)?"""
        from bench.world.captions import parse
        from bench.world.fidelity import factor_hits

        spec = parse(prompt)
        hits = factor_hits(images, self.det)
        ok = np.ones(len(images), dtype=bool)
        for f, v in spec.items():
            ok &= hits[f] == v
        return ok

    def keeps(self, images: np.ndarray, prompt: str, concept: Concept) -> np.ndarray | None:
        """Specificity (DESIGN §6): per image, does it show every factor the forget prompt names
        *besides* the concept's (a texture concept keeps shape and colour, …)? None when the prompt
        names no other factor ("a star")."""
        from bench.world.captions import parse
        from bench.world.fidelity import factor_hits

        own = {f for f, _ in detect_specs(concept)}
        spec = {f: v for f, v in parse(prompt).items() if f not in own}
        if not spec:
            return None
        hits = factor_hits(images, self.det)
        ok = np.ones(len(images), dtype=bool)
        for f, v in spec.items():
            ok &= hits[f] == v
        return ok

    def off_domain(self, images: np.ndarray) -> np.ndarray:
        """Per image: is it outside the oracle's training domain (a tinted background, where its
        readings fail; ``bench.world.fidelity.off_domain``)? A diagnostic beside the detections."""
        from bench.world.fidelity import off_domain

        return off_domain(images)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate oracle features: the world's feature space for KID."""
        return self.det.embed(images)

    def describe(self) -> dict:
        return {"name": self.name, "threshold": "argmax"}


def shapes_world_json(model_cfg: Any) -> dict:
    p = Path(model_path(model_cfg)) / "world.json"
    return json.loads(p.read_text()) if p.exists() else {}


def shapes_renderer(concept_cfg: Any) -> Callable[[int, int], np.ndarray]:
    """Renders of a Shapes concept: its detect factor fixed (one of its values, for a
    several-concept preset), the other factors uniform."""
    from bench.world.render import FACTORS, render

    detect = concept_cfg.detect
    parts = list(detect) if isinstance(detect, (list, tuple)) or OmegaConf.is_list(detect) else [detect]
    specs = [(p["factor"], FACTORS[p["factor"]].index(p["value"])) for p in parts]

    def _render(n: int, seed: int, target: int | None = None) -> np.ndarray:
        """``n`` images; ``target`` = index of one of the preset's values (several-concept presets)."""
        rng = np.random.default_rng(seed)
        facs = {f: rng.integers(0, len(v), n) for f, v in FACTORS.items()}
        which = rng.integers(0, len(specs), n) if target is None else np.full(n, target)
        for j, (factor, value) in enumerate(specs):
            facs[factor][which == j] = value
        return render(facs["shape"], facs["colour"], facs["texture"], seed=seed + 1).images

    return _render


def shapes_prompt_renders(prompt: str, concept: Concept, n: int, seed: int) -> np.ndarray:
    """Renders of what a Shapes prompt asks for: every factor it names fixed (and the concept's own
    value when the prompt names it only by a word the grammar lacks), the others random."""
    from bench.world.captions import parse
    from bench.world.render import FACTORS, render

    named = parse(prompt)
    for f, v in detect_specs(concept)[:1]:
        named.setdefault(f, v)
    rng = np.random.default_rng(seed)
    facs = {f: rng.integers(0, len(vals), n) for f, vals in FACTORS.items()}
    for f, v in named.items():
        facs[f][:] = FACTORS[f].index(v)
    return render(facs["shape"], facs["colour"], facs["texture"], seed=seed + 1).images


def build_concept(cfg: Any) -> Concept:
    """The ``Concept`` for a run, with the world's gold model and renderer attached."""
    if cfg.model.world == "shapes":
        gold = shapes_world_json(cfg.model).get("gold", {}).get(cfg.concept.name)
        gold_path = str(Path(model_path(cfg.model)) / gold["unet"]) if gold else None
        render = shapes_renderer(cfg.concept) if cfg.concept.get("detect") else None
        return concept_from_cfg(cfg.concept, gold_unet=gold_path, render=render)
    return concept_from_cfg(cfg.concept)


def build_detector(cfg: Any):
    """The world's concept detector, or None where the world has none."""
    if cfg.model.world == "shapes":
        from bench.world.detector import Detector

        return ShapesDetector(Detector.load(Path(model_path(cfg.model)) / "detector"))
    if cfg.model.world == "sd":  # NudeNet / ImageNet ResNet-50 / CLIP zero-shot, per `concept.detector`
        from bench.detectors import build_sd_detector

        return build_sd_detector(cfg)
    return None


__all__ = ["ShapesDetector", "build_concept", "build_detector", "SHAPES_DIR"]
