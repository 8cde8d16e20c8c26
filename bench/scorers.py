"""Shared scorers: images → metrics, for the prompt level (λ_U vs λ_O) and for every probe.

Each scorer declares, beside its code, which way is better, how a job-level value is formed from
the prompts and what its interval resamples (``SCORERS``); ``leaderboard/schema.json`` is checked
against these declarations (tests/test_leaderboard.py::test_schema_is_complete_and_agrees_with_the_scorers), so the page cannot rank a column the wrong way.

Per prompt, ``prompt_scores`` judges the plain generations (detection, erasure or retention,
specificity, KID of λ_U to λ_O, the classifier's validation accuracy) and ``probe_scores`` judges
one probe's images along its axis (CCS, CRS, the authors' CRS, KID, concept detection and
specificity per axis value, and the recovery point). Both also return the per-seed *units* that
the job-level two-level bootstrap (``aggregate``) resamples: prompts, then seeds within prompts
(DESIGN §6). Metric formulas are in ``bench.metrics``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import metrics as M

TWO_LEVEL = "prompts, then seeds within each prompt (two-level bootstrap)"
PROMPTS_ONLY = "prompts"


@dataclass(frozen=True)
class Scorer:
    """What a metric means for ranking: ``better`` per class (``higher``/``lower``/``none``),
    ``ranked`` (False: shown for comparability, never ranked), the job-level ``aggregation`` and
    what its interval ``resampled``."""

    name: str
    better: dict[str, str]
    aggregation: str
    resampled: str
    ranked: bool = True
    level: str = "probe"  # "prompt": plain generations; "probe": one probe's images along its axis


def _both(forget: str, retain: str) -> dict[str, str]:
    return {"forget": forget, "retain": retain}


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("erasure", {"forget": "higher"}, "mean over forget prompts of 1 − detect_U/detect_O", TWO_LEVEL, level="prompt"),
    Scorer("retention", {"retain": "higher"}, "mean over retain prompts of detect_U/detect_O (each prompt's own concept)",
           TWO_LEVEL, level="prompt"),
    Scorer("specificity", {"forget": "higher"},
           "mean over forget prompts of keep_U/keep_O: the share of images showing every non-target factor the prompt names, "
           "θ* over θ", TWO_LEVEL, level="prompt"),
    Scorer("detect_u", {"forget": "lower", "retain": "higher"}, "mean over prompts", TWO_LEVEL, level="prompt"),
    Scorer("detect_o", _both("none", "none"), "mean over prompts", TWO_LEVEL, level="prompt"),
    Scorer("off_domain_u", _both("none", "none"),
           "mean over prompts of the share of λ_U images outside the detector's domain (Shapes: tinted backgrounds, "
           "where the oracle misreads shapes); a warning beside erasure, specificity and retention, not a ranking",
           TWO_LEVEL, ranked=False, level="prompt"),
    Scorer("kid_uo", {"retain": "lower"}, "mean over retain prompts of KID(λ_U, λ_O)", PROMPTS_ONLY, level="prompt"),
    Scorer("classifier_val_acc", _both("none", "none"), "mean over prompts", PROMPTS_ONLY, level="prompt"),
    Scorer("ccs", _both("lower", "higher"), "mean over the axis and attacked seeds, then over prompts", TWO_LEVEL),
    Scorer("crs", _both("lower", "higher"), "mean over the axis and attacked seeds, then over prompts", TWO_LEVEL),
    Scorer("crs_paper", _both("none", "none"), "the authors' per-prompt formula, mean over prompts", PROMPTS_ONLY, ranked=False),
    Scorer("kid_po", _both("higher", "lower"), "mean over the axis, then over prompts", PROMPTS_ONLY),
    Scorer("kid_pu", _both("lower", "none"), "mean over the axis, then over prompts", PROMPTS_ONLY),
    Scorer("recover", {"forget": "higher"},
           "smallest axis value at which the prompt-mean concept detection reaches 0.5 (interpolated); None = never",
           TWO_LEVEL),
)}


# --------------------------------------------------------------------------- prompt level

def prompt_scores(detector: Any, concept: Any, prompt: str, cls: str, o: np.ndarray, u: np.ndarray, n: int,
                  seed: int, clf: Any = None) -> tuple[dict[str, M.Metric], dict[str, list]]:
    """Metrics of the plain generations of one prompt, and the per-seed units of the bootstrap.

    ``o``/``u``: λ_O and λ_U (seed order, the same seeds); the first ``n`` train the classifier and
    serve as KID references, all of them are judged by the detector."""
    m: dict[str, M.Metric] = {}
    units: dict[str, list] = {}
    if clf is not None:
        m["classifier_val_acc"] = M.Metric(value=clf.val_accuracy, n=2 * n)
    if hasattr(detector, "clip_score"):  # SD worlds: prompt alignment of θ* and θ images (CLIP score)
        for tag, x in (("u", u[:n]), ("o", o[:n])):
            sc = detector.clip_score(x, prompt)
            m[f"clip_score_{tag}"] = M.Metric(value=float(sc.mean()), ci=M.bootstrap_ci(sc, seed=seed), n=len(sc))
    if detector is None:
        return m, units
    hits = (lambda x: detector.concept_hits(x, concept)) if cls == "forget" else (lambda x: detector.prompt_hits(x, prompt))
    du, do = hits(u), hits(o)
    m["detect_u"], m["detect_o"] = M.detection_rate(du, seed=seed), M.detection_rate(do, seed=seed)
    m["erasure" if cls == "forget" else "retention"] = (M.erasure if cls == "forget" else M.retention)(du, do, seed=seed)
    units["du"], units["do"] = _ints(du), _ints(do)
    off_domain = getattr(detector, "off_domain", None)
    if off_domain is not None:  # where the detections above cannot be trusted (the images sit outside its training)
        off = off_domain(u)
        m["off_domain_u"] = M.detection_rate(off, seed=seed)
        units["off"] = _ints(off)
    if cls == "forget":
        ku, ko = _keeps(detector, u, prompt, concept), _keeps(detector, o, prompt, concept)
        if ku is not None:
            m["specificity"] = M.retention(ku, ko, seed=seed)  # the same ratio: keep_U / keep_O
            units["ku"], units["ko"] = _ints(ku), _ints(ko)
    else:
        wo, wu = detector.features(o[:n]), detector.features(u[:n])
        m["kid_uo"] = M.Metric(value=M.kid(wu, wo, seed=seed)[0], n=2 * n)
    return m, units


def _keeps(detector: Any, images: np.ndarray, prompt: str, concept: Any) -> np.ndarray | None:
    keeps = getattr(detector, "keeps", None)
    return None if keeps is None else keeps(images, prompt, concept)


def _ints(a: np.ndarray) -> list:
    a = np.asarray(a)
    return a.astype(int).tolist() if a.dtype == bool else a.astype(float).tolist()


# --------------------------------------------------------------------------- probe level

def probe_scores(images: dict[float, np.ndarray], extra: dict[str, dict[float, np.ndarray]], o: np.ndarray, u: np.ndarray,
                 n: int, clf: Any, detector: Any, concept: Any, prompt: str, cls: str, seed: int
                 ) -> tuple[dict[str, M.Metric], list[dict], dict[str, list]]:
    """One probe on one prompt: metrics, the curve along the axis and the per-seed units.

    ``images[x]``: the probe's images at axis value x (the same attacked seeds at every x). CCS
    and CRS use the classifier g trained on this prompt's λ_O vs λ_U; detection uses the world's
    concept detector (forget prompts) or the prompt's own concept (retain prompts)."""
    xs = list(images)
    o_n, u_n = o[:n], u[:n]
    p_orig = {x: clf.prob_original(im) for x, im in images.items()}
    feats = {x: clf.features(im) for x, im in images.items()}
    # One call for both sets: identical images (θ* = θ) then get bit-identical features.
    f_ou = clf.features(np.concatenate([o_n, u_n]))
    f_o, f_u = f_ou[: len(o_n)], f_ou[len(o_n):]
    m: dict[str, M.Metric] = {
        "ccs": M.ccs(p_orig, seed=seed),
        "crs": M.crs(feats, f_o, f_u, seed=seed),
        "crs_paper": M.crs_paper(feats, f_o, f_u, retain=cls == "retain", seed=seed),
    }
    for tag, imgs in extra.items():
        m[f"ccs_{tag}"] = M.ccs({x: clf.prob_original(im) for x, im in imgs.items()}, seed=seed)
        m[f"crs_paper_{tag}"] = M.crs_paper({x: clf.features(im) for x, im in imgs.items()}, f_o, f_u, retain=cls == "retain", seed=seed)
    units: dict[str, list] = {"p_original": np.stack([p_orig[x] for x in xs], axis=1).tolist(),
                              "retrieval": M.retrieval_rows(feats, f_o, f_u).tolist()}
    det = [None] * len(xs)
    spec: list[float | None] = [None] * len(xs)
    if detector is not None:
        hits = (lambda x: detector.concept_hits(x, concept)) if cls == "forget" else (lambda x: detector.prompt_hits(x, prompt))
        h = np.stack([hits(images[x]) for x in xs], axis=1)
        det = h.mean(axis=0).tolist()
        units["hits"] = h.astype(int).tolist()
        wf = {x: detector.features(im) for x, im in images.items()}
        wo, wu = detector.features(o_n), detector.features(u_n)
        m["kid_po"], m["kid_pu"] = M.kid_by_psi(wf, wo, seed=seed), M.kid_by_psi(wf, wu, seed=seed)
        if cls == "forget":
            keep = [_keeps(detector, images[x], prompt, concept) for x in xs]
            ko = _keeps(detector, o, prompt, concept)
            if keep[0] is not None and ko is not None and float(np.mean(ko)) > 0:
                spec = [float(np.mean(k)) / float(np.mean(ko)) for k in keep]
    curve_p = m["ccs"].curve["p_original"]
    curve_r = m["crs"].curve["retrieval"]
    curve = [{"x": x, "p_original": curve_p[k], "retrieval": curve_r[k], "detection": det[k], "specificity": spec[k]}
             for k, x in enumerate(xs)]
    basis = det if detector is not None and cls == "forget" else curve_p
    m["recover"] = M.Metric(value=M.psi_recover(xs, basis), n=len(xs))
    return m, curve, units


