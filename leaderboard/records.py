"""Gather and validate result records — the leaderboard's only input.

A record is ``record.json`` as written by ``bench`` (its layout: ``bench/recordspec.py``, schema 2)
under ``runs/<model>/<concept>/<method>/<job-key>/`` or published under ``leaderboard/results/``.
A schema-1 record (the first wave's partial-diffusion-only layout) is converted to the schema-2
layout, marked ``legacy`` and named in the build report: it ranks only with other schema-1
records and is never judged (it has no bootstrap replicates). A bad record never stops the
build: it becomes an :class:`Issue` that names the file and the reason, and the page is built
from the valid ones (``--strict`` turns any issue into a failing exit).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.recordspec import is_number

# The job key names the record's asset folder in the site, so it must be a safe path component.
_JOB_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IDENTITY = ("model.name", "concept.name", "method.name", "protocol.hash")
_MISSING = object()


@dataclass(frozen=True)
class Issue:
    """A problem with one record file. ``error``: the record is left out; ``warning``: it is
    shown, but flagged; ``info``: nothing is wrong (e.g. a duplicate copy was skipped)."""

    source: str
    reason: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.source}: {self.reason}"


@dataclass
class Record:
    """One valid record: ``source`` is its root-relative label, ``directory`` holds its assets."""

    source: str
    directory: Path
    data: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        value = lookup(self.data, dotted)
        return default if value is _MISSING else value


def lookup(data: Any, dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; the sentinel ``_MISSING`` when any step is absent."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def gather(roots: Iterable[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Every ``record.json`` under each root as ``(label, path)``, in a stable order.

    The label (``"<root label>/<path under root>"``) names the record in messages and outputs,
    so the output does not depend on where the checkout lives. Missing roots are skipped: a
    fresh clone has no ``runs/``.
    """
    found = []
    for label, root in roots:
        root = Path(root)
        if root.is_dir():
            for path in root.rglob("record.json"):
                found.append((f"{label}/{path.relative_to(root).as_posix()}", path))
    return sorted(found)


def load(source: str, path: Path, schema: dict) -> tuple[Record | None, list[Issue]]:
    """Parse and validate one record file against ``schema`` (leaderboard/schema.json)."""
    from bench.recordspec import LEGACY_VERSIONS, SCHEMA_VERSION, check_record, upgrade_v1
    from bench.verdict import off_domain_note, thresholds

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return None, [Issue(source, f"malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}")]
    except (OSError, UnicodeDecodeError) as e:
        return None, [Issue(source, f"unreadable: {e}")]
    if not isinstance(data, dict):
        return None, [Issue(source, f"not a JSON object (got {type(data).__name__})")]
    reason = _check_header(data, (SCHEMA_VERSION, *LEGACY_VERSIONS))
    if reason:
        return None, [Issue(source, reason)]
    notes = []
    if data["schema_version"] in LEGACY_VERSIONS:
        if not isinstance(data.get("metrics"), dict) or not isinstance(data.get("retain"), dict):
            return None, [Issue(source, "`metrics` and `retain` must be objects")]
        data = upgrade_v1(data)
        notes.append(f"schema_version {data['legacy']} (the first wave's layout: no bootstrap replicates, no specificity); "
                     "shown in its own ranking and not judged — re-run it to rank it with schema-2 records")
    errors = _check_required(data, schema)  # before check_record drops bad optional values
    more, warnings = check_record(data) if not errors else ([], [])
    errors += more
    if errors:
        return None, [Issue(source, "; ".join(errors))]
    record = Record(source, Path(path).parent, data)
    warnings += _check_prompts(data)
    off_domain = off_domain_note(data, thresholds(schema))
    if off_domain:
        warnings.append(off_domain)
    record.artifacts, artifact_warnings, infos = _check_artifacts(record, schema)
    warnings += artifact_warnings
    return record, [Issue(source, w, "warning") for w in notes + warnings] + [Issue(source, i, "info") for i in infos]


