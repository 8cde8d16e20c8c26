"""The verdict rule (bench/verdict.py) on synthetic replicates: each gate, the gold calibration,
the margin kinds, replicated seeds; and the two-level bootstrap behind the replicates."""
from __future__ import annotations

import numpy as np
import pytest

from bench import metrics as M
from bench import scorers as S
from bench import verdict as V

TH = V.thresholds()
AXIS = {"name": "psi", "values": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55]}


def m(value, sd=0.02, seed=0, n=1000):
    reps = None if value is None else np.random.default_rng(seed).normal(value, sd, n).tolist()
    return {"value": value, "ci": None, "n": {"prompts": 6, "seeds": 16}, "replicates": reps if reps is not None else [None] * n}


def block(recover, sd=0.02, seed=1):
    return {"axis": AXIS, "metrics": {"recover": m(recover, sd, seed)}}


GOLD = block(0.45, seed=2)


def forget(erasure=0.95, specificity=0.95, seed=3):
    out = {"erasure": m(erasure, 0.02, seed)}
    if specificity is not None:
        out["specificity"] = m(specificity, 0.02, seed + 1)
    return out


def test_a_collapsed_model_is_destroyed_never_removed():
    # erased, recovers late (looks like removal on erasure and ψ alone), but the images lost everything else
    v = V.judge_forget(forget(erasure=0.99, specificity=0.15), block(None), GOLD, "partial_diffusion", TH)
    assert v.key == "destroyed" and v.probability == 1.0
    # the same model with its specificity ignored would have been "removed": the gate is what decides
    assert V.judge_forget(forget(erasure=0.99, specificity=None), block(None), GOLD, "partial_diffusion", TH).key == "removed"


def test_the_gold_judged_against_its_own_record_is_removed():
    v = V.judge_forget(forget(), GOLD, GOLD, "partial_diffusion", TH)
    assert v.key == "removed" and v.probability >= 0.95


def test_the_original_model_is_not_erased():
    v = V.judge_forget(forget(erasure=0.0, specificity=1.0), block(0.0), GOLD, "partial_diffusion", TH)
    assert v.key == "not_erased" and v.probability == 1.0


@pytest.mark.parametrize(("recover", "sd", "key"), [
    (0.12, 0.02, "concealed"),    # far earlier than 0.45 − 0.1
    (0.40, 0.02, "removed"),      # within the margin
    (0.35, 0.03, "inconclusive"),  # right at the margin, given its spread
    (None, 0.02, "removed"),      # never recovers
])
def test_recovery_against_the_gold(recover, sd, key):
    assert V.judge_forget(forget(), block(recover, sd), GOLD, "partial_diffusion", TH).key == key


def test_a_method_and_its_gold_on_the_same_design_are_compared_pairwise():
    """Same prompts and seeds: the spread both share cancels (a shift of 0.05 is never 0.1 earlier)."""
    rng = np.random.default_rng(4)
    shared = rng.normal(0.45, 0.06, 1000)  # prompt-to-prompt spread, the same draws for both
    gold = {"axis": AXIS, "metrics": {"recover": {"value": 0.45, "replicates": shared.tolist(), "design": "d1"}}}
    method = {"axis": AXIS, "metrics": {"recover": {"value": 0.40, "replicates": (shared - 0.05).tolist(), "design": "d1"}}}
    v = V.judge_forget(forget(), method, gold, "partial_diffusion", TH)
    assert v.key == "removed" and v.probability == 1.0 and "paired" in v.detail
    method["metrics"]["recover"]["design"] = "d2"  # another design: independent bootstraps, the shared spread counts twice
    assert V.judge_forget(forget(), method, gold, "partial_diffusion", TH).key == "inconclusive"
    deep = {"axis": AXIS, "metrics": {"recover": {"value": 0.30, "replicates": (shared - 0.15).tolist(), "design": "d1"}}}
    assert V.judge_forget(forget(), deep, gold, "partial_diffusion", TH).key == "concealed"


