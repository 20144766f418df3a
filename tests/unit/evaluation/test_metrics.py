from __future__ import annotations

import math

import numpy as np
import pytest

from service.evaluation import metrics
from service.evaluation.metrics import Confusion


def test_wilson_interval_known_values() -> None:
    # Wilson 95 % interval for 81/100 (Newcombe 1998 style check against the closed form).
    e = metrics.wilson_interval(81, 100)
    assert e.value == pytest.approx(0.81)
    assert e.low == pytest.approx(0.7222, abs=1e-4)
    assert e.high == pytest.approx(0.8749, abs=1e-4)
    # At the boundary the interval stays inside [0, 1] and is not degenerate.
    full = metrics.wilson_interval(20, 20)
    assert full.value == 1.0 and full.high == 1.0 and 0.8 < full.low < 0.85  # type: ignore[operator]
    assert metrics.wilson_interval(0, 0).value is None


def test_binary_report_table() -> None:
    labels = np.array([1] * 10 + [0] * 90)
    probs = np.array([0.9] * 8 + [0.1] * 2 + [0.8] * 3 + [0.2] * 87)
    r = metrics.binary_report(labels, probs, threshold=0.5)
    assert r.confusion == Confusion(tp=8, fp=3, tn=87, fn=2)
    assert r.sensitivity.value == pytest.approx(0.8)
    assert r.specificity.value == pytest.approx(87 / 90)
    assert r.ppv.value == pytest.approx(8 / 11)
    assert r.npv.value == pytest.approx(87 / 89)
    assert r.accuracy.value == pytest.approx(0.95)
    po, pe = 0.95, (11 * 10 + 89 * 90) / 100**2
    assert r.kappa.value == pytest.approx((po - pe) / (1 - pe))
    assert r.kappa.low < r.kappa.value < r.kappa.high  # type: ignore[operator]


def test_kappa_perfect_and_chance() -> None:
    y = np.array([1, 0] * 50)
    assert metrics.cohen_kappa(Confusion.from_arrays(y, y)).value == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noise = rng.random(4000) < 0.5
    labels = rng.random(4000) < 0.5
    k = metrics.cohen_kappa(Confusion.from_arrays(labels, noise))
    assert abs(k.value) < 0.06  # type: ignore[arg-type]
    assert k.low < 0 < k.high  # type: ignore[operator]


def test_auc_against_pairwise_definition() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + 0.4 * y, 1)  # rounded: plenty of ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]).sum()
                + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    a = metrics.auc(y, s)
    assert a.value == pytest.approx(pairwise)
    assert a.low < a.value < a.high  # type: ignore[operator]
    assert metrics.auc(np.zeros(5), np.arange(5)).value is None


def test_roc_curve_endpoints_and_monotone() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    fpr, tpr, thr = metrics.roc_curve(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert math.isinf(thr[0])
    # Trapezoid area equals the Mann-Whitney AUC.
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auc(y, s).value)


def test_choose_threshold_meets_sensitivity_with_best_specificity() -> None:
    y = np.array([1] * 20 + [0] * 80)
    s = np.concatenate([np.linspace(0.3, 0.95, 20), np.linspace(0.0, 0.6, 80)])
    t, sens, spec = metrics.choose_threshold(y, s, min_sensitivity=0.95)
    predicted = s >= t
    assert sens == pytest.approx(((predicted & (y == 1)).sum()) / 20) and sens >= 0.95
    assert spec == pytest.approx(((~predicted & (y == 0)).sum()) / 80)
    # No threshold with sensitivity >= 0.95 has better specificity.
    for cand in np.unique(s):
        p = s >= cand
        if (p & (y == 1)).sum() / 20 >= 0.95:
            assert (~p & (y == 0)).sum() / 80 <= spec + 1e-12
    with pytest.raises(ValueError):
        metrics.choose_threshold(np.ones(4), np.arange(4.0))


def test_choose_threshold_takes_the_higher_sensitivity_at_equal_specificity() -> None:
    # Thresholds at 0.9 (sensitivity 2/4) and at 0.8 (3/4) both meet the target 0.5 at
    # specificity 1.0 (the top negative is 0.7); the rule takes 0.8's higher sensitivity.
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.95, 0.9, 0.8, 0.1, 0.7, 0.6, 0.5])
    t, sens, spec = metrics.choose_threshold(y, s, min_sensitivity=0.5)
    assert spec == 1.0 and sens == 0.75
    assert 0.7 < t < 0.8  # midway between the last positive taken and the top negative


def test_rsna_weighted_log_loss_definition() -> None:
    y = np.array([[1, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=float)
    p = np.full((2, 8), 0.5)
    # Any study with p = 0.5 everywhere scores ln 2 whatever its weights.
    assert metrics.rsna_weighted_log_loss(y, p) == pytest.approx(math.log(2))
    p2 = p.copy()
    p2[0, 0] = 0.9  # patient positive (14), C1 negative (1), C2 positive (2), C3..C7 (5 x 1)
    expected_first = (14 * -math.log(0.9) + (1 + 2 + 5) * math.log(2)) / 22
    assert metrics.rsna_weighted_log_loss(y, p2) == pytest.approx(
        (expected_first + math.log(2)) / 2)
    with pytest.raises(ValueError):
        metrics.rsna_weighted_log_loss(y[:, :7], p[:, :7])


def test_rsna_constant_prevalence_scores_about_056() -> None:
    # Published RSNA 2022 training prevalence per vertebra; patient = any vertebra.
    prevalence = np.array([0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195])
    rng = np.random.default_rng(0)
    vertebrae = (rng.random((20000, 7)) < prevalence).astype(float)
    y = np.c_[vertebrae.max(axis=1), vertebrae]
    constant = np.tile(y.mean(axis=0), (len(y), 1))
    assert metrics.rsna_weighted_log_loss(y, constant) == pytest.approx(0.56, abs=0.01)


def test_dice() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros_like(a)
    a[:2] = 3
    b[1:3] = 3
    assert metrics.dice(a, b, 3) == pytest.approx(0.5)
    assert metrics.dice(a, b, 5) is None


def test_bootstrap_interval_reproducible() -> None:
    v = np.linspace(0, 1, 50)
    a, b = metrics.bootstrap_interval(v, seed=3), metrics.bootstrap_interval(v, seed=3)
    assert a == b and a.low < 0.5 < a.high  # type: ignore[operator]


def test_estimate_format_keeps_fractions_readable() -> None:
    """AUC/kappa to three decimals; "to" separates the bounds so a negative kappa reads."""
    assert metrics.Estimate(0.9512, 0.9, 0.98).format(percent=False) == "0.951 (0.900 to 0.980)"
    assert metrics.Estimate(-0.1, -0.3, 0.2).format(percent=False) == "-0.100 (-0.300 to 0.200)"
    assert metrics.Estimate(0.8, 0.7, 0.9, 8, 10).format() == "80.0 % (70.0 to 90.0) [8/10]"
