"""Synthetic schema-v1 records, for the leaderboard's tests and for previewing the page.

Not results: the numbers are made up so that every verdict, reference row and edge case shows.
``python -c "from leaderboard.samples import write_samples; write_samples('/tmp/lb')"`` then
``python -m leaderboard build --runs /tmp/lb/runs --results /tmp/lb/results --out /tmp/lb/site``.
"""
from __future__ import annotations

import copy
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

PSI = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.55]
PROTOCOL = {"hash": "a1b2c3d4e5f6", "eval": "quick", "psi": PSI, "split": "step", "steps": 20,
            "guidance": 7.5, "sampler": "DDIMScheduler", "n": 32, "attack_seeds": 8,
            "classifier": {"backbone": "detector_trunk", "epochs": 10}}
REFERENCE = {"noop": ("original", "Original (no unlearning)"),
             "retrain": ("gold", "Gold standard (retrained without the concept)")}


def metric(value: float | None, ci: list[float] | None = None, n: int = 64) -> dict:
    return {"value": value, "ci": ci, "n": n}


def curve(psi_recover: float | None, floor: float = 0.05) -> list[dict]:
    """A ψ-curve whose detection rate crosses 0.5 at ``psi_recover`` (never when None)."""
    pts = []
    for psi in PSI:
        det = floor if psi_recover is None else 1 / (1 + math.exp(-(psi - psi_recover) * 40))
        pts.append({"psi": psi, "p_original": round(min(1.0, det + 0.1), 4),
                    "retrieval": round(min(1.0, det * 0.9 + 0.05), 4), "detection": round(det, 4)})
    return pts


def record(job_key: str, method: str, concept: str = "star", *, variant: str | None = None,
           ccs: float = 0.3, crs: float = 0.4, erasure: float | None = 0.9,
           psi_recover: float | None = 0.3, gold: float | None | str = "unknown",
           retention: float | None = 0.95, protocol: dict | None = None, model: str = "shapes",
           prompts: list[str] | None = None, params: dict | None = None) -> dict[str, Any]:
    """One valid record (schema_version 1) with the given headline numbers."""
    ref, display = REFERENCE.get(method, (None, method.upper()))
    forget = {"ccs": metric(ccs, [max(0, ccs - 0.05), min(1, ccs + 0.05)], 56),
              "crs": metric(crs, [max(0, crs - 0.1), min(1, crs + 0.1)], 56),
              "crs_paper": metric(round(crs * 0.1, 4), None, 7), "erasure": metric(erasure, [0.8, 0.95]),
              "detect_u": metric(0.05), "detect_o": metric(0.95), "psi_recover": metric(psi_recover, None, 7),
              "kid_po": metric(0.01, None, 7), "kid_pu": metric(0.002, None, 7),
              "classifier_val_acc": metric(0.97, None, 26)}
    retain = {"retention": metric(retention, [0.9, 1.0]), "ccs": metric(0.55, None, 56),
              "crs": metric(0.52, None, 56), "crs_paper": metric(0.97, None, 7),
              "kid_po": metric(0.003, None, 7), "kid_pu": metric(0.004, None, 7), "kid_uo": metric(0.003)}
    texts = prompts or [f"a {concept}", f"a yellow {concept} on stripes", "a red circle"]
    return {
        "schema_version": 1, "status": "ok", "error": None, "job_key": job_key,
        "created": "2026-11-24T04:12:00Z",
        "model": {"name": model, "id": f"concealbench/{model}", "revision": "sha256:0123abcd", "world": model},
        "concept": {"name": concept, "kind": "object", "target": concept, "anchor": "shape"},
        "method": {"name": method, "variant": variant or method, "display": display,
                   "params": params if params is not None else {"lr": 1e-5, "iterations": 200},
                   "reference": ref},
        "protocol": copy.deepcopy(protocol or PROTOCOL),
        "metrics": forget, "retain": retain,
        "gold": None if gold == "unknown" else {"psi_recover": gold},
        "psi_curve": curve(psi_recover),
        "prompts": [{"prompt": t, "class": "retain" if i == len(texts) - 1 else "forget",
                     "metrics": forget if i < len(texts) - 1 else retain,
                     "psi_curve": curve(psi_recover if i < len(texts) - 1 else None, 0.9)}
                    for i, t in enumerate(texts)],
        "cost": {"unlearn": {"seconds": 60.1, "nfe": 12000, "steps": 200},
                 "generate": {"seconds": 30.0, "nfe": 8000}, "attack": {"seconds": 20.0, "nfe": 5000},
                 "classifier": {"seconds": 10.0}, "cache": {"hits": 3, "misses": 1},
                 "total_seconds": 120.1, "total_nfe": 25000,
                 "peak_memory_mb": 900, "params_changed": 1234},
        "env": {"python": "3.11.7", "torch": "2.14.1", "diffusers": "0.42.1", "git_sha": "abc123", "host": "cpu"},
        "wandb": None,
        "artifacts": {},
    }