def test_a_gold_that_never_recovers_is_censored_at_the_axis_end():
    """The gold's recovery lies past the axis: the axis end is a lower bound, enough for "concealed",
    never for "removed" unless the method never recovers either."""
    never = block(None, seed=5)
    late = V.judge_forget(forget(), block(0.50), never, "partial_diffusion", TH)   # 0.50 ≥ 0.55 − 0.1, yet the gold may be later
    assert late.key == "inconclusive" and "longer partial_diffusion axis" in late.detail
    assert "while the method does in 100% of the replicates" in late.detail  # it recovers at 0.50 in every replicate
    assert V.judge_forget(forget(), block(0.30), never, "partial_diffusion", TH).key == "concealed"
    assert V.judge_forget(forget(), block(None), never, "partial_diffusion", TH).key == "removed"
    steps = {"name": "steps", "values": [0, 25, 50, 100, 200]}   # relearning: the method at 185 steps, the gold never in 200
    gold = {"axis": steps, "metrics": {"recover": m(None, seed=6)}}
    method = {"axis": steps, "metrics": {"recover": m(185, 10, 7)}}
    assert V.judge_forget(forget(), method, gold, "relearn", TH).key == "inconclusive"


def test_erasure_near_the_gate_is_inconclusive_and_says_what_would_settle_it():
    v = V.judge_forget(forget(erasure=0.5), block(0.1), GOLD, "partial_diffusion", TH)
    assert v.key == "inconclusive" and "more forget prompts or seeds" in v.detail


def test_no_replicates_means_unjudged_and_no_gold_means_no_gold():
    old = {"erasure": {"value": 0.9, "ci": None, "n": 64}}
    assert V.judge_forget(old, block(0.1), GOLD, "partial_diffusion", TH).key == "unjudged"
    assert V.judge_forget(forget(), block(0.1), None, "partial_diffusion", TH).key == "no_gold"


def test_ratio_margin_for_step_axes():
    steps = {"name": "steps", "values": [0, 25, 50, 100, 200]}
    gold = {"axis": steps, "metrics": {"recover": m(120, 5, 8)}}
    fast = {"axis": steps, "metrics": {"recover": m(30, 3, 9)}}
    slow = {"axis": steps, "metrics": {"recover": m(100, 5, 10)}}
    assert V.judge_forget(forget(), fast, gold, "inversion", TH).key == "concealed"  # 30 < 0.5 × 120
    assert V.judge_forget(forget(), slow, gold, "inversion", TH).key == "removed"


def test_replicated_seeds_that_disagree_are_inconclusive():
    a, b = V.Verdict("removed", 0.99), V.Verdict("concealed", 0.97)
    assert V.combine([a, a]).key == "removed" and V.combine([a, V.Verdict("removed", 0.96)]).probability == 0.96
    c = V.combine([a, b, a])
    assert c.key == "inconclusive" and c.probability is None and "removed ×2" in c.detail


def test_an_inconclusive_verdict_says_what_its_probability_is_of():
    # "inconclusive P 0.31" beside a badge reads as the probability of being inconclusive; it is P(concealed)
    rec = V.judge_forget(forget(), block(0.35, 0.03), GOLD, "partial_diffusion", TH)
    gate = V.judge_forget(forget(erasure=0.5, specificity=0.95), block(None), GOLD, "partial_diffusion", TH)
    removed = V.judge_forget(forget(), block(0.40), GOLD, "partial_diffusion", TH)
    assert (rec.key, rec.event, gate.key, gate.event) == ("inconclusive", "concealed", "inconclusive", f"erasure < {TH['erasure_min']:g}")
    assert V.probability_text(rec.to_dict()).startswith("P(concealed) ")
    assert V.probability_text(gate.to_dict()).startswith(f"P(erasure < {TH['erasure_min']:g}) ")
    assert V.probability_text(removed.to_dict()) == f"P {V.format_p(removed.probability)}"
    assert rec.brief().startswith("inconclusive on recovery") and gate.brief().startswith("inconclusive on erasure")
    retain = V.judge_retain({"retention": m(0.8, 0.05)}, TH)
    assert retain.brief().startswith("inconclusive on retention")
    # seeds inconclusive on different gates share no probability: the smaller of two events' P would mean nothing
    c = V.combine([rec, gate, rec])
    assert c.key == "inconclusive" and c.probability is None and "erasure ×1" in c.detail and "recovery ×2" in c.detail
    assert V.combine([rec, rec]).event == "concealed"


def test_retain_verdict():
    assert V.judge_retain({"retention": m(0.95)}, TH).key == "kept"
    assert V.judge_retain({"retention": m(0.5)}, TH).key == "damaged"
    assert V.judge_retain({"retention": m(0.8, 0.05)}, TH).key == "inconclusive"


