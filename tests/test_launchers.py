"""Launchers: Slurm composes as documented; the local parallel launcher runs for real and its jobs
share the content-addressed cache safely (λ_O computed once, records identical to a sequential run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import needs_world
from tests.test_bench_e2e import strip

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def hydra_cfg(*overrides):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        return compose(config_name="config", overrides=["logger=none", *overrides], return_hydra_config=True)


def test_slurm_launcher_composes_with_documented_keys():
    cfg = hydra_cfg("hydra/launcher=slurm", "+sweep=esd_x", "hydra.launcher.partition=a100", "hydra.launcher.timeout_min=90")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "a100" and launcher.timeout_min == 90
    assert launcher.gpus_per_node == 1 and launcher.mem_gb >= 32 and launcher.cpus_per_task >= 1
    assert launcher.array_parallelism >= 1 and list(launcher.setup) == []
    # the plugin can instantiate it (import path and argument names are right)
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    params = {k: v for k, v in launcher.items() if k != "_target_"}
    SlurmLauncher(**params)


def test_local_launchers_compose():
    joblib = hydra_cfg("hydra/launcher=local").hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2
    sub = hydra_cfg("hydra/launcher=submitit_local_cpu").hydra.launcher
    assert sub._target_.endswith("LocalLauncher")


def _multirun(tmp_path: Path, name: str, launcher: str | None) -> list[dict]:
    args = [sys.executable, "-m", "bench", "-m", "method=uce", "method.params.lamb=0.1,2.0", "concept=star",
            "eval=smoke", "eval.max_forget_prompts=1", "eval.max_retain_prompts=1", "logger=none", "threads=1",
            f"out_dir={tmp_path}/{name}/runs", f"cache_dir={tmp_path}/{name}/cache", f"hydra.sweep.dir={tmp_path}/{name}/sweep"]
    if launcher:
        args.append(f"hydra/launcher={launcher}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / name / "runs").rglob("record.json"))]
    assert len(recs) == 2 and all(rec["status"] == "ok" for rec in recs)
    pointers = sorted((tmp_path / name / "sweep").glob("*/result.json"))
    assert len(pointers) == 2  # sweep_report finds every job through these
    return sorted(recs, key=lambda rec: rec["method"]["params"]["lamb"])


@needs_world
@pytest.mark.slow
def test_parallel_jobs_share_the_cache_and_match_a_sequential_run(tmp_path):
    parallel = _multirun(tmp_path, "parallel", "local")
    sequential = _multirun(tmp_path, "sequential", None)
    # λ_O (and every θ-prefix snapshot) was computed by exactly one of the two parallel jobs
    misses = [set(rec["cost"]["cache"]["misses"]) for rec in parallel]
    hits = [set(rec["cost"]["cache"]["hits"]) for rec in parallel]
    needed = misses[0] | misses[1]
    assert any(k.startswith("lambda_o/") for k in needed)
    assert not misses[0] & misses[1], "two parallel jobs computed the same cache entry"
    assert needed == misses[0] | hits[0] == misses[1] | hits[1]
    lambda_o = sorted((tmp_path / "parallel" / "cache" / "lambda_o").glob("*.safetensors"))
    assert len(lambda_o) == len([k for k in needed if k.startswith("lambda_o/")])
    assert not list((tmp_path / "parallel" / "cache").rglob("*.tmp"))  # no half-written entry left
    # the sequential run computes the same entries, and the records agree bit for bit (minus timings)
    seq_needed = set(sequential[0]["cost"]["cache"]["misses"]) | set(sequential[1]["cost"]["cache"]["misses"])
    assert seq_needed == needed
    for a, b in zip(parallel, sequential, strict=True):
        assert a["job_key"] == b["job_key"]
        assert strip(a) == strip(b)
