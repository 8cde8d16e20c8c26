"""The probe seam moved partial diffusion out of the job's skeleton without changing a number.

``tests/data/before_seam/`` holds records written by the code before the seam (commit 6cd1956):
two eval=smoke jobs made for this test (threads=1), and the published eval=quick record of the original model
on `star` (2 threads). Float results depend on the thread count, so each runs with its own, and compare up to float32 round-off. The same configurations run through the seam must give the same protocol hash and the
same values — per prompt (value, interval, n, ψ-curve) and aggregated (value, ψ-curve). What the
verdicts issue redefined on purpose is not compared: aggregate intervals (now a two-level
bootstrap), ``n`` of aggregates (now independent units) and the job key (no longer depends on the
probes, so a probe can be added to a finished job).
"""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bench.run import execute
from tests.conftest import needs_world

CONF = str(Path(__file__).resolve().parents[1] / "conf")
BEFORE = Path(__file__).parent / "data" / "before_seam"
PROMPT_LEVEL = {"detect_u", "detect_o", "erasure", "retention", "kid_uo", "classifier_val_acc"}
LEGACY_QUICK = ["eval.max_forget_prompts=3", "eval.max_retain_prompts=3", "probes.partial_diffusion.psi=[0.0,0.05,0.1,0.2,0.3,0.4,0.55]",
                "probes.partial_diffusion.seeds=8", "probes.partial_diffusion.retain_seeds=null"]


def run_job(tmp_path, *overrides) -> dict:
    with initialize_config_dir(version_base=None, config_dir=CONF):
        cfg = compose(config_name="config", overrides=["logger=none", f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", *overrides])
    assert execute(cfg) == 0
    return json.loads(next((tmp_path / "runs").rglob("record.json")).read_text())


def _where(new_prompt_or_record: dict, name: str, block: str = "metrics") -> dict:
    if name in PROMPT_LEVEL:
        return new_prompt_or_record[block][name]
    pd = new_prompt_or_record["probes"]["partial_diffusion"]
    return pd[block]["recover" if name == "psi_recover" else name]


CURVE_KEYS = ("x", "p_original", "retrieval", "detection")


def _curve(old: list[dict], keys: tuple[str, ...] = CURVE_KEYS) -> list[dict]:
    """The old record's ψ-curve in the new layout (``psi`` → ``x``), restricted to ``keys``."""
    return [{k: p["psi" if k == "x" else k] for k in keys} for p in old]


# Differences of two means of classifier features (the authors' CRS, KID): round-off in the terms is
# amplified relative to the difference, so these get an absolute tolerance on the terms' scale.
DIFFERENCES = {"crs_paper", "kid_uo", "kid_po", "kid_pu"}


def same(expected, abs_tol: float = 1e-7):
    """Equal up to float32 round-off. Classifier features are float32 sums whose order can change
    with the CPU's vector width and the thread pool's state, and the per-prompt classifier is
    trained, so the round-off is carried through its training. Measured against these fixtures at
    the same thread count: on CI's earlier machine S_O/S_U came back 6e-9 apart and KID 2.6e-6
    relative; on an AMD EPYC machine the classifier's probabilities (``ccs``, ``p_original``) came
    back up to 8.5e-5 relative apart, ``crs_paper`` 1.2e-5 and KID 5.7e-4 absolute (1.4e-3 relative
    on a value near zero). Detections, erasure, retention, ``crs`` and the retrieval curve matched
    exactly. Hence rel 3e-4 for every float and abs 2e-3 for ``DIFFERENCES``; a changed image or
    seed moves them by far more (and moves the exactly-compared detections)."""
    if isinstance(expected, dict):
        return {k: same(v, abs_tol) for k, v in expected.items()}
    if isinstance(expected, (list, tuple)):
        return type(expected)(same(v, abs_tol) for v in expected)
    return pytest.approx(expected, rel=3e-4, abs=abs_tol) if isinstance(expected, float) else expected


def _tol(name: str) -> float:
    return 2e-3 if name in DIFFERENCES else 1e-7


# Outputs of the per-prompt λ_O-vs-λ_U classifier after training (not the seam's work).
TRAINED = {"classifier_val_acc", "ccs", "crs_paper", "kid_po", "kid_pu"}


def assert_same_numbers(old: dict, new: dict, trained: bool = True) -> None:
    """``trained=False`` leaves out what the trained classifier outputs (``TRAINED`` and the
    p_original curve); everything else — detections, erasure, retention, ψ recovery, ``crs`` and
    the retrieval curve — is still compared."""
    skip = set() if trained else TRAINED
    keys = CURVE_KEYS if trained else tuple(k for k in CURVE_KEYS if k != "p_original")
    pd = new["probes"]["partial_diffusion"]
    assert pd["protocol"]["hash"] == old["protocol"]["hash"]
    assert [(p["prompt"], p["class"]) for p in new["prompts"]] == [(p["prompt"], p["class"]) for p in old["prompts"]]
    for po, pn in zip(old["prompts"], new["prompts"], strict=True):
        for name, m in po["metrics"].items():
            if name in skip:
                continue
            got = pn["metrics"][name] if name in PROMPT_LEVEL else pn["probes"]["partial_diffusion"]["metrics"]["recover" if name == "psi_recover" else name]
            assert got["n"] == m["n"], (po["prompt"], name)
            assert (got["value"], got["ci"]) == same((m["value"], m["ci"]), _tol(name)), (po["prompt"], name)
            if "curve" in m:
                assert got["curve"] == same(m["curve"], _tol(name)), (po["prompt"], name)
        new_curve = [{k: p[k] for k in keys} for p in pn["probes"]["partial_diffusion"]["curve"]]
        assert new_curve == same(_curve(po["psi_curve"], keys)), po["prompt"]
    for block, new_block in (("metrics", "metrics"), ("retain", "retain")):
        for name, m in old[block].items():
            if name in skip:
                continue
            target = new[new_block] if name in PROMPT_LEVEL else pd[new_block]
            got = target["recover" if name == "psi_recover" else name]
            assert got["value"] == same(m["value"], _tol(name)), (block, name)
    for a, b in zip(pd["curve"], _curve(old["psi_curve"], keys), strict=True):
        assert {k: a[k] for k in keys} == same(b)


@needs_world
@pytest.mark.parametrize(("fixture", "overrides"), [
    ("uce_star_smoke.json", ["method=uce", "concept=star", "eval=smoke", "threads=1"]),
    ("fmn_red_smoke.json", ["method=fmn", "concept=red", "eval=smoke", "threads=1"]),
])
def test_partial_diffusion_behind_the_seam_gives_the_same_record(tmp_path, fixture, overrides):
    assert_same_numbers(json.loads((BEFORE / fixture).read_text()), run_job(tmp_path, *overrides))


@needs_world
@pytest.mark.slow
def test_published_quick_record_reproduces_through_the_seam(tmp_path):
    old = json.loads((BEFORE / "noop_star_quick.json").read_text())
    # θ* = θ: the classifier trains on two samples of one distribution, so it learns nothing and its
    # outputs are round-off-driven — on an AMD EPYC machine its validation accuracy came back 0.125
    # from the fixture's and CCS 2% (every detection, erasure, crs and retrieval value exact).
    # The trained classifier's outputs are therefore left out here; the smoke fixtures compare them.
    assert_same_numbers(old, run_job(tmp_path, "method=noop", "concept=star", "eval=quick", "threads=2", *LEGACY_QUICK),
                        trained=False)