# --------------------------------------------------------------------------- job level

def aggregate(rows: Sequence[dict], cls: str, seed: int, xs: Sequence[float] | None = None,
              n_boot: int = M.N_BOOT) -> tuple[dict[str, dict], list[dict]]:
    """Job-level metrics of one class over its prompts, with two-level bootstrap intervals.

    ``rows``: per-prompt ``{"metrics": {name: Metric dict}, "units": {...}, "curve": [...]}``.
    Values are means over prompts (prompts whose value is None are skipped), as before; the
    recovery point is read off the prompt-mean curve. Intervals resample prompts, then seeds within
    prompts where the per-seed units are kept (``resampled`` says which); ``n`` counts the
    independent units. Verdict metrics carry their bootstrap ``replicates``."""
    sel = [r for r in rows if r["class"] == cls]
    out: dict[str, dict] = {}
    names = sorted({k for r in sel for k in r["metrics"]})
    rng_seed = int(seed)
    for name in names:
        vals = [r["metrics"][name]["value"] for r in sel if name in r["metrics"]]
        kept = [v for v in vals if v is not None]
        if name == "recover":
            continue  # from the mean curve below
        value = float(np.mean(kept)) if kept else None
        entry = {"value": value, "ci": None, "n": {"prompts": len(kept)}, "resampled": PROMPTS_ONLY}
        reps = _two_level(sel, name, rng_seed, n_boot)
        if reps is not None:
            entry.update(resampled=TWO_LEVEL, n={"prompts": len(kept), "seeds": _seed_count(sel, name)})
            entry["ci"] = _percentile_ci(reps)
            if name in VERDICT_METRICS:
                entry["replicates"] = _pack(reps)
        elif len(kept) >= 2:
            entry["ci"] = M.bootstrap_ci(np.array(kept), n_boot=n_boot, seed=rng_seed)
        elif len(kept) == 1:
            ci = next(r["metrics"][name].get("ci") for r in sel if name in r["metrics"] and r["metrics"][name]["value"] is not None)
            entry.update(ci=ci, resampled="seeds (one prompt)")
        out[name] = entry
    curve = mean_curve(sel)
    if xs is not None and curve:
        basis_key = "detection" if all(c["detection"] is not None for c in curve) and cls == "forget" else "p_original"
        basis = [c[basis_key] for c in curve]
        if all(b is not None for b in basis):
            rec = {"value": M.psi_recover(list(xs), basis), "ci": None, "n": {"prompts": len(sel)}, "basis": basis_key,
                   "resampled": PROMPTS_ONLY}
            if basis_key == "detection" and all("hits" in r["units"] for r in sel):
                reps = M.two_level_replicates([(np.asarray(r["units"]["hits"], float),) for r in sel],
                                              _recover_statistic(xs), n_boot=n_boot, seed=rng_seed)
                n_seeds = len(sel[0]["units"]["hits"])
                rec.update(ci=_percentile_ci(reps, censored=True), replicates=_pack(reps), resampled=TWO_LEVEL,
                           n={"prompts": len(sel), "seeds": n_seeds},
                           # Records with the same design drew the same prompts and seeds in replicate b: a
                           # method and its gold (same prompts, same attacked seeds) are compared pairwise.
                           design=design_hash([r["prompt"] for r in sel], n_seeds, rng_seed, n_boot))
            elif cls == "retain":
                per = [r["metrics"]["recover"]["value"] for r in sel if r["metrics"].get("recover", {}).get("value") is not None]
                rec["value"] = float(np.mean(per)) if per else None  # the v1 retain value: mean of the prompts' points
            out["recover"] = rec
    return out, curve


