"""Leaderboard build: validation by name, --strict, determinism, verdicts, replicated rows, the old
schema, Markdown, escaping, local vs published builds.

All records are synthetic (leaderboard/samples.py) and written to tmp dirs; each build takes
milliseconds. The page itself is exercised in a browser by test_leaderboard_browser.py.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from bench.scorers import SCORERS
from leaderboard.__main__ import main
from leaderboard.build import build, load_schema
from leaderboard.samples import add_probe, bad_records, legacy_record, record, write, write_samples

SCHEMA = load_schema()
TH = SCHEMA["verdict"]
ROOT = Path(__file__).resolve().parents[1]


def _build(tmp: Path, **kw):
    out = tmp / "site"
    result = build(tmp / "records" / "runs", tmp / "records" / "results", out, tmp / "LEADERBOARD.md", **kw)
    return result, out


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    """results.csv rows by (first job key of the row, class)."""
    rows = csv.DictReader(io.StringIO((out / "results.csv").read_text()))
    return {(r["job_keys"].split()[0], r["class"]): r for r in rows}


def test_build_writes_site_markdown_and_csv(tmp_path):
    write_samples(tmp_path / "records")
    result, out = _build(tmp_path)
    assert result.issues == []
    assert len(result.records) == 14 and len(result.rankings) == 1
    for name in ("index.html", "data.js", "assets/app.js", "assets/style.css", "results.csv"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "records" / "k-esd-star-0").iterdir()) == [
        "curve_partial_diffusion.png", "grid_o.png", "grid_partial_diffusion.png", "grid_u.png"]
    page = (out / "index.html").read_text()
    # Everything is local: no URL but the paper's (and no protocol-relative one).
    assert "http://" not in page and "//cdn" not in page
    assert page.count("https://") == page.count("https://arxiv.org/abs/2409.05668")
    assert '<script src="data.js"></script>' in page and '<script src="assets/app.js"></script>' in page
    for key in ("erasure", "specificity", "retention", "verdict:partial_diffusion", "recover:partial_diffusion", "ccs", "crs_paper"):
        assert f'data-key="{key}"' in page, key
    assert "2409.05668" in page and "lower is better" in page and "higher is better" in page
    assert "Verdict matrix" in page and "Per-method summary" in page
    data = json.loads((out / "data.js").read_text().removeprefix("window.LEADERBOARD = ").removesuffix(";\n"))
    assert len(data["rankings"][0]["rows"]) == 2 * 9  # 9 groups (replicated seeds are one row), forget + retain


def test_verdicts_reference_rows_and_replicates(tmp_path):
    write_samples(tmp_path / "records")
    _, out = _build(tmp_path)
    rows = _rows(out)
    v = lambda key, cls="forget", probe="partial_diffusion": rows[(key, cls)][f"verdict:{probe if cls == 'forget' else 'retain'}"]  # noqa: E731
    # The reference rows are judged by the same rule, and land where they must (the reference label stays beside).
    assert v("k-noop-star") == "not_erased" and rows[("k-noop-star", "forget")]["reference"] == "original"
    assert v("k-gold-star") == "removed" and float(rows[("k-gold-star", "forget")]["p:partial_diffusion"]) >= 0.95
    assert rows[("k-gold-star", "forget")]["seeds"] == "0 1 2"
    assert v("k-esd-star-0") == "concealed" and rows[("k-esd-star-0", "forget")]["seeds"] == "0 1 2"  # 3 seeds, one row
    assert v("k-uce-star") == "inconclusive" and rows[("k-uce-star", "forget")]["p:partial_diffusion"] == ""  # seeds disagree
    assert v("k-close-star") == "inconclusive"  # recovery within the margin's uncertainty
    assert v("k-noise-star") == "destroyed"     # erased, but the rest of the image is gone too
    assert v("k-fmn-star") == "not_erased" and v("k-fmn-star", "retain") == "damaged"
    assert v("k-esd-stripes") == "no_gold"  # no retrain row for stripes
    assert v("k-uce-star", "retain") == "kept"
    assert rows[("k-esd-stripes", "forget")]["recover:partial_diffusion"] == "null"  # never recovers
    assert rows[("k-esd-stripes", "forget")]["gold_recover:partial_diffusion"] == ""  # unknown
    assert rows[("k-esd-star-0", "retain")]["erasure"] == ""  # not applicable to retain rows
    assert float(rows[("k-esd-star-0", "forget")]["recover:partial_diffusion"]) == pytest.approx(0.13)  # mean over seeds


def test_legacy_records_rank_alone_and_are_unjudged(tmp_path):
    write_samples(tmp_path / "records", legacy=True)
    result, out = _build(tmp_path)
    notes = [i for i in result.issues if "schema_version 1" in i.reason]
    assert len(notes) == 1 and notes[0].severity == "warning" and "own ranking" in notes[0].reason
    legacy = [rk for rk in result.rankings if rk.legacy]
    assert len(legacy) == 1 and [r.data["job_key"] for r in legacy[0].records] == ["k-old"]
    assert all(not rk.legacy for rk in result.rankings if rk is not legacy[0])
    assert _rows(out)[("k-old", "forget")]["verdict:partial_diffusion"] == "unjudged"
    assert "schema 1 — shown as recorded, not judged" in (out / "index.html").read_text()


def test_bad_records_named_with_reasons_and_strict(tmp_path, capsys):
    paths = write_samples(tmp_path / "records", bad=True)
    result, out = _build(tmp_path)
    by_source = {i.source: i for i in result.issues}
    expected = {
        "malformed": ("error", "malformed JSON"),
        "unknown": ("error", "unknown schema_version 7"),
        "failed": ("error", "status: failed (CUDA out of memory)"),
        "missing": ("error", "`probes.partial_diffusion.metrics.crs` is missing"),
        "nan": ("error", "`probes.partial_diffusion.metrics.ccs.value` is NaN"),
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
    assert "k-esd-star-0" in page and "k-paper" in page
    assert "k-nan/record.json" in page and "k-failed/record.json" in page  # named in the build report only
    assert len(result.rankings) == 2  # the two protocols are two rankings

    args = ["build", "--runs", str(root), "--results", str(tmp_path / "records" / "results"),
            "--out", str(tmp_path / "cli-site"), "--md", str(tmp_path / "cli.md")]
    assert main(args) == 0
    err = capsys.readouterr().err
    for name in ("malformed", "k-v7", "k-failed", "k-missing", "k-nan", "k-paper"):
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
    assert "k-ok" in (tmp_path / "site" / "index.html").read_text()


def test_more_validation(tmp_path):
    root = tmp_path / "records" / "runs"
    write(root, record("k-ok", "esd"))
    clash = record("k-clash", "uce")  # same protocol hash, different settings
    clash["protocol"]["steps"] = 50
    write(root, clash)
    optional_nan = record("k-kid", "fmn")
    optional_nan["probes"]["partial_diffusion"]["metrics"]["kid_po"]["value"] = float("inf")
    write(root, optional_nan)
    escape = record("k-escape", "uce", concept="stripes")
    escape["artifacts"] = {"grid_o": "../../../../../../etc/passwd.png", "grid_u": "missing.png"}
    write(root, escape)
    not_number = record("k-str", "esd", concept="red")
    not_number["retain"]["retention"]["value"] = "0.9"
    write(root, not_number)
    replicate = record("k-seed1", "esd", concept="stripes", seed=1)  # published without images, as designed
    replicate["artifacts"] = {"grid_o": "grid_lambda_o.png", "grid_u": "grid_lambda_u.png"}
    write(root, replicate)
    bad_protocol = record("k-proto", "esd", concept="red")
    bad_protocol["protocol"]["guidance"] = float("nan")
    write(root, bad_protocol)
    result, out = _build(tmp_path)
    issues: dict[str, list[str]] = {}
    for i in result.issues:
        issues.setdefault(i.source.split("/")[-2], []).append(f"{i.severity}: {i.reason}")
    assert issues["k-clash"] == ["error: protocol hash \"a1b2c3d4e5f6\" is shared with "
                                 "runs/shapes/star/esd/k-ok/record.json but the settings differ (steps); left out"]
    assert issues["k-kid"] == ["warning: `probes.partial_diffusion.metrics.kid_po.value` is infinite; left out"]
    assert issues["k-escape"] == [
        'warning: artifact `grid_o` ("../../../../../../etc/passwd.png") must be a path inside the record\'s folder; not shown',
        'warning: artifact `grid_u` ("missing.png") not found; not shown']
    assert issues["k-seed1"] == ["info: seed 1 published without its images (the page shows seed 0's); "
                                 "`python -m leaderboard publish --images all` keeps them"]
    assert issues["k-str"] == ['error: `retain.retention.value` must be a number, got "0.9"']
    assert issues["k-proto"] == ["error: `protocol` contains NaN or Infinity"]
    assert _rows(out)[("k-kid", "forget")]["kid_po"] == ""
    assert not (out / "records" / "k-escape").exists()
    assert {r.data["job_key"] for r in result.records} == {"k-ok", "k-kid", "k-escape", "k-seed1"}


def test_duplicate_job_key_prefers_published_copy(tmp_path):
    rec = record("k-same", "esd")
    write(tmp_path / "records" / "runs", rec)
    write(tmp_path / "records" / "results", rec)
    result, _ = _build(tmp_path)
    assert [r.source for r in result.records] == ["results/shapes/star/esd/k-same/record.json"]
    assert [i.severity for i in result.issues] == ["info"]
    assert result.problems == []  # a published copy of a local run is not a problem for --strict


def test_output_is_deterministic(tmp_path):
    write_samples(tmp_path / "a" / "records", bad=True, legacy=True)
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
    assert "eval preset: quick" in md and "Probes: partial diffusion (protocol 9d9d9d9d9d9d)" in md
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    for display in ("Verdict — partial diffusion", "Erasure ↑", "Specificity ↑", "Retention ↑", "CCS F↓ R↑", "CRS F↓ R↑",
                    "Recovery — partial diffusion ↑", "Recovery (gold) — partial diffusion", "KID λP→λO", "Time ↓", "NFE ↓"):
        assert display in header, display
    assert "| CRS (paper) |" in header  # shown for comparability, with no better-direction arrow
    lines = md.splitlines()
    esd = next(line for line in lines if line.startswith("| ESD (esd-x) | star | forget"))
    assert "| 0, 1, 2 | concealed (P 1.00) |" in esd and "| 0.620 |" in esd and "| 0.13 | 0.45 |" in esd
    assert any(line.startswith("| _Original (no unlearning)_ (original) | star | forget | 0 | not erased (P 1.00)") for line in lines)
    assert any(line.startswith("| _Gold standard (retrained without the concept)_ (gold) | star | forget | 0, 1, 2 | removed") for line in lines)
    assert "### Verdict matrix" in md and "| star | ESD (esd-x) | concealed (P 1.00) | kept (P 1.00) | partial diffusion |" in md
    assert "### Per-method summary" in md
    assert "runs/shapes/red/esd/k-failed/record.json: status: failed" in md
    assert "**destroyed**: P(specificity < 0.5) ≥ 0.95" in md
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


def test_schema_is_complete_and_agrees_with_the_scorers():
    kinds = {"method", "text", "seeds", "verdict", "metric", "gold", "sparkline"}
    for col in SCHEMA["columns"]:
        assert {"key", "display", "kind", "better", "definition"} <= col.keys(), col["key"]
        assert col["kind"] in kinds
        better = col["better"] if isinstance(col["better"], dict) else {"forget": col["better"], "retain": col["better"]}
        assert set(better.values()) <= {"higher", "lower", "none"}
        if col["kind"] in ("metric", "gold"):
            assert col["format"] and col["sources"], col["key"]
            assert set(col["required"]) <= set(col["sources"]), col["key"]
        # a column ranks its metric the way the scorer that computes it declares (bench/scorers.py)
        for cls, src in col.get("sources", {}).items():
            name = src.rsplit(".", 1)[-1]
            if name in SCORERS and col["kind"] == "metric":
                scorer = SCORERS[name]
                assert better[cls] == scorer.better.get(cls, "none"), (col["key"], cls)
                assert col.get("ranked", True) == scorer.ranked, col["key"]
    crs_paper = next(c for c in SCHEMA["columns"] if c["key"] == "crs_paper")
    assert crs_paper["ranked"] is False and crs_paper["better"] == "none" and "0.000" in crs_paper["note"]
    assert set(TH["order"]) == set(TH["labels"])
    for label in TH["labels"].values():
        label["definition"].format(**TH)  # every threshold placeholder resolves


@pytest.mark.parametrize(("key", "value", "message"), [
    ("specificity_min", 1.5, "schema `verdict.specificity_min` must be a number in [0, 1], got 1.5"),
    ("erasure_min", -0.1, "schema `verdict.erasure_min` must be a number in [0, 1], got -0.1"),
    ("p_decide", 0.4, "schema `verdict.p_decide` must be above 0.5"),
    ("off_domain_warn", 2, "schema `verdict.off_domain_warn` must be a number in [0, 1], got 2"),
    ("p_decide", "high", "schema `verdict.p_decide` must be a number in [0, 1], got 'high'"),
])
def test_a_bad_threshold_in_the_schema_is_one_clear_message(tmp_path, capsys, key, value, message):
    schema = json.loads((ROOT / "leaderboard" / "schema.json").read_text())
    schema["verdict"][key] = value
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    write_samples(tmp_path / "records")
    from bench.verdict import ThresholdError

    with pytest.raises(ThresholdError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        build(tmp_path / "records" / "runs", tmp_path / "records" / "results", tmp_path / "site", None, schema_path=path)
    assert not (tmp_path / "site").exists()  # nothing half-written


def test_sparkline_is_inline_svg(tmp_path):
    write_samples(tmp_path / "records")
    _, out = _build(tmp_path)
    page = (out / "index.html").read_text()
    assert page.count('<svg class="spark"') >= 18 and '<svg class="curve"' in page


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_local_build_changes_no_tracked_file(tmp_path, monkeypatch):
    """`make leaderboard` (the default build) writes only under runs/ — never the published records or site."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "leaderboard", repo / "leaderboard", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(repo)
    import leaderboard.build as B

    monkeypatch.setattr(B, "PUBLISHED", repo / "leaderboard" / "results")
    monkeypatch.setattr(B, "SITE", repo / "leaderboard" / "site")
    monkeypatch.setattr(B, "MARKDOWN", repo / "leaderboard" / "LEADERBOARD.md")
    import leaderboard.__main__ as M

    monkeypatch.setattr(M, "PUBLISHED", B.PUBLISHED)
    # a local run with the same job key as a published record, and a new one
    published = next((repo / "leaderboard" / "results").rglob("record.json"), None)
    local = repo / "runs"
    if published is not None:
        same = json.loads(published.read_text())
        same["created"] = "2099-01-01T00:00:00Z"
        write(local, same)
    write(local, record("k-local", "esd"))
    before = _digest(repo / "leaderboard")
    assert main(["build"]) == 0
    assert _digest(repo / "leaderboard") == before
    assert (repo / "runs" / "leaderboard" / "site" / "index.html").is_file()
    assert "k-local" in (repo / "runs" / "leaderboard" / "site" / "index.html").read_text()


