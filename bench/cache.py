"""Content-addressed stage cache shared across methods, sweeps and parallel jobs.

λ_O sets and θ-prefix snapshots depend only on the base model, the prompt, the seeds and the
protocol — not on the method — so every job that needs one computes it at most once. Entries are
safetensors files named by a hash of their inputs. Concurrency: a per-entry file lock makes
parallel jobs wait for the first writer instead of computing twice, and files appear by atomic
rename, so a reader never sees half of one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from bench.record import canonical, short_hash


class Cache:
    """``get_or_compute(kind, key, fn)`` over a directory of safetensors entries."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, kind: str, key: dict[str, Any]) -> Path:
        return self.root / kind / f"{short_hash(key, 20)}.safetensors"

    def get_or_compute(
        self,
        kind: str,
        key: dict[str, Any],
        compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load the entry for ``key`` or run ``compute() -> (tensors, meta)`` once and store it."""
        path = self.path(kind, key)
        if path.exists():
            self.hits.append(f"{kind}/{path.stem}")
            return load_entry(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():  # another job finished it while we waited
                self.hits.append(f"{kind}/{path.stem}")
                return load_entry(path)
            tensors, meta = compute()
            save_entry(path, tensors, {**meta, "key": key})
            self.misses.append(f"{kind}/{path.stem}")
            return tensors, meta


def save_entry(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(_unshared(tensors), str(tmp), metadata={"meta": canonical(meta)})
    os.replace(tmp, path)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, copying any that shares storage with an earlier one (safetensors refuses
    shared storage; θ-prefix snapshots that fall on the same step share their tensors)."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta
