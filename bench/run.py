"""``python -m bench``: validate → load → unlearn → generate → attack → classify → score → record.

One job = one (model, concept, method + hyperparameters, protocol, seed). Its directory
``<out_dir>/<model>/<concept>/<method>/<job-key>/`` holds the method's ``delta.safetensors``, one
stage file per prompt (λ_U and λ_P images, then its scores), the figures and ``record.json``.
Every file is written atomically; a re-run skips finished stages (a killed job resumes and ends
with the same numbers), and a finished job is skipped unless ``overwrite=true``. λ_O sets and
θ-prefix snapshots go to the content-addressed cache shared by all methods and sweep jobs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bench import metrics as M
from bench.cache import Cache, load_entry, save_entry
from bench.config import validate
from bench.hparams import ConfigError, file_fingerprints
from bench.pipeline import (
    DeltaError,
    apply_delta,
    autocast_dtype,
    describe_pipeline,
    load_pipeline,
    resolve_device,
    save_delta,
    snapshot_state,
    state_hash,
)
from bench.record import (
    SCHEMA_VERSION,
    environment,
    job_key,
    now,
    protocol,
    read_record,
    write_json,
)

ATTACK_SEED_OFFSET = 100_000  # attacked seeds are disjoint from the λ_O/λ_U seeds 0..N−1 (DESIGN §1.2)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Job:
    """The state of one benchmark job; each ``stage_*`` method is resumable."""

    def __init__(self, cfg: DictConfig, fn: Any, params: dict[str, Any]):
        from bench.sampling import NFECounter, SamplerConfig
        from bench.worlds import build_concept, build_detector

        self.cfg, self.fn, self.params = cfg, fn, params
        # Methods that cache their own data (FMN's generated concept images, CA's anchor images) use it.
        os.environ["CONCEALBENCH_CACHE"] = str(Path(cfg.cache_dir).resolve())
        self.device = resolve_device(cfg.device)
        self.concept = build_concept(cfg)
        self.detector = build_detector(cfg)
        # model.max_batch_size caps eval.batch_size so a world's batches fit its GPU (SD: 24 GB)
        batch = min(int(cfg.eval.batch_size), int(cfg.model.get("max_batch_size") or cfg.eval.batch_size))
        self.sampler = SamplerConfig(steps=int(cfg.eval.steps), guidance=float(cfg.eval.guidance), batch_size=batch, split=cfg.attack.split)
        self.precision = autocast_dtype(cfg.model, self.device)  # None = fp32 (always on the CPU)
        self.counter = NFECounter()
        self.cache = Cache(cfg.cache_dir)
        self.psis = [float(p) for p in cfg.attack.psi]
        self.timings: dict[str, float] = {}
        self.nfe: dict[str, int] = {}

    # ------------------------------------------------------------------ setup
    def load(self) -> None:
        t = time.time()
        self.pipe = load_pipeline(self.cfg.model, self.device)
        self.theta = self.pipe.unet
        self.theta.requires_grad_(False)
        self.base_state = snapshot_state(self.theta)
        self.model_hash = state_hash({**{f"unet.{k}": v for k, v in self.base_state.items()},
                                      **{f"te.{k}": v for k, v in self.pipe.text_encoder.state_dict().items()},
                                      **{f"vae.{k}": v for k, v in self.pipe.vae.state_dict().items()}})
        self.unet_hash = state_hash(self.base_state)
        det = self.detector.describe() if self.detector is not None else None
        self.protocol = protocol(self.cfg, self.model_hash, type(self.pipe.scheduler).__name__, det, precision=self.precision)
        self.pipeline_info = describe_pipeline(self.pipe, self.cfg.model, self.device)
        # Weight files a method reads (e.g. method=weights) enter the key by content, not by path.
        key_params = {**self.params, **{f"{k}.sha256": v for k, v in file_fingerprints(self.fn, self.params).items()}}
        self.key = job_key(self.cfg.model.name, self.concept.name, self.cfg.method.name, key_params, self.protocol["hash"], int(self.cfg.seed))
        self.dir = Path(self.cfg.out_dir) / self.cfg.model.name / self.concept.name / self.cfg.method.name / self.key
        self.timings["load"] = time.time() - t

    def prompts(self) -> list[tuple[str, str]]:
        e = self.cfg.eval
        forget = list(self.concept.forget_prompts)[: e.max_forget_prompts or None]
        retain = list(self.concept.retain_prompts)[: e.max_retain_prompts or None]
        return [(p, "forget") for p in forget] + [(p, "retain") for p in retain]

    # ------------------------------------------------------------------ unlearn
    def stage_unlearn(self) -> dict:
        delta, report_file = self.dir / "delta.safetensors", self.dir / "unlearn.json"
        star = copy.deepcopy(self.theta)
        if delta.exists() and report_file.exists():
            log(f"unlearn: reusing {delta}")
            report = json.loads(report_file.read_text())
        else:
            log(f"unlearn: {self.cfg.method.name} {self.params}")
            t = time.time()
            self.pipe.unet = star
            star.requires_grad_(False)
            seed_everything(int(self.cfg.seed))
            offload = self.device.type == "cuda"  # θ waits on the CPU: full-UNet Adam (ESD-u, FMN) needs the room
            if offload:
                self.theta.to("cpu")
                torch.cuda.empty_cache()
            try:
                report = dict(self.fn(self.pipe, self.concept, **self.params) or {})
            finally:
                self.pipe.unet = self.theta
                if offload:
                    self.theta.to(self.device)
            report["seconds"] = time.time() - t
            names = save_delta(delta, self.base_state, star, {
                "method": self.cfg.method.name, "concept": self.concept.name, "params": self.params,
                "base_model": {"id": self.cfg.model.id, "hash": self.unet_hash}, "seed": int(self.cfg.seed),
            })
            changed = sum(self.base_state[n].numel() for n in names if n in self.base_state)
            report.update({"changed_tensors": names, "params_changed": int(changed)})
            write_json(report_file, report)
        # Every later stage uses the weights as re-loaded from the delta, so the record is traceable to them.
        star = copy.deepcopy(self.theta)
        apply_delta(star, delta, base_hash=self.unet_hash)
        star.requires_grad_(False)
        self.star = star.eval()
        self.timings["unlearn"] = report.get("seconds", 0.0)
        self.nfe["unlearn"] = int(report.get("nfe", 0) or 0)
        return report

    # ------------------------------------------------------------------ images
    def amp(self):
        """Autocast (``model.autocast``, CUDA only) for sampling, the attack and decoding; methods run outside it."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.precision))

    def _precision_key(self) -> dict:
        # fp16 images differ from fp32 ones: cached λ_O sets and snapshots must not mix (absent = fp32).
        return {"precision": self.precision} if self.precision else {}

    def _images(self, unet, prompt: str, seeds: list[int]) -> np.ndarray:
        from bench.sampling import decode, generate

        with self.amp():
            return decode(self.pipe, generate(self.pipe, unet, prompt, seeds, self.sampler, self.counter), self.sampler.batch_size)

    def lambda_o(self, prompt: str, seeds: list[int]) -> np.ndarray:
        """λ_O for a prompt from the shared cache (depends on the base model and protocol only)."""
        key = {"model": self.model_hash, "prompt": prompt, "seeds": seeds, "sampler": self.sampler.as_metadata(), **self._precision_key()}

        def compute():
            before = self.counter.total
            imgs = self._images(self.theta, prompt, seeds)
            return {"images": torch.from_numpy(imgs)}, {"nfe": self.counter.total - before}

        tensors, meta = self.cache.get_or_compute("lambda_o", key, compute)
        self._cached_nfe = meta.get("nfe", 0)
        return tensors["images"].numpy()

    def snapshots(self, prompt: str, seeds: list[int]) -> tuple[dict, int]:
        """θ-prefix snapshots at every ψ, computed once per (model, prompt, seeds, protocol)."""
        from bench.sampling import Snapshot, prefix_snapshots

        key = {"model": self.model_hash, "prompt": prompt, "seeds": seeds, "psi": self.psis, "sampler": self.sampler.as_metadata(),
               **self._precision_key()}

        def compute():
            before = self.counter.total
            with self.amp():
                snaps = prefix_snapshots(self.pipe, self.theta, prompt, seeds, self.psis, self.sampler, self.counter)
            tensors, meta = {}, {"nfe": self.counter.total - before, "snapshots": {}}
            for i, p in enumerate(self.psis):
                tensors.update({f"{i}/{k}": v for k, v in snaps[p].to_tensors().items()})
                meta["snapshots"][str(i)] = snaps[p].metadata
            return tensors, meta

        tensors, meta = self.cache.get_or_compute("prefix", key, compute)
        snaps = {}
        for i, p in enumerate(self.psis):
            sub = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
            snaps[p] = Snapshot.from_tensors(sub, meta["snapshots"][str(i)], self.device)
        return snaps, int(meta.get("nfe", 0))

    def stage_prompt_images(self, i: int, prompt: str) -> dict[str, Any]:
        """λ_O (cached), λ_U and λ_P(ψ) for one prompt; stage file ``images-<i>.safetensors``."""
        from bench.attack import attack

        e = self.cfg.eval
        ref_seeds = list(range(max(int(e.n), int(e.detect_n))))
        att_seeds = [ATTACK_SEED_OFFSET + s for s in range(int(e.attack_seeds))]
        path = self.dir / f"images-{i}.safetensors"
        images_o = self.lambda_o(prompt, ref_seeds)
        nfe_o = self._cached_nfe
        if path.exists():
            tensors, meta = load_entry(path)
        else:
            t, before = time.time(), self.counter.total
            images_u = self._images(self.star, prompt, ref_seeds)
            t_gen, nfe_u = time.time() - t, self.counter.total - before
            snaps, nfe_prefix = self.snapshots(prompt, att_seeds)
            t, before = time.time(), self.counter.total
            with self.amp():
                lam_p = attack(self.pipe, self.theta, self.star, prompt, att_seeds, self.psis, self.sampler, snapshots=snaps, counter=self.counter)
            tensors = {"u": torch.from_numpy(images_u), **{f"p{k}": torch.from_numpy(lam_p[p]) for k, p in enumerate(self.psis)}}
            meta = {"prompt": prompt, "seconds_generate": t_gen, "seconds_attack": time.time() - t,
                    "nfe_u": nfe_u, "nfe_continue": self.counter.total - before, "nfe_prefix": nfe_prefix}
            if self.cfg.attack.paper_seed is not None:
                seed42 = [int(self.cfg.attack.paper_seed)]
                snaps42, _ = self.snapshots(prompt, seed42)
                with self.amp():
                    lam42 = attack(self.pipe, self.theta, self.star, prompt, seed42, self.psis, self.sampler, snapshots=snaps42, counter=self.counter)
                tensors.update({f"s42_{k}": torch.from_numpy(lam42[p]) for k, p in enumerate(self.psis)})
            save_entry(path, tensors, meta)
        out = {"o": images_o, "u": tensors["u"].numpy(), "p": {p: tensors[f"p{k}"].numpy() for k, p in enumerate(self.psis)}, "meta": meta}
        if "s42_0" in tensors:
            out["p42"] = {p: tensors[f"s42_{k}"].numpy() for k, p in enumerate(self.psis)}
        out["meta"]["nfe_o"] = nfe_o
        return out

    # ------------------------------------------------------------------ scores
    def stage_prompt_scores(self, i: int, prompt: str, cls: str, imgs: dict) -> dict:
        path = self.dir / f"scores-{i}.json"
        prev = read_record(path)
        if prev is not None:
            return prev
        from bench.classifier import ClassifierConfig, train_classifier

        n, seed = int(self.cfg.eval.n), int(self.cfg.seed)
        t = time.time()
        c = OmegaConf.to_container(self.cfg.eval.classifier, resolve=True)
        ccfg = ClassifierConfig(**c, seed=seed * 1000 + i)
        init = self.detector.det if (c["backbone"] == "detector_trunk" and self.detector is not None) else None
        if c["backbone"] == "detector_trunk" and init is None:
            raise ConfigError("`eval.classifier.backbone` = 'detector_trunk' needs a world with a detector; use resnet18_imagenet")
        o, u = imgs["o"][:n], imgs["u"][:n]
        clf = train_classifier(o, u, ccfg, init_trunk=init, device=self.device)
        t_clf = time.time() - t
        p_orig = {p: clf.prob_original(x) for p, x in imgs["p"].items()}
        feats_p = {p: clf.features(x) for p, x in imgs["p"].items()}
        # One call for both sets: identical images (θ* = θ) then get bit-identical features.
        f_ou = clf.features(np.concatenate([o, u]))
        f_o, f_u = f_ou[: len(o)], f_ou[len(o) :]
        res: dict[str, Any] = {"prompt": prompt, "class": cls}
        m = {
            "ccs": M.ccs(p_orig, seed=seed),
            "crs": M.crs(feats_p, f_o, f_u, seed=seed),
            "crs_paper": M.crs_paper(feats_p, f_o, f_u, retain=cls == "retain", seed=seed),
            "classifier_val_acc": M.Metric(value=clf.val_accuracy, n=2 * n),
        }
        if "p42" in imgs:
            p42 = {p: clf.prob_original(x) for p, x in imgs["p42"].items()}
            f42 = {p: clf.features(x) for p, x in imgs["p42"].items()}
            m["ccs_seed42"] = M.ccs(p42, seed=seed)
            m["crs_paper_seed42"] = M.crs_paper(f42, f_o, f_u, retain=cls == "retain", seed=seed)
        if hasattr(self.detector, "clip_score"):  # SD worlds: prompt alignment of θ* and θ images (CLIP score)
            for tag, x in (("u", imgs["u"][:n]), ("o", imgs["o"][:n])):
                sc = self.detector.clip_score(x, prompt)
                m[f"clip_score_{tag}"] = M.Metric(value=float(sc.mean()), ci=M.bootstrap_ci(sc, seed=seed), n=len(sc))
        curve_det: list[float | None] = [None] * len(self.psis)
        if self.detector is not None:
            hits = (lambda x: self.detector.concept_hits(x, self.concept)) if cls == "forget" else (lambda x: self.detector.prompt_hits(x, prompt))
            du, do = hits(imgs["u"]), hits(imgs["o"])
            m["detect_u"], m["detect_o"] = M.detection_rate(du, seed=seed), M.detection_rate(do, seed=seed)
            m["erasure" if cls == "forget" else "retention"] = (M.erasure if cls == "forget" else M.retention)(du, do, seed=seed)
            curve_det = [float(hits(imgs["p"][p]).mean()) for p in self.psis]
            wf = {p: self.detector.features(x) for p, x in imgs["p"].items()}
            wo, wu = self.detector.features(imgs["o"][:n]), self.detector.features(imgs["u"][:n])
            m["kid_po"], m["kid_pu"] = M.kid_by_psi(wf, wo, seed=seed), M.kid_by_psi(wf, wu, seed=seed)
            if cls == "retain":
                kv = M.kid(wu, wo, seed=seed)
                m["kid_uo"] = M.Metric(value=kv[0], n=2 * n)
        curve_p = (m["ccs"].curve or {}).get("p_original") or [float(np.mean(p_orig[p])) for p in self.psis]
        curve_r = (m["crs"].curve or {}).get("retrieval") or [None] * len(self.psis)
        res["psi_curve"] = [{"psi": p, "p_original": curve_p[k], "retrieval": curve_r[k], "detection": curve_det[k]} for k, p in enumerate(self.psis)]
        basis = curve_det if self.detector is not None and cls == "forget" else curve_p
        m["psi_recover"] = M.Metric(value=M.psi_recover(self.psis, basis), n=len(self.psis))
        res["metrics"] = {k: v.to_dict() for k, v in m.items()}
        res["classifier"] = {"val_accuracy": clf.val_accuracy, "history": clf.history}
        res["seconds_classifier"] = t_clf
        res["seconds_metrics"] = time.time() - t - t_clf
        write_json(path, res)
        return res

    # ------------------------------------------------------------------ record
    def aggregate(self, rows: list[dict]) -> tuple[dict, dict, list[dict]]:
        def agg(cls: str) -> dict:
            sel = [r for r in rows if r["class"] == cls]
            names = sorted({k for r in sel for k in r["metrics"]})
            out = {}
            for name in names:
                ms = [M.Metric(value=r["metrics"][name]["value"], ci=tuple(r["metrics"][name]["ci"]) if r["metrics"][name].get("ci") else None,
                               n=r["metrics"][name]["n"]) for r in sel if name in r["metrics"]]
                out[name] = M.aggregate(ms, seed=int(self.cfg.seed)).to_dict()
            return out

        forget = [r for r in rows if r["class"] == "forget"]
        curve = []
        for k, p in enumerate(self.psis):
            point = {"psi": p}
            for key in ("p_original", "retrieval", "detection"):
                vals = [r["psi_curve"][k][key] for r in forget if r["psi_curve"][k][key] is not None]
                point[key] = float(np.mean(vals)) if vals else None
            curve.append(point)
        metrics, retain = agg("forget"), agg("retain")
        basis = [c["detection"] for c in curve] if self.detector is not None else [c["p_original"] for c in curve]
        if all(b is not None for b in basis):
            metrics["psi_recover"] = {"value": M.psi_recover(self.psis, basis), "ci": None, "n": len(self.psis)}
        return metrics, retain, curve

    def gold(self) -> dict | None:
        """The gold standard's ψ-curve for this concept and protocol, if its record exists."""
        if self.cfg.method.get("reference") == "gold":
            return None
        root = Path(self.cfg.out_dir) / self.cfg.model.name / self.concept.name / "retrain"
        for rec_path in sorted(root.glob("*/record.json")):
            rec = read_record(rec_path)
            if rec and rec.get("status") == "ok" and rec["protocol"]["hash"] == self.protocol["hash"]:
                return {"psi_recover": rec["metrics"].get("psi_recover", {}).get("value"), "psi_curve": rec["psi_curve"], "job_key": rec["job_key"]}
        return None

    def figures(self, rows: list[dict], imgs_by_prompt: dict[int, dict], curve: list[dict], gold: dict | None) -> dict[str, str]:
        from bench.plots import image_grid, psi_curve_plot

        title = f"{self.cfg.method.get('display') or self.cfg.method.name} — {self.concept.name} (forget prompts)"
        psi_curve_plot(curve, self.dir / "psi_curve.png", title, gold=(gold or {}).get("psi_curve"))
        labels = [f"{r['class']}: {r['prompt'][:28]}" for r in rows]
        image_grid([imgs_by_prompt[i]["o"] for i in range(len(rows))], self.dir / "grid_lambda_o.png", labels, "λ_O: original model θ")
        image_grid([imgs_by_prompt[i]["u"] for i in range(len(rows))], self.dir / "grid_lambda_u.png", labels, "λ_U: unlearned model θ*")
        first = imgs_by_prompt[0]["p"]
        image_grid([first[p] for p in self.psis], self.dir / "grid_lambda_p.png", [f"ψ = {p:g}" for p in self.psis], f"λ_P across ψ: {rows[0]['prompt']!r}")
        return {"psi_curve_png": "psi_curve.png", "grid_o": "grid_lambda_o.png", "grid_u": "grid_lambda_u.png", "grid_p": "grid_lambda_p.png"}


