"""Resumable training state in safetensors (no pickle): modules, optimizer moments, step, log."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer | None, step: int, log: list) -> None:
    """Write ``modules`` state, optimizer moments and the training log to one file atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}::{k}"] = v.detach().contiguous().clone()
    groups = []
    if opt is not None:
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt::{pid}::{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().clone()
        groups = sd["param_groups"]
    meta = {"step": str(step), "param_groups": json.dumps(groups), "log": json.dumps(log)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_state(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer | None) -> tuple[int, list]:
    """Restore what ``save_state`` wrote; returns (step, log)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        for name, m in modules.items():
            prefix = f"{name}::"
            m.load_state_dict({k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)})
        if opt is not None:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for k in keys:
                if k.startswith("opt::"):
                    _, pid, name = k.split("::")
                    state.setdefault(int(pid), {})[name] = f.get_tensor(k)
            opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"]), json.loads(meta["log"])
