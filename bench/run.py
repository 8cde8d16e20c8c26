"""``python -m bench``: validate → load → unlearn → λ_O, λ_U → classifier → probes → score → record.

One job = one (model, concept, method + hyperparameters, shared protocol, seed). Its directory
``<out_dir>/<model>/<concept>/<method>/<job-key>/`` holds the method's ``delta.safetensors``,
one stage file per prompt and stage, one folder per probe (``probes/<name>/``), the figures and
``record.json``. Every file is written atomically; a re-run skips finished stages (a killed job
resumes and ends with the same numbers), and a finished job is skipped unless ``overwrite=true``
— or unless it lacks a probe the command asks for, which is then added without recomputing the
rest (the job key does not depend on the probes). λ_O sets and θ-prefix snapshots go to the
content-addressed cache shared by all methods and sweep jobs.
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

from bench import scorers as S
from bench.cache import Cache, load_entry, save_entry
from bench.config import validate
from bench.cpuload import OtherLoad
from bench.hparams import ConfigError, file_fingerprints, takes_context
from bench.pipeline import (
    TEXT_ENCODER_PREFIX,
    DeltaError,
    apply_delta,
    autocast_dtype,
    changed_components,
    delta_names,
    delta_text_names,
    describe_pipeline,
    load_pipeline,
    load_tensors,
    pair_text_encoder,
    resolve_device,
    save_delta,
    snapshot_state,
    state_hash,
    using_text_encoder,
)
from bench.record import (
    SCHEMA_VERSION,
    environment,
    job_key,
    kernels,
    now,
    protocols,
    read_record,
    write_json,
)

SEED_STRIDE = 1_000_000  # seed s draws its reference images from s·10⁶ + i and its probe seeds above that
PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboard" / "results"


def job_seed_base(seed: int) -> int:
    """Where a job's seeds start: ``seed`` moves λ_O/λ_U, every probe's seeds and the classifier."""
    return int(seed) * SEED_STRIDE


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Job:
    """The state of one benchmark job; each ``stage_*`` method is resumable."""

    def __init__(self, cfg: DictConfig, fn: Any, params: dict[str, Any], probes: list):
        from bench.sampling import NFECounter, SamplerConfig
        from bench.worlds import build_concept, build_detector

        self.cfg, self.fn, self.params, self.probes = cfg, fn, params, probes
        self.device = resolve_device(cfg.device)
        self.concept = build_concept(cfg)
        self.detector = build_detector(cfg)
        # model.max_batch_size caps eval.batch_size so a world's batches fit its GPU (SD: 24 GB)
        batch = min(int(cfg.eval.batch_size), int(cfg.model.get("max_batch_size") or cfg.eval.batch_size))
        self.sampler = SamplerConfig(steps=int(cfg.eval.steps), guidance=float(cfg.eval.guidance), batch_size=batch)
        self.precision = autocast_dtype(cfg.model, self.device)  # None = fp32 (always on the CPU)
        self.counter = NFECounter()
        self.cache = Cache(cfg.cache_dir)
        self.seed = int(cfg.seed)
        self.timings: dict[str, float] = {}
        self.reused: dict[str, int] = {}  # stage → how many of its files a resumed job reused
        self.stage = "validation"
        self._classifiers: dict[int, Any] = {}
        self.star_text_encoder = None  # θ*'s own text encoder when the method changed it (stage_unlearn)

    # ------------------------------------------------------------------ setup
    def load(self) -> None:
        t = time.time()
        self.stage = "loading the model"
        self.pipe = load_pipeline(self.cfg.model, self.device)
        self.theta = self.pipe.unet
        self.theta.requires_grad_(False)
        self.base_state = snapshot_state(self.theta)
        self.model_hash = state_hash({**{f"unet.{k}": v for k, v in self.base_state.items()},
                                      **{f"te.{k}": v for k, v in self.pipe.text_encoder.state_dict().items()},
                                      **{f"vae.{k}": v for k, v in self.pipe.vae.state_dict().items()}})
        self.unet_hash = state_hash(self.base_state)
        det = self.detector.describe() if self.detector is not None else None
        self.protocol, self.probe_protocols = protocols(self.cfg, self.model_hash, type(self.pipe.scheduler).__name__, det,
                                                        self.probes, precision=self.precision)
        self.pipeline_info = describe_pipeline(self.pipe, self.cfg.model, self.device)
        # Weight files a method reads (e.g. method=weights) enter the key by content, not by path.
        key_params = {**self.params, **{f"{k}.sha256": v for k, v in file_fingerprints(self.fn, self.params).items()}}
        self.key = job_key(self.cfg.model.name, self.concept.name, self.cfg.method.name, key_params, self.protocol["hash"], self.seed)
        self.dir = Path(self.cfg.out_dir) / self.cfg.model.name / self.concept.name / self.cfg.method.name / self.key
        self.timings["load"] = time.time() - t

    def prompts(self) -> list[tuple[str, str]]:
        e = self.cfg.eval
        forget = list(self.concept.forget_prompts)[: e.max_forget_prompts or None]
        retain = list(self.concept.retain_prompts)[: e.max_retain_prompts or None]
        return [(p, "forget") for p in forget] + [(p, "retain") for p in retain]

    def _reuse(self, stage: str) -> None:
        self.reused[stage] = self.reused.get(stage, 0) + 1

    # ------------------------------------------------------------------ unlearn
    def stage_unlearn(self) -> dict:
        from bench.context import MethodContext

        self.stage = "unlearn"
        delta, report_file = self.dir / "delta.safetensors", self.dir / "unlearn.json"
        star = copy.deepcopy(self.theta)
        text_encoder = self.pipe.text_encoder
        if delta.exists() and report_file.exists():
            log(f"unlearn: reusing {delta}")
            self._reuse("unlearn")
            report = json.loads(report_file.read_text())
        else:
            log(f"unlearn: {self.cfg.method.name} {self.params}")
            t = time.time()
            self.pipe.unet = star
            star.requires_grad_(False)
            # A CPU copy, not a second encoder on the device: a method may edit the text encoder in
            # place (AdvUnlearn trains it); its changes go into the delta and θ gets the original back.
            te_base = snapshot_state(text_encoder)
            seed_everything(self.seed)
            offload = self.device.type == "cuda"  # θ waits on the CPU: full-UNet Adam (ESD-u, FMN) needs the room
            if offload:
                self.theta.to("cpu")
                torch.cuda.empty_cache()
            kwargs = dict(self.params)
            if takes_context(self.fn):
                kwargs["ctx"] = MethodContext(cache_dir=Path(self.cfg.cache_dir).resolve(), progress=True, seed=self.seed)
            try:
                report = dict(self.fn(self.pipe, self.concept, **kwargs) or {})
                report["seconds"] = time.time() - t
                names = save_delta(delta, self.base_state, star, {
                    "method": self.cfg.method.name, "concept": self.concept.name, "params": self.params,
                    "base_model": {"id": self.cfg.model.id, "hash": self.unet_hash}, "seed": self.seed,
                }, text_encoder_base=te_base, text_encoder=self.pipe.text_encoder)
            finally:
                self.pipe.unet, self.pipe.text_encoder = self.theta, text_encoder
                load_tensors(text_encoder, te_base)
                if offload:
                    self.theta.to(self.device)
            base = {**self.base_state, **delta_text_names(te_base, TEXT_ENCODER_PREFIX)}
            changed = sum(base[n].numel() for n in names if n in base)
            own = star.state_dict()  # tensors a method adds (Receler's erasers) are not in the base
            added = sum(own[n].numel() for n in names if n not in base and n in own)
            report.update({"changed_tensors": names, "params_changed": int(changed), "params_added": int(added),
                           "changed_components": changed_components(names)})
            write_json(report_file, report)
        # Every later stage uses the weights as re-loaded from the delta, so the record is traceable to them.
        star = copy.deepcopy(self.theta)
        names = delta_names(delta)
        te_star = None
        if any(n.startswith(TEXT_ENCODER_PREFIX) for n in names):
            te_star = copy.deepcopy(text_encoder).requires_grad_(False).eval()
        apply_delta(star, delta, base_hash=self.unet_hash, text_encoder=te_star)
        star.requires_grad_(False)
        if te_star is not None:
            # θ* encodes prompts with its own text encoder, θ with the original (bench.pipeline.pair_text_encoder).
            pair_text_encoder(star, te_star)
            pair_text_encoder(self.theta, text_encoder)
        self.star, self.star_text_encoder = star.eval(), te_star
        report.setdefault("changed_components", changed_components(names))
        self.timings["unlearn"] = report.get("seconds", 0.0)
        return report

    def as_star(self):
        """Inside the block ``pipe.text_encoder`` is θ*'s (when the method changed it): probes that
        attack θ* through the text encoder (adversarial prompt, inversion, relearning) attack its own."""
        return using_text_encoder(self.pipe, self.star_text_encoder)

    # ------------------------------------------------------------------ plain generations
    def amp(self):
        """Autocast (``model.autocast``, CUDA only) for sampling, the probes and decoding; methods run outside it."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.precision))

    def cache_key(self) -> dict:
        # Cached λ_O sets and snapshots must not mix images that differ: fp16 from fp32 (absent = fp32),
        # nor one CPU instruction set or GPU from another (``record.kernels``).
        return {"model": self.model_hash, "kernels": kernels(self.device),
                **({"precision": self.precision} if self.precision else {})}

    def _images(self, unet, prompt: str, seeds: list[int]) -> np.ndarray:
        from bench.sampling import decode, generate

        with self.amp():
            return decode(self.pipe, generate(self.pipe, unet, prompt, seeds, self.sampler, self.counter), self.sampler.batch_size)

    def ref_seeds(self) -> list[int]:
        e, base = self.cfg.eval, job_seed_base(self.seed)
        return list(range(base, base + max(int(e.n), int(e.detect_n))))

    def lambda_o(self, prompt: str, seeds: list[int]) -> tuple[np.ndarray, int]:
        """λ_O for a prompt from the shared cache (depends on the base model and sampler only)."""
        key = {**self.cache_key(), "prompt": prompt, "seeds": seeds, "sampler": self.sampler.as_metadata()}

        def compute():
            before = self.counter.total
            imgs = self._images(self.theta, prompt, seeds)
            return {"images": torch.from_numpy(imgs)}, {"nfe": self.counter.total - before}

        tensors, meta = self.cache.get_or_compute("lambda_o", key, compute)
        return tensors["images"].numpy(), int(meta.get("nfe", 0))

    def stage_reference(self, i: int, prompt: str) -> dict[str, Any]:
        """λ_O (cached) and λ_U for one prompt; stage file ``u-<i>.safetensors``."""
        self.stage = f"λ_U of prompt {i + 1}"
        seeds = self.ref_seeds()
        o, nfe_o = self.lambda_o(prompt, seeds)
        path = self.dir / f"u-{i}.safetensors"
        if path.exists():
            self._reuse("λ_U")
            tensors, meta = load_entry(path)
        else:
            t, before = time.time(), self.counter.total
            u = self._images(self.star, prompt, seeds)
            tensors, meta = {"u": torch.from_numpy(u)}, {"prompt": prompt, "seconds": time.time() - t, "nfe": self.counter.total - before}
            save_entry(path, tensors, meta)
        return {"o": o, "u": tensors["u"].numpy(), "meta": {**meta, "nfe_o": nfe_o}}

    def classifier(self, i: int, o: np.ndarray, u: np.ndarray):
        """The paper's λ_O-vs-λ_U classifier for prompt i, trained once and kept in ``classifier-<i>/``."""
        from bench.classifier import ClassifierConfig, ConceptClassifier, train_classifier

        if i in self._classifiers:
            return self._classifiers[i]
        c = OmegaConf.to_container(self.cfg.eval.classifier, resolve=True)
        init = self.detector.det if (c["backbone"] == "detector_trunk" and self.detector is not None) else None
        path = self.dir / f"classifier-{i}"
        t = time.time()
        if (path / "config.json").exists():
            self._reuse("classifier")
            clf = ConceptClassifier.load(path, init_trunk=init, device=self.device)
            seconds = json.loads((path / "config.json").read_text()).get("seconds", 0.0)
        else:
            self.stage = f"classifier of prompt {i + 1}"
            n = int(self.cfg.eval.n)
            clf = train_classifier(o[:n], u[:n], ClassifierConfig(**c, seed=self.seed * 1000 + i), init_trunk=init, device=self.device)
            seconds = time.time() - t
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            clf.save(tmp)
            meta = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps({**meta, "seconds": seconds}, indent=2))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        self.timings["classifier"] = self.timings.get("classifier", 0.0) + (seconds if seconds else 0.0)
        self._classifiers[i] = clf
        return clf

    def stage_prompt_scores(self, i: int, prompt: str, cls: str, ref: dict) -> dict:
        """Prompt-level scores (detection, erasure/retention, specificity, KID of λ_U to λ_O); ``scores-<i>.json``."""
        path = self.dir / f"scores-{i}.json"
        prev = read_record(path)
        if prev is not None:
            self._reuse("scores")
            return prev
        self.stage = f"scores of prompt {i + 1}"
        n = int(self.cfg.eval.n)
        clf = self.classifier(i, ref["o"], ref["u"]) if self.probes else None
        m, units = S.prompt_scores(self.detector, self.concept, prompt, cls, ref["o"], ref["u"], n, self.seed, clf)
        res = {"prompt": prompt, "class": cls, "metrics": {k: v.to_dict() for k, v in m.items()}, "units": units}
        if clf is not None:
            res["classifier"] = {"val_accuracy": clf.val_accuracy, "history": clf.history}
        write_json(path, res)
        return res

    # ------------------------------------------------------------------ probes
    def probe_context(self):
        from bench.probes import ProbeContext

        ctx = ProbeContext(pipe=self.pipe, theta=self.theta, star=self.star, concept=self.concept, sampler=self.sampler,
                           cache=self.cache, counter=self.counter, device=self.device, seed=self.seed, amp=self.amp,
                           detector=self.detector, world=self.cfg.model.world, cache_key=self.cache_key())
        return ctx

    def probe_dir(self, probe) -> Path:
        """A probe's stage files, one folder per probe protocol: re-configuring a probe never reuses
        another configuration's images (``probes/<name>/<probe protocol hash>/``)."""
        return self.dir / "probes" / probe.name / self.probe_protocols[probe.name]["hash"]

    def stage_probe_prepare(self, probe, ctx) -> tuple[dict, dict]:
        """A probe's per-model work (``prepare``), kept in ``probes/<name>/<hash>/state.safetensors``."""
        path = self.probe_dir(probe) / "state.safetensors"
        if path.exists():
            self._reuse(f"{probe.name} prepare")
            return load_entry(path)
        self.stage = f"{probe.name}: prepare"
        t, before = time.time(), self.counter.total
        seed_everything(self.seed)
        with self.as_star():
            tensors, meta = probe.prepare(ctx)
        meta = {**meta, "seconds": time.time() - t, "nfe": self.counter.total - before}
        save_entry(path, tensors, meta)
        return tensors, meta

    def stage_probe_prompt(self, probe, ctx, state, i: int, prompt: str, cls: str, ref: dict) -> dict:
        """One probe on one prompt: its images (``probes/<name>/<hash>/images-<i>.safetensors``) and scores."""
        folder = self.probe_dir(probe)
        scores_path = folder / f"scores-{i}.json"
        prev = read_record(scores_path)
        if prev is not None:
            self._reuse(probe.name)
            return prev
        self.stage = f"{probe.name} on prompt {i + 1}"
        img_path = folder / f"images-{i}.safetensors"
        if img_path.exists():
            tensors, meta = load_entry(img_path)
        else:
            seed_everything(self.seed * 1000 + i)
            with self.as_star():
                out = probe.run(ctx, prompt, cls, state)
            tensors = {f"x{k}": torch.from_numpy(im) for k, im in enumerate(out.images.values())}
            for tag, imgs in out.extra.items():
                tensors.update({f"{tag}_{k}": torch.from_numpy(im) for k, im in enumerate(imgs.values())})
            meta = {"prompt": prompt, "x": [float(x) for x in out.images], "extra": sorted(out.extra), **out.meta, "data": out.data}
            save_entry(img_path, tensors, meta)
        xs = [float(x) for x in meta["x"]]
        images = {x: tensors[f"x{k}"].numpy() for k, x in enumerate(xs)}
        extra = {tag: {x: tensors[f"{tag}_{k}"].numpy() for k, x in enumerate(xs)} for tag in meta.get("extra", [])}
        n = int(self.cfg.eval.n)
        clf = self.classifier(i, ref["o"], ref["u"])
        m, curve, units = S.probe_scores(images, extra, ref["o"], ref["u"], n, clf, self.detector, self.concept, prompt, cls, self.seed)
        res = {"prompt": prompt, "class": cls, "metrics": {k: v.to_dict() for k, v in m.items()}, "curve": curve,
               "units": units, "data": meta.get("data") or {},
               "cost": {k: meta.get(k) for k in ("seconds", "nfe", "nfe_shared")}}
        write_json(scores_path, res)
        return res

    def probe_images(self, probe, i: int) -> dict[float, np.ndarray]:
        tensors, meta = load_entry(self.probe_dir(probe) / f"images-{i}.safetensors")
        return {float(x): tensors[f"x{k}"].numpy() for k, x in enumerate(meta["x"])}

    # ------------------------------------------------------------------ gold standard
    def gold(self, probe_name: str, probe_hash: str) -> dict | None:
        """The gold standard's record for this concept, probe protocol and seed (``find_gold``)."""
        if self.cfg.method.get("reference") == "gold":
            return None
        return find_gold(Path(self.cfg.out_dir), self.cfg.model.name, self.concept.name, self.seed, probe_name, probe_hash)

    # ------------------------------------------------------------------ figures
    def figures(self, rows: list[dict], refs: dict[int, dict], blocks: dict[str, dict], golds: dict[str, dict | None]) -> dict[str, str]:
        from bench.plots import image_grid, probe_curve_plot

        name = self.cfg.method.get("display") or self.cfg.method.name
        labels = [f"{r['class']}: {r['prompt']}" for r in rows]
        artifacts = {"grid_o": "grid_lambda_o.png", "grid_u": "grid_lambda_u.png"}
        image_grid([refs[i]["o"][:8] for i in range(len(rows))], self.dir / artifacts["grid_o"], labels, "λ_O: original model θ")
        image_grid([refs[i]["u"][:8] for i in range(len(rows))], self.dir / artifacts["grid_u"], labels, "λ_U: unlearned model θ*")
        first = next(i for i, r in enumerate(rows) if r["class"] == "forget")
        for probe in self.probes:
            block, gold = blocks[probe.name], golds.get(probe.name)
            ax = block["axis"]
            curve_file, grid_file = f"curve_{probe.name}.png", f"grid_{probe.name}.png"
            probe_curve_plot(block["curve"], self.dir / curve_file, f"{name} — {self.concept.name}: {probe.display or probe.name} (forget prompts)",
                             ax["label"], gold=(gold or {}).get("curve"), recover=block["metrics"].get("recover"),
                             gold_recover=(gold or {}).get("metrics", {}).get("recover"))
            imgs = self.probe_images(probe, first)
            xs = list(imgs)
            xs = [xs[round(k * (len(xs) - 1) / 8)] for k in range(9)] if len(xs) > 9 else xs  # at most 9 rows
            image_grid([imgs[x][:8] for x in dict.fromkeys(xs)], self.dir / grid_file, [f"{ax['unit'] or ax['name']} = {x:g}" for x in dict.fromkeys(xs)],
                       f"{probe.display or probe.name} on {rows[first]['prompt']!r}: θ* images along the axis")
            artifacts[f"curve_{probe.name}"], artifacts[f"grid_{probe.name}"] = curve_file, grid_file
        return artifacts


