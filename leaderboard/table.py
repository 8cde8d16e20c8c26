"""Records → rankings → groups → rows: values, formatted cells and verdicts, all driven by schema.json.

A ranking is one (model, shared protocol hash): rows from different protocols are never compared,
and schema-1 records (``legacy``) only ever rank among themselves. Within a ranking the records of
one method configuration on one concept — its replicated seeds — form a **group**, shown as one
row per class (``forget``, ``retain``) with the mean over seeds and their spread. Verdicts come
from ``bench.verdict`` (the same code a job's own summary uses): per seed, each against the gold
standard's record of the same seed and probe protocol, then combined (seeds that disagree read
"inconclusive").
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench import verdict as V
from bench.recordspec import is_number
from leaderboard import svg
from leaderboard.records import _MISSING, Record, lookup

CLASSES = ("forget", "retain")


@dataclass
class Group:
    """One method configuration on one concept: its records, one per seed, in seed order."""

    id: str
    concept: str
    method: str
    reference: str | None
    records: list[Record]

    @property
    def seeds(self) -> list[int]:
        return [int(r.data.get("seed", 0)) for r in self.records]

    def by_seed(self, seed: int) -> Record | None:
        return next((r for r in self.records if int(r.data.get("seed", 0)) == seed), None)


@dataclass
class Ranking:
    id: str
    model: dict
    protocol: dict
    legacy: bool
    probes: list[str]
    probe_display: dict[str, str]
    probe_protocols: dict[str, str]
    records: list[Record]
    groups: list[Group] = field(default_factory=list)
    golds: dict[str, Group] = field(default_factory=dict)  # concept → the gold-standard group
    rows: list[dict] = field(default_factory=list)
    verdicts: dict[str, dict[str, dict]] = field(default_factory=dict)  # group id → probe (or "retain") → verdict
    columns: list[dict] = field(default_factory=list)


def better(column: dict, cls: str) -> str:
    """``higher``, ``lower`` or ``none`` for this column on a row of class ``cls``."""
    b = column.get("better", "none")
    return b.get(cls, "none") if isinstance(b, dict) else b


def reference_of(record: Record, schema: dict) -> str | None:
    """``original`` / ``gold`` for the reference rows, else None."""
    ref = record.get("method.reference")
    if ref in schema["references"]["labels"]:
        return ref
    return schema["references"]["by_method"].get(record.data["method"]["name"])


def _group_key(r: Record) -> tuple:
    m = r.data["method"]
    params = json.dumps(m.get("params") or {}, sort_keys=True, default=str)
    return (r.data["concept"]["name"], m["name"], m.get("variant") if isinstance(m.get("variant"), str) else "", params)


def _probe_order(names: set[str], schema: dict) -> list[str]:
    order = schema["probes"]["order"]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def expand_columns(schema: dict, probes: list[str]) -> list[dict]:
    """The schema's columns for a ranking: a ``per_probe`` column once per probe (key ``key:probe``);
    ``{primary}`` sources point at the primary probe (partial diffusion: the paper's metrics)."""
    primary = schema["probes"]["primary"]
    out = []
    for col in schema["columns"]:
        if col.get("per_probe"):
            for p in probes:
                c = dict(col, key=f"{col['key']}:{p}", base=col["key"], probe=p)
                c["sources"] = {k: v.replace("{probe}", p) for k, v in col.get("sources", {}).items()}
                out.append(c)
        else:
            c = dict(col, base=col["key"], probe=primary if any("{primary}" in v for v in col.get("sources", {}).values()) else None)
            c["sources"] = {k: v.replace("{primary}", primary) for k, v in col.get("sources", {}).items()}
            if c["probe"] and c["probe"] not in probes:
                continue  # a ranking without the primary probe has no such column
            out.append(c)
    return out


def make_rankings(records: list[Record], schema: dict) -> list[Ranking]:
    """Group records by (model, shared protocol hash, legacy) and build each ranking's rows."""
    th = V.thresholds(schema)
    by: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        by[(r.data["model"]["name"], bool(r.data.get("legacy")), r.data["protocol"]["hash"])].append(r)
    rankings = []
    for i, key in enumerate(sorted(by), start=1):
        recs = sorted(by[key], key=lambda r: r.source)
        names = {p for r in recs for p in r.data["probes"]}
        probes = _probe_order(names, schema)
        display = {p: next((r.data["probes"][p].get("display") for r in recs if p in r.data["probes"]), p) or p for p in probes}
        protos = {p: _majority([r.data["probes"][p]["protocol"]["hash"] for r in recs if p in r.data["probes"]]) for p in probes}
        rk = Ranking(f"ranking-{i}", recs[0].data["model"], recs[0].data["protocol"], key[1], probes, display, protos, recs)
        rk.columns = expand_columns(schema, probes)
        groups: dict[tuple, list[Record]] = defaultdict(list)
        for r in recs:
            groups[_group_key(r)].append(r)
        for n, gkey in enumerate(sorted(groups)):
            members = sorted(groups[gkey], key=lambda r: (int(r.data.get("seed", 0)), r.source))
            g = Group(f"{rk.id}-g{n}", gkey[0], gkey[1], reference_of(members[0], schema), members)
            rk.groups.append(g)
            if g.reference == "gold":
                rk.golds.setdefault(g.concept, g)
        for g in rk.groups:
            rk.verdicts[g.id] = group_verdicts(g, rk, th)
            warning = group_warning(g, th)
            for cls in CLASSES:
                rk.rows.append(make_row(g, cls, rk, schema, warning))
        rk.rows.sort(key=lambda row: _rank_key(row, schema))
        for n, row in enumerate(rk.rows):
            row["order"] = n
        rankings.append(rk)
    return rankings


def _majority(hashes: list[str]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for h in hashes:
        counts[h] += 1
    return max(sorted(counts), key=lambda h: counts[h])


def probe_block(record: Record, probe: str, ranking: Ranking) -> dict | None:
    """The record's block of ``probe`` if it was run under the ranking's protocol for that probe."""
    block = record.data["probes"].get(probe)
    if block is None or block["protocol"]["hash"] != ranking.probe_protocols.get(probe):
        return None
    return block


def gold_block(group: Group, record: Record, probe: str, ranking: Ranking) -> dict | None:
    """What a record of ``group`` is judged against for ``probe``: the gold standard's block for the
    same concept, seed and probe protocol (the gold group itself for its own records)."""
    if group.reference == "gold":
        return probe_block(record, probe, ranking)
    gold = ranking.golds.get(group.concept)
    g = gold.by_seed(int(record.data.get("seed", 0))) if gold else None
    return probe_block(g, probe, ranking) if g else None


def group_verdicts(group: Group, ranking: Ranking, th: dict) -> dict[str, dict]:
    """Per probe the forget verdict, and under ``retain`` the retain verdict: combined over the
    group's seeds, with each seed's own verdict and probability kept beside."""
    out = {}
    for probe in ranking.probes:
        per = []
        for r in group.records:
            block = probe_block(r, probe, ranking)
            v = V.judge_forget(r.data["metrics"], block, gold_block(group, r, probe, ranking), probe, th) if block else None
            if v is not None:
                per.append((int(r.data.get("seed", 0)), v))
        out[probe] = _combined(per)
    out["retain"] = _combined([(int(r.data.get("seed", 0)), V.judge_retain(r.data["retain"], th)) for r in group.records])
    return out


def _combined(per: list[tuple[int, V.Verdict]]) -> dict:
    if not per:
        return {"key": "not_run", "probability": None, "detail": "not run under this ranking's protocol", "per_seed": []}
    c = V.combine([v for _, v in per])
    return {**c.to_dict(), "per_seed": [{"seed": s, **v.to_dict()} for s, v in per]}


def group_warning(group: Group, th: dict) -> str | None:
    """Each seed's off-domain note (``bench.verdict.off_domain_note``), joined; None when no seed has one."""
    notes = [(r.data.get("seed", 0), V.off_domain_note(r.data, th)) for r in group.records]
    return "; ".join(f"seed {seed}: {note}" for seed, note in notes if note) or None


def make_row(group: Group, cls: str, ranking: Ranking, schema: dict, warning: str | None = None) -> dict:
    """One table row: raw ``values`` (for sorting and the CSV), formatted ``cells``, verdicts, and the
    group's ``warning`` (``group_warning``) for the badge beside its name."""
    values: dict[str, Any] = {}
    cells: dict[str, dict] = {}
    for col in ranking.columns:
        src = col.get("sources", {}).get(cls)
        if src is None:
            continue
        owner = group
        if col["kind"] == "gold":
            owner = ranking.golds.get(group.concept)
            if owner is None or owner is group:
                continue
        found = []
        for r in owner.records:
            if col.get("probe") and probe_block(r, col["probe"], ranking) is None:
                continue
            raw = lookup(r.data, src)
            if raw is not _MISSING:
                found.append((int(r.data.get("seed", 0)), raw))
        if col["kind"] == "gold":  # the gold's value for the seeds this group has
            mine = set(group.seeds)
            found = [(s, raw) for s, raw in found if s in mine] or found
        if not found:
            continue
        value, title = _combine_values(found, col)
        values[col["key"]] = value
        cells[col["key"]] = {"text": fmt(value, col), "title": title, "better": better(col, cls)}
    first = group.records[0].data
    primary = schema["probes"]["primary"] if schema["probes"]["primary"] in ranking.probes else (ranking.probes or [None])[0]
    curve = class_curve(first, cls, primary)
    gold = ranking.golds.get(group.concept)
    gold_curve = class_curve(gold.records[0].data, cls, primary) if gold is not None and gold is not group else None
    m = first["method"]
    verdicts = ranking.verdicts[group.id]
    return {
        "warning": warning,
        "id": f"{group.id}-{cls}", "group": group.id, "record": first["job_key"], "records": [r.data["job_key"] for r in group.records],
        "seeds": group.seeds, "ranking": ranking.id, "concept": group.concept, "method": group.method,
        "variant": m.get("variant") if isinstance(m.get("variant"), str) else None,
        "display": method_display(first), "show_variant": _show_variant(first), "class": cls, "reference": group.reference,
        "verdicts": {p: verdicts[p] for p in ranking.probes} if cls == "forget" else {"retain": verdicts["retain"]},
        "values": values, "cells": cells, "curve": curve,
        "spark": svg.sparkline(curve, gold_curve, schema["curve"]["primary"]),
    }


def _raw_value(raw: Any) -> tuple[Any, dict]:
    return (raw.get("value"), raw) if isinstance(raw, dict) else (raw, {})


def _combine_values(found: list[tuple[int, Any]], col: dict) -> tuple[Any, str]:
    """One value per seed → the shown value (the mean; None when every seed is None) and its title
    (the 95% interval of a single seed, or each seed's value and their spread)."""
    vals = [(s, *_raw_value(raw)) for s, raw in found]
    if len(vals) == 1:
        _, v, meta = vals[0]
        return v, _title(meta, col)
    nums = [v for _, v, _ in vals if is_number(v)]
    value = float(f"{sum(nums) / len(nums):.12g}") if nums else None  # no float noise from the mean in the CSV
    each = ", ".join(f"{s}: {fmt(v, col)}" for s, v, _ in vals)
    spread = f"; spread {fmt(min(nums), col)}–{fmt(max(nums), col)}" if len(nums) > 1 else ""
    nulls = len(vals) - len(nums)
    extra = f"; {col.get('null_label', 'undefined')} in {nulls} of {len(vals)} seeds" if nulls and nums else ""
    return value, f"mean over seeds ({each}){spread}{extra}"


def class_curve(data: dict, cls: str, probe: str | None) -> list[dict]:
    """A probe's forget curve is its block's ``curve``; the retain curve is the mean over the retain
    prompts' curves of that probe, per axis value and series."""
    if probe is None:
        return []
    block = data["probes"].get(probe) or {}
    if cls == "forget" and block.get("curve"):
        return sorted(block["curve"], key=lambda pt: pt["x"])
    sums: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in data.get("prompts", []):
        if p.get("class") == cls:
            for pt in ((p.get("probes") or {}).get(probe) or {}).get("curve") or []:
                for k, v in pt.items():
                    if k != "x" and is_number(v) and is_number(pt.get("x")):
                        sums[pt["x"]][k].append(float(v))
    return [{"x": x, **{k: sum(vs) / len(vs) for k, vs in sorted(series.items())}} for x, series in sorted(sums.items())]


def method_display(data: dict) -> str:
    m = data["method"]
    for key in ("display", "variant", "name"):
        if isinstance(m.get(key), str) and m[key]:
            return m[key]
    return m["name"]


def _show_variant(data: dict) -> bool:
    """Show the variant beside the display name only when it adds something: STEREO (stereo-noxattn), not
    UCE (uce) or Concept Ablation (model-based) (model-based)."""
    m = data["method"]
    v = m.get("variant")
    return isinstance(v, str) and bool(v) and v.lower() not in method_display(data).lower() and v.lower() != m["name"].lower()


def fmt(value: Any, column: dict) -> str:
    """A value as the page and the Markdown table show it (schema ``format``)."""
    if value is None:
        return column.get("null_label", "—")
    f = column.get("format", "fixed3")
    if f.startswith("fixed"):
        return f"{value:.{int(f[5:])}f}"
    if f in ("psi", "axis"):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
    if f == "seconds":
        if value < 60:
            return f"{value:.1f} s"
        return f"{value / 60:.1f} min" if value < 3600 else f"{value / 3600:.1f} h"
    if f == "count":
        if value < 1e3:
            return f"{value:g}"
        return f"{value / 1e3:.1f}k" if value < 1e6 else f"{value / 1e6:.2f}M"
    raise ValueError(f"schema column {column['key']!r}: unknown format {f!r}")


def _title(meta: dict, column: dict) -> str:
    parts = []
    ci = meta.get("ci")
    if isinstance(ci, list) and len(ci) == 2 and all(c is None or is_number(c) for c in ci) and any(is_number(c) for c in ci):
        lo = "—" if ci[0] is None else fmt(ci[0], column)
        hi = column.get("null_label", "—") if ci[1] is None else fmt(ci[1], column)
        parts.append(f"95% CI [{lo}, {hi}]")
    n = meta.get("n")
    if isinstance(n, dict):
        parts.append("n = " + ", ".join(f"{v} {k}" for k, v in n.items()))
    elif isinstance(n, int):
        parts.append(f"n = {n}")
    if isinstance(meta.get("resampled"), str):
        parts.append(f"resampled: {meta['resampled']}")
    return " · ".join(parts)


def _rank_key(row: dict, schema: dict) -> tuple:
    """Default order: concept, forget before retain, reference rows first, then the primary probe's
    verdict (schema order), then ``rank_by`` in its better direction, then method name for ties."""
    refs = schema["references"]["order"]
    ref = refs.index(row["reference"]) if row["reference"] in refs else len(refs)
    order = schema["verdict"]["order"]
    vkey = next(iter(row["verdicts"].values()), {}).get("key") if row["verdicts"] else "undefined"
    rank = order.index(vkey) if vkey in order else len(order)
    key = schema["rank_by"]
    v = row["values"].get(key)
    col = next((c for c in schema["columns"] if c["key"] == key.split(":")[0]), {})
    sign = -1.0 if better(col, row["class"]) == "higher" else 1.0
    return (row["concept"], CLASSES.index(row["class"]), ref, rank, v is None, sign * v if is_number(v) else 0.0,
            row["display"], row["variant"] or "", row["record"])


def arrows(column: dict) -> str:
    """The column header's direction mark: ``↑``, ``↓`` or per class (``F↓ R↑``); none if not ranked."""
    if column.get("ranked") is False:
        return ""
    sym = {"higher": "↑", "lower": "↓"}
    b = column.get("better", "none")
    if isinstance(b, dict):
        return " ".join(f"{cls[0].upper()}{sym[d]}" for cls, d in b.items() if d in sym)
    return sym.get(b, "")


def direction_text(column: dict) -> str:
    """The direction in words, for the definitions ("forget: lower is better; …")."""
    if column.get("ranked") is False:
        return "not ranked"
    words = {"higher": "higher is better", "lower": "lower is better"}
    b = column.get("better", "none")
    if isinstance(b, dict):
        return "; ".join(f"{cls}: {words[d]}" for cls, d in b.items() if d in words)
    return words.get(b, "")


def setting_text(v: Any) -> str:
    """A protocol or concept setting as one line of text (lists and dicts flattened)."""
    if isinstance(v, list):
        return ", ".join(setting_text(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {setting_text(x)}" for k, x in v.items())
    if v is None or isinstance(v, bool):
        return {None: "none", True: "true", False: "false"}[v]
    return str(v)


def verdict_matrix(ranking: Ranking) -> dict[str, list[dict]]:
    """Per concept, one entry per group: its verdict under each probe and the probes that expose it."""
    out: dict[str, list[dict]] = defaultdict(list)
    for g in ranking.groups:
        vs = ranking.verdicts[g.id]
        first = g.records[0].data
        out[g.concept].append({"group": g.id, "display": method_display(first), "method": g.method, "reference": g.reference,
                               "variant": first["method"].get("variant") if _show_variant(first) else None,
                               "seeds": g.seeds, "verdicts": {p: vs[p] for p in ranking.probes}, "retain": vs["retain"],
                               "exposed_by": [p for p in ranking.probes if vs[p]["key"] == "concealed"]})
    refs = ("original", "gold")
    for rows in out.values():
        rows.sort(key=lambda e: (refs.index(e["reference"]) if e["reference"] in refs else 2, e["display"], e["variant"] or ""))
    return dict(sorted(out.items()))


SUMMARY_KEYS = ("removed", "concealed", "destroyed", "not_erased", "inconclusive", "no_gold")


def method_summary(ranking: Ranking) -> dict[str, list[dict]]:
    """Per probe, per method (and reference row): how often, across concepts, it is each verdict."""
    out: dict[str, list[dict]] = {}
    for probe in ranking.probes:
        by: dict[tuple, dict] = {}
        for g in ranking.groups:
            first = g.records[0].data
            key = (g.reference or "", method_display(first), first["method"].get("variant") if _show_variant(first) else "")
            e = by.setdefault(key, {"display": key[1], "variant": key[2] or None, "reference": g.reference,
                                    "counts": dict.fromkeys(SUMMARY_KEYS, 0), "other": 0, "concepts": 0})
            v = ranking.verdicts[g.id][probe]["key"]
            e["concepts"] += 1
            if v in e["counts"]:
                e["counts"][v] += 1
            else:
                e["other"] += 1
        out[probe] = [by[k] for k in sorted(by, key=lambda k: (k[0] == "", k[0], k[1], k[2]))]
    return out
