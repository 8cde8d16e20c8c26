"""The leaderboard as text: ``results.csv`` (raw values) and ``LEADERBOARD.md`` (the README's
tables). Same rows, order, verdicts and schema as the page."""
from __future__ import annotations

import csv
import html
import io
from typing import TYPE_CHECKING

from bench.verdict import probability_text
from leaderboard.table import (
    SUMMARY_KEYS,
    Ranking,
    arrows,
    direction_text,
    method_summary,
    setting_text,
    verdict_matrix,
)

if TYPE_CHECKING:
    from leaderboard.build import BuildResult


def _verdict_keys(rankings: list[Ranking]) -> list[str]:
    keys: list[str] = []
    for rk in rankings:
        keys += [p for p in rk.probes if p not in keys]
    return keys + ["retain"]


def results_csv(rankings: list[Ranking], schema: dict) -> str:
    """One line per table row (a method configuration × class, its seeds combined): verdicts with
    their probabilities (``p:<probe>``) and what each is the probability of (``p_of:<probe>``: the verdict
    itself, or for *inconclusive* the event that stayed undecided, e.g. ``concealed``), raw values
    (empty = absent, ``null`` = undefined/never), the job keys."""
    vkeys = _verdict_keys(rankings)
    metric_keys: list[str] = []
    for rk in rankings:
        metric_keys += [c["key"] for c in rk.columns if c.get("sources") and c["key"] not in metric_keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "protocol_hash", "eval", "schema", "concept", "class", "method", "variant", "display", "reference", "seeds",
                *[f"verdict:{k}" for k in vkeys], *[f"p:{k}" for k in vkeys], *[f"p_of:{k}" for k in vkeys], *metric_keys, "job_keys"])
    for rk in rankings:
        for row in rk.rows:
            vs = row["verdicts"]
            verdicts = [vs[k]["key"] if k in vs else "" for k in vkeys]
            probs = ["" if k not in vs or vs[k]["probability"] is None else f"{vs[k]['probability']:.4f}" for k in vkeys]
            events = ["" if k not in vs or vs[k]["probability"] is None else vs[k].get("event", "") for k in vkeys]  # what p: is of
            vals = [("null" if row["values"][k] is None else repr(row["values"][k])) if k in row["values"] else "" for k in metric_keys]
            w.writerow([rk.model["name"], rk.protocol["hash"], rk.protocol.get("eval", ""), 1 if rk.legacy else 2,
                        row["concept"], row["class"], row["method"], row["variant"] or "", row["display"], row["reference"] or "",
                        " ".join(map(str, row["seeds"])), *verdicts, *probs, *events, *vals, " ".join(row["records"])])
    return buf.getvalue()


