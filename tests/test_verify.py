"""``make verify`` (bench/verify.py): which differences between a record and its rerun count, the
verdicts compared against the same gold, the outcome, bad input, and a real rerun of a smoke job."""
import copy
import json
import shutil
from pathlib import Path

import pytest

from bench import verify
from bench.run import execute
from tests.conftest import needs_world
from tests.test_bench_e2e import cfg_with

ROOT = Path(__file__).resolve().parents[1]
# The published ESD-x row on star, seed 0, with every probe: detector- and embedding-based numbers,
# forget and retain prompts, a gold standard to judge against.
PUBLISHED = ROOT / "leaderboard" / "results" / "shapes" / "star" / "esd_x" / "ba17258f23ee"


@pytest.fixture(scope="module")
def record():
    return json.loads((PUBLISHED / "record.json").read_text())


def _forget_and_retain(rec):
    classes = [p["class"] for p in rec["prompts"]]
    return classes.index("forget"), classes.index("retain")


def test_a_record_reproduces_itself_and_provenance_is_not_compared(record):
    rerun = copy.deepcopy(record)
    rerun["created"], rerun["env"]["cpu_isa"] = "2030-01-01T00:00:00Z", "AVX2"
    rerun["cost"]["total_seconds"] *= 3
    rerun["probes"]["partial_diffusion"]["cost"]["seconds"] = 1.0
    rerun["unlearn"]["seconds"] = 1.0
    rerun["config"]["out_dir"], rerun["config"]["threads"] = "/elsewhere", 1
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "reproduced" and rep["reproduced"]
    assert rep["exact"]["compared"] > 10_000 and rep["embedding"]["compared"] > 5_000
    assert not rep["exact"]["differ"] and not rep["embedding"]["differ"] and not rep["missing"]
    assert rep["env"] == {"cpu_isa": [None, "AVX2"]}
    assert [v["probe"] for v in rep["verdicts"]] == [*record["probes"], "retain"] and all(v["same"] for v in rep["verdicts"])


def test_a_detector_based_number_must_be_equal(record):
    rerun = copy.deepcopy(record)
    rerun["metrics"]["erasure"]["value"] += 1e-12
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "not reproduced"
    assert [d["field"] for d in rep["exact"]["differ"]] == ["metrics.erasure.value"]


def test_an_embedding_based_number_may_move_within_the_tolerance(record):
    rerun = copy.deepcopy(record)
    rerun["probes"]["partial_diffusion"]["metrics"]["kid_po"]["value"] += 1e-8
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "reproduced" and rep["embedding"]["within"] == 1
    assert rep["embedding"]["max_at"] == "probes.partial_diffusion.metrics.kid_po.value"
    rerun["probes"]["partial_diffusion"]["metrics"]["ccs"]["value"] += 1e-3
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "verdicts reproduced" and not rep["reproduced"]
    assert [d["field"] for d in rep["embedding"]["differ"]] == ["probes.partial_diffusion.metrics.ccs.value"]


def test_a_prompt_recovery_point_is_exact_on_forget_prompts_and_classifier_based_on_retain_prompts(record):
    """Per-prompt rows carry no ``basis``: a forget prompt's recovery point counts the detector's
    decisions, a retain prompt's is read from the classifier's P(original) (bench/scorers.py)."""
    f, r = _forget_and_retain(record)
    for i, outcome in ((f, "not reproduced"), (r, "reproduced")):
        rerun = copy.deepcopy(record)
        rec = rerun["prompts"][i]["probes"]["partial_diffusion"]["metrics"]["recover"]
        assert rec["value"] is not None, i
        rec["value"] += 1e-9
        assert verify.report(record, rerun)["outcome"] == outcome, i
    rerun = copy.deepcopy(record)
    rerun["probes"]["partial_diffusion"]["retain"]["recover"]["value"] += 1e-9  # its block says basis p_original
    assert verify.report(record, rerun)["outcome"] == "reproduced"