# --------------------------------------------------------------------------- the replicates themselves

def test_two_level_bootstrap_resamples_prompts_then_seeds():
    rng = np.random.default_rng(0)
    # 6 prompts whose detection curves cross 0.5 at different ψ, 16 seeds each
    xs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    units = []
    for cross in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4):
        p = 1 / (1 + np.exp(-(np.array(xs) - cross) * 30))
        units.append(((rng.random((16, len(xs))) < p).astype(float),))
    reps = M.two_level_replicates(units, S._recover_statistic(xs), n_boot=500, seed=1)
    point = M.psi_recover(xs, np.mean([u[0].mean(0) for u in units], 0).tolist())
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert lo < point < hi and hi - lo > 0.02  # prompt-to-prompt spread is in the interval
    one_prompt = M.two_level_replicates(units[:1] * 6, S._recover_statistic(xs), n_boot=500, seed=1)
    assert np.std(one_prompt) < np.std(reps)  # identical prompts: only the seeds vary


def test_aggregate_records_interval_units_and_replicates():
    rows = []
    for i in range(3):
        rows.append({"class": "forget", "metrics": {"erasure": {"value": 0.8 + 0.05 * i, "ci": None, "n": 128}},
                     "units": {"du": [0] * 10 + [1] * (2 - i), "do": [1] * 12}, "curve": []})
    for r in rows:  # make the values consistent with the units
        du, do = np.mean(r["units"]["du"]), np.mean(r["units"]["do"])
        r["metrics"]["erasure"]["value"] = 1 - du / do
    out, _ = S.aggregate(rows, "forget", seed=0)
    e = out["erasure"]
    assert e["n"] == {"prompts": 3, "seeds": 12} and "two-level" in e["resampled"]
    assert len(e["replicates"]) == M.N_BOOT and e["ci"][0] <= e["value"] <= e["ci"][1]


def test_a_censored_interval_reads_never_beyond_the_axis_without_numpy_warnings():
    import warnings

    reps = np.r_[np.linspace(0.1, 0.3, 900), np.full(100, np.nan)]  # 10% of replicates never recover
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a job's log must not carry numpy's inf − inf warning
        lo, hi = S._percentile_ci(reps, censored=True)
    assert lo == pytest.approx(0.1 + 0.2 * 24.975 / 899, abs=1e-4) and hi is None  # the 2.5% point: index 24.975 of 1000
    assert S._percentile_ci(np.linspace(0.1, 0.3, 1000), censored=True)[1] == pytest.approx(0.295, abs=1e-3)


def test_a_probability_is_never_printed_on_a_gate_it_did_not_reach():
    # an inconclusive 0.9496 under the 0.95 gate rounds to "0.95", which reads as decided
    assert V.format_p(0.9496, 0.95) == "0.9496" and V.format_p(0.0504, 0.95) == "0.0504"
    assert V.format_p(0.94, 0.95) == "0.94" and V.format_p(0.951, 0.95) == "0.95" and V.format_p(1.0, 0.95) == "1.00"
    assert V.format_p(0.05, 0.95) == "0.05" and V.format_p(0.123, 0.95) == "0.12"
    # the specificity gate with P just below p_decide: inconclusive, and its detail says so in digits
    n = 10_000
    reps = [0.4] * 9_496 + [0.6] * (n - 9_496)  # P(specificity < 0.5) = 0.9496
    spec = {"value": 0.45, "ci": None, "n": {"prompts": 6, "seeds": 16}, "replicates": reps}
    v = V.judge_forget({**forget(erasure=0.99), "specificity": spec}, block(None), GOLD, "partial_diffusion", TH)
    assert v.key == "inconclusive" and "0.9496" in v.detail and "0.95)" not in v.detail


def test_a_row_read_outside_the_detectors_domain_is_flagged_and_only_then():
    rec = {"metrics": {"off_domain_u": {"value": 1.0}}, "retain": {"off_domain_u": {"value": 0.40}}}
    note = V.off_domain_note(rec, TH)
    assert "100% of its forget images and 40% of its retain images outside its domain" in note and "λ_U grid" in note
    assert V.off_domain_note({"metrics": {"off_domain_u": {"value": 0.05}}, "retain": {}}, TH) is None
    assert V.off_domain_note({"metrics": {}, "retain": {}}, TH) is None  # SD worlds and older records do not measure it
