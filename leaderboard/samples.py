"""Synthetic records, for the leaderboard's tests and for previewing the page.

Not results: the numbers are made up so that every verdict, reference row, replicated row and
edge case shows. Schema 2, with bootstrap replicates drawn around the given values (``legacy``
writes one schema-1 record too).
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

import numpy as np

PSI = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.55]
BASE = {"hash": "a1b2c3d4e5f6", "eval": "quick", "steps": 20, "guidance": 7.5, "sampler": "DDIMScheduler", "n": 32,
        "detect_n": 64, "classifier": {"backbone": "detector_trunk", "epochs": 10}}
PD = {"hash": "9d9d9d9d9d9d", "psi": PSI, "split": "step", "paper_seed": None, "attack_seeds": 8}
REFERENCE = {"noop": ("original", "Original (no unlearning)"),
             "retrain": ("gold", "Gold standard (retrained without the concept)")}


def metric(value: float | None, ci: list[float] | None = None, n: Any = 64, spread: float | None = None, seed: int = 0) -> dict:
    """A metric; with ``spread``, 1000 bootstrap replicates ~ N(value, spread) (None value: all None)."""
    m = {"value": value, "ci": ci, "n": n}
    if spread is not None:
        rng = np.random.default_rng(seed)
        reps = [None] * 1000 if value is None else np.round(rng.normal(value, spread, 1000), 5).tolist()
        m["replicates"] = reps
        m["resampled"] = "prompts, then seeds within each prompt (two-level bootstrap)"
        if value is not None and ci is None:
            m["ci"] = [round(value - 1.96 * spread, 5), round(value + 1.96 * spread, 5)]
    return m


def curve(recover: float | None, floor: float = 0.05) -> list[dict]:
    """A curve whose detection rate crosses 0.5 at ``recover`` (never when None)."""
    pts = []
    for x in PSI:
        det = floor if recover is None else 1 / (1 + math.exp(-(x - recover) * 40))
        pts.append({"x": x, "p_original": round(min(1.0, det + 0.1), 4), "retrieval": round(min(1.0, det * 0.9 + 0.05), 4),
                    "detection": round(det, 4), "specificity": 0.9})
    return pts


def _seed_of(job_key: str, salt: int) -> int:
    return zlib.crc32(f"{job_key}/{salt}".encode())


def record(job_key: str, method: str, concept: str = "star", *, seed: int = 0, variant: str | None = None,
           ccs: float = 0.3, crs: float = 0.4, erasure: float | None = 0.9, erasure_sd: float = 0.03,
           specificity: float | None = 0.95, recover: float | None = 0.3, recover_sd: float = 0.02,
           retention: float | None = 0.95, base: dict | None = None, pd: dict | None = None, model: str = "shapes",
           prompts: list[str] | None = None, params: dict | None = None) -> dict[str, Any]:
    """One valid schema-2 record with the given headline numbers and a partial-diffusion block."""
    ref, display = REFERENCE.get(method, (None, method.upper()))
    units = {"prompts": 3, "seeds": 64}
    forget = {"erasure": metric(erasure, None, units, erasure_sd, _seed_of(job_key, 1)),
              "detect_u": metric(0.05, None, units), "detect_o": metric(0.95, None, units),
              "classifier_val_acc": metric(0.97, None, {"prompts": 3})}
    if specificity is not None:
        forget["specificity"] = metric(specificity, None, units, 0.03, _seed_of(job_key, 2))
    retain = {"retention": metric(retention, None, units, 0.03, _seed_of(job_key, 3)), "kid_uo": metric(0.003, None, {"prompts": 1})}
    block_metrics = {"ccs": metric(ccs, [max(0, ccs - 0.05), min(1, ccs + 0.05)], {"prompts": 2, "seeds": 8}),
                     "crs": metric(crs, [max(0, crs - 0.1), min(1, crs + 0.1)], {"prompts": 2, "seeds": 8}),
                     "crs_paper": metric(round(crs * 0.1, 4), None, {"prompts": 2}),
                     "kid_po": metric(0.01, None, {"prompts": 2}), "kid_pu": metric(0.002, None, {"prompts": 2}),
                     "recover": {**metric(recover, None, {"prompts": 2, "seeds": 8}, recover_sd, _seed_of(job_key, 4)), "basis": "detection"}}
    block_retain = {"ccs": metric(0.55, None, {"prompts": 1, "seeds": 8}), "crs": metric(0.52, None, {"prompts": 1, "seeds": 8}),
                    "crs_paper": metric(0.97, None, {"prompts": 1}), "kid_po": metric(0.003, None, {"prompts": 1}),
                    "kid_pu": metric(0.004, None, {"prompts": 1})}
    base_proto = copy.deepcopy(base or BASE)
    pd_proto = {**{k: v for k, v in base_proto.items() if k != "hash"}, **copy.deepcopy(pd or PD)}
    texts = prompts or [f"a {concept}", f"a yellow {concept} on stripes", "a red circle"]
    prompt_rows = []
    for i, t in enumerate(texts):
        cls = "retain" if i == len(texts) - 1 else "forget"
        pm = {"recover": metric(recover if cls == "forget" else None, None, 7), "ccs": metric(ccs if cls == "forget" else 0.55, None, 16)}
        prompt_rows.append({"prompt": t, "class": cls, "metrics": {"erasure" if cls == "forget" else "retention": metric(erasure if cls == "forget" else retention)},
                            "probes": {"partial_diffusion": {"metrics": pm, "curve": curve(recover if cls == "forget" else None, 0.9 if cls == "retain" else 0.05)}}})
    return {
        "schema_version": 2, "status": "ok", "error": None, "job_key": job_key, "seed": seed,
        "created": "2026-11-24T04:12:00Z",
        "model": {"name": model, "id": f"concealbench/{model}", "revision": "sha256:0123abcd", "world": model},
        "concept": {"name": concept, "kind": "object", "target": concept, "anchor": "shape"},
        "method": {"name": method, "variant": variant or method, "display": display,
                   "params": params if params is not None else {"lr": 1e-5, "iterations": 200}, "reference": ref},
        "protocol": base_proto,
        "metrics": forget, "retain": retain,
        "probes": {"partial_diffusion": {
            "protocol": pd_proto, "display": "partial diffusion", "classes": ["forget", "retain"],
            "axis": {"name": "psi", "label": "ψ (share of the trajectory denoised by the original model)", "unit": "ψ", "values": PSI,
                     "steps": [int(p * 20) for p in PSI]},
            "metrics": block_metrics, "retain": block_retain, "curve": curve(recover), "gold": None,
            "cost": {"seconds": 20.0, "nfe": 5000}}},
        "prompts": prompt_rows,
        "cost": {"unlearn": {"seconds": 60.1, "nfe": 12000, "steps": 200}, "generate": {"seconds": 30.0, "nfe": 8000},
                 "classifier": {"seconds": 10.0}, "probes": {"partial_diffusion": {"seconds": 20.0, "nfe": 5000}},
                 "cache": {"hits": ["lambda_o/x"], "misses": []}, "total_seconds": 120.1, "total_nfe": 25000,
                 "peak_memory_mb": 900, "params_changed": 1234},
        "env": {"python": "3.11.7", "torch": "2.14.1", "diffusers": "0.42.1", "git_sha": "abc123", "host": "cpu"},
        "wandb": None,
        "artifacts": {},
    }


def legacy_record(job_key: str, method: str, concept: str = "star", psi_recover: float | None = 0.3) -> dict:
    """A schema-1 record (the first wave's layout), for the old-schema path."""
    m = lambda v, n=64: {"value": v, "ci": None, "n": n}  # noqa: E731
    proto = {"hash": "0ld0ld0ld0ld", "eval": "quick", "psi": PSI, "split": "step", "steps": 20, "guidance": 7.5,
             "sampler": "DDIMScheduler", "n": 32, "attack_seeds": 8}
    ref, display = REFERENCE.get(method, (None, method.upper()))
    return {"schema_version": 1, "status": "ok", "error": None, "job_key": job_key, "created": "2026-11-20T00:00:00Z",
            "model": {"name": "shapes", "id": "concealbench/shapes", "world": "shapes"},
            "concept": {"name": concept, "kind": "object", "target": concept, "anchor": "shape"},
            "method": {"name": method, "display": display, "params": {}, "reference": ref}, "protocol": proto, "seed": 0,
            "metrics": {"ccs": m(0.4), "crs": m(0.4), "crs_paper": m(0.1), "erasure": m(0.9), "psi_recover": m(psi_recover, 7)},
            "retain": {"retention": m(0.95), "ccs": m(0.5), "crs": m(0.5), "crs_paper": m(0.9)},
            "psi_curve": [{"psi": x, "detection": 0.1, "p_original": 0.2, "retrieval": 0.3} for x in PSI],
            "prompts": [{"prompt": f"a {concept}", "class": "forget", "metrics": {"erasure": m(0.9), "ccs": m(0.4)},
                         "psi_curve": [{"psi": x, "detection": 0.1} for x in PSI]}],
            "gold": None, "cost": {"total_seconds": 50.0, "total_nfe": 1000}, "artifacts": {}}


def png(width: int = 24, height: int = 8, rgb: tuple[int, int, int] = (40, 90, 160)) -> bytes:
    """A tiny solid-colour PNG (no imaging library needed)."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


ARTIFACTS = (("grid_o", "grid_lambda_o.png"), ("grid_u", "grid_lambda_u.png"),
             ("curve_partial_diffusion", "curve_partial_diffusion.png"), ("grid_partial_diffusion", "grid_partial_diffusion.png"))


def write(root: Path, rec: dict, images: bool = False) -> Path:
    """Write ``rec`` to ``root/<model>/<concept>/<method>/<job_key>/record.json``."""
    d = Path(root) / rec["model"]["name"] / rec["concept"]["name"] / rec["method"]["name"] / rec["job_key"]
    d.mkdir(parents=True, exist_ok=True)
    if images:
        for i, (key, name) in enumerate(ARTIFACTS):
            (d / name).write_bytes(png(rgb=(40 + 50 * i, 90, 160)))
            rec["artifacts"][key] = name
    path = d / "record.json"
    path.write_text(json.dumps(rec, indent=2), encoding="utf-8")
    return path


def good_records() -> list[dict]:
    """Valid records covering every verdict: star has a gold standard, stripes has none; ESD on star
    is replicated over three seeds that agree, UCE on star over two that disagree."""
    return [
        record("k-noop-star", "noop", ccs=0.5, crs=0.5, erasure=0.0, erasure_sd=0.0, recover=0.0, recover_sd=0.0, retention=1.0),
        record("k-gold-star", "retrain", ccs=0.08, crs=0.2, erasure=0.96, recover=0.45),
        *[record(f"k-esd-star-{s}", "esd", seed=s, variant="esd-x", ccs=0.62, crs=0.71, recover=0.12 + 0.01 * s) for s in (0, 1, 2)],
        record("k-gold-star-1", "retrain", seed=1, ccs=0.08, crs=0.2, erasure=0.96, recover=0.46),
        record("k-gold-star-2", "retrain", seed=2, ccs=0.08, crs=0.2, erasure=0.96, recover=0.44),
        record("k-uce-star", "uce", ccs=0.15, crs=0.3, erasure=0.93, recover=0.42),
        record("k-uce-star-1", "uce", seed=1, ccs=0.5, crs=0.6, erasure=0.93, recover=0.1),
        record("k-fmn-star", "fmn", ccs=0.45, crs=0.5, erasure=0.3, recover=0.02, retention=0.6,
               prompts=["<script>window.__xss = 1</script> a star",
                        '<img src="x" onerror="window.__xss = 2"> star', "a <b>blue</b> circle"],
               params={"lr": 1e-5, "note": "<script>window.__xss = 3</script>"}),
        record("k-noise-star", "salun", ccs=0.2, crs=0.2, erasure=0.99, specificity=0.2, recover=None),
        record("k-close-star", "ca", ccs=0.3, crs=0.3, erasure=0.9, recover=0.34, recover_sd=0.05),
        record("k-noop-stripes", "noop", concept="stripes", ccs=0.5, crs=0.5, erasure=0.0, erasure_sd=0.0, recover=0.0, recover_sd=0.0),
        record("k-esd-stripes", "esd", concept="stripes", variant="esd-u", ccs=0.2, crs=0.35, recover=None),
    ]


def bad_records() -> dict[str, dict | str]:
    """One record per way a record can be bad; the key is the job folder it is written to."""
    failed = record("k-failed", "esd", concept="red")
    failed.update(status="failed", error="CUDA out of memory")
    unknown = record("k-v7", "uce", concept="red")
    unknown["schema_version"] = 7
    missing = record("k-missing", "fmn", concept="red")
    del missing["probes"]["partial_diffusion"]["metrics"]["crs"]
    nan = record("k-nan", "esd", concept="red", variant="esd-u")
    nan["probes"]["partial_diffusion"]["metrics"]["ccs"]["value"] = float("nan")
    other = dict(BASE, hash="ffffeeee0000", eval="paper", n=200)
    other_protocol = record("k-paper", "esd", concept="star", variant="esd-x", base=other)
    return {"malformed": '{"schema_version": 2, "status": "ok",', "failed": failed, "unknown": unknown,
            "missing": missing, "nan": nan, "other_protocol": other_protocol}


def write_samples(root: Path | str, bad: bool = False, legacy: bool = False) -> dict[str, Path]:
    """Good records under ``root/results`` (star's ESD seed 0 with images) and ``root/runs``
    (stripes); with ``bad``, also every bad record under ``root/runs``; with ``legacy``, a
    schema-1 record under ``root/runs``. Returns job key → record path."""
    root = Path(root)
    paths = {}
    for rec in good_records():
        where = "runs" if rec["concept"]["name"] == "stripes" else "results"
        paths[rec["job_key"]] = write(root / where, rec, images=rec["job_key"] == "k-esd-star-0")
    if bad:
        for name, rec in bad_records().items():
            if isinstance(rec, str):
                path = root / "runs" / "shapes" / "broken" / name / "record.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(rec, encoding="utf-8")
                paths[name] = path
            else:
                paths[name] = write(root / "runs", rec)
    if legacy:
        paths["k-old"] = write(root / "runs", legacy_record("k-old", "esd"))
    return paths


def add_probe(root: Path | str, name: str = "noise", display: str = "noise-based") -> None:
    """Give every good schema-2 record under ``root`` a second probe, ``name``: a copy of its
    partial-diffusion block under another protocol hash (the board then groups per-probe columns)."""
    for path in sorted(Path(root).rglob("record.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("schema_version") != 2 or rec.get("status") != "ok" or "partial_diffusion" not in rec.get("probes", {}):
            continue
        block = copy.deepcopy(rec["probes"]["partial_diffusion"])
        block["display"] = display
        block["protocol"] = {**block["protocol"], "probe": {"name": name}, "hash": f"{name[:2]}0000000000"}
        rec["probes"][name] = block
        for p in rec["prompts"]:
            p["probes"][name] = copy.deepcopy(p["probes"]["partial_diffusion"])
        path.write_text(json.dumps(rec, indent=1), encoding="utf-8")
