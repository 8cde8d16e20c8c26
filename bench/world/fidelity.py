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


# The oracle was trained on renders whose backgrounds are grey (two-tone or plain); an edited model
# can paint the background in a colour, where the oracle's reading of the shape fails: on renders
# whose grey background is tinted to a frame saturation of about 0.3 its shape accuracy falls from
# 1.00 to 0.75-0.80, fully tinted to 0.40-0.44, most shapes read as crosses (``tinted_accuracy``).
FRAME_PX = 2        # the frame read as background: a shape reaches it only at its largest radius and jitter
MAX_TINT = 0.3      # median HSV saturation of the frame above which an image is outside the oracle's domain


def background_tint(images: np.ndarray) -> np.ndarray:
    """Per image, the median HSV saturation of its ``FRAME_PX``-pixel frame: 0 for every render
    (grey backgrounds), near 1 for a background painted in a pure colour."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    f = FRAME_PX
    frame = np.concatenate([x[:, :f].reshape(len(x), -1, 3), x[:, -f:].reshape(len(x), -1, 3),
                            x[:, f:-f, :f].reshape(len(x), -1, 3), x[:, f:-f, -f:].reshape(len(x), -1, 3)], axis=1)
    hi, lo = frame.max(-1), frame.min(-1)
    return np.median((hi - lo) / np.maximum(hi, 1e-3), axis=1)


def off_domain(images: np.ndarray, max_tint: float = MAX_TINT) -> np.ndarray:
    """Per image: is its background tinted beyond ``max_tint``, outside what the oracle was trained on?"""
    return background_tint(images) > max_tint


def tinted_accuracy(detector: Detector, n: int = 2000, seed: int = 999_999,
                    tints: Sequence[float] = (0.3, 0.45, 0.6, 1.0)) -> dict[str, dict[str, float]]:
    """The oracle on renders whose grey background is tinted towards blue, yellow or red (``tints``:
    the mix towards the colour, 1 = fully tinted): accuracy per head and the frame saturation
    (``background_tint``) the tint gives, per colour and mix. The shape is found by rendering the
    same draw twice in two colours (the nuisance draws do not depend on the colour)."""
    from bench.world.render import COLOURS, SHAPES, TEXTURES, render

    rng = np.random.default_rng(seed)
    shape, colour, texture = (rng.integers(0, len(v), n) for v in (SHAPES, COLOURS, TEXTURES))
    a = render(shape, colour, texture, seed=seed + 1)
    b = render(shape, (colour + 3) % len(COLOURS), texture, seed=seed + 1)
    shape_px = (np.abs(a.images.astype(np.int16) - b.images.astype(np.int16)).sum(-1) > 30)[..., None]
    labels = {"shape": shape, "colour": colour, "texture": texture}
    x = a.images.astype(np.float32)
    out = {}
    for name, rgb in (("blue", (0.35, 0.55, 1.0)), ("yellow", (1.0, 0.9, 0.3)), ("red", (1.0, 0.4, 0.4))):
        for mix in tints:
            tint = 1 - mix + mix * np.asarray(rgb, dtype=np.float32)
            imgs = np.clip(np.where(shape_px, x, x * tint), 0, 255).astype(np.uint8)
            p = detector.predict(imgs)
            out[f"{name}_{mix:g}"] = {"frame_tint": float(np.median(background_tint(imgs))),
                                      **{h: float((p[h].argmax(1) == labels[h]).mean()) for h in HEADS}}
    return out


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
