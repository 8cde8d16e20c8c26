"""Generate with a Shapes pipeline and score it with the oracle detector.

Fidelity of a prompt = for each factor the prompt specifies (``captions.parse``), the share of its
images in which the detector's argmax equals that value.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bench.world.captions import VALUES, parse
from bench.world.detector import HEADS, Detector

# 12 prompts covering every shape twice, every colour twice and every texture three times.
EVAL_PROMPTS = (
    "a red star on a striped background",
    "a blue circle on a dotted background",
    "a green square on a checkered background",
    "a yellow triangle on a plain background",
    "a purple heart on a striped background",
    "a cyan cross on a dotted background",
    "a yellow circle on a checkered background",
    "a red heart on a plain background",
    "a cyan triangle on a striped background",
    "a purple square on a dotted background",
    "a green cross on a checkered background",
    "a blue star on a plain background",
)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 7.5,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """uint8 images (len(prompts)·len(seeds), H, W, 3): every prompt with every seed, prompt-major."""
    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    it = range(0, len(jobs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="generate", unit="batch")
    for i in it:
        chunk = jobs[i : i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
        res = pipe(
            [p for p, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        ).images
        out.append(np.clip(np.round(res * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def factor_hits(images: np.ndarray, detector: Detector) -> dict[str, np.ndarray]:
    """Detector argmax per head, as value names (N,)."""
    probs = detector.predict(images)
    return {h: np.array(VALUES[h])[probs[h].argmax(1)] for h in HEADS}


def prompt_fidelity(images: np.ndarray, prompt: str, detector: Detector) -> dict[str, float]:
    """Share of images showing each factor value the prompt specifies."""
    spec = parse(prompt)
    hits = factor_hits(images, detector)
    return {f: float((hits[f] == v).mean()) for f, v in spec.items()}


def fidelity_table(pipe, detector: Detector, prompts: Sequence[str], seeds: Sequence[int], **kw) -> list[dict]:
    """Per prompt: the factors it specifies and the detection rate of each."""
    images = generate(pipe, prompts, seeds, **kw)
    n = len(seeds)
    rows = []
    for i, p in enumerate(prompts):
        rows.append({"prompt": p, "n": n, **prompt_fidelity(images[i * n : (i + 1) * n], p, detector)})
    return rows


def summarise(rows: list[dict]) -> dict[str, float]:
    """Mean fidelity per factor over the prompts that specify it."""
    out = {}
    for f in HEADS:
        vals = [r[f] for r in rows if f in r]
        if vals:
            out[f] = float(np.mean(vals))
    return out