def test_a_changed_verdict_is_named(record):
    rerun = copy.deepcopy(record)
    rerun["metrics"]["specificity"]["replicates"] = [0.0] * len(record["metrics"]["specificity"]["replicates"])
    rep = verify.report(record, rerun)
    changed = [v for v in rep["verdicts"] if not v["same"]]
    assert changed and all(v["rerun"]["key"] == "destroyed" for v in changed)
    assert rep["outcome"] == "not reproduced"
    text = "\n".join(verify.lines(record, rerun, rep))
    assert "DIFFERENT" in text and "NOT REPRODUCED" in text


def test_new_fields_are_listed_missing_fields_fail_and_unshared_probes_are_left_out(record):
    rerun = copy.deepcopy(record)
    for row in rerun["prompts"]:
        row["metrics"]["new_metric"] = {"value": 0.5}
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "reproduced" and rep["added"] == ["prompts[].metrics.new_metric"]
    del rerun["metrics"]["specificity"]["ci"]
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "not reproduced" and rep["missing"] == ["metrics.specificity.ci"]
    rerun = copy.deepcopy(record)  # a rerun of partial diffusion alone: the other probes are not compared
    for name in list(rerun["probes"]):
        if name != "partial_diffusion":
            del rerun["probes"][name], rerun["config"]["probes"][name]
    for row in rerun["prompts"]:
        row["probes"] = {"partial_diffusion": row["probes"]["partial_diffusion"]}
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "reproduced" and rep["probes_only"]["record"] == sorted(set(record["probes"]) - {"partial_diffusion"})
    assert [v["probe"] for v in rep["verdicts"]] == ["partial_diffusion", "retain"]


def _write(tmp_path, name, rec):
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "record.json").write_text(json.dumps(rec))
    return d


def test_bad_input_is_one_message_and_exit_2(tmp_path, record, capsys):
    failed = _write(tmp_path, "failed", {**record, "status": "failed"})
    old = _write(tmp_path, "old", {**record, "schema_version": 1})
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "record.json").write_text("{bad")
    cases = [
        ([str(tmp_path / "nothing")], "no readable record.json"),
        ([str(tmp_path / "notjson")], "is not JSON"),
        ([str(failed)], "its status is 'failed'"),
        ([str(old)], "made under record schema 1"),
        ([str(PUBLISHED), "--tolerance", "2"], "`--tolerance` must be in [0, 1), got 2"),
        ([str(PUBLISHED), "--against", str(failed)], "its status is 'failed'"),
    ]
    for argv, message in cases:
        assert verify.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, (argv, err)
    assert not list((tmp_path).glob("**/verify.json"))


def test_against_compares_two_finished_records_without_running(tmp_path, record, capsys):
    same = _write(tmp_path, "same", record)
    assert verify.main([str(PUBLISHED), "--against", str(same)]) == 0
    assert "REPRODUCED: every verdict" in capsys.readouterr().out
    moved = copy.deepcopy(record)
    moved["metrics"]["detect_u"]["value"] = 0.5
    assert verify.main([str(PUBLISHED), "--against", str(_write(tmp_path, "moved", moved))]) == 1
    assert "metrics.detect_u.value" in capsys.readouterr().out


@needs_world
def test_a_smoke_job_rerun_from_its_record_reproduces(tmp_path, capsys):
    """The real path: a job, then ``verify`` rebuilds it from the record's own config into another
    folder (nothing shared but the λ_O cache) and compares."""
    assert execute(cfg_with(tmp_path, "method=noop", "concept=star", "threads=1")) == 0
    (rec_file,) = (tmp_path / "runs").rglob("record.json")
    published = tmp_path / "published"
    shutil.copytree(rec_file.parent, published)
    capsys.readouterr()
    assert verify.main([str(published), "--out", str(tmp_path / "verify")]) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED: every verdict" in out
    (again,) = (tmp_path / "verify").rglob("record.json")
    assert again.parent.name == rec_file.parent.name  # the same job key: the config was rebuilt faithfully
    rep = json.loads((again.parent / "verify.json").read_text())
    assert rep["outcome"] == "reproduced" and rep["exact"]["compared"] > 100
    assert json.loads(again.read_text())["config"]["logger"]["name"] == "none"