def _check_header(data: dict, versions: tuple[int, ...]) -> str | None:
    got = data.get("schema_version", _MISSING)
    if got is _MISSING:
        return "missing `schema_version`"
    if got not in versions or isinstance(got, bool):
        return f"unknown schema_version {_show(got)} (this build reads {', '.join(map(str, versions))})"
    status = data.get("status")
    if status == "failed":
        return f"status: failed ({data.get('error') or 'the record gives no error message'})"
    if status != "ok":
        return f'`status` must be "ok" or "failed", got {_show(status)}'
    key = data.get("job_key")
    if not isinstance(key, str) or not _JOB_KEY.match(key):
        return f"`job_key` must be 1-64 characters from [A-Za-z0-9_.-], got {_show(key)}"
    for dotted in _IDENTITY:
        value = lookup(data, dotted)
        if not isinstance(value, str) or not value:
            return f"`{dotted}` must be a non-empty string, got {_show(value)}"
    for section in ("model", "concept", "method", "protocol"):
        try:  # these are shown and embedded as they are: no NaN/Infinity, which JSON cannot carry
            json.dumps(data[section], allow_nan=False)
        except ValueError:
            return f"`{section}` contains NaN or Infinity"
    return None


def _check_required(data: dict, schema: dict) -> list[str]:
    """Every metric the schema requires, in every place it applies: the prompt-level ones always,
    the probe-level ones in each probe block the record has (``{probe}``) or in its primary probe's."""
    errors = []
    primary = schema["probes"]["primary"]
    for col in schema["columns"]:
        for cls, src in col.get("sources", {}).items():
            if cls not in col.get("required", []):
                continue
            probes = list(data["probes"]) if "{probe}" in src else [primary] if "{primary}" in src else [None]
            for p in probes:
                if p is not None and p not in data["probes"]:
                    continue
                dotted = src.replace("{probe}", p or "").replace("{primary}", p or "")
                raw = lookup(data, dotted)
                if raw is _MISSING:
                    errors.append(f"`{dotted}` is missing")
                elif not isinstance(raw, dict) or "value" not in raw:
                    errors.append(f"`{dotted}` must be an object with a `value`, got {_show(raw)}")
                elif raw["value"] is None:
                    if not col.get("nullable", True):
                        errors.append(f"`{dotted}.value` is null")
                elif not is_number(raw["value"]):
                    errors.append(f"`{dotted}.value` must be a number, got {_show(raw['value'])}")
                elif not math.isfinite(raw["value"]):
                    errors.append(f"`{dotted}.value` is {'NaN' if math.isnan(raw['value']) else 'infinite'}")
    return errors


def _check_prompts(data: dict) -> list[str]:
    """A malformed prompt list only costs the per-prompt table, not the record."""
    prompts = data.get("prompts")
    ok = isinstance(prompts, list) and all(
        isinstance(p, dict) and isinstance(p.get("prompt"), str) and p.get("class") in ("forget", "retain")
        for p in prompts)
    if not ok:
        data["prompts"] = []
        return ["`prompts` is malformed; per-prompt results are not shown"] if prompts is not None else []
    for p in prompts:
        if not isinstance(p.get("metrics"), dict):
            p["metrics"] = {}
        if not isinstance(p.get("probes"), dict):
            p["probes"] = {}
    return []


