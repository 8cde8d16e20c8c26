"""scripts/interval_budget.py: where the gold's recovery interval comes from (prompts vs seeds)."""
import json
from pathlib import Path

import numpy as np

from tests.conftest import load_script

XS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def _load():
    return load_script("interval_budget")


def _curve(at: int) -> list[float]:
    return [0.0 if i < at else 1.0 for i in range(len(XS))]


def _record(folder: Path, method: str, crossings: list[int], replicates: list, design: str = "d1") -> None:
    prompts = [{"class": "forget", "prompt": f"p{i}", "probes": {"partial_diffusion": {
        "curve": [{"x": x, "detection": d} for x, d in zip(XS, _curve(k), strict=True)]}}} for i, k in enumerate(crossings)]
    r = {"schema_version": _load().SCHEMA_VERSION, "status": "ok", "seed": 0, "method": {"name": method},
         "concept": {"name": "star"}, "prompts": prompts,
         "probes": {"partial_diffusion": {"axis": {"values": XS}, "metrics": {"recover": {
             "value": 0.3, "ci": [0.2, 0.4], "n": {"prompts": len(crossings), "seeds": 16},
             "replicates": replicates, "design": design}}}}}
    (folder / method).mkdir(parents=True)
    (folder / method / "record.json").write_text(json.dumps(r))


def test_identical_prompts_leave_no_prompt_level_width_and_more_prompts_narrow_a_spread():
    ib = _load()
    same = np.array([_curve(3)] * 6, float)
    assert ib.prompt_level_half_width(XS, same, 6) == 0.0
    spread = np.array([_curve(k) for k in (1, 2, 3, 4, 5, 6)], float)
    w6, w24 = ib.prompt_level_half_width(XS, spread, 6), ib.prompt_level_half_width(XS, spread, 24)
    assert w6 > 0.05 and w24 < 0.7 * w6  # ≈ 1/√4 of the width with four times the prompts


def test_paired_width_uses_only_rows_of_the_gold_design(tmp_path, capsys):
    ib = _load()
    gold = [0.3 + 0.01 * (i % 11) for i in range(200)]
    _record(tmp_path, "retrain", [1, 2, 3, 4, 5, 6], gold)
    _record(tmp_path, "uce", [0] * 6, [g - 0.2 for g in gold])               # moves with the gold: width 0
    _record(tmp_path, "fmn", [0] * 6, [0.1] * 200, design="another")          # other draws: not paired
    rows = ib.budget(tmp_path, "partial_diffusion", [12], 500)
    assert len(rows) == 1 and rows[0]["paired"] == {"rows": 1, "median": 0.0, "max": 0.0}
    assert rows[0]["prompt_level"]["6"] > rows[0]["prompt_level"]["12"]
    assert ib.main([str(tmp_path), "--prompts", "12", "--n-boot", "200", "--plot", str(tmp_path / "w.png")]) == 0
    assert "| star | 0 | 0.30 [0.20, 0.40] | ±0.100 |" in capsys.readouterr().out
    assert (tmp_path / "w.png").stat().st_size > 1000


def test_bad_input_is_one_message_and_exit_2(tmp_path, capsys):
    ib = _load()
    assert ib.main([str(tmp_path / "missing")]) == 2
    assert ib.main([str(tmp_path), "--prompts", "1"]) == 2
    assert ib.main([str(tmp_path)]) == 2  # no gold record
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "`folder`" in err[0] and "`--prompts`" in err[1] and "no gold record" in err[2]
