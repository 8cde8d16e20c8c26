"""The Shapes oracle concept detector: a small CNN with shape, colour and texture heads.

It plays the role NudeNet / an ImageNet classifier / a CLIP style probe play on Stable Diffusion:
it decides whether a generated image shows a concept (``erasure``, ``retention``, ``psi_recover``)
and gives the feature space for KID. Weights are stored as safetensors with a JSON config.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.world.render import FACTORS

HEADS = tuple(FACTORS)  # ("shape", "colour", "texture")


class Detector(nn.Module):
    """3 stages of 2×(conv3×3 + BN + ReLU), max-pool between, GAP, one linear per factor."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 96)):
        super().__init__()
        self.widths = tuple(widths)
        layers: list[nn.Module] = []
        c_in = 3
        for i, w in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c_in = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({h: nn.Linear(c_in, len(FACTORS[h])) for h in HEADS})
        self.feature_dim = c_in

    @staticmethod
    def preprocess(images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1] → normalised float (N, 3, H, W)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.dtype == torch.uint8:
            # contiguous NCHW whatever the array's memory layout: a freshly decoded batch is an NCHW buffer
            # seen as NHWC, one read back from a stage or cache file is C-contiguous NHWC, and without this the
            # two reach the convolutions as NCHW and channels-last, whose kernels round differently (features
            # 1e-6 apart), so a job's KID moved with whether its λ_O came from the cache
            images = images.permute(0, 3, 1, 2).contiguous().float() / 255.0
        return (images - 0.5) / 0.25

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features of preprocessed images."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {h: head(f) for h, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images, batch_size: int = 512) -> dict[str, np.ndarray]:
        """Class probabilities per head for uint8 (N, H, W, 3) images (or float NCHW in [0,1])."""
        self.eval()
        out: dict[str, list[np.ndarray]] = {h: [] for h in HEADS}
        for i in range(0, len(images), batch_size):
            logits = self(self.preprocess(images[i : i + batch_size]))
            for h in HEADS:
                out[h].append(torch.softmax(logits[h].float(), -1).numpy())
        return {h: np.concatenate(v) if v else np.zeros((0, len(FACTORS[h]))) for h, v in out.items()}

    @torch.no_grad()
    def embed(self, images, batch_size: int = 512) -> np.ndarray:
        """Penultimate features (N, D) for uint8 images: the world's feature space for KID."""
        self.eval()
        feats = [self.features(self.preprocess(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(feats) if feats else np.zeros((0, self.feature_dim), np.float32)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        cfg = {"widths": list(self.widths), "heads": {h: list(FACTORS[h]) for h in HEADS}}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.exists() or not weights.exists():
            raise FileNotFoundError(f"no detector at {path} (need config.json and model.safetensors)")
        cfg = json.loads(cfg_file.read_text())
        for h in HEADS:
            if cfg["heads"].get(h) != list(FACTORS[h]):
                raise ValueError(f"detector at {path} was trained for other {h} classes: {cfg['heads'].get(h)}")
        det = cls(tuple(cfg["widths"]))
        det.load_state_dict(load_file(str(weights)))
        return det.eval()
