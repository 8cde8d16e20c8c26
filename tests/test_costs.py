"""``python -m bench.costs``: a probe suite priced from the config alone (the counts themselves are
held to the NFE counter per probe in test_probes.py)."""
from __future__ import annotations

import json

from bench.costs import main


def test_probes_all_on_sd14_is_priced_without_loading_a_model(tmp_path, capsys):
    out = tmp_path / "costs.json"
    assert main(["model=sd14", "concept=van_gogh", "probes=all", "eval=paper", "--row-ms", "10", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["probes"]) == {"partial_diffusion", "inversion", "relearn", "noise", "completion", "inpainting", "adversarial_prompt"}
    inv = data["probes"]["inversion"]
    assert inv["train"] == 2 * 3000 * 4 and inv["theta"] == 25 * 100 * 2  # conf/world_probes/sd.yaml: 3000 steps × batch 4; 25 θ images
    assert data["probe_seconds_total"] > 0 and "assumed 10 ms" in capsys.readouterr().out


def test_a_gpu_smoke_measurement_sets_the_row_cost(tmp_path, capsys):
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"device": "cuda:0", "stages": [{"stage": "attack (θ* continuations)", "per_unit": 0.02}]}))
    assert main(["concept=star", "probes=[noise]", "--smoke", str(smoke), "--json", str(tmp_path / "c.json")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["row_seconds"] == 0.02 and data["seconds"]["noise"] == data["probes"]["noise"]["sample"] * 0.02


def test_an_unknown_probe_is_one_message_and_exit_2(capsys):
    assert main(["probes=[bogus]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probes/bogus" in err
