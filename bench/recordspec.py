"""The result record, typed: what ``bench`` writes and ``leaderboard`` reads (torch-free).

A record (``record.json``, schema 2) is one job: one model, concept, method + hyperparameters,
shared protocol and seed. Its layout, as ``TypedDict`` definitions, and ``check_record``, which
both sides use (``bench`` in its tests on what it wrote, ``leaderboard`` on what it gathers):

- ``metrics`` / ``retain``: prompt-level metrics of the forget / retain prompts (erasure,
  specificity, retention, detection rates, …), each a ``Metric``;
- ``probes``: one ``ProbeBlock`` per probe — its own ranking ``protocol`` (with ``hash``), its
  ``axis``, job-level ``metrics`` (forget) and ``retain``, the forget ``curve`` along the axis,
  the ``gold`` it was compared with when it ran, and ``cost``;
- ``prompts``: per prompt its prompt-level ``metrics`` and per probe ``{metrics, curve}``.

``upgrade_v1`` turns a schema-1 record (partial diffusion only, no replicates) into this shape so
the leaderboard can show it — in its own ranking, marked ``legacy`` and never judged.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, TypedDict

SCHEMA_VERSION = 2
LEGACY_VERSIONS = (1,)
CLASSES = ("forget", "retain")
# Prompt-level metrics of schema 1 (everything else in its metrics/retain was partial diffusion's).
_V1_PROMPT_LEVEL = ("detect_u", "detect_o", "erasure", "retention", "kid_uo", "classifier_val_acc", "clip_score_u", "clip_score_o")


class Metric(TypedDict, total=False):
    value: float | None                     # None: undefined (e.g. erasure of a prompt θ never shows), or "never" (recover)
    ci: list[float | None] | None           # 95% interval; a None bound of a recovery point = beyond the axis
    n: int | dict[str, int]                 # images (per prompt) or independent units {"prompts", "seeds"} (job level)
    resampled: str                          # what the interval resamples
    replicates: list[float | None]          # bootstrap replicates (verdict metrics): the verdicts' probabilities
    curve: dict[str, list[float | None]]


class Axis(TypedDict, total=False):
    name: str
    label: str
    unit: str
    values: list[float]
    steps: list[int]


class ProbeBlock(TypedDict, total=False):
    protocol: dict[str, Any]
    display: str
    reference: str
    classes: list[str]
    axis: Axis
    metrics: dict[str, Metric]
    retain: dict[str, Metric]
    curve: list[dict[str, float | None]]    # {"x", "detection", "p_original", "retrieval", "specificity"}
    gold: dict[str, Any] | None
    cost: dict[str, Any]


class Record(TypedDict, total=False):
    schema_version: int
    status: str
    error: str | None
    job_key: str
    created: str
    model: dict[str, Any]
    concept: dict[str, Any]
    method: dict[str, Any]
    protocol: dict[str, Any]
    seed: int
    metrics: dict[str, Metric]
    retain: dict[str, Metric]
    probes: dict[str, ProbeBlock]
    prompts: list[dict[str, Any]]
    cost: dict[str, Any]
    artifacts: dict[str, str]


def timed_whole(record: dict, probe: str | None = None) -> bool:
    """Whether a record's wall time measures the work it names: ``probe``'s own seconds (its ``prepare`` and
    every prompt run in this job), or with ``probe=None`` the whole job. A resumed job reused finished stages
    (``resumed``: stage → files reused) and timed only what was left, so its times are not costs."""
    resumed = record.get("resumed") or {}
    return not resumed if probe is None else probe not in resumed and f"{probe} prepare" not in resumed


def is_number(x: Any) -> bool:
    """An int or a float, not a bool (JSON true/false load as bool, a subclass of int)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metric_problem(m: Any, where: str) -> str | None:
    if not isinstance(m, dict) or "value" not in m:
        return f"`{where}` must be an object with a `value`, got {_show(m)}"
    v = m["value"]
    if v is not None and not is_number(v):
        return f"`{where}.value` must be a number, got {_show(v)}"
    if v is not None and not math.isfinite(v):
        return f"`{where}.value` is {'NaN' if math.isnan(v) else 'infinite'}"
    reps = m.get("replicates")
    if reps is not None and (not isinstance(reps, list) or any(r is not None and not is_number(r) for r in reps)):
        return f"`{where}.replicates` must be a list of numbers or nulls"
    return None


