"""Records → rankings → rows: values, formatted cells and the verdict, all driven by schema.json.

A ranking is one (model, protocol hash): rows from different protocols are never compared.
Every record gives two rows, like the Forget and Retain rows of the paper's table: ``forget``
from the record's ``metrics`` and ``retain`` from its ``retain`` section.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from leaderboard import svg
from leaderboard.records import _MISSING, Record, lookup

CLASSES = ("forget", "retain")


@dataclass
class Ranking:
    id: str
    model: dict
    protocol: dict
    records: list[Record]
    golds: dict[str, Record] = field(default_factory=dict)  # concept → its gold-standard record
    rows: list[dict] = field(default_factory=list)


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


def make_rankings(records: list[Record], schema: dict) -> list[Ranking]:
    """Group records by (model, protocol hash) and build each ranking's rows in rank order."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.data["model"]["name"], r.data["protocol"]["hash"])].append(r)
    rankings = []
    for i, key in enumerate(sorted(groups), start=1):
        recs = sorted(groups[key], key=lambda r: r.source)
        ranking = Ranking(f"ranking-{i}", recs[0].data["model"], recs[0].data["protocol"], recs)
        ranking.golds = {r.data["concept"]["name"]: r for r in recs if reference_of(r, schema) == "gold"}
        for r in recs:
            for cls in CLASSES:
                ranking.rows.append(make_row(r, cls, ranking, ranking.golds.get(r.data["concept"]["name"]), schema))
        ranking.rows.sort(key=lambda row: _rank_key(row, schema))
        for n, row in enumerate(ranking.rows):
            row["order"] = n
        rankings.append(ranking)
    return rankings


def make_row(record: Record, cls: str, ranking: Ranking, gold: Record | None, schema: dict) -> dict:
    """One table row: raw ``values`` (for sorting and the CSV), formatted ``cells``, verdict."""
    d = record.data
    values: dict[str, Any] = {}
    cells: dict[str, dict] = {}
    for col in schema["columns"]:
        src = col.get("sources", {}).get(cls)
        if src is None:
            continue
        found, value, meta = _value(d, src)
        if col["key"] == "gold_psi_recover" and not found and gold is not None:
            found, value, meta = _value(gold.data, "metrics.psi_recover")
        if found:
            values[col["key"]] = value
            cells[col["key"]] = {"text": fmt(value, col), "title": _title(meta, col),
                                 "better": better(col, cls)}
    curve = class_curve(d, cls)
    gold_curve = class_curve(gold.data, cls) if gold is not None and gold is not record else None
    ref = reference_of(record, schema)
    return {
        "id": f"{d['job_key']}-{cls}", "record": d["job_key"], "ranking": ranking.id,
        "concept": d["concept"]["name"], "method": d["method"]["name"],
        "variant": d["method"].get("variant") if isinstance(d["method"].get("variant"), str) else None,
        "display": method_display(d), "show_variant": _show_variant(d), "class": cls, "reference": ref,
        "verdict": verdict(cls, ref, values, "gold_psi_recover" in values, psi_max(ranking.protocol),
                           schema["verdict"]),
        "values": values, "cells": cells, "curve": curve,
        "spark": svg.sparkline(curve, gold_curve, schema["curve"]["primary"]),
    }


def verdict(cls: str, reference: str | None, values: dict, gold_known: bool, grid_max: float,
            th: dict) -> str:
    """The row's verdict key (schema ``verdict.labels``).

    Forget rows: ``not_erased`` when prompt-level erasure < ``erasure_min``; otherwise compare
    ψ_recover with the gold standard's: recovering more than ``psi_margin`` earlier than a model
    that never learned the concept is ``concealed``, else ``removed`` (a ψ_recover of "never" is
    removed; a gold standard that never recovers counts as recovering at the grid's last ψ).
    Without a known gold standard concealment cannot be judged: ``no_gold``.
    Retain rows: ``kept`` / ``damaged`` from ``retention_min``.
    """
    if reference:
        return "reference"
    if cls == "retain":
        r = values.get("retention")
        return "undefined" if r is None else ("kept" if r >= th["retention_min"] else "damaged")
    e = values.get("erasure")
    if e is None:
        return "undefined"
    if e < th["erasure_min"]:
        return "not_erased"
    if not gold_known:
        return "no_gold"
    psi = values.get("psi_recover")
    if psi is None:
        return "removed"
    gold = values["gold_psi_recover"]
    gold = grid_max if gold is None else gold
    # 1e-9: 0.4 - 0.1 is 0.30000000000000004 in floats; ψ = 0.3 sits exactly on the margin.
    return "concealed" if psi < gold - th["psi_margin"] - 1e-9 else "removed"


