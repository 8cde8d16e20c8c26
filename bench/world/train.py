"""Build the Shapes world: VAE, oracle detector, base UNet + text encoder, gold-standard UNets.

Every job is seeded, checkpoints to ``world-build/<job>/state.safetensors`` and resumes from it;
the randomness of step ``s`` depends only on ``(seed, s)``, so an interrupted job continues
exactly as an uninterrupted one. Recipes follow the measured calibration runs
(``shared/reference/world-calibration*.md``): min-SNR-γ=5 weighting, EMA 0.998, AdamW, bf16
autocast, 16-token captions with clause dropout.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.world import captions as cap
from bench.world.checkpoint import atomic_write_text, load_state, save_state
from bench.world.detector import HEADS, Detector
from bench.world.render import FACTORS, render_random

ASSET_DIR = Path(__file__).parent / "assets" / "shapes"
CONCEPT_DIR = Path(__file__).resolve().parents[2] / "conf" / "concept"
# Seed offsets of the first gold models (their shipped weights were trained with them); any later
# preset gets a stable offset from its name, so adding a preset never changes another's gold.
_GOLD_JOB_IDS = {"red": 1, "star": 2, "stripes": 3}


@dataclass(frozen=True)
class GoldSpec:
    """A gold-standard model to train: the preset's name, a stable seed offset, and the
    (factor, value) pairs whose images are left out of its training data (any of them)."""

    name: str
    job_id: int
    exclude: tuple[tuple[str, str], ...]


def gold_specs(concept_dir: Path = CONCEPT_DIR) -> dict[str, GoldSpec]:
    """Every Shapes concept preset (``conf/concept/*.yaml`` with a ``detect`` spec on a world
    factor) as a gold model to train; the preset is the registry, there is no second list."""
    import zlib

    import yaml

    specs = {}
    for path in sorted(Path(concept_dir).glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        detect = data.get("detect")
        parts = detect if isinstance(detect, list) else [detect] if isinstance(detect, dict) else []
        pairs = tuple((d.get("factor"), d.get("value")) for d in parts)
        if not pairs or any(f not in FACTORS or v not in FACTORS[f] for f, v in pairs):
            continue  # not a Shapes concept (SD presets name other detectors)
        name = data.get("name", path.stem)
        job_id = _GOLD_JOB_IDS.get(name, 4 + zlib.crc32(name.encode()) % 10_000)
        specs[name] = GoldSpec(name, job_id, pairs)
    return specs


@dataclass
class BuildConfig:
    seed: int = 0
    n_train: int = 50_000
    n_test: int = 2_000
    build_dir: Path = Path("world-build")
    out_dir: Path = ASSET_DIR
    threads: int = 2
    vae_steps: int = 1400
    vae_batch: int = 32
    vae_lr: float = 1e-3
    detector_steps: int = 1000
    detector_batch: int = 128
    detector_lr: float = 2e-3
    unet_steps: int = 7000
    gold_steps: int = 3200
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.998
    min_snr_gamma: float = 5.0
    eval_every: int = 500
    eval_seeds: int = 16
    ckpt_every: int = 200
    stop_at: int | None = None  # stop (after checkpointing) at this step: emulates a killed job in tests

    def job_dir(self, name: str) -> Path:
        d = Path(self.build_dir) / name
        d.mkdir(parents=True, exist_ok=True)
        return d


# ----------------------------------------------------------------------------- data

def training_set(cfg: BuildConfig):
    """The rendered training set as a Hugging Face ``datasets.Dataset`` (cached on disk)."""
    import datasets

    path = Path(cfg.build_dir) / f"data-{cfg.n_train}-{cfg.seed}"
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path)).with_format("numpy")
    chunk = 2000

    def gen():
        for i in range(0, cfg.n_train, chunk):
            b = render_random(min(chunk, cfg.n_train - i), seed=cfg.seed * 100_003 + 1000 + i)
            for j in range(len(b)):
                yield {"image": b.images[j], "shape": int(b.shape[j]), "colour": int(b.colour[j]), "texture": int(b.texture[j])}

    features = datasets.Features(
        {
            "image": datasets.Array3D((32, 32, 3), "uint8"),
            "shape": datasets.ClassLabel(names=list(FACTORS["shape"])),
            "colour": datasets.ClassLabel(names=list(FACTORS["colour"])),
            "texture": datasets.ClassLabel(names=list(FACTORS["texture"])),
        }
    )
    ds = datasets.Dataset.from_generator(gen, features=features, cache_dir=str(Path(cfg.build_dir) / "hf-cache"))
    ds.save_to_disk(str(path))
    return datasets.load_from_disk(str(path)).with_format("numpy")


def test_set(cfg: BuildConfig):
    return render_random(cfg.n_test, seed=999_999)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------- VAE

def train_vae(cfg: BuildConfig) -> Path:
    """AutoencoderKL f2: MSE + 0.5·L1 + 1e-6·KL, AdamW 1e-3, batch 32, bf16 autocast."""
    from bench.world.models import make_vae

    job = cfg.job_dir("vae")
    final = job / "final"
    if (final / "config.json").exists():
        return final
    torch.manual_seed(cfg.seed)
    ds = training_set(cfg)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    state_file = job / "state.safetensors"
    step, log = (load_state(state_file, {"vae": vae}, opt) if state_file.exists() else (0, []))
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="vae", unit="step")
    t0 = time.time()
    while step < cfg.vae_steps:
        rng = np.random.default_rng([cfg.seed, 1, step])
        x = to_tensor(ds[rng.integers(0, len(ds), cfg.vae_batch)]["image"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, 100)
        torch.manual_seed(cfg.seed * 7919 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        log.append({"step": step, "loss": loss.item(), "t": time.time() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % cfg.ckpt_every == 0 or step == cfg.vae_steps:
            save_state(state_file, {"vae": vae}, opt, step, log)
    bar.close()
    vae.eval()
    # Latent statistics → scaling factor (unit-variance latents, as SD's 0.18215 does for SD).
    imgs = ds[np.arange(0, min(len(ds), 8192))]["image"]
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_tensor(imgs[i : i + 512])).latent_dist.mean for i in range(0, len(imgs), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    test = test_set(cfg)
    with torch.no_grad():
        rec = reconstruct(vae, test.images)
    mse = float(np.mean(((rec.astype(np.float32) - test.images.astype(np.float32)) / 127.5) ** 2))
    atomic_write_text(job / "report.json", json.dumps({"steps": step, "test_mse": mse, "log": log[-1], "scaling_factor": vae.config.scaling_factor}, indent=2))
    vae.save_pretrained(str(final))
    return final


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Encode (posterior mean) and decode uint8 images through the VAE."""
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- detector

def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Robustness to decoder and diffusion artefacts: noise, blur, tone jitter, colour fringes.

    ``x``: float NCHW in [0, 1]. The fringe shifts one colour channel by a pixel, the halo seen
    around decoded hearts in calibration run 2 (where the oracle read them as crosses).
    """
    n = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    # colour fringe on 30%
    fr = r(n) < 0.3
    if fr.any():
        ch = int(torch.randint(0, 3, (1,), generator=g))
        shift = (int(torch.randint(-1, 2, (1,), generator=g)), int(torch.randint(-1, 2, (1,), generator=g)))
        x = x.clone()
        x[fr, ch] = torch.roll(x[fr, ch], shifts=shift, dims=(-2, -1))
    # blur on 30%
    bl = r(n) < 0.3
    if bl.any():
        k = torch.ones(3, 1, 3, 3) / 9
        x[bl] = F.conv2d(F.pad(x[bl], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    bright = (r(n, 1, 1, 1) - 0.5) * 0.2
    contrast = 1 + (r(n, 1, 1, 1) - 0.5) * 0.1
    x = (x - 0.5) * contrast + 0.5 + bright
    x = x + torch.randn(x.shape, generator=g) * r(n, 1, 1, 1) * 0.12
    return x.clamp(0, 1)


def _tone(x: torch.Tensor, g: torch.Generator, p: float = 0.7) -> torch.Tensor:
    """Darken (×0.4–1.0) and desaturate (0–70% towards grey) a share ``p`` of the images.

    Generated images come out with duller, darker colours than the renders; with only the mild tone
    jitter of ``_augment`` the oracle read a dark purple cross on dots as a star (a rendered cross
    scaled ×0.5 was called "star" 23–43% of the time). The shape and texture heads also train on
    this view; the colour head does not (darkening changes what colour an image shows).
    """
    n = x.shape[0]
    on = (torch.rand(n, 1, 1, 1, generator=g) < p).float()
    scale = 0.4 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    sat = 0.7 * torch.rand(n, 1, 1, 1, generator=g)
    y = x * scale
    y = y + sat * (y.mean(1, keepdim=True) - y)
    return on * y + (1 - on) * x


TONE_HEADS = ("shape", "texture")


def train_detector(cfg: BuildConfig, vae_dir: Path) -> Path:
    """Oracle CNN on renders, half of each batch passed through the world's VAE first."""
    from diffusers import AutoencoderKL

    job = cfg.job_dir("detector")
    final = job / "final"
    if (final / "model.safetensors").exists():
        return final
    torch.manual_seed(cfg.seed)
    ds = training_set(cfg)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    det = Detector()
    opt = torch.optim.AdamW(det.parameters(), lr=cfg.detector_lr, weight_decay=1e-4)
    state_file = job / "state.safetensors"
    step, log = (load_state(state_file, {"det": det}, opt) if state_file.exists() else (0, []))
    bar = tqdm(total=cfg.detector_steps, initial=step, desc="detector", unit="step")
    t0 = time.time()
    det.train()
    while step < cfg.detector_steps:
        rng = np.random.default_rng([cfg.seed, 2, step])
        batch = ds[rng.integers(0, len(ds), cfg.detector_batch)]
        imgs = batch["image"]
        half = cfg.detector_batch // 2
        imgs = np.concatenate([imgs[:half], reconstruct(vae, imgs[half:])])
        g = torch.Generator().manual_seed(cfg.seed * 104729 + step)
        x = _augment(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, g)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, cfg.detector_steps, cfg.detector_lr, 50)
        labels = {h: torch.from_numpy(batch[h].astype(np.int64)) for h in HEADS}
        logits = det(Detector.preprocess(x))
        toned = det(Detector.preprocess(_tone(x, g)))
        loss = sum(F.cross_entropy(logits[h], labels[h]) for h in HEADS)
        loss = loss + sum(F.cross_entropy(toned[h], labels[h]) for h in TONE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        log.append({"step": step, "loss": loss.item(), "t": time.time() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % cfg.ckpt_every == 0 or step == cfg.detector_steps:
            save_state(state_file, {"det": det}, opt, step, log)
    bar.close()
    det.eval()
    report = evaluate_detector(cfg, det, vae)
    atomic_write_text(job / "report.json", json.dumps({"steps": step, **report, "log_last": log[-1]}, indent=2))
    det.save(final)
    return final


def evaluate_detector(cfg: BuildConfig, det: Detector, vae) -> dict:
    """Accuracy per head on the held-out renders (``accuracy_report``) and their count."""
    test = test_set(cfg)
    return {**accuracy_report(det, vae, test), "n": len(test)}


def accuracy_report(det: Detector, vae, test) -> dict:
    """Accuracy per head on rendered ``test`` images and on their VAE reconstructions; shape and
    texture also on darkened and desaturated copies (the duller tones of generated images)."""
    labels = {"shape": test.shape, "colour": test.colour, "texture": test.texture}
    out = {}
    for name, imgs in (("renders", test.images), ("vae_reconstructions", reconstruct(vae, test.images))):
        p = det.predict(imgs)
        out[name] = {h: float((p[h].argmax(1) == labels[h]).mean()) for h in HEADS}
    x = test.images.astype(np.float32)
    for name, imgs in (("darkened_x0.5", x * 0.5), ("desaturated_50pct", 0.5 * x + 0.5 * x.mean(-1, keepdims=True))):
        p = det.predict(np.clip(imgs, 0, 255).astype(np.uint8))
        out[name] = {h: float((p[h].argmax(1) == labels[h]).mean()) for h in TONE_HEADS}
    return out


# ----------------------------------------------------------------------------- UNet (+ text encoder)

def latents(cfg: BuildConfig, vae_dir: Path) -> np.ndarray:
    """Scaled VAE posterior means of the training set, cached as ``latents.npy``."""
    from diffusers import AutoencoderKL

    # Keyed by the VAE's weights: latents of a rebuilt VAE and of the shipped one never mix.
    from bench.hparams import SafetensorsFile

    tag = SafetensorsFile.fingerprint(Path(vae_dir) / "diffusion_pytorch_model.safetensors")[:10]
    path = Path(cfg.build_dir) / f"latents-{cfg.n_train}-{cfg.seed}-{tag}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    ds = training_set(cfg)
    out = np.zeros((len(ds), 4, 16, 16), np.float32)
    with torch.no_grad():
        for i in tqdm(range(0, len(ds), 1000), desc="encode latents"):
            x = to_tensor(ds[i : i + 1000]["image"])
            out[i : i + 1000] = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).numpy()
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return np.load(path, mmap_mode="r")


def built(cfg: BuildConfig, part: str) -> Path | None:
    """The finished output of a build part in ``build_dir`` (``vae``, ``detector``, ``base``), or None."""
    final = Path(cfg.build_dir) / part / "final"
    marker = {"vae": "config.json", "detector": "model.safetensors", "base": "unet/config.json"}[part]
    return final if (final / marker).exists() else None


class _Tokens:
    """Memoised tokenisation of captions (the grammar has a few thousand distinct captions)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        miss = [t for t in set(texts) if t not in self.cache]
        if miss:
            ids = self.tok(miss, padding="max_length", max_length=self.tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(miss, ids, strict=True))
        return torch.stack([self.cache[t] for t in texts])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(p, 1 - decay)


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    from bench.world.models import make_inference_scheduler

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_unet(cfg: BuildConfig, vae_dir: Path, detector_dir: Path, concept: str | None = None, text_dir: Path | None = None) -> Path | None:
    """Base UNet + text encoder (``concept=None``) or a gold UNet on the data minus ``concept``.

    Gold-standard UNets train from scratch against the base model's frozen text encoder and VAE,
    so they differ from the base model only in the UNet (as SD v1.4 and an art-free model do).
    """
    import copy

    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from bench.world.models import TEXT_LEN, make_text_encoder, make_train_scheduler, make_unet
    from bench.world.tokenizer import build_clip_tokenizer

    name = "base" if concept is None else f"gold-{concept}"
    job = cfg.job_dir(name)
    final = job / "final"
    if (final / "unet" / "config.json").exists():
        return final
    steps = cfg.unet_steps if concept is None else cfg.gold_steps
    spec = None if concept is None else gold_specs()[concept]
    job_id = 0 if spec is None else spec.job_id
    torch.manual_seed(cfg.seed + job_id)
    ds = training_set(cfg)
    lat = latents(cfg, vae_dir)
    facs = {f: np.asarray(ds.select_columns([f])[:][f]) for f in FACTORS}
    idx = np.arange(len(ds))
    if spec is not None:
        keep = np.ones(len(idx), dtype=bool)
        for factor, value in spec.exclude:
            keep &= facs[factor] != FACTORS[factor].index(value)
        idx = idx[keep]
    tokenizer = build_clip_tokenizer(Path(cfg.build_dir) / "tokenizer", model_max_length=TEXT_LEN)
    tokens = _Tokens(tokenizer)
    unet = make_unet()
    train_text = concept is None
    # The shipped text encoder is stored in fp16: gold training reads it in fp32, as the base trained it.
    te = make_text_encoder() if train_text else CLIPTextModel.from_pretrained(str(text_dir), dtype=torch.float32)
    te.requires_grad_(train_text)
    ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(te)
    params = list(unet.parameters()) + (list(te.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    sched = make_train_scheduler()
    ac = sched.alphas_cumprod
    snr = ac / (1 - ac)
    modules = {"unet": unet, "ema_unet": ema_unet} | ({"te": te, "ema_te": ema_te} if train_text else {})
    state_file = job / "state.safetensors"
    step, log = (load_state(state_file, modules, opt) if state_file.exists() else (0, []))
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    det = Detector.load(detector_dir)
    bar = tqdm(total=steps, initial=step, desc=name, unit="step")
    t0 = time.time() - (log[-1]["t"] if log else 0.0)
    while step < steps:
        rng = np.random.default_rng([cfg.seed, 3, 0 if concept is None else job_id, step])
        b = idx[rng.integers(0, len(idx), cfg.unet_batch)]
        b.sort()
        x0 = torch.from_numpy(np.asarray(lat[b]))
        texts = [cap.sample_caption(int(facs["shape"][i]), int(facs["colour"][i]), int(facs["texture"][i]), rng) for i in b]
        ids = tokens(texts)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + job_id * 100_000 + step)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(b),), generator=g)
        xt = sched.add_noise(x0, noise, t)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, cfg.unet_lr, cfg.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.set_grad_enabled(train_text):
                enc = te(ids)[0]
            pred = unet(xt, t, encoder_hidden_states=enc).sample.float()
        # min-SNR-γ weighting for ε-prediction (Hang et al. 2023): w = min(SNR, γ) / SNR.
        w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (w * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        if train_text:
            _ema_update(ema_te, te, decay)
        entry = {"step": step, "loss": loss.item(), "mse": mse.mean().item(), "t": time.time() - t0}
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % cfg.eval_every == 0 or step == steps:
            entry["eval"] = _eval(cfg, vae, ema_te if train_text else te, tokenizer, ema_unet, det)
            bar.write(f"[{name}] step {step}: {entry['eval']['summary']}")
        log.append(entry)
        if step % cfg.ckpt_every == 0 or step == steps or step == cfg.stop_at:
            save_state(state_file, modules, opt, step, log)
        if step == cfg.stop_at:
            bar.close()
            return None
    bar.close()
    final.mkdir(parents=True, exist_ok=True)
    ema_unet.save_pretrained(str(final / "unet"))
    if train_text:
        ema_te.save_pretrained(str(final / "text_encoder"))
    atomic_write_text(job / "report.json", report_json({"job": name, "steps": steps, "config": _jsonable(asdict(cfg)), "log": log}))
    return final


def report_json(report: dict) -> str:
    """A training report as shipped in the world: the per-step log one compact line per step, floats to
    5 significant digits (the log is for curves; 9 reports of 3,200–7,000 steps must fit the world's budget)."""
    def rounded(x):
        if isinstance(x, float):
            return float(f"{x:.5g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x

    head = {k: v for k, v in report.items() if k != "log"}
    lines = [json.dumps(rounded(e), separators=(",", ":")) for e in report.get("log", [])]
    body = json.dumps(head, indent=1)[:-2]
    return body + ',\n "log": [\n' + ",\n".join(lines) + "\n ]\n}\n" if lines else json.dumps(head, indent=1)


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def _eval(cfg: BuildConfig, vae, te, tokenizer, unet, det) -> dict:
    from bench.world.fidelity import EVAL_PROMPTS, fidelity_table, summarise

    unet.eval()
    te.eval()
    pipe = build_pipeline(vae, te, tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    rows = fidelity_table(pipe, det, EVAL_PROMPTS, list(range(cfg.eval_seeds)), steps=20, guidance=7.5)
    return {"summary": {k: round(v, 3) for k, v in summarise(rows).items()}, "rows": rows}