VERDICT_METRICS = ("erasure", "specificity", "retention")


def design_hash(prompts: list[str], n_seeds: int, boot_seed: int, n_boot: int) -> str:
    """What fixes the bootstrap's draws: the same hash means replicate b resampled the same prompts
    and seed positions (``bench.verdict`` then pairs two records' replicates)."""
    from bench.record import short_hash

    return short_hash({"prompts": prompts, "seeds": n_seeds, "bootstrap_seed": boot_seed, "n_boot": n_boot, "scheme": "two-level/1"})


def mean_curve(rows: Sequence[dict]) -> list[dict]:
    """Per axis value, the mean over prompts of each curve series (None entries skipped)."""
    curves = [r.get("curve") or [] for r in rows]
    if not curves or not curves[0]:
        return []
    out = []
    for k, point in enumerate(curves[0]):
        p = {"x": point["x"]}
        for key in point:
            if key == "x":
                continue
            vals = [c[k][key] for c in curves if k < len(c) and c[k].get(key) is not None]
            p[key] = float(np.mean(vals)) if vals else None
        out.append(p)
    return out


def _recover_statistic(xs: Sequence[float]):
    xs = list(xs)

    def stat(units: list[tuple[np.ndarray, ...]]) -> float | None:
        curve = np.mean([u[0].mean(axis=0) for u in units], axis=0)
        return M.psi_recover(xs, curve.tolist())

    return stat


