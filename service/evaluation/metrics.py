"""Evaluation metrics in plain numpy, so the runtime (no torch, no scikit-learn) can report them.

Conventions: labels are 0/1 arrays, probabilities are floats in [0, 1]. Every interval is a
two-sided 95 % confidence interval. Proportions use the Wilson score interval (well behaved at
0 and 1, where sensitivity on a small synthetic set often sits); Cohen's kappa uses the
large-sample standard error of Cohen (1960); AUC uses the Hanley-McNeil (1982) standard error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from service.findings import VERTEBRAE

logger = logging.getLogger(__name__)

Z95 = 1.959963984540054
"""Standard normal quantile for a two-sided 95 % interval."""

RSNA_LABELS: tuple[str, ...] = ("patient_overall", *VERTEBRAE)
"""Column order of the RSNA 2022 metric (patient first, then the vertebrae)."""
RSNA_BASE_WEIGHTS = np.array([7.0, 1, 1, 1, 1, 1, 1, 1])
"""Weights of a negative label; a positive label weighs twice as much ([14, 2, ..., 2])."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % confidence interval; None where undefined (0/0)."""

    value: float | None
    low: float | None
    high: float | None
    numerator: int | None = None
    denominator: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def format(self, percent: bool = True) -> str:
        if self.value is None or self.low is None or self.high is None:
            return "n/a"
        # Percentages to 0.1 %, fractions (AUC, kappa, Dice) to 0.001: the same resolution.
        scale, unit, digits = (100.0, " %", 1) if percent else (1.0, "", 3)
        text = (f"{self.value * scale:.{digits}f}{unit} "
                f"({self.low * scale:.{digits}f} to {self.high * scale:.{digits}f})")
        if self.numerator is not None and self.denominator is not None:
            text += f" [{self.numerator}/{self.denominator}]"
        return text


def wilson_interval(successes: int, total: int, z: float = Z95) -> Estimate:
    """Proportion ``successes / total`` with its Wilson score interval."""
    if total <= 0:
        return Estimate(None, None, None, successes, total)
    p = successes / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), successes, total)


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def from_arrays(cls, labels: np.ndarray, predicted: np.ndarray) -> Confusion:
        y = np.asarray(labels).astype(bool)
        p = np.asarray(predicted).astype(bool)
        return cls(tp=int((y & p).sum()), fp=int((~y & p).sum()),
                   tn=int((~y & ~p).sum()), fn=int((y & ~p).sum()))

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def cohen_kappa(confusion: Confusion, z: float = Z95) -> Estimate:
    """Agreement between prediction and reference beyond chance, with Cohen's (1960) SE."""
    c = confusion
    n = c.n
    if n == 0:
        return Estimate(None, None, None)
    po = (c.tp + c.tn) / n
    pe = ((c.tp + c.fp) * (c.tp + c.fn) + (c.fn + c.tn) * (c.fp + c.tn)) / (n * n)
    if pe >= 1.0:
        # Both raters constant and identical: agreement is perfect but kappa is undefined.
        return Estimate(None, None, None)
    kappa = (po - pe) / (1 - pe)
    se = math.sqrt(max(po * (1 - po), 0.0) / n) / (1 - pe)
    return Estimate(kappa, max(-1.0, kappa - z * se), min(1.0, kappa + z * se))


@dataclass(frozen=True)
class BinaryReport:
    """The table the clinical literature reports for a triage product, at one threshold."""

    threshold: float
    confusion: Confusion
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    accuracy: Estimate
    kappa: Estimate

    def as_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "confusion": asdict(self.confusion),
            "sensitivity": self.sensitivity.as_dict(),
            "specificity": self.specificity.as_dict(),
            "ppv": self.ppv.as_dict(),
            "npv": self.npv.as_dict(),
            "accuracy": self.accuracy.as_dict(),
            "kappa": self.kappa.as_dict(),
        }


