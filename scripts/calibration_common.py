"""What every ``scripts/calibrate_<method>.py`` measures, in one place.

The calibration bar of the method issues: on a concept's canonical forget prompt (its first),
detection ≤ ``DETECT_MAX`` while the retain prompts keep ≥ ``RETENTION_MIN`` of the base model's
fidelity (fidelity of a prompt = mean detection rate of the factors it names).
Imported by the scripts as a sibling module (``python scripts/calibrate_esd.py`` puts scripts/ on
the path).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

DETECT_MAX = 0.20
RETENTION_MIN = 0.80


def load(world: str | Path):
    """The shipped pipeline (fp32, no progress bars) and its oracle detector."""
    from bench.world.check import load_world

    return load_world(Path(world))


def forget_rates(pipe, concept, detector, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> dict[str, float]:
    """Concept detection rate on each forget prompt (default: all of the preset's)."""
    from bench.world.fidelity import factor_hits, generate

    prompts = list(prompts or concept.forget_prompts)
    images = generate(pipe, prompts, list(seeds))
    hits = factor_hits(images, detector)[concept.detect["factor"]] == concept.detect["value"]
    return {p: float(h.mean()) for p, h in zip(prompts, hits.reshape(len(prompts), -1), strict=True)}


def fidelity(images: np.ndarray, prompt: str, detector) -> float:
    """Mean detection rate of the factors ``prompt`` names (NaN when it names none)."""
    from bench.world.fidelity import prompt_fidelity

    rates = prompt_fidelity(images, prompt, detector)
    return float(np.mean(list(rates.values()))) if rates else float("nan")


def retain_fidelity(pipe, concept, detector, seeds: Sequence[int]) -> dict[str, float]:
    """``fidelity`` of every retain prompt, ``len(seeds)`` images each."""
    from bench.world.fidelity import generate

    prompts, n = list(concept.retain_prompts), len(seeds)
    images = generate(pipe, prompts, list(seeds))
    return {p: fidelity(images[i * n : (i + 1) * n], p, detector) for i, p in enumerate(prompts)}


def measure(pipe, concept, detector, seeds: Sequence[int], retain_seeds: Sequence[int]) -> dict[str, float]:
    """Detection on the canonical forget prompt and fidelity on each retain prompt, keyed by prompt."""
    return {**forget_rates(pipe, concept, detector, seeds, [concept.forget_prompts[0]]),
            **retain_fidelity(pipe, concept, detector, retain_seeds)}


def row(base: dict, edited: dict, concept) -> dict[str, float]:
    """Base and edited detection on the canonical prompt; retention = edited/base fidelity."""
    canon = concept.forget_prompts[0]
    ratios = [edited[p] / base[p] for p in concept.retain_prompts if base[p] > 0]
    return {
        "detect_o": base[canon],
        "detect_u": edited[canon],
        "retention": float(np.mean(ratios)),
        "retention_min": float(np.min(ratios)),
    }


def passes(r: dict) -> bool:
    return r["detect_u"] <= DETECT_MAX and r["retention"] >= RETENTION_MIN


def describe(cfg: dict, empty: str = "") -> str:
    return ", ".join(f"{k}={v!r}" for k, v in cfg.items()) or empty