def md_escape(text: str) -> str:
    """Record strings in a Markdown table: no HTML, no table breaks, no Markdown markup."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    for ch in "\\`*_[]|#":
        text = text.replace(ch, "\\" + ch)
    return text


def verdict_text(v: dict, schema: dict) -> str:
    label = schema["verdict"]["labels"].get(v["key"], {}).get("display", v["key"])
    return f"{label} ({probability_text(v, schema['verdict']['p_decide'])})" if v.get("probability") is not None else label


def markdown(result: BuildResult, schema: dict) -> str:
    """LEADERBOARD.md: per ranking its table, verdict matrix and per-method summary, then the
    column and verdict definitions."""
    lines = ["# ConcealBench leaderboard", "",
             f"Generated from {len(result.records)} records. "
             f"Metrics follow [{schema['paper']['title']}]({schema['paper']['url']}); "
             "one table per model and protocol (rows from different protocols are never ranked together). "
             "Reference rows are in italics and judged by the same rule as every method; a row's seeds are combined "
             "(mean value, common verdict — seeds that disagree read inconclusive).", ""]
    if not result.rankings:
        lines += ["_No records yet._", ""]
    for rk in result.rankings:
        lines += _md_ranking(rk, schema)
    lines += _md_definitions(schema)
    problems = [i for i in result.issues if i.severity != "info"]
    if problems:
        lines += ["", "## Build report", ""]
        lines += [f"- {i.severity}: {md_escape(i.source)}: {md_escape(i.reason)}" for i in problems]
    return "\n".join(lines) + "\n"


def _head(c: dict, rk: Ranking) -> str:
    name = f"{c['display']} — {rk.probe_display[c['probe']]}" if c.get("per_probe") else c["display"]
    return f"{name} {arrows(c)}".strip()


def _md_ranking(rk: Ranking, schema: dict) -> list[str]:
    cols = [c for c in rk.columns if c["kind"] != "sparkline"]
    labels = schema["protocol"]["labels"]
    title = f"## {md_escape(rk.model['name'])} · protocol {md_escape(rk.protocol['hash'])}"
    lines = [title + (" · schema 1 (not judged)" if rk.legacy else ""), "",
             "; ".join(f"{md_escape(labels.get(k, k))}: {md_escape(setting_text(v))}" for k, v in rk.protocol.items() if k != "hash"),
             ""]
    if rk.probes:
        lines += ["Probes: " + ", ".join(f"{md_escape(rk.probe_display[p])} (protocol {rk.probe_protocols[p]})" for p in rk.probes), ""]
    lines += ["| " + " | ".join(_head(c, rk) for c in cols) + " |",
              "|" + "|".join("---:" if c.get("sources") else "---" for c in cols) + "|"]
    for row in rk.rows:
        lines.append("| " + " | ".join(_md_cell(row, c, rk, schema) for c in cols) + " |")
    lines += [""] + _md_matrix(rk, schema) + _md_summary(rk, schema)
    return lines + [""]


def _md_cell(row: dict, column: dict, rk: Ranking, schema: dict) -> str:
    key, base = column["key"], column["base"]
    if base == "method":
        text = md_escape(row["display"]) + (f" ({md_escape(row['variant'])})" if row["show_variant"] else "")
        return f"_{text}_ ({row['reference']})" if row["reference"] else text
    if base in ("concept", "class"):
        return md_escape(row[base])
    if base == "seeds":
        return ", ".join(map(str, row["seeds"]))
    if base == "verdict":
        v = row["verdicts"].get(column["probe"]) if row["class"] == "forget" else (
            row["verdicts"]["retain"] if column["probe"] == rk.probes[0] else None)
        return verdict_text(v, schema) if v else ""
    return row["cells"].get(key, {}).get("text", "")


def _md_matrix(rk: Ranking, schema: dict) -> list[str]:
    if not rk.probes:
        return []
    lines = ["### Verdict matrix", "", "Each method on each concept under each probe; “exposed by” lists the probes that call it concealed.", ""]
    heads = ["Concept", "Method", *[rk.probe_display[p] for p in rk.probes], "Retain", "Exposed by"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for concept, entries in verdict_matrix(rk).items():
        for e in entries:
            name = md_escape(e["display"]) + (f" ({md_escape(e['variant'])})" if e["variant"] else "")
            name = f"_{name}_ ({e['reference']})" if e["reference"] else name
            cells = [md_escape(concept), name, *[verdict_text(e["verdicts"][p], schema) for p in rk.probes],
                     verdict_text(e["retain"], schema), ", ".join(md_escape(rk.probe_display[p]) for p in e["exposed_by"]) or "—"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _md_summary(rk: Ranking, schema: dict) -> list[str]:
    summary = method_summary(rk)
    if not summary:
        return []
    labels = schema["verdict"]["labels"]
    lines = ["### Per-method summary", "", "Across concepts: how often each method is each verdict, per probe.", ""]
    heads = ["Probe", "Method", "Concepts", *[labels[k]["display"] for k in SUMMARY_KEYS], "other"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(heads) - 2)) + "|"]
    for probe, entries in summary.items():
        for e in entries:
            name = md_escape(e["display"]) + (f" ({md_escape(e['variant'])})" if e["variant"] else "")
            name = f"_{name}_ ({e['reference']})" if e["reference"] else name
            lines.append("| " + " | ".join([md_escape(rk.probe_display[probe]), name, str(e["concepts"]),
                                            *[str(e["counts"][k]) for k in SUMMARY_KEYS], str(e["other"])]) + " |")
    return lines + [""]


def _md_definitions(schema: dict) -> list[str]:
    th = schema["verdict"]
    lines = ["## Columns", ""]
    for c in schema["columns"]:
        if c["kind"] != "sparkline":
            direction = f" ({direction_text(c)})" if direction_text(c) else ""
            lines.append(f"- **{c['display']}**{direction}: {c['definition']}")
    lines += ["", "## Verdicts", "",
              f"Decided from the bootstrap replicates in each record at probability {th['p_decide']} (gates: erasure ≥ "
              f"{th['erasure_min']}, specificity ≥ {th['specificity_min']}, retention ≥ {th['retention_min']}; margins: "
              + ", ".join(f"{p} {next(iter(m))} {next(iter(m.values()))}" for p, m in th["margins"].items() if not p.startswith("_") or p == "_default")
              + ").", ""]
    lines += [f"- **{th['labels'][k]['display']}**: {th['labels'][k]['definition'].format(**th)}" for k in th["order"]]
    return lines
