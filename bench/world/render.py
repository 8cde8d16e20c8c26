"""Seeded procedural renderer for the Shapes world.

Images are 32×32 RGB uint8: one coloured shape, large and near the centre, on a grey two-tone
background texture. The factor ranges follow ``shared/reference/world-calibration2.md``: radius
10–13 px, centre ±1.5 px, rotation ±10° made shape learnable for a 1M-parameter UNet on 2 CPU
cores, where 5.5–8.5 px shapes rotated by ±30° left shape fidelity at 34%.

Rendering is vectorised numpy on a 2× supersampled grid, average-pooled to 32×32 (anti-aliased
edges). The same ``(seed, n)`` always gives the same images and factors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
TEXTURES = ("plain", "stripes", "dots", "checker")
FACTORS = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES}

SIZE = 32
SUPERSAMPLE = 2
RADIUS = (10.0, 13.0)
CENTRE_JITTER = 1.5
ROTATION_DEG = 10.0
COLOUR_JITTER = 0.06

_RGB = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.15],  # green
        [0.15, 0.25, 0.95],  # blue
        [0.95, 0.88, 0.10],  # yellow
        [0.60, 0.15, 0.80],  # purple
        [0.10, 0.85, 0.90],  # cyan
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Batch:
    """Rendered images (N, 32, 32, 3) uint8 and their integer factor labels (N,)."""

    images: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    texture: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of the supersampled canvas, in output-pixel units."""
    m = SIZE * SUPERSAMPLE
    c = (np.arange(m, dtype=np.float32) + 0.5) / SUPERSAMPLE
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return np.broadcast_to(xx, (n, m, m)), np.broadcast_to(yy, (n, m, m))


def _polygon_mask(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of (u, v) (N, H, W) against one polygon (K, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    k = len(verts)
    for i in range(k):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % k]
        if y0 == y1:
            continue
        crosses = (v >= min(y0, y1)) & (v < max(y0, y1))
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _regular_star(points: int, inner: float) -> np.ndarray:
    ang = np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


_TRIANGLE = np.stack(
    [np.cos(np.pi / 2 + np.arange(3) * 2 * np.pi / 3), np.sin(np.pi / 2 + np.arange(3) * 2 * np.pi / 3)],
    axis=1,
)
_STAR = _regular_star(5, 0.48)


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of a unit-size shape in normalised coordinates (radius 1, y pointing up)."""
    name = SHAPES[kind]
    if name == "circle":
        return u * u + v * v <= 0.85**2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if name == "triangle":
        return _polygon_mask(u, v + 0.12, _TRIANGLE)
    if name == "star":
        return _polygon_mask(u, v + 0.05, _STAR)
    if name == "heart":
        x, y = u * 1.25, (v + 0.12) * 1.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if name == "cross":
        w = 0.30
        return ((np.abs(u) <= w) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= w) & (np.abs(u) <= 0.92))
    raise ValueError(f"unknown shape index {kind}")


def _background(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey two-tone backgrounds (N, H, W) in [0, 1] on the supersampled grid."""
    n = len(texture)
    xx, yy = _grid(n)
    dark = rng.uniform(0.05, 0.45, n).astype(np.float32)
    light = rng.uniform(0.60, 0.95, n).astype(np.float32)
    swap = rng.random(n) < 0.5
    a, b = np.where(swap, light, dark), np.where(swap, dark, light)
    plain_grey = rng.uniform(0.10, 0.85, n).astype(np.float32)
    angle = rng.uniform(0, np.pi, n).astype(np.float32)
    period = rng.uniform(4.0, 7.0, n).astype(np.float32)
    dot_period = rng.uniform(5.0, 7.5, n).astype(np.float32)
    dot_radius = rng.uniform(1.1, 1.7, n).astype(np.float32)
    check = rng.uniform(2.5, 4.5, n).astype(np.float32)
    phase = rng.uniform(0, 1, (n, 2)).astype(np.float32)

    def col(x: np.ndarray) -> np.ndarray:
        return x[:, None, None]

    proj = xx * col(np.cos(angle)) + yy * col(np.sin(angle))
    stripes = np.floor(proj / col(period) + col(phase[:, 0])) % 2 == 0
    du = (xx / col(dot_period) + col(phase[:, 0])) % 1 - 0.5
    dv = (yy / col(dot_period) + col(phase[:, 1])) % 1 - 0.5
    dots = (du * du + dv * dv) * col(dot_period) ** 2 <= col(dot_radius) ** 2
    checker = (np.floor(xx / col(check) + col(phase[:, 0])) + np.floor(yy / col(check) + col(phase[:, 1]))) % 2 == 0
    t = col(texture)
    pattern = np.where(t == 1, stripes, np.where(t == 2, dots, checker))
    two_tone = np.where(pattern, col(a), col(b))
    return np.where(t == 0, col(plain_grey), two_tone).astype(np.float32)


def render(
    shape: np.ndarray | list[int],
    colour: np.ndarray | list[int],
    texture: np.ndarray | list[int],
    seed: int,
) -> Batch:
    """Render one image per factor triple; nuisance (size, position, rotation, tones) from ``seed``."""
    shape, colour, texture = (np.asarray(x, dtype=np.int64) for x in (shape, colour, texture))
    if not (len(shape) == len(colour) == len(texture)):
        raise ValueError("shape, colour and texture must have the same length")
    for name, arr, vals in (("shape", shape, SHAPES), ("colour", colour, COLOURS), ("texture", texture, TEXTURES)):
        if len(arr) and (arr.min() < 0 or arr.max() >= len(vals)):
            raise ValueError(f"`{name}` indices must be in [0, {len(vals) - 1}], got {arr.min()}..{arr.max()}")
    n = len(shape)
    rng = np.random.default_rng(seed)
    radius = rng.uniform(*RADIUS, n).astype(np.float32)
    cx = SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, n).astype(np.float32)
    cy = SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, n).astype(np.float32)
    rot = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, n)).astype(np.float32)
    rgb = np.clip(_RGB[colour] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (n, 3)), 0, 1).astype(np.float32)
    bg = _background(texture, rng)

    xx, yy = _grid(n)
    dx = (xx - cx[:, None, None]) / radius[:, None, None]
    dy = (cy[:, None, None] - yy) / radius[:, None, None]  # y up
    c, s = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    mask = np.zeros(u.shape, dtype=np.float32)
    for k in np.unique(shape):
        sel = shape == k
        mask[sel] = _shape_mask(int(k), u[sel], v[sel])

    img = mask[..., None] * rgb[:, None, None, :] + (1 - mask[..., None]) * bg[..., None]
    m = SIZE * SUPERSAMPLE
    img = img.reshape(n, SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(2, 4))
    assert img.shape == (n, SIZE, SIZE, 3) and m == SIZE * SUPERSAMPLE
    images = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return Batch(images, shape, colour, texture)


def render_random(n: int, seed: int, exclude: dict[str, int] | None = None) -> Batch:
    """Render ``n`` images with uniformly random factors; ``exclude`` drops one factor value."""
    rng = np.random.default_rng(seed)
    facs = {name: rng.integers(0, len(vals), n) for name, vals in FACTORS.items()}
    for name, value in (exclude or {}).items():
        # Resample excluded values among the allowed ones, keeping the draw deterministic.
        bad = facs[name] == value
        allowed = np.array([i for i in range(len(FACTORS[name])) if i != value])
        facs[name][bad] = allowed[rng.integers(0, len(allowed), int(bad.sum()))]
    return render(facs["shape"], facs["colour"], facs["texture"], seed=seed + 1)
