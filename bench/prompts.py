"""Prompt sets for concept presets: inline lists, shipped files, or Hugging Face Hub datasets.

A prompt list in ``conf/concept/*.yaml`` (``forget_prompts``, ``retain_prompts``,
``anchor_prompts``, …) is either a YAML list or a *source* read through Hugging Face ``datasets``:

    anchor_prompts: {file: imagenette_anchors.csv, where: {anchor: building}}
    forget_prompts: {hub: AIML-TUDA/i2p, split: train, column: prompt,
                     contains: {categories: sexual}, limit: 200}

``file`` is relative to ``bench/data/prompts/`` (or absolute): ``.csv``, ``.json``/``.jsonl`` or
``.txt`` (one prompt per line, column ``text``). ``hub`` is a dataset id on the Hub (``revision``
pins it); it needs the network once, after which ``datasets`` serves it from its cache. Rows are
kept in file order: ``where`` keeps rows whose column equals the value, ``contains`` rows whose
column contains the text (case-insensitive), then ``limit`` keeps the first N. Blank prompts are
dropped. Every problem is a ``ConfigError`` naming the key.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.hparams import ConfigError

PROMPTS_DIR = Path(__file__).parent / "data" / "prompts"
SOURCE_KEYS = ("file", "hub", "revision", "split", "column", "where", "contains", "limit")
_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}


def is_source(value: Any) -> bool:
    """Whether a preset value is a prompt source (a mapping) rather than an inline list."""
    return isinstance(value, Mapping) or (hasattr(value, "keys") and not isinstance(value, (str, bytes)))


def load_prompts(value: Any, key: str = "concept.forget_prompts") -> tuple[str, ...]:
    """The prompts a preset value stands for: an inline list as is, a source loaded and filtered."""
    if value is None:
        return ()
    if not is_source(value):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"`{key}` must be a list of prompts or a source mapping ({{file: ...}} or {{hub: ...}}), got {value!r}")
        return tuple(value)
    spec = {k: value[k] for k in value.keys()}
    unknown = sorted(set(spec) - set(SOURCE_KEYS))
    if unknown:
        raise ConfigError(f"`{key}` has unknown source key(s) {unknown}; allowed: {', '.join(SOURCE_KEYS)}")
    if ("file" in spec) == ("hub" in spec):
        raise ConfigError(f"`{key}` must name exactly one of `file` (shipped in bench/data/prompts) or `hub` (a Hub dataset id), got {spec}")
    ds = _load_file(spec, key) if "file" in spec else _load_hub(spec, key)
    return _select(ds, spec, key)


def _load_file(spec: dict, key: str):
    import datasets

    path = Path(str(spec["file"]))
    path = path if path.is_absolute() else PROMPTS_DIR / path
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"`{key}.file` must end in {', '.join(_BUILDERS)}, got {str(path)!r}")
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*") if p.suffix in _BUILDERS))
        raise ConfigError(f"`{key}.file` = {str(spec['file'])!r} does not exist ({path}); shipped: {shipped}")
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 — a malformed file: one message naming the key and file
        raise ConfigError(f"`{key}.file` {str(path)!r} could not be read as {builder}: {type(e).__name__}: {e}") from e


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _load_hub(spec: dict, key: str):
    import datasets

    name, split = str(spec["hub"]), str(spec.get("split") or "train")
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, split=split, revision=spec.get("revision"))
    except Exception as e:  # noqa: BLE001 — the network/Hub boundary: one message, not a stack trace
        if _offline():
            raise ConfigError(
                f"`{key}` loads the Hugging Face dataset {name!r} ({split}), which is not in the local datasets cache, "
                "and the Hub is switched off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1); run once with "
                "HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 and network access, or give the prompts inline"
            ) from e
        raise ConfigError(f"`{key}` could not load the Hugging Face dataset {name!r} ({split}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _select(ds, spec: dict, key: str) -> tuple[str, ...]:
    column = spec.get("column") or ("text" if "text" in ds.column_names and "prompt" not in ds.column_names else "prompt")
    needed = [column, *(spec.get("where") or {}), *(spec.get("contains") or {})]
    for c in needed:
        if c not in ds.column_names:
            raise ConfigError(f"`{key}`: column {c!r} is not in the prompt set; it has {ds.column_names}")
    where = {c: str(v) for c, v in (spec.get("where") or {}).items()}
    contains = {c: str(v).lower() for c, v in (spec.get("contains") or {}).items()}
    limit = spec.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"`{key}.limit` must be an integer >= 1 or absent, got {limit!r}")
    out: list[str] = []
    for row in ds.select_columns(sorted(set(needed))):
        if any(str(row[c]) != v for c, v in where.items()):
            continue
        if any(v not in str(row[c] or "").lower() for c, v in contains.items()):
            continue
        text = row[column]
        if text is None or not str(text).strip():
            continue
        out.append(str(text).strip())
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"`{key}` selects no prompts from {spec.get('file') or spec.get('hub')!r} (where={where}, contains={contains})")
    return tuple(out)
