"""Survival analysis of a score on lifelines: risk groups, Kaplan-Meier, log-rank, Cox, C-index, horizon AUC."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .evaluation import auc
from .files import atomic_path

__all__ = ["RiskGroups", "logrank", "cox_univariate", "concordance", "horizon_labels", "plot_km",
           "survival_report", "SurvivalReport"]


def _survival_arrays(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event)
    if t.shape != e.shape or t.ndim != 1:
        raise ValueError(f"time and event must be 1-D of equal length, got {t.shape} and {e.shape}")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("survival times must be finite and non-negative; drop rows with missing times first")
    values = set(np.unique(e[~pd.isna(e)]).tolist())
    if not values <= {0, 1, True, False} or pd.isna(e).any():
        raise ValueError(f"event must be 0/1 (1 = event observed), got values {sorted(map(str, values))[:5]}")
    return t, e.astype(bool)


class RiskGroups:
    """Split a score into risk groups at thresholds chosen on a tuning set and applied unchanged elsewhere.

    Parameters
    ----------
    thresholds : sequence of float, optional
        Fixed cut points. Default: the ``quantiles`` of the tuning scores.
    quantiles : sequence of float, default=(0.5,)
        Used by :meth:`fit` when no thresholds are given (the median: two groups).
    labels : sequence of str, optional
        Group names, lowest score first (default ``"low"``/``"high"`` for two groups, else ``"G1"``...).

    Attributes
    ----------
    thresholds_ : numpy.ndarray
    """

    def __init__(self, thresholds: Sequence[float] | None = None, quantiles: Sequence[float] = (0.5,),
                 labels: Sequence[str] | None = None) -> None:
        self.thresholds = thresholds
        self.quantiles = quantiles
        self.labels = labels

    def fit(self, scores: Any) -> RiskGroups:
        """Choose the thresholds on tuning-set scores (or take the given ones)."""
        s = np.asarray(scores, dtype=np.float64)
        s = s[np.isfinite(s)]
        if self.thresholds is not None:
            self.thresholds_ = np.sort(np.asarray(self.thresholds, dtype=np.float64))
        else:
            if len(s) == 0:
                raise ValueError("no finite tuning scores to choose thresholds from")
            self.thresholds_ = np.quantile(s, np.sort(np.asarray(self.quantiles, dtype=np.float64)))
        n_groups = len(self.thresholds_) + 1
        labels = self.labels or (["low", "high"] if n_groups == 2 else [f"G{i + 1}" for i in range(n_groups)])
        if len(labels) != n_groups:
            raise ValueError(f"{len(labels)} labels for {n_groups} groups")
        self.labels_ = list(labels)
        return self

    def transform(self, scores: Any) -> np.ndarray:
        """Group label of each score: scores above a threshold go to the higher group."""
        if not hasattr(self, "thresholds_"):
            raise RuntimeError("RiskGroups is not fitted: call fit(tuning_scores) first")
        s = np.asarray(scores, dtype=np.float64)
        idx = np.searchsorted(self.thresholds_, s, side="left")
        return np.asarray(self.labels_, dtype=object)[idx]

    def fit_transform(self, scores: Any) -> np.ndarray:
        """fit then transform on the same scores."""
        return self.fit(scores).transform(scores)


def logrank(time: Any, event: Any, groups: Any) -> dict[str, float]:
    """Log-rank test between two or more groups (lifelines ``multivariate_logrank_test``)."""
    from lifelines.statistics import multivariate_logrank_test

    t, e = _survival_arrays(time, event)
    g = np.asarray(groups)
    if len(np.unique(g)) < 2:
        raise ValueError("log-rank test needs at least two groups")
    r = multivariate_logrank_test(t, g, e)
    return {"test_statistic": float(r.test_statistic), "p_value": float(r.p_value),
            "degrees_of_freedom": int(r.degrees_of_freedom), "n": len(t), "events": int(e.sum())}


def cox_univariate(time: Any, event: Any, covariate: Any, name: str = "score") -> dict[str, Any]:
    """Univariate Cox model: beta, hazard ratio with 95% CI and Wald p (the paper's Extended Data Table 3).

    ``covariate`` may be numeric or a group label; labels become a 0/1 indicator of the later group in
    sorted order (``"high"`` vs ``"low"``), and the reference group is reported.
    """
    from lifelines import CoxPHFitter

    t, e = _survival_arrays(time, event)
    x = np.asarray(covariate)
    reference = None
    if x.dtype.kind not in "biuf":
        levels = sorted(np.unique(x.astype(str)), key=lambda v: (v != "low", v))
        if len(levels) != 2:
            raise ValueError(f"a group covariate must have 2 levels for a univariate Cox model, got {levels}")
        reference = levels[0]
        x = (x.astype(str) == levels[1]).astype(np.float64)
    frame = pd.DataFrame({"T": t, "E": e.astype(int), name: x.astype(np.float64)})
    cph = CoxPHFitter().fit(frame, duration_col="T", event_col="E")
    row = cph.summary.loc[name]
    return {"covariate": name, "reference": reference, "beta": float(row["coef"]), "hr": float(row["exp(coef)"]),
            "hr_low": float(row["exp(coef) lower 95%"]), "hr_high": float(row["exp(coef) upper 95%"]),
            "p_value": float(row["p"]), "n": len(t), "events": int(e.sum())}


def concordance(time: Any, event: Any, score: Any) -> float:
    """Harrell's C-index of a risk score (higher score = shorter survival)."""
    from lifelines.utils import concordance_index

    t, e = _survival_arrays(time, event)
    return float(concordance_index(t, -np.asarray(score, dtype=np.float64), e))


def horizon_labels(time: Any, event: Any, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Binary endpoint at ``horizon`` (e.g. 2-year survival): 1 = event at or before it.

    Returns
    -------
    labels : numpy.ndarray of int, for the kept rows
    kept : boolean mask; patients censored before the horizon are dropped (count them with ``(~kept).sum()``).
    """
    t, e = _survival_arrays(time, event)
    kept = (t > horizon) | e
    return ((t <= horizon) & e)[kept].astype(int), kept


def plot_km(time: Any, event: Any, groups: Any, ax: Any = None, at_risk: bool = True, title: str | None = None) -> Any:
    """Kaplan-Meier curves per group with a number-at-risk table below; returns the axes."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    t, e = _survival_arrays(time, event)
    g = np.asarray(groups).astype(str)
    if ax is None:
        from .plots import interactive_axes

        ax = interactive_axes((6, 4.5))
    fitters = []
    order = sorted(np.unique(g), key=lambda v: (v != "low", v != "high", v))
    for label in order:
        kmf = KaplanMeierFitter(label=f"{label} (n={int((g == label).sum())})")
        kmf.fit(t[g == label], e[g == label])
        kmf.plot_survival_function(ax=ax, ci_show=True)
        fitters.append(kmf)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    if title:
        ax.set_title(title)
    if at_risk:
        add_at_risk_counts(*fitters, ax=ax, fig=ax.figure, rows_to_show=["At risk"])
    ax.figure.tight_layout()
    return ax


@dataclass(frozen=True)
class SurvivalReport:
    """Everything ``fmcib survival`` computes for one score on one evaluation set."""

    thresholds: list[float]
    threshold_source: str
    n_tune: int
    n_eval: int
    logrank: dict[str, Any]
    cox_groups: dict[str, Any]
    cox_score: dict[str, Any]
    c_index: float
    horizon: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return self.__dict__.copy()

    @property
    def summary(self) -> pd.DataFrame:
        """Cox rows (group and continuous score) in the paper's table layout."""
        return pd.DataFrame([self.cox_groups, self.cox_score])


OPTIMISTIC_THRESHOLD = ("the evaluated rows themselves (no tuning set): optimistic, the groups are not an "
                        "independent test")


def survival_report(table: pd.DataFrame, time: str, event: str, score: str, tune_col: str | None = None,
                    horizon: float | None = None, out_dir: str | os.PathLike | None = None,
                    quantiles: Sequence[float] = (0.5,), split_col: str | None = None) -> SurvivalReport:
    """Risk groups, KM curves, log-rank, Cox (groups and continuous score), C-index and horizon AUC.

    ``split_col`` holds ``train`` / ``tune`` / ``test``: thresholds come from the tuning rows and every
    statistic from the test rows (training rows are left out: a probe's own training rows would flatter it).
    Or ``tune_col`` marks tuning rows (truthy values) and every other row is evaluated. With neither, the
    thresholds come from the evaluated rows themselves (optimistic; said in the report). Rows with a missing
    time, event or score are dropped. With ``out_dir`` writes ``km.png``, ``km.svg``, ``survival.json`` and
    ``cox.csv`` there.
    """
    if tune_col and split_col:
        raise ValueError("give tune_col or split_col, not both")
    for col in [time, event, score] + [c for c in (tune_col, split_col) if c]:
        if col not in table.columns:
            raise ValueError(f"column {col!r} not in the table (columns: {list(table.columns)})")
    data = table.dropna(subset=[time, event, score])
    if split_col:
        split = data[split_col].astype(str).str.lower()
        tune, evaluate = data[split == "tune"], data[split == "test"]
        if len(tune) == 0 or len(evaluate) == 0:
            raise ValueError(f"{split_col!r} marks {len(tune)} 'tune' and {len(evaluate)} 'test' rows; need both")
    elif tune_col:
        is_tune = data[tune_col].fillna(False).astype(bool).to_numpy()
        tune, evaluate = data[is_tune], data[~is_tune]
        if len(tune) == 0 or len(evaluate) == 0:
            raise ValueError(f"{tune_col!r} marks {len(tune)} tuning and {len(evaluate)} evaluation rows; need both")
    else:
        tune = evaluate = data
    groups_model = RiskGroups(quantiles=quantiles).fit(tune[score])
    groups = groups_model.transform(evaluate[score])
    t, e, s = evaluate[time].to_numpy(np.float64), evaluate[event].to_numpy(), evaluate[score].to_numpy(np.float64)
    horizon_result = None
    if horizon is not None:
        labels, kept = horizon_labels(t, e, horizon)
        horizon_result = {"horizon": float(horizon), "n": int(kept.sum()), "n_dropped_censored": int((~kept).sum()),
                          "events": int(labels.sum()),
                          "auc": auc(labels, s[kept]) if 0 < labels.sum() < len(labels) else float("nan")}
    report = SurvivalReport(
        thresholds=[float(v) for v in groups_model.thresholds_],
        threshold_source="tuning rows" if tune_col or split_col else OPTIMISTIC_THRESHOLD,
        n_tune=len(tune) if tune_col or split_col else 0,
        n_eval=len(evaluate), logrank=logrank(t, e, groups),
        cox_groups=cox_univariate(t, e, groups, name="risk_group") if len(groups_model.labels_) == 2 else {},
        cox_score=cox_univariate(t, e, s, name=score), c_index=concordance(t, e, s), horizon=horizon_result,
    )
    if out_dir is not None:
        from .plots import save_figure

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from .plots import new_figure

        ax = plot_km(t, e, groups, ax=new_figure(figsize=(6, 4.5)).subplots(),
                     title=f"{score}: log-rank p = {report.logrank['p_value']:.3g}")
        save_figure(ax.figure, out / "km.png", dpi=150, close=False)
        save_figure(ax.figure, out / "km.svg", dpi=150)
        with atomic_path(out / "survival.json") as tmp:
            Path(tmp).write_text(json.dumps(report.to_dict(), indent=1, default=float))
        with atomic_path(out / "cox.csv") as tmp:
            report.summary.to_csv(tmp, index=False)
    return report
