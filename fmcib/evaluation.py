"""Evaluation statistics: AUC, balanced accuracy, mean average precision, bootstrap CIs, paired permutation tests.

Every metric is computed for a whole batch of resamples at once (arrays of shape ``(B, n)``), so the
paper's defaults (9999 bootstrap resamples, 1000 permutations) run in seconds for a few hundred
samples. Binary scores are the probability of the greater label (``predict_proba(X)[:, 1]``);
multiclass scores are ``(n, K)`` probabilities in the order of the sorted labels; multiclass metrics
are one-vs-rest macro averages, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

__all__ = [
    "METRICS",
    "auc",
    "balanced_accuracy",
    "mean_average_precision",
    "score_metric",
    "bootstrap_ci",
    "permutation_test",
    "BootstrapResult",
    "PermutationResult",
]

_MAX_BATCH_ELEMENTS = 4_000_000  # resampled score values held at once


def _prepare(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels as codes 0..K-1, scores as (n,) for binary or (n, K) for multiclass; checks shapes."""
    y = np.asarray(y_true).ravel()
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if len(y) != len(s):
        raise ValueError(f"y_true has {len(y)} samples but y_score has {len(s)}")
    if len(y) == 0:
        raise ValueError("no samples")
    if pd.isna(y).any() or not np.all(np.isfinite(s)):
        raise ValueError("y_true and y_score must not contain missing or infinite values; drop those rows first")
    classes, codes = np.unique(y, return_inverse=True)
    if s.ndim == 2 and s.shape[1] == 2 and len(classes) <= 2:
        s = s[:, 1]
    if s.ndim == 2 and s.shape[1] != len(classes):
        raise ValueError(f"y_score has {s.shape[1]} columns but y_true has {len(classes)} classes {classes.tolist()}")
    if s.ndim == 1 and len(classes) > 2:
        raise ValueError(f"y_true has {len(classes)} classes: y_score must be (n, {len(classes)}) probabilities")
    return classes, codes.astype(np.int64), s


def _binary_auc(pos: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUC per row of (B, m) boolean ``pos`` and scores ``s`` (Mann-Whitney, ties count 1/2)."""
    ranks = stats.rankdata(s, axis=-1)
    n1 = pos.sum(axis=-1)
    n0 = pos.shape[-1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * pos).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _binary_ap(pos: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision per row, as ``sklearn.metrics.average_precision_score`` (one step per distinct score)."""
    order = np.argsort(-s, axis=-1, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=-1)
    hits = np.take_along_axis(pos, order, axis=-1)
    tp = np.cumsum(hits, axis=-1)
    seen = np.arange(1, s.shape[-1] + 1)
    last_of_tie = np.ones_like(hits, dtype=bool)
    last_of_tie[..., :-1] = s_sorted[..., :-1] != s_sorted[..., 1:]
    tp_at = np.where(last_of_tie, tp, 0)
    previous = np.zeros_like(tp_at)
    previous[..., 1:] = np.maximum.accumulate(tp_at, axis=-1)[..., :-1]
    gained = np.where(last_of_tie, tp - previous, 0)
    n1 = pos.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (gained * tp / seen).sum(axis=-1) / n1


def _per_class(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], codes: np.ndarray, s: np.ndarray) -> np.ndarray:
    if s.ndim == codes.ndim:  # binary
        return fn(codes == 1, s)
    k = s.shape[-1]
    return np.mean([fn(codes == c, s[..., c]) for c in range(k)], axis=0)


def _auc_batch(codes: np.ndarray, s: np.ndarray) -> np.ndarray:
    return _per_class(_binary_auc, codes, s)


def _ap_batch(codes: np.ndarray, s: np.ndarray) -> np.ndarray:
    return _per_class(_binary_ap, codes, s)


def _balanced_accuracy_batch(codes: np.ndarray, s: np.ndarray) -> np.ndarray:
    if s.ndim == codes.ndim:
        pred, k = (s >= 0.5).astype(np.int64), 2
    else:
        pred, k = np.argmax(s, axis=-1), s.shape[-1]
    recalls = []
    for c in range(k):
        true_c = codes == c
        n_c = true_c.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(n_c > 0, (true_c & (pred == c)).sum(axis=-1) / n_c, np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "auc": _auc_batch,
    "balanced_accuracy": _balanced_accuracy_batch,
    "average_precision": _ap_batch,
}


