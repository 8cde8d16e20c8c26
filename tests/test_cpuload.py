"""bench/cpuload.py: a job's records say whether other work shared its cores while it was timed."""
import subprocess
import sys
import time

import pytest

from bench import cpuload
from bench.cpuload import OtherLoad, busy


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.mark.skipif(not cpuload.STAT.exists(), reason="no /proc/stat on this system")
def test_another_process_counts_and_this_one_does_not():
    # this process's own CPU time is the job's and never "other work"; a child spinning for the whole stretch is
    # about one CPU of it (at least 0.5 whatever else the machine runs: other load only adds)
    mine = OtherLoad()
    _spin(0.5)
    own = mine.stop()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # let it start
        theirs = OtherLoad()
        time.sleep(1.5)
        other = theirs.stop()
    finally:
        child.kill()
        child.wait()
    assert other["cpus"] >= 1 and other["others_cpus"] >= 0.5
    assert own["others_cpus"] < other["others_cpus"]


def test_without_proc_stat_the_load_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(cpuload, "STAT", tmp_path / "missing")
    assert OtherLoad().stop() == {"others_cpus": None, "cpus": None}
    assert busy({"others_cpus": None, "cpus": None}, 2) is None and busy(None, 2) is None


@pytest.mark.parametrize("others, cpus, threads, expected", [
    (0.02, 2, 2, False),   # alone on a 2-core machine
    (1.0, 2, 1, True),     # two 1-thread jobs on 2 cores: each slows the other
    (0.9, 2, 2, True),     # a 2-thread job beside anything that needs a core
    (2.0, 16, 2, False),   # a 16-core node running someone's 2-thread job: cores to spare
    (0.05, 2, 2, False),   # daemons and the shell: within the tolerance
    (0.16, 2, 2, True),    # a quick job with a one-core spin loop beside it for a fifth of its time
])
def test_busy_means_short_of_cores(others, cpus, threads, expected):
    assert busy({"others_cpus": others, "cpus": cpus}, threads) is expected


def test_the_job_summary_says_when_its_time_is_not_a_cost(tmp_path):
    from bench.summary import summary_lines

    rec = {"method": {"name": "noop"}, "concept": {"name": "star"}, "model": {"name": "shapes"}, "protocol": {"eval": "quick"},
           "seed": 0, "env": {"threads": 2}, "metrics": {}, "probes": {},
           "cost": {"total_seconds": 700.0, "unlearn": {"seconds": 0.0}, "others_cpus": 1.0, "cpus": 2}}
    took = [line for line in summary_lines(rec, tmp_path / "record.json", {}) if "took" in line]
    assert took and "beside other work (1.0 of 2 CPUs" in took[0]
    rec["cost"]["others_cpus"] = 0.01
    assert "beside" not in next(line for line in summary_lines(rec, tmp_path / "record.json", {}) if "took" in line)


def test_the_page_shows_the_load_beside_the_times():
    from leaderboard.build import _cost

    rows = dict((label, value) for label, value, _ in _cost({"total_seconds": 300.0, "others_cpus": 0.01, "cpus": 2,
                                                            "probes": {"noise": {"seconds": 120.0, "nfe": 10}}}))
    assert rows["CPUs other processes kept busy meanwhile (of 2)"] == "0.01" and "probe: noise" in rows