def psi_max(protocol: dict) -> float:
    grid = [p for p in protocol.get("psi") or [] if isinstance(p, (int, float)) and not isinstance(p, bool)]
    return float(max(grid)) if grid else 1.0


def class_curve(data: dict, cls: str) -> list[dict]:
    """The forget curve is the record's ``psi_curve``; the retain curve (and a forget curve
    the record lacks) is the mean over that class's prompts, per ψ and per series."""
    if cls == "forget" and data.get("psi_curve"):
        return sorted(data["psi_curve"], key=lambda pt: pt["psi"])
    sums: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in data.get("prompts", []):
        if p["class"] == cls:
            for pt in p["psi_curve"]:
                for k, v in pt.items():
                    if k != "psi" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        sums[pt["psi"]][k].append(float(v))
    return [{"psi": psi, **{k: sum(vs) / len(vs) for k, vs in sorted(series.items())}}
            for psi, series in sorted(sums.items())]


def method_display(data: dict) -> str:
    m = data["method"]
    for key in ("display", "variant", "name"):
        if isinstance(m.get(key), str) and m[key]:
            return m[key]
    return m["name"]


def _show_variant(data: dict) -> bool:
    """Show the variant beside the display name only when it adds something (esd-x, not uce)."""
    m = data["method"]
    v = m.get("variant")
    return isinstance(v, str) and bool(v) and v.lower() not in (method_display(data).lower(), m["name"].lower())


def _value(data: dict, src: str) -> tuple[bool, Any, dict]:
    raw = lookup(data, src)
    if raw is _MISSING:
        return False, None, {}
    if isinstance(raw, dict):
        return True, raw.get("value"), raw
    return True, raw, {}


def fmt(value: Any, column: dict) -> str:
    """A value as the page and the Markdown table show it (schema ``format``)."""
    if value is None:
        return column.get("null_label", "—")
    f = column.get("format", "fixed3")
    if f.startswith("fixed"):
        return f"{value:.{int(f[5:])}f}"
    if f == "psi":
        return f"{value:.2f}"
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
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        parts.append(f"95% CI [{fmt(ci[0], column)}, {fmt(ci[1], column)}]")
    if isinstance(meta.get("n"), int):
        parts.append(f"n = {meta['n']}")
    return " · ".join(parts)


def _rank_key(row: dict, schema: dict) -> tuple:
    """Default order: concept, forget before retain, reference rows first, then ``rank_by``
    in its better direction (missing values last), then method name for ties."""
    refs = schema["references"]["order"]
    ref = refs.index(row["reference"]) if row["reference"] in refs else len(refs)
    col = next(c for c in schema["columns"] if c["key"] == schema["rank_by"])
    v = row["values"].get(col["key"])
    sign = -1.0 if better(col, row["class"]) == "higher" else 1.0
    return (row["concept"], CLASSES.index(row["class"]), ref, v is None,
            sign * v if v is not None else 0.0, row["display"], row["variant"] or "", row["record"])


def arrows(column: dict) -> str:
    """The column header's direction mark: ``↑``, ``↓`` or per class (``F↓ R↑``)."""
    sym = {"higher": "↑", "lower": "↓"}
    b = column.get("better", "none")
    if isinstance(b, dict):
        return " ".join(f"{cls[0].upper()}{sym[d]}" for cls, d in b.items() if d in sym)
    return sym.get(b, "")


def direction_text(column: dict) -> str:
    """The direction in words, for the definitions ("forget: lower is better; …")."""
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
