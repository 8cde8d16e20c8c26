"""scripts/calibrate_probes.py: the rule a probe's Shapes settings are held to, and its check on the published records."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cp():
    return load_script("calibrate_probes")


def _row(method, concept, recover, axis=(0, 100, 200, 300)):
    return {"method": method, "concept": concept, "axis": list(axis), "recover": {"value": recover}}


def test_rule_needs_theta_at_the_axis_start_and_the_gold_past_its_first_third(cp):
    assert cp.eligible([_row("noop", "star", 0), _row("retrain", "star", None)]) == (True, "eligible")
    ok, why = cp.eligible([_row("noop", "star", 100), _row("retrain", "blue", 25)])
    assert not ok
    assert "θ does not recover at 0 on star" in why and "the gold recovers at 25 < 100 on blue" in why
    assert cp.eligible([_row("retrain", "blue", 100)])[0]  # exactly at the third is allowed


def test_check_of_the_defaults_reads_the_published_records(tmp_path):
    out = tmp_path / "check.md"
    r = subprocess.run([sys.executable, "scripts/calibrate_probes.py", "--probe", "inpainting", "--records", "leaderboard/results/shapes",
                        "--methods", "noop", "retrain", "--concepts", "star", "stripes", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "--out" in text and "--threads" not in text  # the command shown is the one that wrote it; records mode runs no jobs
    # a centred mask leaves the stripes in the kept frame: the stripes gold recovers early, and the check says so
    assert "the defaults fail the rule (the gold recovers at 0.25 < 0.367 on stripes)" in text


def _judged(method, concept, recover_reps, axis=(0, 100, 200)):
    reps = [0.9] * 20  # erasure and specificity well past their gates: the probe decides
    return {"method": method, "concept": concept, "axis": list(axis), "recover": {"value": None},
            "metrics": {"erasure": {"value": 0.9, "replicates": reps}, "specificity": {"value": 0.9, "replicates": reps}},
            "block": {"axis": {"values": list(axis)}, "metrics": {"recover": {"replicates": recover_reps, "design": "d"}}}}


def test_a_screen_judges_method_rows_against_their_concepts_gold_by_the_board_rule(cp):
    rows = [_judged("retrain", "star", [None] * 20), _judged("rece", "star", [None] * 20),
            _judged("mace", "star", [10.0] * 20), _judged("uce", "blue", [10.0] * 20), _judged("noop", "star", [0.0] * 20)]
    cp.judge(rows, "adversarial_prompt")
    by = {(r["method"], r["concept"]): r.get("verdict") for r in rows}
    assert by[("rece", "star")].key == "removed" and by[("rece", "star")].probability == 1.0
    assert by[("mace", "star")].key == "concealed"  # back at 10 iterations where the gold never is
    assert by[("uce", "blue")] is None and by[("noop", "star")] is None and by[("retrain", "star")] is None  # no gold / references
    assert cp._cell(rows[1]) == "never — removed (1.00)" and cp._cell(rows[0]) == "never"  # no replicate recovers: no share
    rows[1]["recover"]["replicates"] = [None] * 19 + [150.0]
    assert cp._cell(rows[1]) == "never (5.0% of replicates recover) — removed (1.00)"
