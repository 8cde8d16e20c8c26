"""The paper's λ_O-vs-λ_U classifier g (DESIGN §1.2; paper notes §4.1).

g is fine-tuned per (method, prompt) to tell the original model's images λ_O (label 1) from the
unlearned model's λ_U (label 0). Its softmax gives CCS; its penultimate features f(·) give CRS.

Training follows the authors' ``finetune_model_with_contrastive_learning``: each anchor gets a
random other image of its class as positive and ``negatives`` random images of the other class,
of which the nearest (hardest) is used; loss = mean(max(0, ‖f(a) − f(p)‖ − min_k ‖f(a) − f(n_k)‖
+ margin)) + CE(g(a), label), summed 1:1; anchors, positives and negatives go through the
trunk in three separate train-mode passes, as theirs did; SGD with momentum, plain epochs, no
early stopping; validation accuracy after each epoch. Departures, all for reproducibility:
- the split and the triplet sampling are seeded by ``cfg.seed`` (theirs were unseeded, D11);
- the 80/20 split is stratified per class (theirs shuffled the pooled 400 images), so both
  classes are always in the validation set;
- a last training batch of one image is folded into the previous batch (BatchNorm in train mode
  cannot normalise one 1×1 feature map).

Backbones (``cfg.backbone``): ``resnet18_imagenet`` (the paper's), ``resnet18_scratch`` (same net,
random init, no download) and ``detector_trunk`` (a copy of the world's oracle-detector trunk).
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

BACKBONES = ("resnet18_imagenet", "resnet18_scratch", "detector_trunk")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The authors resize 512² SD images to 256² (Resize(256), no crop). Tiny images (the Shapes
# world's 32²) are upsampled to a 64-pixel short side instead: ResNet18 downsamples 32×, so 64
# leaves a 2×2 map in the last stage rather than 1×1, at a quarter of the cost of 128.
RESNET_RESIZE = 256
RESNET_MIN_SIDE = 64
FORMAT = "concealbench.classifier/1"

Preprocess = Callable[[np.ndarray], torch.Tensor]


@dataclass
class ClassifierConfig:
    """Hyperparameters of g; defaults are the authors' (paper notes §4.1)."""

    backbone: str = "resnet18_imagenet"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    val_frac: float = 0.2
    margin: float = 1.0
    negatives: int = 3
    seed: int = 0

    def validate(self) -> None:
        """Check every field; messages name the config key under ``eval.classifier``."""
        k = "eval.classifier"
        if self.backbone not in BACKBONES:
            raise ValueError(f"`{k}.backbone` must be one of {list(BACKBONES)}, got {self.backbone!r}")
        for name in ("epochs", "negatives"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{k}.{name}` must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"`{k}.batch_size` must be >= 2, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"`{k}.lr` must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"`{k}.momentum` must be in [0, 1), got {self.momentum}")
        if not 0 < self.val_frac < 1:
            raise ValueError(f"`{k}.val_frac` must be in (0, 1), got {self.val_frac}")
        if self.margin < 0:
            raise ValueError(f"`{k}.margin` must be >= 0, got {self.margin}")


def imagenet_preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → ImageNet-normalised float (N, 3, H', W') for the ResNet18 backbones.

    Short side ≥ 256: Resize(256) as the authors (bilinear, antialiased, aspect kept, no crop).
    Short side < 64: upsampled to 64 (see ``RESNET_MIN_SIDE``). In between: native size.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    side = min(x.shape[-2:])
    target = RESNET_RESIZE if side >= RESNET_RESIZE else max(side, RESNET_MIN_SIDE)
    if target != side:
        x = TF.resize(x, target, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


class _Net(nn.Module):
    """Trunk (→ penultimate features f) + a 2-way linear head (index 1 = original)."""

    def __init__(self, trunk: nn.Module, feature_dim: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(feature_dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _resnet18_trunk(pretrained: bool) -> tuple[nn.Module, int]:
    """The authors' feature extractor: every ResNet18 child but ``fc``, then Flatten (512-d)."""
    try:
        model = torchvision.models.resnet18(weights="IMAGENET1K_V1" if pretrained else None)
    except Exception as e:  # offline, blocked hub, corrupt cache — one clear message instead
        raise RuntimeError(
            "cannot load torchvision's ResNet18 ImageNet weights (IMAGENET1K_V1) "
            f"[{type(e).__name__}: {e}]. Put them in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints) or set `eval.classifier.backbone` to "
            "'resnet18_scratch' or 'detector_trunk'."
        ) from e
    return nn.Sequential(*list(model.children())[:-1], nn.Flatten(1)), model.fc.in_features


def _unwrap_trunk(init_trunk: nn.Module | None, preprocess: Preprocess | None) -> tuple[nn.Module, Preprocess]:
    """Accept either a trunk module or a detector object exposing ``.trunk``/``.preprocess``."""
    if init_trunk is None:
        raise ValueError("`eval.classifier.backbone` = 'detector_trunk' needs the world's detector (`init_trunk`)")
    trunk = getattr(init_trunk, "trunk", init_trunk)
    preprocess = preprocess or getattr(init_trunk, "preprocess", None)
    if preprocess is None:
        raise ValueError("backbone 'detector_trunk' needs the detector's `preprocess` function")
    return trunk, preprocess


def _build(
    cfg: ClassifierConfig, init_trunk: nn.Module | None, preprocess: Preprocess | None, from_file: bool
) -> tuple[nn.Module, Preprocess, int | None]:
    """Build g's trunk for ``cfg.backbone`` (feature dim None = infer from the trunk). When loading a
    saved g (``from_file``) nothing is downloaded: every weight comes from the file."""
    if cfg.backbone == "detector_trunk":
        trunk, preprocess = _unwrap_trunk(init_trunk, preprocess)
        return copy.deepcopy(trunk), preprocess, None
    trunk, dim = _resnet18_trunk(pretrained=cfg.backbone == "resnet18_imagenet" and not from_file)
    return trunk, preprocess or imagenet_preprocess, dim


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"`{name}` must be a uint8 numpy array (N, H, W, 3), got {got}")
    return images


def min_images_per_class(cfg: ClassifierConfig) -> int:
    """Smallest N per class whose split leaves ≥ 2 validation and ≥ negatives + 2 training images."""
    n = 1
    while _n_val(n, cfg.val_frac) < 2 or n - _n_val(n, cfg.val_frac) < cfg.negatives + 2:
        n += 1
    return n


def _n_val(n: int, val_frac: float) -> int:
    return int(math.floor(val_frac * n + 1e-9))  # the authors' floor(0.2 · n); 1e-9 guards 0.1·30 etc.


class ConceptClassifier:
    """A trained g: ``prob_original`` (CCS) and ``features`` (CRS), plus its training record."""

    def __init__(
        self,
        net: _Net,
        cfg: ClassifierConfig,
        preprocess: Preprocess,
        val_accuracy: float,
        history: list[dict],
        device: torch.device | str = "cpu",
    ):
        self.net = net.to(device).eval()
        self.cfg = cfg
        self.preprocess = preprocess
        self.val_accuracy = float(val_accuracy)
        self.history = history
        self.device = torch.device(device)

    @property
    def feature_dim(self) -> int:
        return self.net.head.in_features

    @torch.no_grad()
    def _run(self, images: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> np.ndarray:
        images = _check_images(images, "images")
        if len(images) == 0:
            raise ValueError("`images` is empty")
        self.net.eval()
        out = [
            fn(self.preprocess(images[i : i + batch_size]).float().to(self.device)).float().cpu().numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out)

    def logits(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """Raw 2-way logits (N, 2); column 1 = original."""
        return self._run(images, self.net, batch_size)

    def prob_original(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """softmax(g(x))[original] per image (N,) — the per-image term of CCS (DESIGN §1.3)."""
        return self._run(images, lambda x: torch.softmax(self.net(x), dim=1)[:, 1], batch_size).astype(np.float64)

    def features(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """Penultimate features f(x) (N, D) — the feature space of CRS (paper notes §3.2)."""
        return self._run(images, self.net.trunk, batch_size)

    def save(self, out_dir: str | Path) -> None:
        """Write ``model.safetensors`` (trunk + head state dict) and ``config.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        meta = {
            "format": FORMAT,
            "config": asdict(self.cfg),
            "feature_dim": self.feature_dim,
            "val_accuracy": self.val_accuracy,
            "history": self.history,
        }
        (out / "config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(
        cls,
        path: str | Path,
        init_trunk: nn.Module | None = None,
        preprocess: Preprocess | None = None,
        device: torch.device | str | None = None,
    ) -> ConceptClassifier:
        """Load a classifier written by :meth:`save`. For ``detector_trunk`` pass the same
        detector (it supplies the trunk's architecture and the preprocessing)."""
        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.exists() or not weights.exists():
            raise FileNotFoundError(f"no classifier at {path} (need config.json and model.safetensors)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_file} is not a {FORMAT} file (format {meta.get('format')!r})")
        known = {f.name for f in fields(ClassifierConfig)}
        cfg = ClassifierConfig(**{k: v for k, v in meta["config"].items() if k in known})
        trunk, preprocess, _ = _build(cfg, init_trunk, preprocess, from_file=True)
        net = _Net(trunk, int(meta["feature_dim"]))
        net.load_state_dict(load_file(str(weights)))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(net, cfg, preprocess, meta["val_accuracy"], meta["history"], device)


def _triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """Hardest-of-k triplet loss on Euclidean distances (the authors' ``TripletLoss``)."""
    d_pos = torch.norm(anchor - positive, dim=1)
    d_neg = torch.norm(anchor.unsqueeze(1) - negatives, dim=2).min(dim=1).values
    return torch.clamp(d_pos - d_neg + margin, min=0.0).mean()


def _stratified_split(labels: np.ndarray, val_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = _n_val(len(idx), val_frac)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.concatenate(train), np.concatenate(val)


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on one 1×1 map
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


@torch.no_grad()
def _accuracy(net: _Net, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int) -> float:
    net.eval()
    correct = sum(
        int((net(x[i : i + batch_size].to(device)).argmax(1).cpu() == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def train_classifier(
    images_o: np.ndarray,
    images_u: np.ndarray,
    cfg: ClassifierConfig | None = None,
    init_trunk: nn.Module | None = None,
    preprocess: Preprocess | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ConceptClassifier:
    """Fine-tune g on λ_O (label 1) vs λ_U (label 0) with triplet + CE loss (DESIGN §1.2).

    ``images_o``/``images_u``: uint8 (N, H, W, 3). ``init_trunk``: for ``detector_trunk``, the
    world's detector (its ``.trunk`` is deep-copied and fine-tuned; its ``.preprocess`` is used
    unless ``preprocess`` is given) or a bare trunk module ending in Flatten. ``preprocess``
    overrides the backbone's preprocessing (uint8 NHWC → float NCHW). Deterministic for a fixed
    ``cfg.seed`` on a given machine and device. Returns g in eval mode with ``val_accuracy``
    (last epoch, as the authors report) and a per-epoch ``history``.
    """
    cfg = cfg or ClassifierConfig()
    cfg.validate()
    images_o, images_u = _check_images(images_o, "images_o"), _check_images(images_u, "images_u")
    if images_o.shape[1:] != images_u.shape[1:]:
        raise ValueError(f"λ_O and λ_U images differ in size: {images_o.shape[1:]} vs {images_u.shape[1:]}")
    n, n_min = min(len(images_o), len(images_u)), min_images_per_class(cfg)
    if n < n_min:
        raise ValueError(
            f"`eval.n` = {n} images per class is too small for the classifier's split "
            f"(val_frac {cfg.val_frac}, {cfg.negatives} negatives): need at least {n_min} "
            f"(≥ 2 validation and ≥ {cfg.negatives + 2} training images per class)"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with torch.random.fork_rng(devices=[]):  # seeded init (head; whole net for resnet18_scratch)
        torch.manual_seed(cfg.seed)
        trunk, preprocess, dim = _build(cfg, init_trunk, preprocess, from_file=False)
        x = torch.cat([preprocess(images_o), preprocess(images_u)]).float()
        if dim is None:
            with torch.no_grad():
                dim = int(trunk.cpu().eval()(x[:2]).shape[1])
        net = _Net(trunk, dim).to(device)
    labels = np.r_[np.ones(len(images_o), np.int64), np.zeros(len(images_u), np.int64)]
    y = torch.from_numpy(labels)

    rng = np.random.default_rng(cfg.seed)
    train_idx, val_idx = _stratified_split(labels, cfg.val_frac, rng)
    by_class = {c: train_idx[labels[train_idx] == c] for c in (0, 1)}
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    history: list[dict] = []

    def fwd(idx: np.ndarray) -> torch.Tensor:
        return net.trunk(x[torch.from_numpy(idx)].to(device))

    for epoch in tqdm(range(cfg.epochs), desc="classifier", disable=not progress):
        net.train()
        sums = np.zeros(3)
        batches = _batches(rng.permutation(train_idx), cfg.batch_size)
        for batch in batches:
            same = [by_class[labels[a]] for a in batch]
            pos = np.array([rng.choice(s[s != a]) for a, s in zip(batch, same, strict=True)])
            neg = np.stack([rng.choice(by_class[1 - labels[a]], cfg.negatives, replace=False) for a in batch])
            f_a, f_p = fwd(batch), fwd(pos)
            f_n = fwd(neg.ravel()).view(len(batch), cfg.negatives, -1)
            triplet = _triplet_loss(f_a, f_p, f_n, cfg.margin)
            ce = F.cross_entropy(net.head(f_a), y[torch.from_numpy(batch)].to(device))
            loss = triplet + ce
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums += [loss.item(), triplet.item(), ce.item()]
        acc = _accuracy(net, x[torch.from_numpy(val_idx)], y[torch.from_numpy(val_idx)], device, cfg.batch_size)
        loss_mean, trip_mean, ce_mean = (sums / len(batches)).tolist()
        history.append({"epoch": epoch + 1, "loss": loss_mean, "triplet": trip_mean, "ce": ce_mean, "val_accuracy": acc})
    return ConceptClassifier(net, cfg, preprocess, history[-1]["val_accuracy"], history, device)
