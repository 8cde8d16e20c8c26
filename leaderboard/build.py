"""The leaderboard is a pure function of the records: gather → validate → render.

Writes ``<out>/index.html`` (+ ``data.js``, ``assets/``, ``records/<job_key>/`` images),
``<out>/results.csv`` and the Markdown table. The site needs no network: every asset is local
and the data is a script (``window.LEADERBOARD = …``) because ``fetch()`` fails on file://.
The same records give byte-identical files: inputs are sorted and nothing reads the clock.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from leaderboard import svg
from leaderboard.export import markdown, results_csv
from leaderboard.records import Issue, Record, check_protocols, dedupe, gather, load
from leaderboard.table import (
    CLASSES,
    Ranking,
    arrows,
    class_curve,
    direction_text,
    fmt,
    make_rankings,
    setting_text,
)

HERE = Path(__file__).parent
SCHEMA_PATH = HERE / "schema.json"
SEVERITIES = ("error", "warning", "info")


@dataclass
class BuildResult:
    records: list[Record]
    rankings: list[Ranking]
    issues: list[Issue]

    @property
    def problems(self) -> list[Issue]:
        """Issues that ``--strict`` fails on (everything but ``info``)."""
        return [i for i in self.issues if i.severity != "info"]


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def root_label(path: Path) -> str:
    """How a records root is named in the outputs: as given when relative, else its folder name."""
    path = Path(path)
    return path.name if path.is_absolute() else path.as_posix()


def collect(runs: Path | None, results: Path | None, schema: dict) -> tuple[list[Record], list[Issue]]:
    """Gather and validate every record under ``results`` and ``runs``."""
    roots = [(root_label(p), Path(p)) for p in (results, runs) if p is not None]
    records, issues = [], []
    for source, path in gather(roots):
        record, found = load(source, path, schema)
        issues += found
        if record is not None:
            records.append(record)
    records, found = dedupe(records, root_label(results) if results is not None else "")
    issues += found
    records, found = check_protocols(records)
    issues += found
    issues.sort(key=lambda i: (i.source, SEVERITIES.index(i.severity), i.reason))
    return records, issues


def build(runs: Path | None, results: Path | None, out: Path, md: Path | None,
          schema_path: Path = SCHEMA_PATH) -> BuildResult:
    """Build the site under ``out`` and the Markdown table at ``md`` from the records."""
    schema = load_schema(schema_path)
    records, issues = collect(runs, results, schema)
    rankings = make_rankings(records, schema)
    result = BuildResult(records, rankings, issues)
    out = Path(out)
    write_site(out, result, schema)
    _write(out / "results.csv", results_csv(rankings, schema))
    if md is not None:
        _write(Path(md), markdown(result, schema))
    return result


# --- site --------------------------------------------------------------------------------------

def write_site(out: Path, result: BuildResult, schema: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("app.js", "style.css"):
        _write(out / "assets" / name, (HERE / "assets" / name).read_text(encoding="utf-8"))
    images = _copy_artifacts(out, result.records, schema)
    _write(out / "data.js", data_js(result, schema))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    page = env.get_template("index.html.j2").render(**page_context(result, schema, images))
    _write(out / "index.html", page)


def _copy_artifacts(out: Path, records: list[Record], schema: dict) -> dict[str, list[tuple[str, str]]]:
    """Copy each record's images to ``records/<job_key>/<artifact key><ext>`` (our own names,
    so a record cannot choose a path in the site); return (label, url) per record."""
    shutil.rmtree(out / "records", ignore_errors=True)  # the folder is ours: drop stale images
    images: dict[str, list[tuple[str, str]]] = {}
    for r in records:
        key = r.data["job_key"]
        images[key] = []
        for name, label in schema["artifacts"].items():
            if name in r.artifacts:
                rel = f"records/{key}/{name}{r.artifacts[name].suffix.lower()}"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(r.artifacts[name], out / rel)
                images[key].append((label, rel))
    return images


def data_js(result: BuildResult, schema: dict) -> str:
    """The page's data as a script. ``<``, ``>`` and ``&`` are escaped inside the JSON so no
    record string can end a script element, whatever context the file is used in."""
    keep = ("id", "record", "ranking", "concept", "method", "variant", "display", "class",
            "reference", "verdict", "values", "order")
    data = {
        "paper": schema["paper"],
        "columns": [{k: c[k] for k in ("key", "display", "kind", "null_sort") if k in c}
                    for c in schema["columns"]],
        "verdicts": {k: v["display"] for k, v in schema["verdict"]["labels"].items()},
        "verdict_order": schema["verdict"]["order"],
        "rankings": [{"id": rk.id, "model": rk.model, "protocol": rk.protocol,
                      "rows": [{k: row[k] for k in keep} for row in rk.rows]} for rk in result.rankings],
        "issues": [{"source": i.source, "severity": i.severity, "reason": i.reason} for i in result.issues],
    }
    text = json.dumps(data, sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return f"window.LEADERBOARD = {text};\n"


def page_context(result: BuildResult, schema: dict, images: dict) -> dict[str, Any]:
    th = schema["verdict"]
    verdicts = {k: {"display": v["display"], "definition": v["definition"].format(**th)}
                for k, v in th["labels"].items()}
    columns = [dict(c, arrows=arrows(c), direction=direction_text(c)) for c in schema["columns"]]
    rows = [row for rk in result.rankings for row in rk.rows]
    return {
        "schema": schema, "columns": columns, "verdicts": verdicts,
        "summary_columns": [c for c in columns if c["key"] not in ("method", "concept", "curve")],
        "prompt_columns": [c for c in columns if c["kind"] == "metric" and any(
            s.split(".")[0] in ("metrics", "retain") for s in c["sources"].values())],
        "verdict_order": th["order"], "classes": schema["classes"],
        "references": schema["references"]["labels"],
        "rankings": [_ranking_context(rk, schema, images) for rk in result.rankings],
        "filters": {"concept": sorted({r["concept"] for r in rows}),
                    "method": sorted({r["method"] for r in rows if not r["reference"]}),
                    "class": [c for c in CLASSES if any(r["class"] == c for r in rows)]},
        "n_records": len(result.records),
        "issues": result.issues,
        "n_errors": sum(i.severity == "error" for i in result.issues),
        "n_warnings": sum(i.severity == "warning" for i in result.issues),
    }


def _ranking_context(rk: Ranking, schema: dict, images: dict) -> dict:
    labels = schema["protocol"]["labels"]
    settings = [(labels.get(k, k), setting_text(v)) for k, v in rk.protocol.items() if k != "hash"]
    return {"id": rk.id, "model": rk.model, "hash": rk.protocol["hash"], "settings": settings, "rows": rk.rows,
            "records": [_detail(r, rk, schema, images.get(r.data["job_key"], [])) for r in rk.records]}


def _detail(r: Record, rk: Ranking, schema: dict, images: list) -> dict:
    """Everything the detail view of one record shows (autoescaped by the template)."""
    d = r.data
    rows = {row["class"]: row for row in rk.rows if row["record"] == d["job_key"]}
    gold = rk.golds.get(d["concept"]["name"])
    gold = None if gold is r else gold
    curve = class_curve(d, "forget")
    gold_curve = class_curve(gold.data, "forget") if gold else None
    markers = {"method": rows["forget"]["values"].get("psi_recover"),
               "gold": rows["forget"]["values"].get("gold_psi_recover")}
    psi_grid = [p for p in rk.protocol.get("psi") or [] if isinstance(p, (int, float))]
    return {
        "id": d["job_key"], "display": rows["forget"]["display"],
        "variant": rows["forget"]["variant"] if rows["forget"]["show_variant"] else None,
        "concept": d["concept"]["name"], "model": d["model"]["name"], "rows": rows, "source": r.source,
        "about": [(k, setting_text(d["concept"][k])) for k in ("kind", "target", "anchor") if k in d["concept"]],
        "plot": Markup(svg.curve_plot(curve, gold_curve, schema["curve"]["series"], psi_grid, markers)),
        "images": images, "prompts": _prompts(d, schema),
        "params": [(k, _param(v)) for k, v in sorted((d["method"].get("params") or {}).items())]
        if isinstance(d["method"].get("params"), dict) else [],
        "cost": _cost(d.get("cost")), "provenance": _provenance(d),
    }


def _param(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False)


def _prompts(d: dict, schema: dict) -> list[dict]:
    """Per-prompt metrics: the schema's metric columns that come from metrics/retain."""
    out = []
    for p in d.get("prompts", []):
        cells = {}
        for col in schema["columns"]:
            src = col.get("sources", {}).get(p["class"], "")
            if col["kind"] == "metric" and src.split(".")[0] in ("metrics", "retain"):
                m = (p.get("metrics") or {}).get(src.split(".", 1)[1])
                if isinstance(m, dict) and "value" in m and (m["value"] is None or isinstance(m["value"], (int, float))):
                    cells[col["key"]] = fmt(m["value"], col)
        out.append({"prompt": p["prompt"], "class": p["class"], "cells": cells,
                    "spark": Markup(svg.sparkline(p["psi_curve"], None, schema["curve"]["primary"]))})
    return out


