"""Leaderboard build: validation by name, --strict, determinism, verdicts, Markdown, escaping.

All records are synthetic (leaderboard/samples.py) and written to tmp dirs; each build takes
milliseconds. The page itself is exercised in a browser by test_leaderboard_browser.py.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from leaderboard.__main__ import main
from leaderboard.build import build, load_schema
from leaderboard.samples import PSI, bad_records, record, write, write_samples
from leaderboard.table import verdict

SCHEMA = load_schema()
TH = SCHEMA["verdict"]


def _build(tmp: Path, **kw):
    out = tmp / "site"
    result = build(tmp / "records" / "runs", tmp / "records" / "results", out, tmp / "LEADERBOARD.md", **kw)
    return result, out


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    rows = csv.DictReader(io.StringIO((out / "results.csv").read_text()))
    return {(r["job_key"], r["class"]): r for r in rows}


def test_build_writes_site_markdown_and_csv(tmp_path):
    write_samples(tmp_path / "records")
    result, out = _build(tmp_path)
    assert result.issues == []
    assert len(result.records) == 7 and len(result.rankings) == 1
    for name in ("index.html", "data.js", "assets/app.js", "assets/style.css", "results.csv"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "records" / "k-esd-star").iterdir()) == [
        "grid_o.png", "grid_p.png", "grid_u.png", "psi_curve_png.png"]
    page = (out / "index.html").read_text()
    # Everything is local: no URL but the paper's (and no protocol-relative one).
    assert "http://" not in page and "//cdn" not in page
    assert page.count("https://") == page.count("https://arxiv.org/abs/2409.05668")
    assert '<script src="data.js"></script>' in page and '<script src="assets/app.js"></script>' in page
    for col in SCHEMA["columns"]:  # headers and definitions come from the schema
        assert f'data-key="{col["key"]}"' in page
    assert "2409.05668" in page and "lower is better" in page and "higher is better" in page
    data = json.loads((out / "data.js").read_text().removeprefix("window.LEADERBOARD = ").removesuffix(";\n"))
    assert len(data["rankings"][0]["rows"]) == 14


def test_verdicts_and_gold_column(tmp_path):
    write_samples(tmp_path / "records")
    _, out = _build(tmp_path)
    rows = _rows(out)
    assert rows[("k-esd-star", "forget")]["verdict"] == "concealed"   # 0.12 < 0.4 - 0.1
    assert rows[("k-uce-star", "forget")]["verdict"] == "removed"     # 0.38 ≥ 0.3
    assert rows[("k-fmn-star", "forget")]["verdict"] == "not_erased"  # erasure 0.3
    assert rows[("k-esd-stripes", "forget")]["verdict"] == "no_gold"  # no retrain row for stripes
    assert rows[("k-fmn-star", "retain")]["verdict"] == "damaged"     # retention 0.6
    assert rows[("k-uce-star", "retain")]["verdict"] == "kept"
    assert {rows[(k, c)]["verdict"] for k in ("k-noop-star", "k-gold-star") for c in ("forget", "retain")} == {"reference"}
    # uce's record has no gold value: it is taken from the ranking's retrain row.
    assert rows[("k-uce-star", "forget")]["gold_psi_recover"] == "0.4"
    assert rows[("k-esd-stripes", "forget")]["psi_recover"] == "null"  # never recovers
    assert rows[("k-esd-stripes", "forget")]["gold_psi_recover"] == ""  # unknown
    assert rows[("k-esd-star", "retain")]["erasure"] == ""  # not applicable to retain rows


@pytest.mark.parametrize(("cls", "ref", "values", "gold_known", "expected"), [
    ("forget", "original", {"erasure": 0.0}, True, "reference"),
    ("forget", None, {"erasure": None}, True, "undefined"),
    ("forget", None, {"erasure": 0.49}, True, "not_erased"),
    ("forget", None, {"erasure": 0.5, "psi_recover": 0.1}, False, "no_gold"),
    ("forget", None, {"erasure": 0.9, "psi_recover": None, "gold_psi_recover": 0.4}, True, "removed"),
    ("forget", None, {"erasure": 0.9, "psi_recover": 0.3, "gold_psi_recover": 0.4}, True, "removed"),  # on the margin
    ("forget", None, {"erasure": 0.9, "psi_recover": 0.29, "gold_psi_recover": 0.4}, True, "concealed"),
    # A gold standard that never recovers is taken to recover at the grid's last ψ (0.55).
    ("forget", None, {"erasure": 0.9, "psi_recover": 0.44, "gold_psi_recover": None}, True, "concealed"),
    ("forget", None, {"erasure": 0.9, "psi_recover": 0.5, "gold_psi_recover": None}, True, "removed"),
    ("retain", None, {"retention": 0.8}, False, "kept"),
    ("retain", None, {"retention": 0.79}, False, "damaged"),
    ("retain", None, {"retention": None}, False, "undefined"),
])
def test_verdict_rules(cls, ref, values, gold_known, expected):
    assert verdict(cls, ref, values, gold_known, max(PSI), TH) == expected


def test_bad_records_named_with_reasons_and_strict(tmp_path, capsys):
    paths = write_samples(tmp_path / "records", bad=True)
    result, out = _build(tmp_path)
    by_source = {i.source: i for i in result.issues}
    expected = {
        "malformed": ("error", "malformed JSON"),
        "unknown": ("error", "unknown schema_version 2"),
        "failed": ("error", "status: failed (CUDA out of memory)"),
        "missing": ("error", "`metrics.crs` is missing"),
        "nan": ("error", "`metrics.ccs.value` is NaN"),
        "other_protocol": ("warning", "protocol hash \"ffffeeee0000\" differs"),
    }
    root = tmp_path / "records" / "runs"
    for name, (severity, reason) in expected.items():
        source = "runs/" + paths[name].relative_to(root).as_posix()
        assert source in by_source, (name, sorted(by_source))
        assert by_source[source].severity == severity and reason in by_source[source].reason
    assert len(result.issues) == len(expected)
    # The page is still built from the valid records; the invalid ones are left out of it.
    page = (out / "index.html").read_text()
    assert 'data-row="k-esd-star-forget"' in page and 'data-row="k-paper-forget"' in page
    assert 'data-row="k-nan-forget"' not in page and 'data-row="k-failed-forget"' not in page
    assert "runs/shapes/red/esd/k-nan/record.json" in page  # and named in its build report
    # The two protocols are two rankings.
    assert len(result.rankings) == 2

    args = ["build", "--runs", str(root), "--results", str(tmp_path / "records" / "results"),
            "--out", str(tmp_path / "cli-site"), "--md", str(tmp_path / "cli.md")]
    assert main(args) == 0
    err = capsys.readouterr().err
    for name in ("malformed", "k-v2", "k-failed", "k-missing", "k-nan", "k-paper"):
        assert name in err
    assert main([*args, "--strict"]) == 1
    assert (tmp_path / "cli-site" / "index.html").is_file()


@pytest.mark.parametrize("name", ["malformed", "unknown", "failed", "missing", "nan", "other_protocol"])
def test_each_bad_record_alone_fails_strict(tmp_path, name):
    root = tmp_path / "records" / "runs"
    write(root, record("k-ok", "esd", variant="esd-x"))
    bad = bad_records()[name]
    if isinstance(bad, str):
        (root / "broken").mkdir(parents=True)
        (root / "broken" / "record.json").write_text(bad)
    else:
        write(root, bad)
    args = ["build", "--runs", str(root), "--results", str(tmp_path / "none"),
            "--out", str(tmp_path / "site"), "--md", str(tmp_path / "lb.md")]
    assert main(args) == 0
    assert main([*args, "--strict"]) == 1
    assert 'data-row="k-ok-forget"' in (tmp_path / "site" / "index.html").read_text()


def test_more_validation(tmp_path):
    root = tmp_path / "records" / "runs"
    ok = record("k-ok", "esd")
    write(root, ok)
    clash = record("k-clash", "uce")  # same protocol hash, different settings
    clash["protocol"]["steps"] = 50
    write(root, clash)
    optional_nan = record("k-kid", "fmn")
    optional_nan["metrics"]["kid_po"]["value"] = float("inf")
    write(root, optional_nan)
    escape = record("k-escape", "uce", concept="stripes")
    escape["artifacts"] = {"grid_o": "../../../../../../etc/passwd.png", "grid_u": "missing.png"}
    write(root, escape)
    not_number = record("k-str", "esd", concept="red")
    not_number["retain"]["retention"]["value"] = "0.9"
    write(root, not_number)
    bad_protocol = record("k-proto", "esd", concept="red")
    bad_protocol["protocol"]["guidance"] = float("nan")
    write(root, bad_protocol)
    result, out = _build(tmp_path)
    issues: dict[str, list[str]] = {}
    for i in result.issues:
        issues.setdefault(i.source.split("/")[-2], []).append(f"{i.severity}: {i.reason}")
    assert issues["k-clash"] == ["error: protocol hash \"a1b2c3d4e5f6\" is shared with "
                                 "runs/shapes/star/esd/k-ok/record.json but the settings differ (steps); left out"]
    assert issues["k-kid"] == ["warning: `metrics.kid_po.value` is infinite; left out"]
    assert issues["k-escape"] == [
        'warning: artifact `grid_o` ("../../../../../../etc/passwd.png") must be a path inside the record\'s folder; not shown',
        'warning: artifact `grid_u` ("missing.png") not found; not shown']
    assert issues["k-str"] == ['error: `retain.retention.value` must be a number, got "0.9"']
    assert issues["k-proto"] == ["error: `protocol` contains NaN or Infinity"]
    assert _rows(out)[("k-kid", "forget")]["kid_po"] == ""
    assert not (out / "records" / "k-escape").exists()
    assert {r.data["job_key"] for r in result.records} == {"k-ok", "k-kid", "k-escape"}


def test_duplicate_job_key_prefers_published_copy(tmp_path):
    rec = record("k-same", "esd")
    write(tmp_path / "records" / "runs", rec)
    write(tmp_path / "records" / "results", rec)
    result, _ = _build(tmp_path)
    assert [r.source for r in result.records] == ["results/shapes/star/esd/k-same/record.json"]
    assert [i.severity for i in result.issues] == ["info"]
    assert result.problems == []  # a published copy of a local run is not a problem for --strict


def test_output_is_deterministic(tmp_path):
    write_samples(tmp_path / "a" / "records", bad=True)
    shutil.copytree(tmp_path / "a" / "records", tmp_path / "b" / "records")
    _build(tmp_path / "a")
    _build(tmp_path / "b")
    _build(tmp_path / "b")  # rebuilding in place changes nothing either

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(tmp_path / "a" / "site"), files(tmp_path / "b" / "site")
    assert a.keys() == b.keys() and len(a) > 8
    assert [k for k in a if a[k] != b[k]] == []
    assert (tmp_path / "a" / "LEADERBOARD.md").read_bytes() == (tmp_path / "b" / "LEADERBOARD.md").read_bytes()


def test_markdown_table(tmp_path):
    write_samples(tmp_path / "records", bad=True)
    _build(tmp_path)
    md = (tmp_path / "LEADERBOARD.md").read_text()
    assert "## shapes · protocol a1b2c3d4e5f6" in md and "## shapes · protocol ffffeeee0000" in md
    assert "eval preset: quick" in md and "ψ grid: 0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.55" in md
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    for display in ("Verdict", "Erasure ↑", "Retention ↑", "CCS F↓ R↑", "CRS F↓ R↑", "CRS (paper) F↓ R↑",
                    "ψ_recover ↑", "ψ_recover (gold)", "KID λP→λO", "KID λP→λU", "Time ↓", "NFE ↓"):
        assert display in header
    lines = md.splitlines()
    esd = next(line for line in lines if line.startswith("| ESD (esd-x) | star | forget"))
    assert "| concealed |" in esd and "| 0.620 |" in esd and "| 0.12 | 0.40 |" in esd
    assert any(line.startswith("| _Original (no unlearning)_ (reference) | star | forget | reference") for line in lines)
    assert any(line.startswith("| _Gold standard (retrained without the concept)_ (reference)") for line in lines)
    assert "runs/shapes/red/esd/k-failed/record.json: status: failed" in md
    assert "**concealed**: erasure ≥ 0.5 but ψ_recover < the gold standard's − 0.1" in md
    assert "2409.05668" in md


def test_record_strings_are_escaped(tmp_path):
    evil = record("k-evil", "esd", variant="<i>x</i>", prompts=["<script>alert(1)</script>", "a | b", "c"],
                  params={"lr": "<img src=x onerror=alert(2)>"})
    evil["method"]["display"] = "<script>alert(3)</script>|*bold*"
    evil["concept"]["name"] = "</script><b>star</b>"
    evil["wandb"] = "javascript:alert(4)"
    write(tmp_path / "records" / "runs", evil)
    _, out = _build(tmp_path)
    page = (out / "index.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>star" not in page and "<i>x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;script&gt;alert(3)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert 'href="javascript:' not in page and "javascript:alert(4)" in page  # shown, not linked
    data = (out / "data.js").read_text()
    assert "<" not in data and ">" not in data and "\\u003cscript\\u003ealert(3)" in data
    md = (tmp_path / "LEADERBOARD.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;alert(3)&lt;/script&gt;\\|\\*bold\\*" in md
    assert "&lt;/script&gt;&lt;b&gt;star&lt;/b&gt;" in md


def test_empty_build(tmp_path):
    result, out = _build(tmp_path)  # neither runs/ nor results/ exists: a fresh clone
    assert result.records == [] and result.issues == []
    assert "No records yet" in (out / "index.html").read_text()
    assert "_No records yet._" in (tmp_path / "LEADERBOARD.md").read_text()
    assert (out / "results.csv").read_text().startswith("model,protocol_hash,")


def test_schema_is_complete():
    kinds = {"method", "text", "verdict", "metric", "gold", "sparkline"}
    for col in SCHEMA["columns"]:
        assert {"key", "display", "kind", "better", "definition"} <= col.keys(), col["key"]
        assert col["kind"] in kinds
        better = col["better"] if isinstance(col["better"], dict) else {"forget": col["better"]}
        assert set(better.values()) <= {"higher", "lower", "none"}
        if col["kind"] in ("metric", "gold"):
            assert col["format"] and col["sources"], col["key"]
            assert set(col["required"]) <= set(col["sources"]), col["key"]
    required = {(cls, c["key"]) for c in SCHEMA["columns"] for cls in c.get("required", [])}
    assert required == {("forget", "ccs"), ("forget", "crs"), ("forget", "crs_paper"),
                        ("forget", "erasure"), ("retain", "retention")}
    assert set(TH["order"]) == set(TH["labels"])
    for label in TH["labels"].values():
        label["definition"].format(**TH)  # every threshold placeholder resolves


def test_sparkline_is_inline_svg(tmp_path):
    write_samples(tmp_path / "records")
    _, out = _build(tmp_path)
    page = (out / "index.html").read_text()
    assert page.count('<svg class="spark"') >= 14 and '<svg class="curve"' in page
