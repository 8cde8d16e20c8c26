"""Concept presets (``conf/concept/*.yaml``) as a typed, validated object handed to methods."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bench.hparams import ConfigError
from bench.prompts import load_prompts

KINDS = ("object", "style", "attribute", "nudity", "identity")


@dataclass(frozen=True)
class Concept:
    """What to erase and how to probe it.

    ``target`` is the word(s) a method is told to erase; ``synonyms`` are paraphrases used only by
    the evaluation (methods never see them); ``anchor`` is the generic concept that Concept
    Ablation maps onto and UCE may guide towards; ``retain_concepts`` is the preserve list.
    """

    name: str
    kind: str
    target: str
    forget_prompts: tuple[str, ...]
    retain_prompts: tuple[str, ...]
    anchor: str = ""
    synonyms: tuple[str, ...] = ()
    retain_concepts: tuple[str, ...] = ()
    anchor_prompts: tuple[str, ...] = ()
    detect: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)  # a list: any of several concepts
    detector: str | None = None  # SD worlds: nudenet | imagenet | clip | None (bench/detectors.py)
    images_dir: str | None = None
    gold_unet: str | None = None  # set by the world when a gold-standard UNet exists
    # World-provided renderer of concept images, ``render(n, seed) -> uint8 (n, H, W, 3)``
    # (the Shapes world draws them; on SD worlds it is None and methods generate or read images).
    render: Callable[[int, int], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def targets(self) -> tuple[str, ...]:
        """The words a method erases (``target`` may list several, comma-separated)."""
        return tuple(t.strip() for t in self.target.split(",") if t.strip())

    def words_to_erase(self) -> tuple[str, ...]:
        """``targets``, or a ConfigError naming ``concept.target`` when it lists no word (a method needs one)."""
        if not self.targets:
            raise ConfigError(f"`concept.target` of {self.name!r} names no word to erase, got {self.target!r}")
        return self.targets

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "target": self.target, "anchor": self.anchor}


def concept_from_cfg(cfg: Any, gold_unet: str | None = None, render: Callable | None = None) -> Concept:
    """Build a ``Concept`` from a ``conf/concept`` node, checking every field."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    name = get("name")
    for key in ("name", "kind", "target"):
        v = get(key)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"`concept.{key}` must be a non-empty string, got {v!r}")
    if get("kind") not in KINDS:
        raise ConfigError(f"`concept.kind` must be one of {', '.join(KINDS)}, got {get('kind')!r}")
    lists = {}
    for key in ("forget_prompts", "retain_prompts", "synonyms", "retain_concepts", "anchor_prompts"):
        v = list(load_prompts(get(key), f"concept.{key}"))  # an inline list or a {file|hub: ...} source
        if not all(isinstance(x, str) and x.strip() for x in v):
            raise ConfigError(f"`concept.{key}` must be a list of non-empty strings, got {v!r}")
        lists[key] = tuple(v)
    if not lists["forget_prompts"]:
        raise ConfigError(f"`concept.forget_prompts` of {name!r} is empty: at least one prompt is needed")
    images_dir = get("images_dir")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ConfigError(f"`concept.images_dir` must be an existing directory, got {images_dir!r}")
    raw = get("detect")
    if OmegaConf.is_config(raw):
        raw = OmegaConf.to_container(raw, resolve=True)
    detect = [dict(d) for d in raw] if isinstance(raw, (list, tuple)) else dict(raw or {})
    if isinstance(detect, list) and (not detect or any(set(d) != {"factor", "value"} for d in detect)):
        raise ConfigError(f"`concept.detect` of {name!r} as a list must hold {{factor, value}} entries (any of them = the concept), got {raw!r}")
    detector = get("detector")
    if detector is not None:  # SD worlds: which detector judges the concept, checked before any load
        from bench.detectors import check_detect_spec

        check_detect_spec(detector, detect, name)
    return Concept(
        name=name,
        kind=get("kind"),
        target=get("target"),
        anchor=get("anchor") or "",
        detect=detect,
        detector=detector,
        images_dir=images_dir,
        gold_unet=gold_unet,
        render=render,
        **lists,
    )