def test_the_rerun_takes_the_records_thread_count_and_says_when_the_kernels_differ(record, monkeypatch, tmp_path):
    import bench.record
    import bench.run

    seen = {}
    monkeypatch.setattr(bench.run, "execute", lambda cfg: seen.update(threads=cfg.threads, logger=cfg.logger.name, out=cfg.out_dir) or 2)
    rec = {**record, "env": {**record["env"], "threads": 1, "cpu_isa": "AVX2"}, "config": {**record["config"], "threads": None}}
    assert verify.rerun(rec, str(tmp_path)) == (2, None)
    assert seen == {"threads": 1, "logger": "none", "out": str(tmp_path)}
    verify.rerun(rec, str(tmp_path), threads=2)
    assert seen["threads"] == 2
    monkeypatch.setattr(bench.record, "cpu_isa", lambda: "AVX512")
    assert "ATEN_CPU_CAPABILITY=avx2" in verify.isa_note(rec)
    assert verify.isa_note({**rec, "env": {**rec["env"], "cpu_isa": "AVX512"}}) is None
    monkeypatch.setattr(bench.record, "cpu_isa", lambda: "AVX2")
    assert "needs a CPU with AVX512" in verify.isa_note({**rec, "env": {**rec["env"], "cpu_isa": "AVX512"}})


def test_text_is_compared_exactly_even_inside_an_embedding_block(record):
    rerun = copy.deepcopy(record)
    rerun["probes"]["adversarial_prompt"]["protocol"]["probe"]["loss"] = "l1"  # a setting named like the inversion's loss curve
    rep = verify.report(record, rerun)
    assert rep["outcome"] == "not reproduced"
    assert [d["field"] for d in rep["exact"]["differ"]] == ["probes.adversarial_prompt.protocol.probe.loss"]


def test_a_local_run_is_judged_against_the_gold_its_own_job_found(tmp_path, record):
    """A job looks for its gold under its own out_dir first (bench.run.find_gold), so verify does too."""
    from bench.run import PUBLISHED

    published_gold = verify._golds(record)["partial_diffusion"]
    golds = {p: json.loads(p.read_text()) for p in (PUBLISHED / "shapes" / "star" / "retrain").glob("*/record.json")}
    gold_file = next(p for p, g in golds.items() if (g.get("probes") or {}).get("partial_diffusion") == published_gold)
    local_gold = golds[gold_file]
    local_gold["probes"]["partial_diffusion"]["metrics"]["recover"]["value"] = 0.123
    runs = tmp_path / "runs"
    _write(runs / "shapes" / "star" / "retrain", gold_file.parent.name, local_gold)
    rec_dir = runs / "shapes" / "star" / "esd_x" / record["job_key"]
    _write(rec_dir.parent, record["job_key"], record)
    assert verify.out_dir_of(rec_dir / "record.json") == runs.resolve()
    assert verify._golds(record, runs)["partial_diffusion"]["metrics"]["recover"]["value"] == 0.123
    assert verify._golds(record)["partial_diffusion"]["metrics"]["recover"]["value"] != 0.123


def test_a_record_that_names_no_isa_and_misses_on_avx512_gets_the_avx2_hint(record):
    rerun = copy.deepcopy(record)
    rerun["env"]["cpu_isa"] = "AVX512"
    rerun["probes"]["partial_diffusion"]["metrics"]["ccs"]["value"] += 1e-3
    assert "cpu_isa" not in record["env"]
    text = "\n".join(verify.lines(record, rerun, verify.report(record, rerun)))
    assert "VERDICTS REPRODUCED" in text and "ATEN_CPU_CAPABILITY=avx2" in text
    named = {**record, "env": {**record["env"], "cpu_isa": "AVX512"}}
    assert "ATEN_CPU_CAPABILITY" not in "\n".join(verify.lines(named, rerun, verify.report(named, rerun)))