def png(width: int = 24, height: int = 8, rgb: tuple[int, int, int] = (40, 90, 160)) -> bytes:
    """A tiny solid-colour PNG (no imaging library needed)."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write(root: Path, rec: dict, images: bool = False) -> Path:
    """Write ``rec`` to ``root/<model>/<concept>/<method>/<job_key>/record.json``."""
    d = Path(root) / rec["model"]["name"] / rec["concept"]["name"] / rec["method"]["name"] / rec["job_key"]
    d.mkdir(parents=True, exist_ok=True)
    if images:
        for i, (key, name) in enumerate((("psi_curve_png", "psi_curve.png"), ("grid_o", "grid_lambda_o.png"),
                                         ("grid_u", "grid_lambda_u.png"), ("grid_p", "grid_lambda_p.png"))):
            (d / name).write_bytes(png(rgb=(40 + 50 * i, 90, 160)))
            rec["artifacts"][key] = name
    path = d / "record.json"
    path.write_text(json.dumps(rec, indent=2), encoding="utf-8")
    return path


def good_records() -> list[dict]:
    """Valid records covering every verdict: star has a gold standard, stripes has none."""
    return [
        record("k-noop-star", "noop", ccs=0.5, crs=0.5, erasure=0.0, psi_recover=0.0, retention=1.0),
        record("k-gold-star", "retrain", ccs=0.08, crs=0.2, erasure=0.96, psi_recover=0.4),
        record("k-esd-star", "esd", variant="esd-x", ccs=0.62, crs=0.71, psi_recover=0.12, gold=0.4),
        record("k-uce-star", "uce", ccs=0.15, crs=0.3, erasure=0.93, psi_recover=0.38),
        record("k-fmn-star", "fmn", ccs=0.45, crs=0.5, erasure=0.3, psi_recover=0.02, retention=0.6,
               prompts=["<script>window.__xss = 1</script> a star",
                        '<img src="x" onerror="window.__xss = 2"> star', "a <b>blue</b> circle"],
               params={"lr": 1e-5, "note": "<script>window.__xss = 3</script>"}),
        record("k-noop-stripes", "noop", concept="stripes", ccs=0.5, crs=0.5, erasure=0.0, psi_recover=0.0),
        record("k-esd-stripes", "esd", concept="stripes", variant="esd-u", ccs=0.2, crs=0.35, psi_recover=None),
    ]


def bad_records() -> dict[str, dict | str]:
    """One record per way a record can be bad; the key is the job folder it is written to."""
    failed = record("k-failed", "esd", concept="red")
    failed.update(status="failed", error="CUDA out of memory")
    unknown = record("k-v2", "uce", concept="red")
    unknown["schema_version"] = 2
    missing = record("k-missing", "fmn", concept="red")
    del missing["metrics"]["crs"]
    nan = record("k-nan", "esd", concept="red", variant="esd-u")
    nan["metrics"]["ccs"]["value"] = float("nan")
    other = dict(PROTOCOL, hash="ffffeeee0000", eval="paper", n=200)
    other_protocol = record("k-paper", "esd", concept="star", variant="esd-x", protocol=other)
    return {"malformed": '{"schema_version": 1, "status": "ok",', "failed": failed, "unknown": unknown,
            "missing": missing, "nan": nan, "other_protocol": other_protocol}


def write_samples(root: Path | str, bad: bool = False) -> dict[str, Path]:
    """Good records under ``root/results`` (star's ESD with images) and ``root/runs``; with
    ``bad``, also every bad record under ``root/runs``. Returns job key → record path."""
    root = Path(root)
    paths = {}
    for rec in good_records():
        where = "runs" if rec["concept"]["name"] == "stripes" else "results"
        paths[rec["job_key"]] = write(root / where, rec, images=rec["job_key"] == "k-esd-star")
    if bad:
        for name, rec in bad_records().items():
            if isinstance(rec, str):
                path = root / "runs" / "shapes" / "broken" / name / "record.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(rec, encoding="utf-8")
                paths[name] = path
            else:
                paths[name] = write(root / "runs", rec)
    return paths