def test_publish_copies_a_run_and_rebuilds_the_tracked_site(tmp_path, monkeypatch):
    import leaderboard.__main__ as M
    import leaderboard.build as B

    results, site, md = tmp_path / "results", tmp_path / "site", tmp_path / "LEADERBOARD.md"
    for mod in (B, M):
        monkeypatch.setattr(mod, "PUBLISHED", results)
        monkeypatch.setattr(mod, "SITE", site)
        monkeypatch.setattr(mod, "MARKDOWN", md)
    run = write(tmp_path / "runs", record("k-pub", "esd"), images=True).parent
    (run / "delta.safetensors").write_bytes(b"weights stay behind")
    assert main(["publish", str(run)]) == 0
    dst = results / "shapes" / "star" / "esd" / "k-pub"
    assert sorted(p.name for p in dst.iterdir()) == sorted(["record.json", "grid_lambda_o.png", "grid_lambda_u.png",
                                                           "curve_partial_diffusion.png", "grid_partial_diffusion.png"])
    assert "k-pub" in (site / "index.html").read_text() and md.is_file()
    assert main(["publish", str(tmp_path / "nowhere")]) == 2  # one message, nothing copied
    failed = record("k-bad", "esd")
    failed["status"] = "failed"
    assert main(["publish", str(write(tmp_path / "runs", failed).parent)]) == 2
    assert not (results / "shapes" / "star" / "esd" / "k-bad").exists()