def _cost(cost: Any) -> list[tuple[str, str, str]]:
    if not isinstance(cost, dict):
        return []
    rows = []
    for stage, c in cost.items():
        if isinstance(c, dict) and ("seconds" in c or "nfe" in c):  # not e.g. cache hit counts
            sec, nfe = c.get("seconds"), c.get("nfe")
            rows.append((stage, fmt(sec, {"key": stage, "format": "seconds"}) if _number(sec) else "—",
                         fmt(nfe, {"key": stage, "format": "count"}) if _number(nfe) else "—"))
    for key in ("peak_memory_mb", "params_changed"):
        if _number(cost.get(key)):
            rows.append((key, f"{cost[key]:g}", ""))
    return rows


def _provenance(d: dict) -> list[tuple[str, str, str | None]]:
    """(label, text, link) — a link only for an http(s) URL, never a javascript: one."""
    items = [("job key", d["job_key"], None), ("created", str(d.get("created") or "—"), None)]
    for k in ("id", "revision", "world"):
        if d["model"].get(k) is not None:
            items.append((f"model {k}", str(d["model"][k]), None))
    env = d.get("env") if isinstance(d.get("env"), dict) else {}
    items += [(k, str(v), None) for k, v in env.items()]
    wandb = d.get("wandb")
    url = wandb.get("url") if isinstance(wandb, dict) else wandb
    if isinstance(url, str) and url:
        items.append(("wandb", url, url if url.startswith(("https://", "http://")) else None))
    return items


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")
