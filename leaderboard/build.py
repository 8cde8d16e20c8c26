"""The leaderboard is a pure function of the records: gather → validate → render.

Writes ``<out>/index.html`` (+ ``data.js``, ``assets/``, ``records/<job_key>/`` images),
``<out>/results.csv`` and the Markdown table. The site needs no network: every asset is local
and the data is a script (``window.LEADERBOARD = …``) because ``fetch()`` fails on file://.
The same records give byte-identical files: inputs are sorted and nothing reads the clock.

Two builds, so a local run never rewrites published data: ``build`` (``make leaderboard``)
shows your runs beside the published records in an ignored folder (``runs/leaderboard/``);
``publish`` (``make publish``) copies chosen runs into ``leaderboard/results/`` and rebuilds the
tracked site and ``LEADERBOARD.md`` from the published records alone.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from bench.recordspec import SCHEMA_VERSION, is_number
from bench.verdict import format_p, probability_text
from leaderboard import svg
from leaderboard.export import markdown, results_csv
from leaderboard.records import Issue, Record, artifact_keys, check_protocols, dedupe, gather, load
from leaderboard.table import (
    CLASSES,
    SUMMARY_KEYS,
    Ranking,
    arrows,
    class_curve,
    direction_text,
    fmt,
    gold_block,
    make_rankings,
    method_summary,
    probe_block,
    setting_text,
    verdict_matrix,
)

HERE = Path(__file__).parent
SCHEMA_PATH = HERE / "schema.json"
SEVERITIES = ("error", "warning", "info")
PUBLISHED = HERE / "results"
SITE = HERE / "site"
MARKDOWN = HERE / "LEADERBOARD.md"
LOCAL = Path("runs") / "leaderboard"  # relative to where the build runs (the repository root)


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
    """The schema, with its verdict thresholds checked (one message naming a bad one)."""
    from bench.verdict import thresholds

    schema = json.loads(Path(path).read_text(encoding="utf-8"))
    thresholds(schema)
    return schema


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


def publish(run_dirs: list[Path], results: Path = PUBLISHED, images: str = "first-seed") -> list[Path]:
    """Copy finished run folders (``record.json`` and its images) to
    ``results/<model>/<concept>/<method>/<job-key>/``; stage files and deltas stay behind.
    ``images``: ``first-seed`` copies the PNGs of seed-0 records only (the page shows a replicated
    row's first seed; the other seeds' records carry the numbers), ``all`` every record's.
    Refuses a folder without an ok record (one message naming it)."""
    copied = []
    for d in run_dirs:
        rec_path = Path(d) / "record.json"
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(d)!r} holds no readable record.json: {e}") from e
        if rec.get("status") != "ok":
            raise ValueError(f"{str(rec_path)!r} is not a finished job (status {rec.get('status')!r})")
        dst = results / rec["model"]["name"] / rec["concept"]["name"] / rec["method"]["name"] / rec["job_key"]
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in Path(d).iterdir():
            if f.is_file() and (f.name == "record.json" or (f.suffix.lower() == ".png" and (images == "all" or rec.get("seed", 0) == 0))):
                shutil.copyfile(f, tmp / f.name)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        copied.append(dst)
    return copied


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
    env.filters["p"] = lambda p: format_p(p, schema["verdict"]["p_decide"])
    env.filters["ptext"] = lambda v: probability_text(v, schema["verdict"]["p_decide"])
    page = env.get_template("index.html.j2").render(**page_context(result, schema, images))
    _write(out / "index.html", page)


def _copy_artifacts(out: Path, records: list[Record], schema: dict) -> dict[str, dict[str, str]]:
    """Copy each record's images to ``records/<job_key>/<artifact key><ext>`` (our own names,
    so a record cannot choose a path in the site); return artifact key → url per record."""
    shutil.rmtree(out / "records", ignore_errors=True)  # the folder is ours: drop stale images
    images: dict[str, dict[str, str]] = {}
    for r in records:
        key = r.data["job_key"]
        images[key] = {}
        for name in artifact_keys(r.data, schema):
            if name in r.artifacts:
                rel = f"records/{key}/{name}{r.artifacts[name].suffix.lower()}"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(r.artifacts[name], out / rel)
                images[key][name] = rel
    return images


def data_js(result: BuildResult, schema: dict) -> str:
    """The page's data as a script. ``<``, ``>`` and ``&`` are escaped inside the JSON so no
    record string can end a script element, whatever context the file is used in."""
    keep = ("id", "group", "record", "records", "seeds", "ranking", "concept", "method", "variant", "display", "class",
            "reference", "values", "order", "warning")
    data = {
        "paper": schema["paper"],
        "columns": {rk.id: [{k: c[k] for k in ("key", "display", "kind", "null_sort", "probe") if k in c} for c in rk.columns]
                    for rk in result.rankings},
        "verdicts": {k: v["display"] for k, v in schema["verdict"]["labels"].items()},
        "verdict_order": schema["verdict"]["order"],
        "rankings": [{"id": rk.id, "model": rk.model, "protocol": rk.protocol, "probes": rk.probes, "legacy": rk.legacy,
                      "rows": [{**{k: row[k] for k in keep},
                                "verdicts": {p: {k: v[k] for k in ("key", "probability")} for p, v in row["verdicts"].items()}}
                               for row in rk.rows]} for rk in result.rankings],
        "issues": [{"source": i.source, "severity": i.severity, "reason": i.reason} for i in result.issues],
    }
    text = json.dumps(data, sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return f"window.LEADERBOARD = {text};\n"


def verdict_definitions(schema: dict) -> dict[str, dict]:
    th = schema["verdict"]
    return {k: {"display": v["display"], "definition": v["definition"].format(**th)} for k, v in th["labels"].items()}


def page_context(result: BuildResult, schema: dict, images: dict) -> dict[str, Any]:
    th = schema["verdict"]
    definitions = [dict(c, arrows=arrows(c), direction=direction_text(c)) for c in schema["columns"]]
    rows = [row for rk in result.rankings for row in rk.rows]
    return {
        "schema": schema, "definitions": definitions, "verdicts": verdict_definitions(schema),
        "verdict_order": th["order"], "classes": schema["classes"], "thresholds": th,
        "references": schema["references"]["labels"],
        "rankings": [_ranking_context(rk, schema, images) for rk in result.rankings],
        "filters": {"concept": sorted({r["concept"] for r in rows}),
                    "method": sorted({r["method"] for r in rows if not r["reference"]}),
                    "class": [c for c in CLASSES if any(r["class"] == c for r in rows)]},
        "n_records": len(result.records),
        "issues": result.issues,
        "n_errors": sum(i.severity == "error" for i in result.issues),
        "n_warnings": sum(i.severity == "warning" for i in result.issues),
        "summary_keys": SUMMARY_KEYS,
    }


def _ranking_context(rk: Ranking, schema: dict, images: dict) -> dict:
    labels = schema["protocol"]["labels"]
    settings = [(labels.get(k, k), setting_text(v)) for k, v in rk.protocol.items() if k != "hash"]
    probe_settings = []
    base_keys = set(rk.protocol)
    for p in rk.probes:
        proto = next((r.data["probes"][p]["protocol"] for r in rk.records if p in r.data["probes"]
                      and r.data["probes"][p]["protocol"]["hash"] == rk.probe_protocols[p]), {})
        own = [(labels.get(k, k), setting_text(v)) for k, v in proto.items() if k not in base_keys or k == "hash"]
        probe_settings.append({"probe": p, "display": rk.probe_display[p], "settings": own})
    columns = [dict(c, arrows=arrows(c), direction=direction_text(c),
                    head=f"{c['display']} — {rk.probe_display[c['probe']]}" if c.get("per_probe") else c["display"])
               for c in rk.columns]
    return {"id": rk.id, "model": rk.model, "hash": rk.protocol["hash"], "legacy": rk.legacy, "settings": settings,
            "probe_settings": probe_settings, "rows": rk.rows, "columns": columns, "header": header_rows(columns, rk),
            "probes": rk.probes,
            "probe_display": rk.probe_display,
            "summary_columns": [c for c in columns if c["base"] not in ("method", "concept", "curve", "seeds")],
            "matrix": verdict_matrix(rk), "method_summary": method_summary(rk), "prompt_columns": prompt_columns(schema, rk),
            "groups": [_detail(g, rk, schema, images) for g in rk.groups]}


def header_rows(columns: list[dict], rk: Ranking) -> list[list[dict]]:
    """The board's header: with several probes, a per-probe column's metric heads a group over its
    probes (``Recovery ↑`` over *partial diffusion*, *concept inversion*, …) and the column itself
    is named by its probe alone; other columns span both rows. One probe: one row, full names.

    Each cell is ``{"column": c, "label": …, "rowspan": n}`` (a sortable column) or
    ``{"group": label, "title": …, "span": n}``."""
    if len(rk.probes) < 2:
        return [[{"column": c, "label": c["head"], "rowspan": 1} for c in columns]]
    top: list[dict] = []
    below: list[dict] = []
    for c in columns:
        if not c.get("per_probe"):
            top.append({"column": c, "label": c["head"], "rowspan": 2})
            continue
        below.append({"column": c, "label": rk.probe_display[c["probe"]], "rowspan": 1})
        last = top[-1] if top else None
        if last and "group" in last and last["base"] == c["base"]:
            last["span"] += 1
        else:
            top.append({"group": c["display"], "base": c["base"], "title": c.get("definition", ""), "span": 1})
    return [top, below]


def _detail(g, rk: Ranking, schema: dict, images: dict) -> dict:
    """Everything the detail view of one group (its seeds' records) shows (autoescaped by the template)."""
    first = g.records[0]
    d = first.data
    rows = {row["class"]: row for row in rk.rows if row["group"] == g.id}
    gold = rk.golds.get(g.concept)
    probes = []
    for p in rk.probes:
        block = probe_block(first, p, rk)
        if block is None:
            continue
        gblock = gold_block(g, first, p, rk)
        curve = class_curve(d, "forget", p)
        gold_curve = (gblock or {}).get("curve") if gold is not None and gold is not g else None
        markers = {"method": (block["metrics"].get("recover") or {}).get("value"),
                   "gold": (gblock["metrics"].get("recover") or {}).get("value") if gblock and gold is not g else None}
        seeds = []
        for r in g.records:
            b = probe_block(r, p, rk)
            if b is None:
                continue
            per = next((v for v in rows["forget"]["verdicts"][p]["per_seed"] if v["seed"] == r.data.get("seed", 0)), None)
            seeds.append({"seed": r.data.get("seed", 0), "job_key": r.data["job_key"], "verdict": per,
                          "metrics": [(name, _metric_text(b["metrics"].get(name), b)) for name in _PROBE_METRICS if name in b["metrics"]],
                          "gold": _metric_text(((gold_block(g, r, p, rk) or {}).get("metrics") or {}).get("recover"), b)})
        probes.append({"probe": p, "display": rk.probe_display[p], "axis": block["axis"],
                       "verdict": rows["forget"]["verdicts"][p],
                       "plot": Markup(svg.curve_plot(curve, gold_curve, schema["curve"]["series"], block["axis"]["values"], markers,
                                                     axis_label=block["axis"].get("unit") or block["axis"]["name"])),
                       "images": [(schema["probe_artifacts"][k], images.get(d["job_key"], {}).get(f"{k}_{p}"))
                                  for k in schema["probe_artifacts"] if not k.startswith("_") and images.get(d["job_key"], {}).get(f"{k}_{p}")],
                       "seeds": seeds})
    return {
        "id": g.id, "display": rows["forget"]["display"],
        "variant": rows["forget"]["variant"] if rows["forget"]["show_variant"] else None,
        "concept": g.concept, "model": d["model"]["name"], "rows": rows, "seeds": g.seeds,
        "sources": [r.source for r in g.records], "legacy": rk.legacy,
        "about": [(k, setting_text(d["concept"][k])) for k in ("kind", "target", "anchor") if k in d["concept"]],
        "retain_verdict": rows["retain"]["verdicts"]["retain"],
        "probes": probes,
        "images": [(label, images.get(d["job_key"], {}).get(k)) for k, label in schema["artifacts"].items()
                   if not k.startswith("_") and images.get(d["job_key"], {}).get(k)],
        "prompts": _prompts(d, rk, schema),
        "params": [(k, _param(v)) for k, v in sorted((d["method"].get("params") or {}).items())]
        if isinstance(d["method"].get("params"), dict) else [],
        "cost": _cost(d.get("cost")), "provenance": [_provenance(r.data, r.source) for r in g.records],
    }


_PROBE_METRICS = ("recover", "ccs", "crs", "crs_paper", "kid_po", "kid_pu")
_AXIS_FMT = {"key": "axis", "format": "axis", "null_label": "never"}


def _metric_text(m: Any, block: dict) -> str:
    if not isinstance(m, dict):
        return "—"
    col = _AXIS_FMT if m is (block.get("metrics") or {}).get("recover") or "basis" in m else {"key": "m", "format": "fixed3"}
    text = fmt(m.get("value"), col)
    ci = m.get("ci")
    if isinstance(ci, list) and len(ci) == 2 and any(isinstance(c, (int, float)) for c in ci):
        lo = "—" if ci[0] is None else fmt(ci[0], col)
        hi = "never" if ci[1] is None else fmt(ci[1], col)
        text += f" [{lo}, {hi}]"
    return text


def _param(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False)


def _prompts(d: dict, rk: Ranking, schema: dict) -> list[dict]:
    """Per-prompt metrics of the group's first seed: the prompt-level ones, then per probe its
    recovery point and the primary probe's CCS/CRS."""
    out = []
    cols = [c for c in schema["columns"] if c["kind"] == "metric" and not c.get("per_probe")]
    for p in d.get("prompts", []):
        cells = {}
        for col in cols:
            src = col.get("sources", {}).get(p["class"], "")
            head, _, name = src.partition(".")
            if head in ("metrics", "retain"):
                m = p["metrics"].get(name)
            elif head == "probes":
                probe, _, rest = name.partition(".")
                m = ((p["probes"].get(schema["probes"]["primary"]) or {}).get("metrics") or {}).get(rest.split(".")[-1])
            else:
                continue
            if isinstance(m, dict) and "value" in m and (m["value"] is None or isinstance(m["value"], (int, float))):
                cells[col["key"]] = fmt(m["value"], col)
        for probe in rk.probes:
            m = ((p["probes"].get(probe) or {}).get("metrics") or {}).get("recover")
            if isinstance(m, dict):
                cells[f"recover:{probe}"] = fmt(m.get("value"), _AXIS_FMT)
        primary = schema["probes"]["primary"] if schema["probes"]["primary"] in rk.probes else (rk.probes or [None])[0]
        spark_curve = ((p["probes"].get(primary) or {}).get("curve") or []) if primary else []
        out.append({"prompt": p["prompt"], "class": p["class"], "cells": cells,
                    "spark": Markup(svg.sparkline(spark_curve, None, schema["curve"]["primary"]))})
    return out


def prompt_columns(schema: dict, rk: Ranking) -> list[tuple[str, str]]:
    cols = [(c["key"], c["display"]) for c in schema["columns"] if c["kind"] == "metric" and not c.get("per_probe")]
    return cols + [(f"recover:{p}", f"Recovery — {rk.probe_display[p]}") for p in rk.probes]


def _cost(cost: Any) -> list[tuple[str, str, str]]:
    if not isinstance(cost, dict):
        return []
    rows = []
    stages = list(cost.items())
    probes = cost.get("probes") if isinstance(cost.get("probes"), dict) else {}
    stages += [(f"probe: {name}", c) for name, c in probes.items()]
    for stage, c in stages:
        if isinstance(c, dict) and ("seconds" in c or "nfe" in c):  # not e.g. cache hit counts
            sec, nfe = c.get("seconds"), c.get("nfe")
            rows.append((stage, fmt(sec, {"key": stage, "format": "seconds"}) if is_number(sec) else "—",
                         fmt(nfe, {"key": stage, "format": "count"}) if is_number(nfe) else "—"))
    for key in ("peak_memory_mb", "params_changed"):
        if is_number(cost.get(key)):
            rows.append((key, f"{cost[key]:g}", ""))
    if is_number(cost.get("others_cpus")):  # whether the seconds above were measured alone (bench/cpuload.py)
        rows.append((f"CPUs other processes kept busy meanwhile (of {cost.get('cpus', '?')})", f"{cost['others_cpus']:g}", ""))
    return rows


def _provenance(d: dict, source: str) -> dict:
    """(label, text, link) per record — a link only for an http(s) URL, never a javascript: one — and
    the command that reruns the record's job and compares (``make verify``, bench/verify.py)."""
    folder = Path(source).parent.as_posix()
    if folder.startswith("results/"):  # the published root is labelled by its folder name (root_label)
        folder = "leaderboard/" + folder
    items = [("job key", d["job_key"], None), ("seed", str(d.get("seed", 0)), None), ("created", str(d.get("created") or "—"), None)]
    if d.get("schema_version") == SCHEMA_VERSION:  # an older record reruns only with the code that made it
        items.append(("rerun and compare", f"make verify RECORD={folder}", None))
    for k in ("id", "revision", "world"):
        if d["model"].get(k) is not None:
            items.append((f"model {k}", str(d["model"][k]), None))
    env = d.get("env") if isinstance(d.get("env"), dict) else {}
    items += [(k, str(v), None) for k, v in env.items()]
    wandb = d.get("wandb")
    url = wandb.get("url") if isinstance(wandb, dict) else wandb
    if isinstance(url, str) and url:
        items.append(("wandb", url, url if url.startswith(("https://", "http://")) else None))
    return {"seed": d.get("seed", 0), "entries": items}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")
