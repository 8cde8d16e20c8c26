"""Write trained world parts into the shipped diffusers layout (fp16 safetensors) + reports.

Layout of ``bench/world/assets/shapes/``::

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/   (StableDiffusionPipeline)
    detector/         config.json, model.safetensors                        (oracle)
    gold/<concept>/unet/                                                     (gold-standard UNets)
    world.json        sampler defaults, concepts with gold models, provenance
    report/           training reports (JSON) and plots (PNG)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bench.world.checkpoint import atomic_write_text

SAMPLING = {"num_inference_steps": 20, "guidance_scale": 7.5, "scheduler": "DDIMScheduler", "eta": 0.0}


def _fp16_copy(src_dir: Path, dst_dir: Path, cls) -> None:
    model = cls.from_pretrained(str(src_dir))
    tmp = dst_dir.with_name(dst_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(dst_dir, ignore_errors=True)
    tmp.rename(dst_dir)


def write_pipeline(out: Path, vae_dir: Path, base_dir: Path, tokenizer_dir: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from bench.world.models import make_inference_scheduler

    out.mkdir(parents=True, exist_ok=True)
    _fp16_copy(vae_dir, out / "vae", AutoencoderKL)
    _fp16_copy(base_dir / "unet", out / "unet", UNet2DConditionModel)
    _fp16_copy(base_dir / "text_encoder", out / "text_encoder", CLIPTextModel)
    CLIPTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out / "tokenizer"))
    make_inference_scheduler().save_pretrained(str(out / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    atomic_write_text(out / "model_index.json", json.dumps(index, indent=2))


def write_detector(out: Path, detector_dir: Path) -> None:
    dst = out / "detector"
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(detector_dir / f, dst / f)


def write_gold(out: Path, concept: str, gold_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    dst = out / "gold" / concept / "unet"
    dst.parent.mkdir(parents=True, exist_ok=True)
    _fp16_copy(gold_dir / "unet", dst, UNet2DConditionModel)


def update_world_json(out: Path, **fields) -> None:
    path = out / "world.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("name", "shapes")
    data.setdefault("sampling", SAMPLING)
    data.setdefault("image_size", 32)
    data.setdefault("storage_dtype", "float16")
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
