"""The versioned results record: protocol hash, job key, environment, atomic writes.

A record is the source of truth for a job (DESIGN §3–4): the leaderboard and wandb mirror it.
The protocol hash covers everything that makes numbers comparable across methods and concepts
(model and its weights, sampler, sample sizes, classifier, detector — and, per probe, the probe's
settings); the job key adds what varies between rows (method, hyperparameters, concept, seed).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.recordspec import SCHEMA_VERSION  # noqa: F401 — re-exported: 2 = one block per probe, replicates for the verdicts


def canonical(obj: Any) -> str:
    """Stable JSON (sorted keys, no spaces) used for every hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def protocols(cfg: Any, model_hash: str, sampler: str, detector: dict | None, probes: list, precision: str | None = None
              ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The shared protocol (what λ_O, λ_U, the classifier and the detector depend on) and each
    probe's own ranking protocol (the shared one plus the probe's settings), each with its hash.

    Records are ranked together only when these match. The shared hash enters the job key, so a
    probe can be added to a finished job. A probe's fields sit beside the shared ones as its
    ``protocol_fields`` place them; partial diffusion keeps the first wave's flat layout (``psi``,
    ``split``, ``paper_seed``, ``attack_seeds``), so its protocol hash equals the one records had
    before the probe seam. ``precision`` is the autocast dtype of the inference stages (None =
    fp32; then the key is absent, so fp32 protocols keep their hash).
    """
    e = cfg.eval
    base = {
        "model": {"id": cfg.model.id, "hash": model_hash},
        "eval": e.name,
        "steps": int(e.steps),
        "guidance": float(e.guidance),
        "sampler": sampler,
        "n": int(e.n),
        "detect_n": int(e.detect_n),
        "max_forget_prompts": e.max_forget_prompts,
        "max_retain_prompts": e.max_retain_prompts,
        "classifier": {k: e.classifier[k] for k in sorted(e.classifier)},
        "detector": detector,
    }
    if precision:
        base["precision"] = precision
    per_probe = {}
    for probe in probes:
        p = {**base, **probe.protocol_fields()}
        p["hash"] = short_hash(p)
        per_probe[probe.name] = p
    base["hash"] = short_hash(base)
    return base, per_probe


def job_key(model: str, concept: str, method: str, params: dict, protocol_hash: str, seed: int) -> str:
    return short_hash({"model": model, "concept": concept, "method": method, "params": params, "protocol": protocol_hash, "seed": seed})


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def cpu_isa() -> str | None:
    """The vector instruction set torch's CPU kernels dispatch to (``AVX512``, ``AVX2``, …; it honours
    ``ATEN_CPU_CAPABILITY``), or None on a torch older than 2.1."""
    import torch

    return getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()


def kernels(device: Any) -> str:
    """Which kernels compute on ``device``: ``cpu:AVX2``, ``cuda:NVIDIA H100 …``. Float results differ in
    their low bits from one to another, so cached images are keyed by it (``Job.cache_key``): a cache
    shared by unlike machines, as in a Slurm sweep, must not make a job's numbers depend on which
    machine filled it first."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    isa = cpu_isa() if device.type == "cpu" else None
    return f"{device.type}:{isa}" if isa else device.type


def environment() -> dict[str, Any]:
    """What ran the job. ``cpu_isa`` is the vector instruction set torch's CPU kernels dispatch to
    (AVX512, AVX2, …): the same config and seed give bit-identical numbers under the same library
    versions and ISA, but a method trained for hundreds of steps drifts apart across ISAs (float
    sums in another order), so two records that disagree should first be compared on it."""
    import diffusers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": __import__("numpy").__version__,
        "git_sha": git_sha(),
        "host": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}),
    }


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def subsample_curves(history: dict[str, list[float]], points: int) -> dict[str, list]:
    """About ``points`` evenly spaced steps of equally long loss curves, with their step indices
    (a method's report keeps these; the record drops full histories)."""
    n = len(next(iter(history.values()), []))
    steps = sorted({round(i * (n - 1) / max(1, points - 1)) for i in range(points)}) if n else []
    return {"step": steps, **{k: [v[s] for s in steps] for k, v in history.items()}}