def _check_artifacts(record: Record, schema: dict) -> tuple[dict[str, Path], list[str], list[str]]:
    """Image files the record references, resolved inside the record's folder only; then warnings,
    and infos (a replicate seed published without any of its images, as `publish` does by default)."""
    artifacts = record.data.get("artifacts")
    if not isinstance(artifacts, dict):
        return {}, [], []
    found, warnings, n_missing = {}, [], 0
    base = record.directory.resolve()
    for key in artifact_keys(record.data, schema):
        if artifacts.get(key) is None:
            continue
        rel = artifacts[key]
        path = (base / rel).resolve() if isinstance(rel, str) else None
        if path is None or Path(rel).is_absolute() or not path.is_relative_to(base):
            warnings.append(f"artifact `{key}` ({_show(rel)}) must be a path inside the record's folder; not shown")
        elif path.suffix.lower() not in schema["artifact_extensions"]:
            warnings.append(f"artifact `{key}` ({_show(rel)}) is not an image ({', '.join(schema['artifact_extensions'])}); not shown")
        elif not path.is_file():
            warnings.append(f"artifact `{key}` ({_show(rel)}) not found; not shown")
            n_missing += 1
        else:
            found[key] = path
    seed = record.data.get("seed")
    if warnings and n_missing == len(warnings) and not found and isinstance(seed, int) and seed != 0:
        return found, [], [f"seed {seed} published without its images (the page shows seed 0's); "
                           "`python -m leaderboard publish --images all` keeps them"]
    return found, warnings, []


def artifact_keys(data: dict, schema: dict) -> list[str]:
    """The artifact keys the detail view shows, in order: the schema's fixed ones, then per probe
    its curve and image grid (``curve_<probe>``, ``grid_<probe>``)."""
    keys = [k for k in schema["artifacts"] if not k.startswith("_")]
    for p in data.get("probes") or {}:
        keys += [f"{kind}_{p}" for kind in schema["probe_artifacts"] if not kind.startswith("_")]
    return keys


def dedupe(records: list[Record], preferred_label: str) -> tuple[list[Record], list[Issue]]:
    """One record per job key: the newest ``created`` wins, then the copy under
    ``preferred_label`` (the published results), then the first in path order."""
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_key[r.data["job_key"]].append(r)
    kept, issues = [], []
    for copies in by_key.values():
        copies.sort(key=lambda r: (not r.source.startswith(preferred_label + "/"), r.source))
        copies.sort(key=lambda r: str(r.data.get("created") or ""), reverse=True)  # stable
        kept.append(copies[0])
        for dup in copies[1:]:
            issues.append(Issue(dup.source, f"duplicate job_key {_show(dup.data['job_key'])}; "
                                            f"{copies[0].source} is shown instead", "info"))
    return sorted(kept, key=lambda r: r.source), issues


def check_protocols(records: list[Record]) -> tuple[list[Record], list[Issue]]:
    """Records sharing a protocol hash must share the settings; a model whose records span
    several protocols is flagged record by record (they are ranked apart, never mixed)."""
    first: dict[str, Record] = {}
    kept, issues = [], []
    for r in records:
        h = r.data["protocol"]["hash"]
        ref = first.setdefault(h, r)
        if r is not ref and r.data["protocol"] != ref.data["protocol"]:
            diff = sorted(k for k in set(r.data["protocol"]) | set(ref.data["protocol"])
                          if r.data["protocol"].get(k) != ref.data["protocol"].get(k))
            issues.append(Issue(r.source, f"protocol hash {_show(h)} is shared with {ref.source} but the "
                                          f"settings differ ({', '.join(diff)}); left out"))
            continue
        kept.append(r)
    issues += _protocol_splits(kept)
    return kept, issues


def _protocol_splits(records: list[Record]) -> list[Issue]:
    by_model: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_model[r.data["model"]["name"]][r.data["protocol"]["hash"]] += 1
    issues = []
    for r in records:
        model, h = r.data["model"]["name"], r.data["protocol"]["hash"]
        counts = by_model[model]
        if len(counts) < 2:
            continue
        top = max(counts.values())
        if counts[h] < top or list(counts.values()).count(top) > 1:
            others = ", ".join(f"{k} ({n} record{'s' * (n != 1)})" for k, n in sorted(counts.items()) if k != h)
            issues.append(Issue(r.source, f"protocol hash {_show(h)} differs from other records of model "
                                          f"{_show(model)}: {others}; ranked separately, not comparable",
                                "warning"))
    return issues


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