def check_record(data: dict) -> tuple[list[str], list[str]]:
    """Problems of a schema-2 record: errors (the record cannot be shown) and warnings (a part of
    it is dropped). The header (version, status, identity) is checked by the caller."""
    errors: list[str] = []
    warnings: list[str] = []
    for section in ("metrics", "retain", "probes"):
        if not isinstance(data.get(section), dict):
            errors.append(f"`{section}` must be an object, got {_show(data.get(section))}")
    if errors:
        return errors, warnings
    if not is_number(data.get("seed")) or data["seed"] < 0:
        errors.append(f"`seed` must be a non-negative integer, got {_show(data.get('seed'))}")
    for section in ("metrics", "retain"):
        for name, m in list(data[section].items()):
            problem = _metric_problem(m, f"{section}.{name}")
            if problem:
                warnings.append(problem + "; left out")
                del data[section][name]
    for name, block in list(data["probes"].items()):
        where = f"probes.{name}"
        if not isinstance(block, dict):
            errors.append(f"`{where}` must be an object")
            continue
        proto = block.get("protocol")
        if not isinstance(proto, dict) or not isinstance(proto.get("hash"), str) or not proto["hash"]:
            errors.append(f"`{where}.protocol.hash` must be a non-empty string")
            continue
        axis = block.get("axis")
        if not isinstance(axis, dict) or not isinstance(axis.get("values"), list) or not axis["values"] or \
                not all(is_number(v) and math.isfinite(v) for v in axis["values"]):
            errors.append(f"`{where}.axis.values` must be a non-empty list of numbers")
            continue
        for part in ("metrics", "retain"):
            if not isinstance(block.get(part), dict):
                errors.append(f"`{where}.{part}` must be an object")
                break
            for mname, m in list(block[part].items()):
                problem = _metric_problem(m, f"{where}.{part}.{mname}")
                if problem:
                    warnings.append(problem + "; left out")
                    del block[part][mname]
        if not _valid_curve(block.get("curve")):
            if block.get("curve") is not None:
                warnings.append(f"`{where}.curve` is malformed; no curve is drawn")
            block["curve"] = []
    return errors, warnings


def _valid_curve(curve: Any) -> bool:
    return isinstance(curve, list) and all(isinstance(pt, dict) and is_number(pt.get("x")) and math.isfinite(pt["x"]) for pt in curve)


def upgrade_v1(data: dict) -> dict:
    """A schema-1 record in the schema-2 layout: its partial-diffusion numbers become the
    ``partial_diffusion`` block (its protocol is the record's own, so it ranks only with other
    schema-1 records of that protocol); ``legacy`` marks it; there are no replicates to judge by."""
    d = copy.deepcopy(data)
    proto = d.get("protocol") or {}
    psi = [p for p in proto.get("psi") or [] if is_number(p)]

    def split(block: dict) -> tuple[dict, dict]:
        plain = {k: v for k, v in block.items() if k in _V1_PROMPT_LEVEL}
        probe = {("recover" if k == "psi_recover" else k): v for k, v in block.items() if k not in _V1_PROMPT_LEVEL}
        return plain, probe

    m_plain, m_probe = split(d.get("metrics") or {})
    r_plain, r_probe = split(d.get("retain") or {})
    curve = [{"x": p.get("psi"), **{k: p.get(k) for k in ("p_original", "retrieval", "detection")}}
             for p in d.get("psi_curve") or [] if isinstance(p, dict)]
    gold = d.get("gold")
    d["probes"] = {"partial_diffusion": {
        "protocol": proto, "display": "partial diffusion", "classes": list(CLASSES),
        "axis": {"name": "psi", "label": "ψ", "unit": "ψ", "values": psi or [0.0]},
        "metrics": m_probe, "retain": r_probe, "curve": curve,
        "gold": {"job_key": gold.get("job_key"), "recover": gold.get("psi_recover")} if isinstance(gold, dict) else None,
    }}
    d["metrics"], d["retain"] = m_plain, r_plain
    prompts = []
    for p in d.get("prompts") or []:
        if not isinstance(p, dict):
            continue
        plain, probe = split(p.get("metrics") or {})
        pc = [{"x": q.get("psi"), **{k: q.get(k) for k in ("p_original", "retrieval", "detection")}}
              for q in p.get("psi_curve") or [] if isinstance(q, dict)]
        prompts.append({**{k: v for k, v in p.items() if k not in ("metrics", "psi_curve")}, "metrics": plain,
                        "probes": {"partial_diffusion": {"metrics": probe, "curve": pc}}})
    d["prompts"] = prompts
    arts = d.get("artifacts") or {}
    d["artifacts"] = {{"psi_curve_png": "curve_partial_diffusion", "grid_p": "grid_partial_diffusion"}.get(k, k): v for k, v in arts.items()}
    d.setdefault("seed", 0)
    d["legacy"] = int(data.get("schema_version", 1))
    return d


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
