"""Validate a composed Hydra config before any model is loaded.

Each check raises ``ConfigError`` naming the key, the value and what is allowed; ``bench.run``
turns it into one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.hparams import ConfigError, check_params

WORLDS = ("shapes", "sd")
BACKBONES = ("detector_trunk", "resnet18_imagenet", "resnet18_scratch")
LOGGERS = ("wandb", "none")


def load_target(path: str, key: str = "method._target_") -> Callable:
    """Import ``module.function`` named by a config's ``_target_``."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"`{key}` must be 'module.function', got {path!r}")
    mod, _, fn = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"`{key}` names {path!r}, which cannot be imported: {e}") from e
    if not callable(obj):
        raise ConfigError(f"`{key}` names {path!r}, which is not callable")
    return obj


def _number(cfg: Any, key: str, *, lo: float | None = None, hi: float | None = None, integer: bool = False, allow_none: bool = False):
    node, _, leaf = key.rpartition(".")
    v = OmegaConf.select(cfg, key)
    if v is None and allow_none:
        return None
    ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
    ok = ok and not (isinstance(v, float) and math.isnan(v))
    ok = ok and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        kind = "an integer" if integer else "a number"
        rng = " in [{}, {}]".format(lo if lo is not None else "-inf", hi if hi is not None else "inf")
        raise ConfigError(f"`{key}` must be {kind}{rng}, got {v!r}")
    return v


def check_eval(cfg: DictConfig) -> None:
    _number(cfg, "eval.n", lo=1, integer=True)
    _number(cfg, "eval.detect_n", lo=1, integer=True)
    _number(cfg, "eval.steps", lo=1, integer=True)
    _number(cfg, "eval.guidance", lo=0)
    _number(cfg, "eval.batch_size", lo=1, integer=True)
    for k in ("max_forget_prompts", "max_retain_prompts"):
        _number(cfg, f"eval.{k}", lo=1, integer=True, allow_none=True)
    check_classifier(cfg)


def check_classifier(cfg: DictConfig) -> None:
    """Every ``eval.classifier`` setting, checked by the classifier's own rules before any load."""
    from bench.classifier import ClassifierConfig, min_images_per_class

    c = cfg.eval.classifier
    if c.backbone not in BACKBONES:
        raise ConfigError(f"`eval.classifier.backbone` must be one of {', '.join(BACKBONES)}, got {c.backbone!r}")
    if c.backbone == "detector_trunk" and cfg.model.get("world") != "shapes":
        raise ConfigError(f"`eval.classifier.backbone` = 'detector_trunk' is the Shapes oracle's trunk; model={cfg.model.name} needs "
                          "resnet18_imagenet (the paper's) or resnet18_scratch")
    _number(cfg, "eval.classifier.epochs", lo=1, integer=True)
    _number(cfg, "eval.classifier.batch_size", lo=2, integer=True)
    _number(cfg, "eval.classifier.lr", lo=1e-12)
    _number(cfg, "eval.classifier.val_frac", lo=0.01, hi=0.9)
    _number(cfg, "eval.classifier.margin", lo=0)
    _number(cfg, "eval.classifier.negatives", lo=1, integer=True)
    _number(cfg, "eval.classifier.momentum", lo=0)
    known = set(ClassifierConfig.__dataclass_fields__) - {"seed"}
    unknown = sorted(set(c) - known)
    if unknown:
        raise ConfigError(f"`eval.classifier.{unknown[0]}` is not a classifier setting; allowed: {', '.join(sorted(known))}")
    ccfg = ClassifierConfig(**OmegaConf.to_container(c, resolve=True))
    try:
        ccfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    # The paper's split: 80/20 of the n images per class; each class needs ≥ 2 validation and
    # ≥ negatives + 2 training images (the triplet loss draws a positive and `negatives` negatives).
    need = min_images_per_class(ccfg)
    if cfg.eval.n < need:
        raise ConfigError(f"`eval.n` = {cfg.eval.n} is too small for the classifier's {1 - c.val_frac:.0%}/{c.val_frac:.0%} split with {c.negatives} negatives; need at least {need}")


SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def check_slug(value: Any, key: str) -> None:
    """A name that becomes a folder of the run directory: one safe path component."""
    if not isinstance(value, str) or not SLUG.match(value) or ".." in value:
        raise ConfigError(f"`{key}` must be a name of 1-64 letters, digits and _ . + - (it becomes a folder name; "
                          f"no '/', no '..', no leading dot), got {value!r}")


def check_writable(path: str, key: str = "out_dir") -> None:
    """The folder can really be created and written: a probe folder is made (and removed) in its
    nearest existing ancestor — ``os.access`` alone says yes to read-only mounts such as /sys."""
    import tempfile

    p = Path(path)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"`{key}` must be a writable directory, got {path!r}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".concealbench-probe-", dir=probe))
    except OSError as e:
        raise ConfigError(f"`{key}` must be a writable directory, got {path!r} ({probe} refuses new folders: {e.strerror or e})") from e


def check_probes(cfg: DictConfig, concept: Any) -> list:
    from bench.probes import Probe, build_probes

    probes = build_probes(cfg.get("probes"))
    for probe in probes:
        probe.check_world(concept, cfg.model.get("world"))
    tokenizer = None
    for probe in probes:
        if type(probe).check_tokenizer is not Probe.check_tokenizer:
            tokenizer = tokenizer or _local_tokenizer(cfg)
            if tokenizer is not None:
                probe.check_tokenizer(tokenizer, max(1, len(concept.targets)))
    return probes


def _local_tokenizer(cfg: DictConfig):
    """The model's tokenizer when it is on disk (the Shapes world, a local model.path); else None."""
    from bench.pipeline import model_path

    path = Path(model_path(cfg.model)) / "tokenizer"
    if not path.is_dir():
        return None
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the whole config; return the method function, its resolved hyperparameters and the probes."""
    if cfg.model.get("world") not in WORLDS:
        raise ConfigError(f"`model.world` must be one of {', '.join(WORLDS)}, got {cfg.model.get('world')!r}")
    if cfg.logger.get("name") not in LOGGERS:
        raise ConfigError(f"`logger.name` must be one of {', '.join(LOGGERS)}, got {cfg.logger.get('name')!r}")
    for key in ("model.name", "concept.name", "method.name"):
        check_slug(OmegaConf.select(cfg, key), key)
    fn = load_target(cfg.method.get("_target_"))
    node = cfg.method.get("params")
    params = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    resolved = check_params(fn, params)
    from bench.concepts import concept_from_cfg

    concept_from_cfg(cfg.concept)
    check_eval(cfg)
    from bench.pipeline import check_model_path

    check_model_path(cfg.model)
    from bench.worlds import build_concept

    probes = check_probes(cfg, build_concept(cfg))  # with the world's renderer and gold model attached
    _number(cfg, "seed", lo=0, integer=True)
    _number(cfg, "threads", lo=1, integer=True, allow_none=True)
    check_writable(cfg.out_dir, "out_dir")
    check_writable(cfg.cache_dir, "cache_dir")
    from bench.pipeline import check_model_options, check_model_path

    check_model_options(cfg.model)
    check_model_path(cfg.model)
    return {"fn": fn, "params": resolved, "probes": probes}