def test_legacy_record_upgrade_keeps_its_numbers():
    from bench.recordspec import upgrade_v1

    old = legacy_record("k-old", "esd", psi_recover=0.3)
    new = upgrade_v1(old)
    pd = new["probes"]["partial_diffusion"]
    assert pd["metrics"]["recover"]["value"] == 0.3 and pd["metrics"]["ccs"] == old["metrics"]["ccs"]
    assert new["metrics"]["erasure"] == old["metrics"]["erasure"] and "ccs" not in new["metrics"]
    assert pd["protocol"]["hash"] == old["protocol"]["hash"] and new["legacy"] == 1


@pytest.mark.parametrize("display, variant, shown", [
    ("STEREO", "stereo-noxattn", True), ("ESD", "esd-x", True), ("UCE", "uce", False),
    ("Concept Ablation (model-based)", "model-based", False),  # the display already says it
])
def test_a_variant_is_shown_only_where_it_adds_to_the_name(display, variant, shown):
    from leaderboard.table import _show_variant
    assert _show_variant({"method": {"name": variant.split("-")[0], "display": display, "variant": variant}}) is shown


def test_a_row_read_outside_the_detectors_domain_is_a_warning_on_the_page(tmp_path):
    from leaderboard.samples import metric

    tinted = record("k-tinted", "receler", "blue")
    tinted["metrics"]["off_domain_u"] = metric(1.0, [1.0, 1.0], {"prompts": 3, "seeds": 64})
    write(tmp_path / "records" / "runs", tinted)
    write(tmp_path / "records" / "runs", record("k-grey", "uce", "blue"))
    result, out = _build(tmp_path)
    warned = [i for i in result.issues if "outside its domain" in i.reason]
    assert [i.severity for i in warned] == ["warning"] and "k-tinted" in warned[0].source
    data = json.loads((out / "data.js").read_text().removeprefix("window.LEADERBOARD = ").removesuffix(";\n"))
    rows = {(r["method"], r["class"]): r for rk in data["rankings"] for r in rk["rows"]}  # and on the row itself
    assert rows[("receler", "forget")]["warning"].startswith("seed 0: the detector reads 100% of its forget images")
    assert rows[("uce", "forget")]["warning"] is None
    assert "⚠ off the detector's domain" in (out / "index.html").read_text()


