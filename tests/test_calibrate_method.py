"""scripts/calibrate_method.py: a screen row is reused only while its hyperparameters match."""
from pathlib import Path

import pytest

from tests.conftest import load_script

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def cm(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the script imports its sibling calibration_common
    return load_script("calibrate_method")


def test_matching_row_is_reused(cm):
    rows = {"as shipped | star": {"entry": "", "detect_u": 0.2, "params": {"lr": 5e-3, "steps": 50}}}
    assert cm.reuse(rows, "as shipped | star", {"lr": 5e-3, "steps": 50})
    assert list(rows) == ["as shipped | star"]


def test_row_from_an_earlier_override_is_kept_under_its_values_and_rerun(cm):
    rows = {"as shipped | star": {"entry": "", "detect_u": 1.0, "params": {"lr": 1e-3, "steps": 50}}}
    assert not cm.reuse(rows, "as shipped | star", {"lr": 5e-3, "steps": 50})
    assert list(rows) == ["lr=0.001 | star"]
    assert rows["lr=0.001 | star"]["entry"] == "lr=0.001" and rows["lr=0.001 | star"]["detect_u"] == 1.0


def test_rows_without_params_predate_them_and_are_reused(cm):
    rows = {"lr=1e-2 | red": {"entry": "lr=1e-2", "detect_u": 0.44}}
    assert cm.reuse(rows, "lr=1e-2 | red", {"lr": 1e-2})
    assert not cm.reuse(rows, "lr=2e-2 | red", {"lr": 2e-2})


def test_plain_drops_the_context_and_makes_json_values(cm):
    assert cm._plain({"lr": 1e-2, "ctx": object(), "grid": (1, 2), "path": Path("a")}) == {"lr": 1e-2, "grid": [1, 2], "path": "a"}
