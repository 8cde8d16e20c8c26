"""End to end on the shipped Shapes world at eval=smoke: record schema, resume, references."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bench.run import execute
from tests.conftest import needs_world

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg_with(tmp_path, *overrides):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        return compose(config_name="config", overrides=["logger=none", "eval=smoke", f"out_dir={tmp_path}/runs",
                                                        f"cache_dir={tmp_path}/cache", *overrides])


def strip(rec):
    """A record minus what legitimately differs between runs (timings, dates, cache bookkeeping)."""
    rec = json.loads(json.dumps(rec))
    for k in ("created", "cost", "env", "wandb", "unlearn", "config"):
        rec.pop(k, None)
    return rec


@needs_world
def test_noop_smoke_record_and_rerun_is_skipped(tmp_path, capsys):
    cfg = cfg_with(tmp_path, "method=noop", "concept=star")
    assert execute(cfg) == 0
    recs = list((tmp_path / "runs").rglob("record.json"))
    assert len(recs) == 1
    rec = json.loads(recs[0].read_text())
    assert rec["schema_version"] == 1 and rec["status"] == "ok"
    assert rec["method"]["name"] == "noop" and rec["method"]["reference"] == "original"
    assert rec["protocol"]["hash"] and rec["job_key"] in str(recs[0])
    for name in ("ccs", "crs", "crs_paper", "erasure", "detect_u", "detect_o", "kid_po", "kid_pu", "psi_recover"):
        assert name in rec["metrics"], name
        assert set(rec["metrics"][name]) >= {"value", "ci", "n"}
    assert rec["metrics"]["erasure"]["value"] in (0.0, None)  # θ* = θ: nothing erased
    assert rec["retain"]["retention"]["value"] in (1.0, None)
    assert rec["metrics"]["crs"]["value"] == pytest.approx(0.5)  # identical λ_O/λ_U: every retrieval is a tie
    assert [p["class"] for p in rec["prompts"]] == ["forget", "retain"]
    assert len(rec["psi_curve"]) == len(cfg.attack.psi)
    run_dir = recs[0].parent
    for f in ("delta.safetensors", "psi_curve.png", "grid_lambda_o.png", "grid_lambda_u.png", "grid_lambda_p.png"):
        assert (run_dir / f).exists(), f
    assert rec["cost"]["total_nfe"] > 0 and rec["cost"]["params_changed"] == 0
    mtime = recs[0].stat().st_mtime
    assert execute(cfg) == 0  # finished job: skipped
    assert recs[0].stat().st_mtime == mtime
    # another job (another seed: a different θ*) reuses λ_O and the θ-prefix snapshots from the cache
    assert execute(cfg_with(tmp_path, "method=noop", "concept=star", "seed=1")) == 0
    recs = sorted((tmp_path / "runs").rglob("record.json"), key=lambda p: p.stat().st_mtime)
    rec2 = json.loads(recs[-1].read_text())
    assert rec2["job_key"] != rec["job_key"] and rec2["protocol"]["hash"] == rec["protocol"]["hash"]
    assert rec2["cost"]["cache"]["misses"] == [] and rec2["cost"]["cache"]["hits"]


@needs_world
def test_resume_from_finished_stages_gives_identical_record(tmp_path):
    cfg = cfg_with(tmp_path, "method=noop", "concept=red")
    assert execute(cfg) == 0
    path = next((tmp_path / "runs").rglob("record.json"))
    first = json.loads(path.read_text())
    # emulate a job killed after its first prompt: drop the record and the later stages
    path.unlink()
    for f in path.parent.glob("*-1.*"):
        f.unlink()
    assert execute(cfg) == 0
    assert strip(json.loads(path.read_text())) == strip(first)


@needs_world
def test_retrain_refuses_where_no_gold_model_exists(tmp_path, capsys):
    # a concept preset without a gold model in this world (a copy of star under another name)
    cfg = cfg_with(tmp_path, "method=retrain", "concept=star", "concept.name=star_copy")
    assert execute(cfg) == 1
    rec = json.loads(next((tmp_path / "runs").rglob("record.json")).read_text())
    assert rec["status"] == "failed" and "gold-standard UNet" in rec["error"]


@needs_world
@pytest.mark.slow
def test_killed_mid_attack_resumes_to_identical_record(tmp_path):
    args = [sys.executable, "-m", "bench", "method=noop", "concept=star", "eval=smoke", "logger=none",
            "eval.max_forget_prompts=2", f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").rglob("images-0.safetensors")):
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not list((tmp_path / "runs").rglob("record.json"))
    assert subprocess.run(args, env=env, capture_output=True, timeout=600).returncode == 0
    resumed = json.loads(next((tmp_path / "runs").rglob("record.json")).read_text())
    fresh_args = [a.replace(str(tmp_path), str(tmp_path / "fresh")) for a in args]
    assert subprocess.run(fresh_args, env=env, capture_output=True, timeout=600).returncode == 0
    fresh = json.loads(next((tmp_path / "fresh" / "runs").rglob("record.json")).read_text())
    assert strip(resumed) == strip(fresh)


@needs_world
def test_retrain_loads_the_shipped_gold_unet():
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from bench.concepts import Concept
    from methods.retrain import unlearn
    from tests.conftest import WORLD

    pipe = StableDiffusionPipeline.from_pretrained(str(WORLD), torch_dtype=torch.float32)
    concept = Concept(name="star", kind="object", target="star", forget_prompts=("a star",), retain_prompts=(),
                      gold_unet=str(WORLD / "gold" / "star" / "unet"))
    unlearn(pipe, concept)
    gold = UNet2DConditionModel.from_pretrained(str(WORLD / "gold" / "star" / "unet"), torch_dtype=torch.float32)
    for (k, a), b in zip(pipe.unet.state_dict().items(), gold.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