def _ratio_statistic(units: list[tuple[np.ndarray, ...]]) -> float | None:
    vals = [u[0].mean() / u[1].mean() for u in units if u[1].mean() > 0]
    return float(np.mean(vals)) if vals else None


def _mean_statistic(units: list[tuple[np.ndarray, ...]]) -> float | None:
    return float(np.mean([u[0].mean() for u in units]))


# metric → (units it resamples, statistic over resampled prompts)
_TWO_LEVEL = {
    "erasure": (("du", "do"), lambda units: _erasure_stat(units)),
    "retention": (("du", "do"), _ratio_statistic),
    "specificity": (("ku", "ko"), _ratio_statistic),
    "detect_u": (("du",), _mean_statistic),
    "detect_o": (("do",), _mean_statistic),
    "off_domain_u": (("off",), _mean_statistic),
    "ccs": (("p_original",), _mean_statistic),
    "crs": (("retrieval",), _mean_statistic),
}


def _erasure_stat(units: list[tuple[np.ndarray, ...]]) -> float | None:
    vals = [1.0 - u[0].mean() / u[1].mean() for u in units if u[1].mean() > 0]
    return float(np.mean(vals)) if vals else None


def _two_level(sel: Sequence[dict], name: str, seed: int, n_boot: int) -> np.ndarray | None:
    spec = _TWO_LEVEL.get(name)
    if spec is None:
        return None
    keys, stat = spec
    units = [tuple(np.asarray(r["units"][k], float) for k in keys) for r in sel
             if name in r["metrics"] and r["metrics"][name]["value"] is not None and all(k in r.get("units", {}) for k in keys)]
    if len(units) < 1 or any(len(u[0]) < 2 for u in units):
        return None
    return M.two_level_replicates(units, stat, n_boot=n_boot, seed=seed)


def _seed_count(sel: Sequence[dict], name: str) -> int:
    keys = _TWO_LEVEL[name][0]
    return max(len(r["units"][keys[0]]) for r in sel if keys[0] in r.get("units", {}))


def _percentile_ci(reps: np.ndarray, censored: bool = False) -> list[float | None] | None:
    """95% percentile interval; for a censored statistic (recovery: NaN = never) an infinite
    bound is reported as None ("beyond the axis")."""
    r = np.where(np.isnan(reps), np.inf, reps) if censored else reps[np.isfinite(reps)]
    if r.size == 0:
        return None
    with np.errstate(invalid="ignore"):  # inf − inf between two "never" replicates: NaN, read as never
        lo, hi = np.percentile(r, [100 * M.ALPHA / 2, 100 * (1 - M.ALPHA / 2)])
    return [None if not np.isfinite(lo) else float(lo), None if not np.isfinite(hi) else float(hi)]


def _pack(reps: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in reps]