def find_gold(out_dir: Path, model: str, concept: str, seed: int, probe: str, probe_hash: str) -> dict | None:
    """The gold standard's record for a concept, probe protocol and seed: a local run under
    ``out_dir`` first, else the published one shipped in ``leaderboard/results/`` (so a first run
    has its gold comparison without running ``method=retrain``)."""
    for root in (Path(out_dir), PUBLISHED):
        for rec_path in sorted((root / model / concept / "retrain").glob("*/record.json")):
            rec = read_record(rec_path)
            if (rec and rec.get("status") == "ok" and rec.get("schema_version") == SCHEMA_VERSION and rec.get("seed") == seed
                    and (rec.get("probes") or {}).get(probe, {}).get("protocol", {}).get("hash") == probe_hash):
                return {"record": rec, "path": str(rec_path), "published": root == PUBLISHED}
    return None


# ---------------------------------------------------------------------------- job → record

def _probe_block(job: Job, probe, ctx, rows: list[dict], prep_meta: dict, seconds: float, load: dict) -> dict:
    axis = probe.axis(ctx).to_dict()
    forget, fcurve = S.aggregate(rows, "forget", job.seed, axis["values"])
    retain, _ = S.aggregate(rows, "retain", job.seed, axis["values"])
    cost = {"seconds": seconds + float(prep_meta.get("seconds") or 0.0),
            "prepare_seconds": prep_meta.get("seconds"), "prepare_nfe": prep_meta.get("nfe"),
            "nfe": int(sum(r["cost"].get("nfe") or 0 for r in rows) + int(prep_meta.get("nfe") or 0)),
            "nfe_shared": int(sum(r["cost"].get("nfe_shared") or 0 for r in rows)), **load}
    return {"protocol": job.probe_protocols[probe.name], "display": probe.display or probe.name, "reference": probe.reference,
            "classes": list(probe.classes), "axis": axis, "metrics": forget, "retain": retain, "curve": fcurve, "cost": cost,
            "state": {k: v for k, v in prep_meta.items() if k not in ("seconds", "nfe")}}


