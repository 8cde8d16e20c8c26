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
