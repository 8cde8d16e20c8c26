"""scripts/bench_probes.py: timings come from current-schema records only, per method and probe set."""
import json
from pathlib import Path

import pytest

from tests.conftest import load_script


def _load():
    return load_script("bench_probes")


def _record(folder: Path, name: str, method: str, schema: int, total: float, unlearn: float, probes: dict,
            resumed: dict | None = None, others: dict | None = None, generate: float | None = None) -> None:
    """``others``: CPUs other work took, per probe name and "job" (absent: an older record that did not measure)."""
    (folder / name).mkdir(parents=True)
    load = {k: {"others_cpus": v, "cpus": 2} for k, v in (others or {}).items()}
    r = {"schema_version": schema, "method": {"name": method}, "env": {"threads": 2}, "resumed": resumed or {},
         "cost": {"total_seconds": total, "unlearn": {"seconds": unlearn}, **load.get("job", {}), "generate": {"seconds": generate},
                  "probes": {k: {"seconds": v, **load.get(k, {})} for k, v in probes.items()}}}
    (folder / name / "record.json").write_text(json.dumps(r))


def test_first_wave_records_are_left_out_and_jobs_grouped_by_method_and_probes(tmp_path):
    bp = _load()
    _record(tmp_path, "a", "uce", bp.SCHEMA_VERSION, 300.0, 0.0, {"partial_diffusion": 150.0})
    _record(tmp_path, "b", "uce", bp.SCHEMA_VERSION, 500.0, 100.0, {"partial_diffusion": 170.0})
    _record(tmp_path, "c", "uce", bp.SCHEMA_VERSION, 900.0, 0.0, {"partial_diffusion": 150.0, "inversion": 50.0})
    _record(tmp_path, "old", "uce", 1, 40.0, 0.0, {"partial_diffusion": 20.0})  # another protocol: not timed here
    s = bp.summarise(bp._records(tmp_path, 2))
    assert s["probes"]["partial_diffusion"]["n"] == 3 and s["probes"]["partial_diffusion"]["min"] == 150.0
    pd = s["per_method"]["uce | partial_diffusion"]
    assert pd["job_without_unlearn"]["n"] == 2 and pd["job_without_unlearn"]["median"] == 350.0
    assert pd["unlearn"]["median"] == 50.0
    assert s["per_method"]["uce | all"]["job_without_unlearn"]["median"] == 900.0
    assert "| uce | partial_diffusion | 2 | 350 |" in bp.table(s, "test")


def test_a_resumed_job_times_only_the_stages_it_ran(tmp_path):
    # a probe added to a finished job: partial diffusion was reused (its 0.4 s is no cost), inversion ran; the job's
    # total is part of a job, so it is not a job time either
    bp = _load()
    _record(tmp_path, "a", "uce", bp.SCHEMA_VERSION, 300.0, 0.0, {"partial_diffusion": 150.0})
    _record(tmp_path, "b", "uce", bp.SCHEMA_VERSION, 60.0, 0.0, {"partial_diffusion": 0.4, "inversion": 50.0},
            resumed={"partial_diffusion prepare": 1, "partial_diffusion": 12, "λ_U": 12})
    s = bp.summarise(bp._records(tmp_path, 2))
    assert s["probes"]["partial_diffusion"] == {"n": 1, "median": 150.0, "min": 150.0, "max": 150.0, "per_generate": {"n": 0}}
    assert s["probes"]["inversion"]["n"] == 1 and s["probes"]["inversion"]["median"] == 50.0
    assert s["job_without_unlearn"]["n"] == 1 and "uce | all" not in s["per_method"]


def test_times_measured_beside_other_work_are_left_out_and_counted(tmp_path):
    # b's inversion ran while another job kept a core busy: its 140 s is contention, not the probe's cost; its
    # partial diffusion ran alone. c predates the measurement: kept, and counted as unmeasured.
    bp = _load()
    _record(tmp_path, "a", "uce", bp.SCHEMA_VERSION, 300.0, 0.0, {"inversion": 50.0}, others={"job": 0.01, "inversion": 0.0})
    _record(tmp_path, "b", "uce", bp.SCHEMA_VERSION, 700.0, 0.0, {"partial_diffusion": 150.0, "inversion": 140.0},
            others={"job": 0.6, "partial_diffusion": 0.05, "inversion": 1.1})
    _record(tmp_path, "c", "uce", bp.SCHEMA_VERSION, 310.0, 0.0, {"inversion": 55.0})
    s = bp.summarise(bp._records(tmp_path, 2))
    assert s["probes"]["inversion"]["n"] == 2 and s["probes"]["inversion"]["max"] == 55.0
    assert s["probes"]["partial_diffusion"]["n"] == 1
    assert s["job_without_unlearn"]["n"] == 2 and s["job_without_unlearn"]["max"] == 310.0
    assert s["load"] == {"beside other work": 2, "load not measured": 2}
    assert "left out as run beside other work: 2" in bp.table(s, "test")


def test_a_probe_is_also_timed_against_its_own_jobs_generation(tmp_path):
    # the same job on a host 1.5x slower: seconds move, the ratio to the job's own λ_U generation does not; a job
    # that reused its λ_U timed that stage on another day, so it has no yardstick
    bp = _load()
    _record(tmp_path, "fast", "noop", bp.SCHEMA_VERSION, 300.0, 0.0, {"partial_diffusion": 100.0}, generate=44.0)
    _record(tmp_path, "slow", "noop", bp.SCHEMA_VERSION, 450.0, 0.0, {"partial_diffusion": 150.0}, generate=66.0)
    _record(tmp_path, "reused", "noop", bp.SCHEMA_VERSION, 60.0, 0.0, {"partial_diffusion": 20.0, "noise": 90.0},
            resumed={"partial_diffusion": 12, "λ_U": 12}, generate=1.0)
    s = bp.summarise(bp._records(tmp_path, 2))
    pd = s["probes"]["partial_diffusion"]
    assert pd["n"] == 2 and pd["per_generate"]["n"] == 2
    assert pd["per_generate"]["min"] == pytest.approx(100 / 44) and pd["per_generate"]["max"] == pytest.approx(150 / 66)
    assert s["probes"]["noise"]["n"] == 1 and s["probes"]["noise"]["per_generate"] == {"n": 0}
    assert "| partial_diffusion | 2 | 125 | 100 | 150 | no | 2.27 (2.27–2.27) |" in bp.table(s, "test")