def _run_stages(job: Job, t0: float, machine: OtherLoad) -> dict:
    """Every stage of a job (each resumable) and the record it ends with. ``machine`` has measured the rest
    of the machine's CPU use since the job started; each probe measures its own stretch the same way."""
    report = job.stage_unlearn()
    prompts = job.prompts()
    rows, refs = [], {}
    for i, (prompt, cls) in enumerate(prompts):
        log(f"prompt {i + 1}/{len(prompts)} ({cls}): {prompt!r} — λ_O, λ_U and scores")
        ref = job.stage_reference(i, prompt)
        refs[i] = ref
        rows.append({**job.stage_prompt_scores(i, prompt, cls, ref), "cost": ref["meta"]})
    ctx = job.probe_context() if job.probes else None
    blocks, per_prompt_probes, golds = {}, {i: {} for i in range(len(prompts))}, {}
    for probe in job.probes:
        probe_machine = OtherLoad()
        state = job.stage_probe_prepare(probe, ctx)
        t = time.time()
        prows = []
        for i, (prompt, cls) in enumerate(prompts):
            if cls not in probe.classes:
                continue
            log(f"{probe.name}: prompt {i + 1}/{len(prompts)} ({cls})")
            r = job.stage_probe_prompt(probe, ctx, state, i, prompt, cls, refs[i])
            prows.append(r)
            per_prompt_probes[i][probe.name] = {"metrics": r["metrics"], "curve": r["curve"], **({"data": r["data"]} if r.get("data") else {})}
        block = _probe_block(job, probe, ctx, prows, state[1], time.time() - t, probe_machine.stop())
        gold = job.gold(probe.name, block["protocol"]["hash"])
        if gold is not None:
            g = gold["record"]
            block["gold"] = {"job_key": g["job_key"], "published": gold["published"],
                             "recover": g["probes"][probe.name]["metrics"].get("recover", {}).get("value")}
            golds[probe.name] = g["probes"][probe.name]
        else:
            block["gold"] = None
        blocks[probe.name] = block
    metrics, _ = S.aggregate(rows, "forget", job.seed)
    retain, _ = S.aggregate(rows, "retain", job.seed)
    artifacts = job.figures(rows, refs, blocks, golds) if job.probes else {}
    nfe_u = sum(int(r["cost"].get("nfe") or 0) for r in rows)
    nfe_o = sum(int(r["cost"].get("nfe_o") or 0) for r in rows)
    probe_nfe = sum(b["cost"]["nfe"] for b in blocks.values())
    cost = {
        "unlearn": {"seconds": report.get("seconds"), "nfe": report.get("nfe"), "steps": report.get("steps"),
                    **({"nfe_saved_by_cache": report["nfe_saved_by_cache"]} if "nfe_saved_by_cache" in report else {})},
        "generate": {"seconds": sum(float(r["cost"].get("seconds") or 0) for r in rows), "nfe": nfe_u},
        "classifier": {"seconds": job.timings.get("classifier", 0.0)},
        "probes": {name: b["cost"] for name, b in blocks.items()},
        "shared": {"nfe": nfe_o + sum(b["cost"]["nfe_shared"] for b in blocks.values()),
                   "what": "λ_O and θ-prefix snapshots: computed once per prompt and shared through the cache by every method"},
        "total_seconds": time.time() - t0,
        **machine.stop(),  # others_cpus, cpus: whether the times above ran alone (bench/cpuload.py)
        "total_nfe": int(nfe_u + probe_nfe + int(report.get("nfe") or 0)),
        "peak_memory_mb": _peak_memory_mb(),
        "params_changed": report.get("params_changed"),
        "cache": {"hits": job.cache.hits, "misses": job.cache.misses},
    }
    return {"status": "ok", "error": None, "metrics": metrics, "retain": retain, "probes": blocks,
            "prompts": [{"prompt": r["prompt"], "class": r["class"], "metrics": r["metrics"], "probes": per_prompt_probes[i]}
                        for i, r in enumerate(rows)],
            "unlearn": {k: v for k, v in report.items() if k not in ("loss_history",)},
            "cost": cost, "artifacts": artifacts, "resumed": dict(job.reused)}


