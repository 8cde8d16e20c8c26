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
    for k in ("created", "cost", "env", "wandb", "unlearn", "config", "resumed"):
        rec.pop(k, None)
    for block in rec.get("probes", {}).values():
        block.pop("cost", None)
        block.get("state", {}).pop("seconds", None)
    return rec


@needs_world
def test_noop_smoke_record_and_rerun_is_skipped(tmp_path, capsys):
    cfg = cfg_with(tmp_path, "method=noop", "concept=star")
    assert execute(cfg) == 0
    recs = list((tmp_path / "runs").rglob("record.json"))
    assert len(recs) == 1
    rec = json.loads(recs[0].read_text())
    assert rec["schema_version"] == 2 and rec["status"] == "ok"
    assert rec["method"]["name"] == "noop" and rec["method"]["reference"] == "original"
    assert rec["protocol"]["hash"] and rec["job_key"] in str(recs[0])
    for name in ("erasure", "detect_u", "detect_o"):
        assert set(rec["metrics"][name]) >= {"value", "ci", "n", "resampled"}, name
    pd = rec["probes"]["partial_diffusion"]
    for name in ("ccs", "crs", "crs_paper", "kid_po", "kid_pu", "recover"):
        assert name in pd["metrics"], name
        assert set(pd["metrics"][name]) >= {"value", "ci", "n"}
    assert pd["protocol"]["hash"] != rec["protocol"]["hash"] and pd["axis"]["name"] == "psi"
    assert rec["metrics"]["erasure"]["value"] in (0.0, None)  # θ* = θ: nothing erased
    assert rec["retain"]["retention"]["value"] in (1.0, None)
    assert pd["metrics"]["crs"]["value"] == pytest.approx(0.5)  # identical λ_O/λ_U: every retrieval is a tie
    assert [p["class"] for p in rec["prompts"]] == ["forget", "retain"]
    assert len(pd["curve"]) == len(cfg.probes.partial_diffusion.psi)
    # the bootstrap replicates behind the verdicts: the erasure gate and the recovery point
    assert len(rec["metrics"]["erasure"]["replicates"]) == 1000 and len(pd["metrics"]["recover"]["replicates"]) == 1000
    assert rec["metrics"]["erasure"]["n"] == {"prompts": 1, "seeds": max(cfg.eval.n, cfg.eval.detect_n)}
    run_dir = recs[0].parent
    for f in ("delta.safetensors", "curve_partial_diffusion.png", "grid_lambda_o.png", "grid_lambda_u.png", "grid_partial_diffusion.png"):
        assert (run_dir / f).exists(), f
    assert rec["cost"]["total_nfe"] > 0 and rec["cost"]["params_changed"] == 0
    # whether its times ran alone: CPUs other work took meanwhile, for the job and for each probe (bench/cpuload.py)
    if Path("/proc/stat").exists():
        assert rec["cost"]["cpus"] >= 1 and rec["cost"]["others_cpus"] >= 0 and pd["cost"]["others_cpus"] >= 0
    # what ran it: a trained method's numbers are bit-exact only on the same library versions and CPU ISA
    import torch
    assert rec["env"]["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and rec["env"]["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert "NOT ERASED" in out and str(recs[0]) in out.splitlines()[-2]  # the summary ends the output
    mtime = recs[0].stat().st_mtime
    assert execute(cfg) == 0  # finished job: skipped
    assert recs[0].stat().st_mtime == mtime
    # another job (another method: another θ*) reuses λ_O and the θ-prefix snapshots from the cache
    assert execute(cfg_with(tmp_path, "method=uce", "concept=star")) == 0
    recs = sorted((tmp_path / "runs").rglob("record.json"), key=lambda p: p.stat().st_mtime)
    rec2 = json.loads(recs[-1].read_text())
    assert rec2["job_key"] != rec["job_key"] and rec2["protocol"]["hash"] == rec["protocol"]["hash"]
    assert rec2["cost"]["cache"]["misses"] == [] and rec2["cost"]["cache"]["hits"]
    # cached images are keyed by the kernels that computed them: another ISA gets its own entries
    from bench.cache import load_entry
    from bench.record import kernels

    here = kernels("cpu")
    for kind in ("lambda_o", "prefix"):
        entries = list((tmp_path / "cache" / kind).glob("*.safetensors"))
        assert entries and all(load_entry(e)[1]["key"]["kernels"] == here for e in entries), kind
    other = subprocess.run([sys.executable, "-c", "from bench.record import kernels; print(kernels('cpu'))"],
                           env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}, cwd=Path(CONF).parent,
                           capture_output=True, text=True, check=True)
    assert here == f"cpu:{rec['env']['cpu_isa']}" and other.stdout.strip() == "cpu:DEFAULT"