def _hydra_pointer(rec_path: Path, status: str) -> None:
    """Leave ``result.json`` in the Hydra job directory: how sweep reports find each job's record."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return
    out = Path(hc.runtime.output_dir)
    write_json(out / "result.json", {"record": str(rec_path.resolve()), "status": status, "overrides": list(hc.overrides.task)})


def _peak_memory_mb() -> float:
    mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        mb = max(mb, torch.cuda.max_memory_allocated() / 2**20)
    return float(mb)


def execute(cfg: DictConfig) -> int:
    """Run one job; return the process exit code (0 ok/skipped, 1 failed, 2 bad input)."""
    from bench.tracking import Tracker

    try:
        v = validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.time()
    try:
        job = Job(cfg, v["fn"], v["params"])
        job.load()
    except (ConfigError, DeltaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rec_path = job.dir / "record.json"
    old = read_record(rec_path)
    if old and old.get("status") == "ok" and not cfg.overwrite:
        log(f"finished job {job.key} exists: {rec_path} (overwrite=true to re-run)")
        _hydra_pointer(rec_path, "ok")
        print(rec_path)
        return 0
    if cfg.overwrite and job.dir.exists():
        shutil.rmtree(job.dir)
    job.dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(cfg, job.key, job.dir, config)
    base = {
        "schema_version": SCHEMA_VERSION, "job_key": job.key, "created": now(),
        "model": {"name": cfg.model.name, "id": cfg.model.id, "revision": cfg.model.get("revision"), "hash": job.model_hash, "world": cfg.model.world,
                  "pipeline": job.pipeline_info},
        "concept": job.concept.to_dict(),
        "method": {"name": cfg.method.name, "display": cfg.method.get("display"), "variant": job.params.get("variant"), "params": job.params, "reference": cfg.method.get("reference")},
        "protocol": job.protocol, "seed": int(cfg.seed), "config": config, "env": environment(),
    }
    failed = False
    try:
        report = job.stage_unlearn()
        rows, imgs_by_prompt = [], {}
        prompts = job.prompts()
        for i, (prompt, cls) in enumerate(prompts):
            log(f"prompt {i + 1}/{len(prompts)} ({cls}): {prompt!r} — images and attack")
            imgs = job.stage_prompt_images(i, prompt)
            imgs_by_prompt[i] = {"o": imgs["o"][:8], "u": imgs["u"][:8], "p": {p: x[:8] for p, x in imgs["p"].items()}}
            log(f"prompt {i + 1}/{len(prompts)}: classifier and metrics")
            rows.append(job.stage_prompt_scores(i, prompt, cls, imgs))
            rows[-1]["cost"] = {k: imgs["meta"].get(k) for k in ("seconds_generate", "seconds_attack", "nfe_u", "nfe_continue", "nfe_prefix", "nfe_o")}
        metrics, retain, curve = job.aggregate(rows)
        gold = job.gold()
        artifacts = job.figures(rows, imgs_by_prompt, curve, gold)
        nfe_gen = sum(sum(r["cost"][k] or 0 for k in ("nfe_o", "nfe_u", "nfe_continue", "nfe_prefix")) for r in rows)
        cost = {
            "unlearn": {"seconds": report.get("seconds"), "nfe": report.get("nfe"), "steps": report.get("steps")},
            "generate_and_attack": {"seconds": sum((r["cost"]["seconds_generate"] or 0) + (r["cost"]["seconds_attack"] or 0) for r in rows), "nfe": nfe_gen},
            "classifier": {"seconds": sum(r.get("seconds_classifier", 0) for r in rows)},
            "total_seconds": time.time() - t0,
            "total_nfe": int(nfe_gen + int(report.get("nfe") or 0)),
            "peak_memory_mb": _peak_memory_mb(),
            "params_changed": report.get("params_changed"),
            "cache": {"hits": job.cache.hits, "misses": job.cache.misses},
        }
        record = {**base, "status": "ok", "error": None, "metrics": metrics, "retain": retain, "psi_curve": curve,
                  "gold": {"psi_recover": gold["psi_recover"], "job_key": gold["job_key"]} if gold else None,
                  "prompts": [{k: r[k] for k in ("prompt", "class", "metrics", "psi_curve")} for r in rows],
                  "unlearn": {k: v for k, v in report.items() if k not in ("loss_history",)},
                  "cost": cost, "artifacts": artifacts, "wandb": tracker.url}
        write_json(rec_path, record)
        _hydra_pointer(rec_path, "ok")
        tracker.log_record(record, job.dir)
        summary = {k: (metrics.get(k) or retain.get(k) or {}).get("value") for k in ("erasure", "ccs", "crs", "crs_paper", "psi_recover")}
        summary["retention"] = retain.get("retention", {}).get("value")
        log("done: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
        print(rec_path)
        return 0
    except (ConfigError, DeltaError) as e:
        # Bad input, not a failed experiment: no record at all (nothing half-written to read back).
        failed = True
        rec_path.unlink(missing_ok=True)
        if job.dir.is_dir() and not any(job.dir.iterdir()):
            job.dir.rmdir()  # nothing was computed: leave no trace of the job
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 — a failed job leaves a failed record and a non-zero exit
        failed = True
        write_json(rec_path, {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        _hydra_pointer(rec_path, "failed")
        log(f"FAILED: {type(e).__name__}: {e} (record: {rec_path})")
        return 1
    finally:
        tracker.finish(failed=failed)
