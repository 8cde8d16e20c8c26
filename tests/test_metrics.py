"""Metrics of DESIGN §1.3 against hand-computed values and reference implementations."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.kid import poly_mmd

from bench import metrics as M

S_COS1 = (1 - math.pi / 4) / (math.pi / 2)  # the authors' s at cos = 1: 0.1366
S_COS0 = 2 / math.pi  # s at cos = 0: 0.6366


def test_paper_similarity_endpoints():
    assert M.paper_similarity(np.array(1.0)) == pytest.approx(0.13662, abs=1e-5)
    assert M.paper_similarity(np.array(0.0)) == pytest.approx(0.63662, abs=1e-5)
    assert M.paper_similarity(np.array(-1.0)) == pytest.approx((1 + math.pi / 4) / (math.pi / 2))


def test_ccs_hand_computed():
    m = M.ccs({0.5: np.array([0.9, 1.0]), 0.1: np.array([0.2, 0.4])})
    assert m.value == pytest.approx((0.3 + 0.95) / 2)
    assert m.n == 4
    assert m.curve == {"psi": [0.1, 0.5], "p_original": pytest.approx([0.3, 0.95])}
    lo, hi = m.ci
    assert 0 <= lo <= m.value <= hi <= 1


def test_ccs_rejects_bad_input():
    with pytest.raises(ValueError, match="same attacked seeds"):
        M.ccs({0.1: np.array([0.2, 0.4]), 0.5: np.array([0.9])})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.ccs({0.1: np.array([1.2])})
    # the axis is any probe's (ψ, inversion steps, …): a value outside [0, 1] is allowed, a non-finite one is not
    assert M.ccs({0.0: np.array([0.5]), 25.0: np.array([0.5])}).value == 0.5
    with pytest.raises(ValueError, match="axis value must be finite"):
        M.ccs({float("nan"): np.array([0.5])})


def test_crs_paper_hand_computed():
    fo = np.array([[1.0, 0.0], [2.0, 0.0]])  # unnormalised on purpose: cosine is scale-free
    fu = np.array([[0.0, 1.0], [0.0, 3.0]])
    att = {0.1: np.array([1.0, 0.0]), 0.5: np.array([[1.0, 1.0]])}  # one image per ψ (authors)
    forget = M.crs_paper(att, fo, fu, retain=False)
    # ψ=0.1: S_O = s(1), S_U = s(0); ψ=0.5: cos = 1/√2 to both, so S_O = S_U
    assert forget.curve["S_O"] == pytest.approx([S_COS1, M.paper_similarity(np.array(2**-0.5))])
    assert forget.curve["S_U"] == pytest.approx([S_COS0, M.paper_similarity(np.array(2**-0.5))])
    assert forget.value == pytest.approx((abs(S_COS0 - S_COS1) + 0) / 2)  # 0.25
    assert forget.ci is None and forget.n == 2  # one attacked image: no interval
    retain = M.crs_paper(att, fo, fu, retain=True)
    assert retain.value == pytest.approx(1 - 0.25)


def test_crs_paper_matches_authors_code_with_one_image_per_psi():
    rng = np.random.default_rng(0)
    fo, fu = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    att = {p: rng.normal(size=(1, 8)) for p in (0.001, 0.05, 0.25)}
    so, su = [], []
    for p in sorted(att):  # the notebook: the attacked image repeated N times, diagonal mean
        den = F.normalize(torch.tensor(att[p]).repeat(20, 1), dim=1)
        for ref, out in ((fo, so), (fu, su)):
            sim = (1 - torch.arctan(den @ F.normalize(torch.tensor(ref), dim=1).T)) / (np.pi / 2)
            out.append(sim.diagonal().mean().item())
    expected = float(np.mean(np.abs(np.array(su) - np.array(so))))
    got = M.crs_paper(att, fo, fu)
    assert got.value == pytest.approx(expected, rel=1e-10)
    assert got.curve["S_O"] == pytest.approx(so) and got.curve["S_U"] == pytest.approx(su)


def test_crs_paper_averages_over_attacked_images():
    fo, fu = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    m = M.crs_paper({0.2: np.array([[1.0, 0.0], [0.0, 1.0]])}, fo, fu)
    assert m.curve["S_O"] == pytest.approx([(S_COS1 + S_COS0) / 2])
    assert m.value == pytest.approx(0.0)
    assert m.n == 2


def _clusters(rng, n=30, d=16):
    e = np.eye(d)
    fo = e[0] * 5 + rng.normal(size=(n, d))
    fu = e[1] * 5 + rng.normal(size=(n, d))
    return fo, fu


def test_crs_separated_sets():
    rng = np.random.default_rng(1)
    fo, fu = _clusters(rng)
    assert M.crs({0.1: fo, 0.3: fo}, fo, fu).value == 1.0
    mirrored = M.crs({0.1: fu, 0.3: fu}, fo, fu)
    assert mirrored.value == 0.0 and mirrored.curve["retrieval"] == [0.0, 0.0]
    half = M.crs({0.1: fu, 0.3: fo}, fo, fu)
    assert half.value == 0.5 and half.curve == {"psi": [0.1, 0.3], "retrieval": [0.0, 1.0]}
    assert half.n == 60 and half.ci[0] <= 0.5 <= half.ci[1]


def test_crs_indistinguishable_sets_near_half():
    rng = np.random.default_rng(2)
    fo, fu = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    att = {p: rng.normal(size=(400, 16)) for p in (0.1, 0.5)}
    assert M.crs(att, fo, fu).value == pytest.approx(0.5, abs=0.1)


def test_crs_ties_count_half():
    rng = np.random.default_rng(3)
    fo = rng.normal(size=(10, 4))
    assert M.crs({0.2: rng.normal(size=(5, 4))}, fo, fo.copy()).value == 0.5


def test_psi_recover():
    psis = [0.0, 0.1, 0.2, 0.3]
    assert M.psi_recover(psis, [0.0, 0.2, 0.6, 1.0]) == pytest.approx(0.1 + 0.3 / 0.4 * 0.1)
    assert M.psi_recover(psis, [0.0, 0.5, 0.7, 1.0]) == pytest.approx(0.1)
    assert M.psi_recover(psis, [0.6, 0.2, 0.9, 1.0]) == 0.0
    assert M.psi_recover(psis, [0.1, 0.2, 0.3, 0.49]) is None
    assert M.psi_recover(psis, [0.0, 0.1, 0.2, 0.9], threshold=0.8) == pytest.approx(0.2 + 0.6 / 0.7 * 0.1)
    with pytest.raises(ValueError, match="increasing"):
        M.psi_recover([0.2, 0.1], [0.0, 1.0])
    with pytest.raises(ValueError, match="equal"):
        M.psi_recover([0.1, 0.2], [0.0])


def test_detection_erasure_retention():
    d = M.detection_rate(np.array([True, False, True, True]))
    assert d.value == 0.75 and d.n == 4 and d.ci[0] <= 0.75 <= d.ci[1]
    e = M.erasure([0, 0, 1, 0], [1, 1, 1, 0])
    assert e.value == pytest.approx(1 - 0.25 / 0.75) and e.n == 8
    assert e.ci[0] <= e.value <= e.ci[1]
    none = M.erasure([0, 1], [0, 0])
    assert none.value is None and none.ci is None
    r = M.retention([1, 1, 0, 0], [1, 1, 1, 1])
    assert r.value == pytest.approx(0.5)
    assert M.retention([1, 0], [0, 0]).value is None
    with pytest.raises(ValueError, match="detect_u"):
        M.erasure([0.3, 0.2], [1, 1])


def test_bootstrap_ci_behaviour():
    rng = np.random.default_rng(4)
    x = rng.normal(loc=1.0, size=200)
    ci = M.bootstrap_ci(x, seed=7)
    assert ci == M.bootstrap_ci(x, seed=7)  # seeded
    assert ci[0] < x.mean() < ci[1]
    assert ci[1] - ci[0] == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.25)
    assert M.bootstrap_ci([1.0]) is None
    # custom statistic on two independent samples
    ci2 = M.bootstrap_ci(x, x + 1, statistic=lambda a, b: b.mean() - a.mean())
    assert ci2[0] < 1.0 < ci2[1]


def _kid_loop(x, y):
    """Direct O(n²) unbiased MMD² with k = (xᵀy/d + 1)³ (Binkowski et al. 2018, eq. for KID)."""
    k = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_references():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 6)), rng.normal(0.5, 1.0, size=(30, 6))
    mean, std = M.kid(x, y)  # subset = whole sets → one exact estimate
    assert std == 0.0
    assert mean == pytest.approx(poly_mmd(torch.tensor(x), torch.tensor(y)).item(), rel=1e-10)
    assert mean == pytest.approx(_kid_loop(x, y), rel=1e-10)
    # unequal sizes: subsets of min(n) each, seeded
    z = rng.normal(size=(12, 6))
    a = M.kid(x, z, n_subsets=20, seed=3)
    assert a == M.kid(x, z, n_subsets=20, seed=3) and a[1] > 0
    with pytest.raises(ValueError, match="subset_size"):
        M.kid(x, z, subset_size=13)


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    shifted = rng.normal(1.0, 1.0, size=(300, 16))
    same, _ = M.kid(x, y, subset_size=100, n_subsets=50)
    far, _ = M.kid(x, shifted, subset_size=100, n_subsets=50)
    assert abs(same) < 0.05
    assert far > 1.0 and far > 20 * abs(same)


def test_kid_by_psi_is_fresh_per_psi():
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(50, 8))
    att = {0.1: rng.normal(2.0, 1.0, size=(10, 8)), 0.5: rng.normal(size=(10, 8))}
    m = M.kid_by_psi(att, ref, n_subsets=10, seed=0)
    for k, p in enumerate((0.1, 0.5)):  # no accumulation across ψ (the authors' D9c)
        assert m.curve["kid"][k] == pytest.approx(M.kid(att[p], ref, n_subsets=10, seed=0)[0])
    assert m.curve["kid"][0] > m.curve["kid"][1]
    assert m.value == pytest.approx(np.mean(m.curve["kid"])) and m.n == 20 and m.ci is None


def test_aggregate_over_prompts():
    ms = [
        M.Metric(0.2, (0.1, 0.3), 10, {"psi": [0.1, 0.5], "r": [0.0, 0.4]}),
        M.Metric(None, None, 8),
        M.Metric(0.6, (0.5, 0.7), 10, {"psi": [0.1, 0.5], "r": [0.2, 1.0]}),
    ]
    a = M.aggregate(ms)
    assert a.value == pytest.approx(0.4) and a.n == 20  # the None prompt is skipped
    assert a.curve == {"psi": [0.1, 0.5], "r": pytest.approx([0.1, 0.7])}
    assert a.ci[0] <= 0.4 <= a.ci[1]
    assert M.aggregate([ms[0]]).ci == (0.1, 0.3)  # one prompt keeps its image-level interval
    assert M.aggregate([ms[1]]).value is None
    assert M.aggregate([ms[0], M.Metric(0.5, None, 3)]).curve is None  # curves only if all have one


def test_metric_to_dict_is_json():
    m = M.ccs({0.1: np.array([0.2, 0.4]), 0.5: np.array([0.9, 1.0])})
    d = json.loads(json.dumps(m.to_dict()))
    assert set(d) == {"value", "ci", "n", "curve"} and d["n"] == 4 and len(d["ci"]) == 2
    assert M.Metric(None).to_dict() == {"value": None, "ci": None, "n": 0}