def _hydra_pointer(rec_path: Path, status: str) -> None:
    """In a multirun, leave ``result.json`` in the Hydra job directory: how sweep reports find each record."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return
    if hc.mode.name != "MULTIRUN":
        return
    out = Path(hc.runtime.output_dir)
    write_json(out / "result.json", {"record": str(rec_path.resolve()), "status": status, "overrides": list(hc.overrides.task)})


def _peak_memory_mb() -> float:
    mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        mb = max(mb, torch.cuda.max_memory_allocated() / 2**20)
    return float(mb)


def _warn_if_busy(cfg: DictConfig) -> None:
    """Two torch jobs on a small machine slow each other many-fold: say so before the long work."""
    if cfg.threads is not None or not hasattr(os, "getloadavg") or torch.get_num_threads() < 2:
        return
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if cores <= 8 and load >= 0.75 * cores:
        log(f"warning: the machine is already busy (load {load:.1f} on {cores} cores); torch's default of "
            f"{torch.get_num_threads()} threads will compete with it and can make this job several times slower. "
            "Set threads=1 (or wait for the other job).")


def _existing(job: Job) -> dict | None:
    old = read_record(job.dir / "record.json")
    if not old or old.get("status") != "ok" or old.get("schema_version") != SCHEMA_VERSION:
        return None
    have = {name: b.get("protocol", {}).get("hash") for name, b in (old.get("probes") or {}).items()}
    if all(have.get(p.name) == job.probe_protocols[p.name]["hash"] for p in job.probes):
        return old
    return None  # a probe was added (or re-configured): its stages run, the others are reused


def execute(cfg: DictConfig) -> int:
    """Run one job; return the process exit code (0 ok/skipped, 1 failed, 2 bad input, 130 interrupted)."""
    from bench.summary import print_summary
    from bench.tracking import Tracker

    try:
        v = validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    _warn_if_busy(cfg)
    t0, machine = time.time(), OtherLoad()
    job = None
    try:
        job = Job(cfg, v["fn"], v["params"], v["probes"])
        job.load()
    except (ConfigError, DeltaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted while loading; nothing was written", file=sys.stderr)
        return 130
    rec_path = job.dir / "record.json"
    old = _existing(job)
    if old and not cfg.overwrite:
        log(f"finished job {job.key} exists: {rec_path} (overwrite=true to re-run)")
        _hydra_pointer(rec_path, "ok")
        print_summary(old, rec_path, job)
        return 0
    if cfg.overwrite and job.dir.exists():
        shutil.rmtree(job.dir)
    created = not job.dir.exists()
    try:
        job.dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: `out_dir` = {str(cfg.out_dir)!r}: cannot create the job folder {str(job.dir)!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(cfg, job.key, job.dir, config)
    base = {
        "schema_version": SCHEMA_VERSION, "job_key": job.key, "created": now(),
        "model": {"name": cfg.model.name, "id": cfg.model.id, "revision": cfg.model.get("revision"), "hash": job.model_hash,
                  "world": cfg.model.world, "pipeline": job.pipeline_info},
        "concept": job.concept.to_dict(),
        "method": {"name": cfg.method.name, "display": cfg.method.get("display"), "variant": job.params.get("variant"),
                   "params": job.params, "reference": cfg.method.get("reference")},
        "protocol": job.protocol, "seed": job.seed, "config": config, "env": environment(),
    }
    outcome = "failed"
    try:
        record = {**base, **_run_stages(job, t0, machine), "wandb": tracker.url}
        # What ran, in the method's own words (ESD's parameter set, UCE's key rule, FMN's trained part, …).
        record["method"]["variant"] = record["unlearn"].get("variant") or job.params.get("variant")
        record["method"]["changed"] = record["unlearn"].get("changed_components")  # tensors per component: {unet, text_encoder}
        write_json(rec_path, record)
        _hydra_pointer(rec_path, "ok")
        tracker.log_record(record, job.dir)
        outcome = "ok"
        tracker.finish("ok")
        print_summary(record, rec_path, job)
        return 0
    except (ConfigError, DeltaError) as e:
        # Bad input, not a failed experiment: no record at all (nothing half-written to read back).
        rec_path.unlink(missing_ok=True)
        _remove_if_untouched(job.dir, created)
        print(f"error: {e}", file=sys.stderr)
        outcome = "bad_input"
        return 2
    except KeyboardInterrupt:
        outcome = "interrupted"
        _remove_if_untouched(job.dir, created)
        print(f"\ninterrupted during {job.stage}; finished stages are kept — re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — a failed job leaves a failed record and a non-zero exit
        write_json(rec_path, {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "stage": job.stage,
                              "traceback": traceback.format_exc()})
        _hydra_pointer(rec_path, "failed")
        log(f"FAILED during {job.stage}: {type(e).__name__}: {e} (record: {rec_path})")
        return 1
    finally:
        if outcome != "ok":
            tracker.finish(outcome)


def _remove_if_untouched(path: Path, created: bool) -> None:
    """Remove a job folder this run created if nothing was computed in it (no empty folders left)."""
    if not created or not path.is_dir():
        return
    if not any(p.is_file() and not p.name.startswith(".") for p in path.rglob("*")):
        shutil.rmtree(path, ignore_errors=True)
        for parent in list(path.parents)[:3]:  # <method>/<concept>/<model> folders left empty by it
            with contextlib.suppress(OSError):
                parent.rmdir()