def _metric_fn(metric: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    return METRICS[metric]


def score_metric(metric: str, y_true: Any, y_score: Any) -> float:
    """One metric (``"auc"``, ``"balanced_accuracy"`` or ``"average_precision"``) of scores against labels."""
    _, codes, s = _prepare(y_true, y_score)
    return float(_metric_fn(metric)(codes[None], s[None])[0])


def auc(y_true: Any, y_score: Any) -> float:
    """ROC AUC; multiclass: macro average of one-vs-rest AUCs (``roc_auc_score(multi_class="ovr")``)."""
    return score_metric("auc", y_true, y_score)


def balanced_accuracy(y_true: Any, y_score: Any) -> float:
    """Balanced accuracy of the predicted class (argmax, or probability >= 0.5 for binary scores)."""
    return score_metric("balanced_accuracy", y_true, y_score)


def mean_average_precision(y_true: Any, y_score: Any) -> float:
    """Average precision; multiclass: macro average over one-vs-rest problems."""
    return score_metric("average_precision", y_true, y_score)


@dataclass(frozen=True)
class BootstrapResult:
    """A metric with its bootstrap confidence interval."""

    metric: str
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    method: str
    n: int
    n_resamples: int
    standard_error: float
    n_invalid: int = 0
    distribution: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    @property
    def ci(self) -> tuple[float, float]:
        """(low, high)."""
        return self.ci_low, self.ci_high

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (without the bootstrap distribution)."""
        d = asdict(self)
        d.pop("distribution")
        return d

    @property
    def summary(self) -> pd.DataFrame:
        """One-row table."""
        return pd.DataFrame([self.to_dict()])


@dataclass(frozen=True)
class PermutationResult:
    """Paired permutation test of ``metric(score_a) - metric(score_b)``."""

    metric: str
    metric_a: float
    metric_b: float
    statistic: float
    p_value: float
    n: int
    n_permutations: int
    alternative: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @property
    def summary(self) -> pd.DataFrame:
        """One-row table."""
        return pd.DataFrame([self.to_dict()])


def _resample_indices(codes: np.ndarray, b: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    n = len(codes)
    if not stratified:
        return rng.integers(0, n, size=(b, n))
    parts = []
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        parts.append(members[rng.integers(0, len(members), size=(b, len(members)))])
    return np.concatenate(parts, axis=1)


def _chunks(total: int, per_row: int) -> list[int]:
    size = max(1, _MAX_BATCH_ELEMENTS // max(1, per_row))
    return [min(size, total - start) for start in range(0, total, size)]


def bootstrap_ci(
    y_true: Any,
    y_score: Any,
    metric: str = "auc",
    n_resamples: int = 9999,
    confidence: float = 0.95,
    method: str = "percentile",
    stratified: bool = True,
    random_state: int | np.random.Generator | None = None,
) -> BootstrapResult:
    """Bootstrap confidence interval of a metric (the paper: 9999 resamples).

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Labels.
    y_score : array-like of shape (n,) or (n, K)
        Positive-class probability (binary) or class probabilities (multiclass).
    metric : {"auc", "balanced_accuracy", "average_precision"}, default="auc"
    n_resamples : int, default=9999
    confidence : float, default=0.95
    method : {"percentile", "bca"}, default="percentile"
        ``"bca"``: bias-corrected and accelerated (jackknife acceleration), as ``scipy.stats.bootstrap``.
    stratified : bool, default=True
        Resample within each class, keeping class counts (every resample then has every class).
        ``False`` resamples the pairs freely, as ``scipy.stats.bootstrap(paired=True)``.
    random_state : int or numpy.random.Generator, optional

    Returns
    -------
    BootstrapResult
        Estimate on all samples, CI, bootstrap standard error and the resampled values. Resamples
        where the metric is undefined (a class missing) are dropped and counted in ``n_invalid``.
    """
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    fn = _metric_fn(metric)
    _, codes, s = _prepare(y_true, y_score)
    n = len(codes)
    estimate = float(fn(codes[None], s[None])[0])
    rng = np.random.default_rng(random_state)
    per_row = n * (s.shape[1] if s.ndim == 2 else 1)
    values = []
    for b in _chunks(int(n_resamples), per_row):
        idx = _resample_indices(codes, b, rng, stratified)
        values.append(fn(codes[idx], s[idx]))
    dist = np.concatenate(values)
    valid = dist[np.isfinite(dist)]
    if len(valid) == 0:
        raise ValueError(f"{metric} is undefined on every resample (does y_true hold at least two classes?)")
    alpha = (1 - confidence) / 2
    if method == "percentile":
        probs = np.array([alpha, 1 - alpha])
    else:
        probs = _bca_levels(fn, codes, s, valid, estimate, alpha)
    lo, hi = np.quantile(valid, probs)
    return BootstrapResult(metric, estimate, float(lo), float(hi), float(confidence), method, n, int(n_resamples),
                           float(np.std(valid, ddof=1)) if len(valid) > 1 else 0.0,
                           int(len(dist) - len(valid)), valid)


def _bca_levels(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], codes: np.ndarray, s: np.ndarray,
                dist: np.ndarray, estimate: float, alpha: float) -> np.ndarray:
    """Bias-corrected and accelerated quantile levels (Efron 1987; as scipy.stats.bootstrap)."""
    n = len(codes)
    z0 = special.ndtri((np.sum(dist < estimate) + 0.5 * np.sum(dist == estimate)) / len(dist))
    keep = ~np.eye(n, dtype=bool)
    loo = np.broadcast_to(np.arange(n), (n, n))[keep].reshape(n, n - 1)  # row i leaves sample i out
    step = max(1, _MAX_BATCH_ELEMENTS // (n * (s.shape[1] if s.ndim == 2 else 1)))
    jack = np.concatenate([fn(codes[loo[i:i + step]], s[loo[i:i + step]]) for i in range(0, n, step)])
    d = np.nanmean(jack) - jack
    d = d[np.isfinite(d)]
    denom = 6.0 * np.sum(d**2) ** 1.5
    a = np.sum(d**3) / denom if denom > 0 else 0.0
    z = special.ndtri(np.array([alpha, 1 - alpha]))
    return special.ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))


def permutation_test(
    y_true: Any,
    score_a: Any,
    score_b: Any,
    metric: str = "auc",
    n_permutations: int = 1000,
    alternative: str = "two-sided",
    random_state: int | np.random.Generator | None = None,
) -> PermutationResult:
    """Paired permutation test: do two models' scores on the same samples differ in ``metric``?

    Under the null hypothesis the two scores of each sample are exchangeable, so each permutation
    swaps them sample by sample with probability 1/2. The p-value counts the observed assignment
    (``(1 + hits) / (1 + n_permutations)``); two-sided doubles the smaller one-sided p-value, as
    ``scipy.stats.permutation_test`` does.

    Returns
    -------
    PermutationResult
        ``statistic = metric(a) - metric(b)`` and its p-value.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    fn = _metric_fn(metric)
    _, codes, a = _prepare(y_true, score_a)
    _, _, b = _prepare(y_true, score_b)
    if a.shape != b.shape:
        raise ValueError(f"score_a has shape {a.shape} but score_b has shape {b.shape}")
    n = len(codes)
    ma, mb = (float(v) for v in fn(codes[None], np.stack([a, b])))
    observed = ma - mb
    rng = np.random.default_rng(random_state)
    per_row = n * (a.shape[1] if a.ndim == 2 else 1)
    null = []
    for k in _chunks(int(n_permutations), per_row):
        swap = rng.random((k, n)) < 0.5
        if a.ndim == 2:
            swap = swap[..., None]
        sa, sb = np.where(swap, b, a), np.where(swap, a, b)
        null.append(fn(np.broadcast_to(codes, (k, n)), sa) - fn(np.broadcast_to(codes, (k, n)), sb))
    d = np.concatenate(null)
    eps = 1e-12 * max(1.0, abs(observed))
    p_greater = (1 + np.sum(d >= observed - eps)) / (1 + len(d))
    p_less = (1 + np.sum(d <= observed + eps)) / (1 + len(d))
    p = {"greater": p_greater, "less": p_less, "two-sided": min(1.0, 2 * min(p_greater, p_less))}[alternative]
    return PermutationResult(metric, ma, mb, observed, float(p), n, int(n_permutations), alternative)