@needs_world
def test_seed_moves_every_evaluation_seed(tmp_path):
    """`seed` replicates the evaluation: other reference images, other attacked seeds, another classifier."""
    recs = {}
    for seed in (0, 1):
        assert execute(cfg_with(tmp_path, "method=noop", "concept=star", f"seed={seed}")) == 0
    for path in (tmp_path / "runs").rglob("record.json"):
        r = json.loads(path.read_text())
        recs[r["seed"]] = (r, path.parent)
    (r0, d0), (r1, d1) = recs[0], recs[1]
    assert r0["protocol"]["hash"] == r1["protocol"]["hash"] and r0["job_key"] != r1["job_key"]
    from bench.cache import load_entry

    u0, u1 = load_entry(d0 / "u-0.safetensors")[0]["u"], load_entry(d1 / "u-0.safetensors")[0]["u"]
    assert not (u0 == u1).all()  # λ_U (and λ_O) from other seeds
    p0 = load_entry(next((d0 / "probes" / "partial_diffusion").glob("*/images-0.safetensors")))[0]["x0"]
    p1 = load_entry(next((d1 / "probes" / "partial_diffusion").glob("*/images-0.safetensors")))[0]["x0"]
    assert not (p0 == p1).all()  # the attacked seeds moved too
    assert r1["cost"]["cache"]["misses"]  # seed 1 cannot reuse seed 0's λ_O


@needs_world
def test_adding_a_probe_to_a_finished_job_recomputes_nothing_else(tmp_path):
    base = ["method=uce", "concept=star"]
    assert execute(cfg_with(tmp_path, *base, "probes=[]")) == 0
    path = next((tmp_path / "runs").rglob("record.json"))
    first = json.loads(path.read_text())
    assert first["probes"] == {} and "erasure" in first["metrics"]
    stamps = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir() if p.is_file() and p.name != "record.json"}
    assert execute(cfg_with(tmp_path, *base)) == 0  # now with partial diffusion: same job key, same folder
    again = json.loads(path.read_text())
    assert again["job_key"] == first["job_key"] and "partial_diffusion" in again["probes"]
    for name, t in stamps.items():  # the delta, λ_U and prompt scores were reused, not rewritten
        assert (path.parent / name).stat().st_mtime_ns == t, name
    assert again["metrics"]["erasure"] == first["metrics"]["erasure"]
    # re-configuring the probe gets its own stage files: the images of the first setting are not reused
    assert execute(cfg_with(tmp_path, *base, "probes.partial_diffusion.seeds=3")) == 0
    third = json.loads(path.read_text())
    pd2, pd1 = third["probes"]["partial_diffusion"], again["probes"]["partial_diffusion"]
    assert pd2["protocol"]["hash"] != pd1["protocol"]["hash"] and pd2["metrics"]["recover"]["n"]["seeds"] == 3
    assert len(list((path.parent / "probes" / "partial_diffusion").iterdir())) == 2


@needs_world
def test_a_warm_cache_gives_the_record_a_cold_one_does(tmp_path):
    # λ_O and θ's ψ-prefixes read back from the cache must score exactly as when computed in the job. (Arrays read
    # from files once took other convolution kernels than freshly decoded ones, moving KID and CCS at 1e-8 in quick
    # jobs; at this size that did not show, so test_world.py pins the detector itself — this guards the cache path.)
    with initialize_config_dir(version_base=None, config_dir=CONF):
        cold, warm = (compose(config_name="config", overrides=["logger=none", "eval=smoke", "method=noop", "concept=star",
                                                               f"out_dir={tmp_path}/{name}", f"cache_dir={tmp_path}/cache"])
                      for name in ("cold", "warm"))
    assert execute(cold) == 0 and execute(warm) == 0
    a, b = (json.loads(next((tmp_path / name).rglob("record.json")).read_text()) for name in ("cold", "warm"))
    assert a["cost"]["cache"]["hits"] == [] and b["cost"]["cache"]["misses"] == []
    assert strip(a) == strip(b)


@needs_world
def test_resume_from_finished_stages_gives_identical_record(tmp_path):
    cfg = cfg_with(tmp_path, "method=noop", "concept=red")
    assert execute(cfg) == 0
    path = next((tmp_path / "runs").rglob("record.json"))
    first = json.loads(path.read_text())
    # emulate a job killed after its first prompt: drop the record and the later stages
    path.unlink()
    for f in path.parent.rglob("*-1.*"):
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
    while time.time() < deadline and not list((tmp_path / "runs").rglob("probes/partial_diffusion/*/images-0.safetensors")):
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