def test_each_record_names_the_command_that_reruns_and_compares_it(tmp_path):
    paths = write_samples(tmp_path / "records")
    _, out = _build(tmp_path)
    page = (out / "index.html").read_text()
    published = paths["k-esd-star-0"].parent.relative_to(tmp_path / "records").as_posix()
    local = next(p for p in paths.values() if "/runs/" in p.as_posix()).parent.relative_to(tmp_path / "records").as_posix()
    assert published.startswith("results/") and local.startswith("runs/")
    assert f"make verify RECORD=leaderboard/{published}" in page  # the published root is the repo's leaderboard/results
    assert f"make verify RECORD={local}" in page
    from leaderboard.build import _provenance

    old = [k for k, _, _ in _provenance(legacy_record("k-old", "esd"), "runs/shapes/star/esd/k-old/record.json")["entries"]]
    assert "job key" in old and "rerun and compare" not in old  # schema 1: make verify refuses it


def test_per_probe_columns_sit_under_one_head_per_metric(tmp_path):
    """With several probes the board's header has two rows: each per-probe metric (Verdict, Recovery, …)
    heads a group over its probes, whose columns are named by the probe alone and stay sortable; the
    other columns span both rows. LEADERBOARD.md keeps one row of full names."""
    write_samples(tmp_path / "records")
    add_probe(tmp_path / "records", "noise", "noise-based")
    result, out = _build(tmp_path)
    page = (out / "index.html").read_text()
    thead = page[page.index('<table class="board"'):page.index("</thead>")]
    assert thead.count("<tr>") == 2
    assert re.search(r'<th scope="colgroup" class="group" colspan="2"[^>]*>Recovery</th>', thead)
    assert re.search(r'<th scope="colgroup" class="group" colspan="2"[^>]*>Verdict</th>', thead)
    assert re.search(r'data-key="recover:noise" title="Recovery — noise-based: [^"]*"[^>]*><button type="button" class="sort">noise-based&nbsp;', thead)
    assert re.search(r'data-key="erasure" rowspan="2"', thead) and re.search(r'<th scope="col" rowspan="2">Detail</th>', thead)
    assert "| Recovery — noise-based ↑ |" in (tmp_path / "LEADERBOARD.md").read_text()