def binary_report(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> BinaryReport:
    """Decision ``probability >= threshold`` against the reference labels."""
    predicted = np.asarray(probabilities, dtype=float) >= threshold
    c = Confusion.from_arrays(labels, predicted)
    return BinaryReport(
        threshold=float(threshold),
        confusion=c,
        sensitivity=wilson_interval(c.tp, c.tp + c.fn),
        specificity=wilson_interval(c.tn, c.tn + c.fp),
        ppv=wilson_interval(c.tp, c.tp + c.fp),
        npv=wilson_interval(c.tn, c.tn + c.fn),
        accuracy=wilson_interval(c.tp + c.tn, c.n),
        kappa=cohen_kappa(c),
    )


def auc(labels: np.ndarray, scores: np.ndarray, z: float = Z95) -> Estimate:
    """Area under the ROC curve (Mann-Whitney, ties count one half) with Hanley-McNeil CI.

    Undefined (None) when one class is absent, which happens for rare levels on small sets.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return Estimate(None, None, None, n_pos, n_pos + n_neg)
    ranks = _average_ranks(s)
    value = (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    q1 = value / (2 - value)
    q2 = 2 * value * value / (1 + value)
    var = (value * (1 - value) + (n_pos - 1) * (q1 - value * value)
           + (n_neg - 1) * (q2 - value * value)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return Estimate(float(value), max(0.0, value - z * se), min(1.0, value + z * se),
                    n_pos, n_pos + n_neg)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=float)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending.

    The first point is (0, 0) at threshold +inf; each later point is the decision
    ``score >= threshold`` for a distinct score.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    thresholds = np.unique(s)[::-1]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = [0.0]
    fpr = [0.0]
    for t in thresholds:
        p = s >= t
        tpr.append(float((p & y).sum()) / n_pos)
        fpr.append(float((p & ~y).sum()) / n_neg)
    return np.array(fpr), np.array(tpr), np.concatenate([[np.inf], thresholds])


def choose_threshold(labels: np.ndarray, scores: np.ndarray,
                     min_sensitivity: float = 0.95) -> tuple[float, float, float]:
    """Operating point: the best specificity among thresholds with sensitivity >= target.

    Returns (threshold, sensitivity, specificity). Ties in specificity go to the higher
    sensitivity (the lower threshold): lowering the threshold past positives alone costs no
    specificity, and the higher threshold would be a dominated operating point. The
    threshold is placed midway between the chosen score and the next lower distinct score,
    so it is not sitting exactly on a validation case.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    if y.sum() == 0 or (~y).sum() == 0:
        raise ValueError("choosing a threshold needs both positive and negative cases")
    distinct = np.unique(s)[::-1]
    best: tuple[float, float, float] | None = None
    for i, t in enumerate(distinct):
        predicted = s >= t
        sens = float((predicted & y).sum() / y.sum())
        spec = float((~predicted & ~y).sum() / (~y).sum())
        if sens >= min_sensitivity and (best is None or spec > best[2]
                                        or (spec == best[2] and sens > best[1])):
            lower = distinct[i + 1] if i + 1 < len(distinct) else 0.0
            best = (float((t + lower) / 2.0), sens, spec)
    assert best is not None  # the lowest threshold always reaches sensitivity 1
    return best


def rsna_weighted_log_loss(labels: np.ndarray, probabilities: np.ndarray,
                           eps: float = 1e-15) -> float:
    """RSNA 2022 Cervical Spine Fracture Detection metric.

    ``labels`` and ``probabilities`` are (n_studies, 8) in :data:`RSNA_LABELS` order.
    Per study: binary log loss of each label weighted by [7, 1, ..., 1] when the label is
    negative and [14, 2, ..., 2] when positive, summed and divided by that study's weight
    sum; then averaged over studies. A constant prediction at RSNA training prevalence scores
    about 0.56; lower is better.
    """
    y = np.asarray(labels, dtype=float)
    p = np.clip(np.asarray(probabilities, dtype=float), eps, 1 - eps)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(RSNA_LABELS):
        raise ValueError(f"expected (n, {len(RSNA_LABELS)}) arrays, got {y.shape} and {p.shape}")
    weights = np.where(y > 0.5, 2.0 * RSNA_BASE_WEIGHTS, RSNA_BASE_WEIGHTS)
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    per_study = (weights * losses).sum(axis=1) / weights.sum(axis=1)
    return float(per_study.mean())


def dice(reference: np.ndarray, predicted: np.ndarray, label: int) -> float | None:
    """Dice overlap of one label between two label maps; None when absent from both."""
    a = np.asarray(reference) == label
    b = np.asarray(predicted) == label
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * float((a & b).sum()) / total


def bootstrap_interval(values: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                       ) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap 95 % interval (seeded, reproducible)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Estimate(None, None, None)
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(n_resamples, v.size), replace=True).mean(axis=1)
    return Estimate(float(v.mean()), float(np.quantile(means, 0.025)),
                    float(np.quantile(means, 0.975)))
