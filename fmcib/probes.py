"""Linear probes on extracted features: an Optuna-tuned logistic regression as a scikit-learn estimator.

The paper's recipe: standardise the features, fit a logistic regression, and search its inverse
regularisation ``C`` log-uniformly in [1e-6, 1e3] with Optuna, scoring AUC on a tuning set. The
probe is saved as plain JSON (scaler, coefficients, settings), never as a pickle.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from ._version import __version__
from .evaluation import score_metric
from .files import atomic_path
from .tables import feature_matrix

__all__ = ["LogisticProbe", "fit_probe", "feature_matrix", "complete_rows", "drop_missing", "limited_data_curve", "load_probe",
           "encoder_of", "prediction_table"]

logger = logging.getLogger(__name__)

log = logging.getLogger(__name__)

PROBE_FORMAT = "fmcib.LogisticProbe/1"
PENALTIES = ("l2", "l1")
UNDEFINED_SCORE = -1.0  # what a trial scores when its metric is undefined (below any real AUC/accuracy/AP)


def complete_rows(X: Any, y: Any = None) -> np.ndarray:
    """Boolean mask of the rows whose features are all finite (and whose label, if given, is present)."""
    values = X.to_numpy(dtype=np.float64) if isinstance(X, pd.DataFrame) else np.asarray(X, dtype=np.float64)
    kept = np.all(np.isfinite(values), axis=1)
    if y is not None:
        kept &= ~pd.isna(np.asarray(y, dtype=object).ravel())
    return kept


def drop_missing(X: Any, y: Any = None) -> tuple[Any, Any, np.ndarray]:
    """Drop rows with any missing feature (and a missing label), keeping features and labels aligned.

    Returns
    -------
    X, y, kept : the kept rows (same types as given) and the boolean mask of kept rows.
    """
    kept = complete_rows(X, y)
    take = (lambda a: a[kept] if not isinstance(a, (pd.DataFrame, pd.Series)) else a.loc[kept])
    return take(X), (take(np.asarray(y) if not isinstance(y, pd.Series) else y) if y is not None else None), kept


# liblinear penalises the intercept as the weight of a constant feature of this value; this large, the
# penalty on the intercept is negligible (decision functions within 0.02 of saga's converged solution, tested).
LIBLINEAR_INTERCEPT_SCALING = 100.0
_PENALTY_BY_L1_RATIO = inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"


def _logistic(C: float, penalty: str, max_iter: int, random_state: int | None, n_classes: int = 2) -> LogisticRegression:
    """A LogisticRegression with an L1 or L2 penalty, across scikit-learn versions.

    Solvers: lbfgs for L2; for L1, liblinear on two classes (on 4096 features 50-100x faster than saga,
    which often stops unconverged) and saga on more (multinomial).
    """
    solver = "lbfgs" if penalty != "l1" else ("liblinear" if n_classes == 2 else "saga")
    extra = {"intercept_scaling": LIBLINEAR_INTERCEPT_SCALING} if solver == "liblinear" else {}
    if _PENALTY_BY_L1_RATIO:  # scikit-learn >= 1.8: `penalty` is deprecated, l1_ratio names it
        extra["l1_ratio"] = 1.0 if penalty == "l1" else 0.0
    else:  # scikit-learn < 1.8 ignores l1_ratio unless penalty="elasticnet": it must be named
        extra["penalty"] = penalty
    return LogisticRegression(C=C, solver=solver, max_iter=max_iter, random_state=random_state, **extra)


class LogisticProbe(ClassifierMixin, BaseEstimator):
    """Standardised logistic regression whose ``C`` (and penalty) Optuna tunes, as in the paper.

    Parameters
    ----------
    n_trials : int, default=100
        Optuna trials. ``0`` skips tuning and uses ``C``.
    C : float, default=1.0
        Inverse regularisation strength used when ``n_trials=0``.
    C_range : (float, float), default=(1e-6, 1e3)
        Log-uniform search range for ``C``.
    penalties : sequence of {"l2", "l1"}, default=("l2",)
        Penalties Optuna may choose from (L1: ``liblinear`` for two classes, the slower ``saga`` for more).
    scoring : {"auto", "auc", "balanced_accuracy", "average_precision"}, default="auto"
        Tuning objective. ``"auto"``: AUC (binary) or macro one-vs-rest AUC (multiclass).
    cv : int, default=5
        Stratified folds used for tuning when ``fit`` gets no tuning set (fewer, with a warning, when the rarest
        class has fewer training rows; with one row, ``C`` is used untuned). ``cv_folds_`` says how many.
    max_iter : int, default=1000
    random_state : int, optional
        Seeds Optuna's sampler, the folds and the solver: same data and seed, same probe.

    Attributes
    ----------
    pipeline_ : sklearn.pipeline.Pipeline
        The final StandardScaler + LogisticRegression, refitted on all training rows.
    study_ : optuna.study.Study or None
        The tuning study (``None`` when not tuned or after :func:`load_probe`).
    best_params_ : dict
        ``C`` and ``penalty`` used by ``pipeline_``.
    best_score_ : float
        Tuning objective of ``best_params_`` (NaN when not tuned).
    classes_, n_features_in_, feature_names_in_ : as in scikit-learn.
    n_dropped_ : int
        Training rows dropped for missing features or labels.
    encoder_ : dict or None
        The encoder that made the training features (model name, weights sha256), when known: set from a
        features table's provenance (:func:`encoder_of`) and saved with the probe.
    """

    def __init__(self, n_trials: int = 100, C: float = 1.0, C_range: tuple[float, float] = (1e-6, 1e3),
                 penalties: Sequence[str] = ("l2",), scoring: str = "auto", cv: int = 5, max_iter: int = 1000,
                 random_state: int | None = None) -> None:
        self.n_trials = n_trials
        self.C = C
        self.C_range = C_range
        self.penalties = penalties
        self.scoring = scoring
        self.cv = cv
        self.max_iter = max_iter
        self.random_state = random_state

    def _objective_metric(self) -> str:
        return "auc" if self.scoring == "auto" else str(self.scoring)

    def _validate_settings(self) -> None:
        bad = [p for p in self.penalties if p not in PENALTIES]
        if bad or not self.penalties:
            raise ValueError(f"penalties must be a non-empty subset of {PENALTIES}, got {self.penalties!r}")
        if self.scoring not in ("auto", "auc", "balanced_accuracy", "average_precision"):
            raise ValueError(f"unknown scoring {self.scoring!r}")
        lo, hi = self.C_range
        if not 0 < lo < hi:
            raise ValueError(f"C_range must satisfy 0 < low < high, got {self.C_range!r}")
        if int(self.n_trials) < 0:
            raise ValueError(f"n_trials must be >= 0, got {self.n_trials}")

    def fit(self, X: Any, y: Any, X_tune: Any = None, y_tune: Any = None) -> LogisticProbe:
        """Tune (on ``X_tune, y_tune`` or by stratified CV on ``X, y``) and fit on all of ``X, y``.

        Rows with a missing feature or label are dropped together with their label (counted in
        ``n_dropped_`` and logged).
        """
        self._validate_settings()
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        X = validate_data(self, X, reset=True, ensure_all_finite="allow-nan", dtype=np.float64)
        y = column_or_1d(y, warn=True)
        check_consistent_length(X, y)
        kept = complete_rows(X, y)  # missing labels too: they are dropped, not rejected
        self.n_dropped_ = int((~kept).sum())
        if self.n_dropped_:
            log.warning("LogisticProbe: dropped %d of %d training rows with missing features or labels",
                        self.n_dropped_, len(kept))
            X, y = X[kept], y[kept]
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least two classes to fit a probe, got one class ({self.classes_.tolist()})")
        tune = None
        if X_tune is not None:
            Xt = validate_data(self, X_tune, reset=False, ensure_all_finite="allow-nan", dtype=np.float64)
            yt = column_or_1d(y_tune)
            ok = complete_rows(Xt, yt)
            tune = (Xt[ok], yt[ok])
        self.study_ = None
        smallest = int(np.unique(y, return_counts=True)[1].min())
        self.cv_folds_ = min(int(self.cv), smallest)  # a fold per member of the rarest class at most
        if int(self.n_trials) > 0 and tune is None and self.cv_folds_ < 2:
            logger.warning("LogisticProbe: the rarest class has %d training row(s): too few to tune C by "
                           "cross-validation; C=%g is used", smallest, self.C)
        if int(self.n_trials) > 0 and (tune is not None or self.cv_folds_ >= 2):
            if tune is None and self.cv_folds_ < int(self.cv):
                logger.warning("LogisticProbe: the rarest class has %d training rows: tuning by %d-fold instead "
                               "of %d-fold cross-validation", smallest, self.cv_folds_, int(self.cv))
            self.best_params_, self.best_score_ = self._tune(X, y, tune)
        else:
            self.best_params_, self.best_score_ = {"C": float(self.C), "penalty": self.penalties[0]}, float("nan")
        self.pipeline_ = self._make(self.best_params_).fit(X, y)
        self.n_iter_ = self.pipeline_.named_steps["logistic"].n_iter_
        return self

    def _make(self, params: dict[str, Any]) -> Pipeline:
        return Pipeline([("scaler", StandardScaler()),
                         ("logistic", _logistic(params["C"], params["penalty"], self.max_iter, self.random_state,
                                                n_classes=len(self.classes_)))])

    def _score(self, model: Pipeline, X: np.ndarray, y: np.ndarray) -> float:
        present = np.unique(y)
        if not np.isin(present, model.classes_).all():
            raise ValueError(f"the tuning set holds classes {np.setdiff1d(present, model.classes_).tolist()} "
                             "that the training set lacks")
        proba = _align_proba(model.predict_proba(X), model.classes_, present)
        return score_metric(self._objective_metric(), y, proba)

    def _tune(self, X: np.ndarray, y: np.ndarray, tune: tuple[np.ndarray, np.ndarray] | None
              ) -> tuple[dict[str, Any], float]:
        import optuna

        folds: list[Any] = []
        if tune is None:
            folds = list(StratifiedKFold(n_splits=self.cv_folds_, shuffle=True,
                                         random_state=self.random_state).split(X, y))

        def objective(trial: Any) -> float:
            params = {"C": trial.suggest_float("C", *self.C_range, log=True),
                      "penalty": trial.suggest_categorical("penalty", list(self.penalties))}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings at extreme C
                if tune is not None:
                    value = self._score(self._make(params).fit(X, y), *tune)
                else:
                    value = float(np.nanmean([self._score(self._make(params).fit(X[tr], y[tr]), X[te], y[te])
                                              for tr, te in folds]))
            return value if np.isfinite(value) else UNDEFINED_SCORE

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=self.random_state)
        self.study_ = optuna.create_study(direction="maximize", sampler=sampler)
        self.study_.optimize(objective, n_trials=int(self.n_trials))
        best = self.study_.best_trial
        score = float(best.value) if best.value != UNDEFINED_SCORE else float("nan")
        if np.isnan(score):
            log.warning("LogisticProbe: the tuning metric was undefined in every trial (a class missing from "
                        "every tuning fold?); C=%g was kept without a score", best.params["C"])
        return {"C": float(best.params["C"]), "penalty": str(best.params["penalty"])}, score

    def _features(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        X = validate_data(self, X, reset=False, ensure_all_finite=False)
        bad = np.flatnonzero(~complete_rows(X))
        if len(bad):
            raise ValueError(f"rows {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''} have missing features; "
                             "drop them first (fmcib.probes.drop_missing)")
        return X

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        X = self._features(X)
        return self.pipeline_.predict_proba(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """Linear scores (log-odds for binary probes)."""
        X = self._features(X)
        return self.pipeline_.decision_function(X)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted probe as JSON (scaler, coefficients, settings, provenance), atomically."""
        check_is_fitted(self, "pipeline_")
        scaler, logistic = self.pipeline_.named_steps["scaler"], self.pipeline_.named_steps["logistic"]
        doc = {
            "format": PROBE_FORMAT,
            "fmcib_version": __version__,
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()},
            "best_params": self.best_params_,
            "best_score": None if np.isnan(self.best_score_) else self.best_score_,
            "n_dropped": self.n_dropped_,
            "classes": self.classes_.tolist(),
            "feature_names": (self.feature_names_in_.tolist() if hasattr(self, "feature_names_in_") else None),
            "scaler": {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(), "var": scaler.var_.tolist(),
                       "n_samples_seen": int(scaler.n_samples_seen_)},
            "coef": logistic.coef_.tolist(),
            "intercept": logistic.intercept_.tolist(),
            "encoder": getattr(self, "encoder_", None),
        }
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LogisticProbe:
        """Read a probe written by :meth:`save`; it predicts exactly as before saving."""
        return load_probe(path)


def _check_probe_doc(doc: Any, path: str | os.PathLike) -> None:
    """A probe file must be complete, consistent and finite: a NaN coefficient would silently predict one class."""
    if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"'{path}' is not an fmcib probe file (format {found!r}, expected {PROBE_FORMAT!r})")
    missing = [k for k in ("params", "best_params", "classes", "coef", "intercept", "scaler", "n_dropped",
                           "best_score", "feature_names") if k not in doc]
    missing += [f"scaler.{k}" for k in ("mean", "scale", "var", "n_samples_seen") if k not in doc.get("scaler", {})]
    if missing:
        raise ValueError(f"'{path}': probe file lacks {missing}")
    try:
        coef = np.asarray(doc["coef"], dtype=np.float64)
        intercept = np.asarray(doc["intercept"], dtype=np.float64)
        mean, scale = (np.asarray(doc["scaler"][k], dtype=np.float64) for k in ("mean", "scale"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"'{path}': probe file holds non-numeric coefficients ({exc})") from exc
    n_classes = len(doc["classes"])
    rows = 1 if n_classes == 2 else n_classes
    problems = []
    if n_classes < 2:
        problems.append(f"{n_classes} class(es)")
    if coef.ndim != 2 or coef.shape[0] != rows:
        problems.append(f"coef of shape {coef.shape} for {n_classes} classes")
    elif intercept.shape != (rows,) or mean.shape != (coef.shape[1],) or scale.shape != (coef.shape[1],):
        problems.append(f"intercept {intercept.shape}, scaler mean {mean.shape} and scale {scale.shape} do not fit "
                        f"coef {coef.shape}")
    if doc["feature_names"] is not None and coef.ndim == 2 and len(doc["feature_names"]) != coef.shape[1]:
        problems.append(f"{len(doc['feature_names'])} feature names for {coef.shape[1]} coefficients")
    for name, values in (("coef", coef), ("intercept", intercept), ("scaler mean", mean), ("scaler scale", scale)):
        if not np.all(np.isfinite(values)):
            problems.append(f"non-finite {name}")
    if np.any(scale <= 0):
        problems.append("scaler scale <= 0")
    if problems:
        raise ValueError(f"'{path}': invalid probe file: " + "; ".join(problems))


def load_probe(path: str | os.PathLike) -> LogisticProbe:
    """Read a probe written by :meth:`LogisticProbe.save` (plain JSON, no code is executed), validated.

    Raises
    ------
    ValueError
        Not a probe file; a missing field (named); shapes that do not fit; non-finite values; scale <= 0.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"'{path}': cannot read a probe file ({exc})") from exc
    _check_probe_doc(doc, path)
    params = dict(doc["params"])
    params["C_range"] = tuple(params["C_range"])
    params["penalties"] = tuple(params["penalties"])
    probe = LogisticProbe(**params)
    probe.best_params_ = doc["best_params"]
    probe.best_score_ = float("nan") if doc["best_score"] is None else float(doc["best_score"])
    probe.n_dropped_ = int(doc["n_dropped"])
    probe.study_ = None
    probe.classes_ = np.asarray(doc["classes"])
    coef = np.asarray(doc["coef"], dtype=np.float64)
    probe.n_features_in_ = coef.shape[1]
    if doc["feature_names"] is not None:
        probe.feature_names_in_ = np.asarray(doc["feature_names"], dtype=object)
    scaler = StandardScaler()
    scaler.mean_ = np.asarray(doc["scaler"]["mean"])
    scaler.scale_ = np.asarray(doc["scaler"]["scale"])
    scaler.var_ = np.asarray(doc["scaler"]["var"])
    scaler.n_samples_seen_ = doc["scaler"]["n_samples_seen"]
    scaler.n_features_in_ = coef.shape[1]
    logistic = _logistic(probe.best_params_["C"], probe.best_params_["penalty"], probe.max_iter, probe.random_state,
                         n_classes=len(probe.classes_))
    logistic.coef_ = coef
    logistic.intercept_ = np.asarray(doc["intercept"], dtype=np.float64)
    logistic.classes_ = probe.classes_
    logistic.n_features_in_ = coef.shape[1]
    logistic.n_iter_ = np.zeros(1, dtype=np.int32)
    probe.pipeline_ = Pipeline([("scaler", scaler), ("logistic", logistic)])
    probe.encoder_ = doc.get("encoder")
    return probe


def fit_probe(
    table: pd.DataFrame,
    label: str,
    *,
    tune_col: str | None = None,
    split_col: str | None = None,
    probe: LogisticProbe | None = None,
    name: str = "table",
) -> LogisticProbe:
    """Fit a probe on a features table's rows that have a label.

    Parameters
    ----------
    table : pandas.DataFrame
        ``pred_*`` features (as :func:`fmcib.extract_features` writes them) and the label column.
    label : str
        Column holding the classes; rows without one are left out.
    tune_col : str, optional
        Truthy for rows that only tune the hyper-parameters (the others fit); default: stratified CV.
    split_col : str, optional
        Instead of ``tune_col``: ``train`` / ``tune`` / ``test`` per row; test rows play no part at all.
    probe : LogisticProbe, optional
        The unfitted probe with its settings (default: ``LogisticProbe()``).
    name : str
        How messages name the table.

    Raises
    ------
    TableError
        A named column is missing.
    ValueError
        Both ``tune_col`` and ``split_col``.
    """
    from .exceptions import TableError

    if tune_col and split_col:
        raise ValueError("give tune_col or split_col, not both")
    for col in [label] + [c for c in (tune_col, split_col) if c]:
        if col not in table.columns:
            raise TableError(f"{name}: no column {col!r} (columns: {list(table.columns)[:20]})")
    table = table[table[label].notna()]
    if split_col:  # the test rows play no part in fitting or tuning
        split = table[split_col].astype(str).str.lower()
        table, tune = table[split.isin(["train", "tune"])], (split[split.isin(["train", "tune"])] == "tune")
    elif tune_col:
        tune = table[tune_col].fillna(False).astype(bool)
    model = probe if probe is not None else LogisticProbe()
    X, y = feature_matrix(table), table[label].to_numpy()
    if split_col or tune_col:
        mask = tune.to_numpy()
        return model.fit(X[~mask], y[~mask], X_tune=X[mask], y_tune=y[mask])
    return model.fit(X, y)


def encoder_of(provenance: Any) -> dict[str, Any] | None:
    """The encoder identity (model, weights sha256, patch contract) in a features table's fmcib metadata."""
    if not isinstance(provenance, dict):
        return None
    prov = provenance.get("provenance", provenance)
    if "model" not in prov:
        return None
    return {"model": prov.get("model"), "weights_sha256": (prov.get("weights") or {}).get("sha256"),
            "preprocess": prov.get("preprocess")}


def prediction_table(probe: LogisticProbe, table: pd.DataFrame) -> pd.DataFrame:
    """Every row's class probabilities (``prob_<class>``) and ``prediction``, after the table's non-feature columns.

    Rows with a missing feature, or whose probabilities are not finite, get NaN probabilities and no prediction.

    Raises
    ------
    ValueError
        The table already has a ``prediction`` or ``prob_<class>`` column (it would be overwritten).
    """
    X = feature_matrix(table)
    added = [f"prob_{cls}" for cls in probe.classes_] + ["prediction"]
    clash = [c for c in added if c in table.columns]
    if clash:
        raise ValueError(f"the features table already has column(s) {clash}, which predictions would overwrite; "
                         "rename them first")
    ok = complete_rows(X)
    proba = np.full((len(table), len(probe.classes_)), np.nan)
    if ok.any():
        proba[ok] = probe.predict_proba(X[ok])
    ok &= np.all(np.isfinite(proba), axis=1)
    out = table[[c for c in table.columns if c not in X.columns]].copy()
    for k, cls in enumerate(probe.classes_):
        out[f"prob_{cls}"] = proba[:, k]
    best = probe.classes_[np.argmax(np.where(ok[:, None], proba, 0.0), axis=1)]
    out["prediction"] = pd.Series(best, index=out.index, dtype=object).where(ok, None)
    return out


def _align_proba(proba: np.ndarray, model_classes: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Probabilities restricted to the classes present in the labels (for scoring subsets)."""
    if len(present) == len(model_classes):
        return proba
    cols = np.searchsorted(model_classes, present)
    sub = proba[:, cols]
    return sub / sub.sum(axis=1, keepdims=True)


def limited_data_curve(
    estimator: Any,
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
    fractions: Sequence[float] = (0.1, 0.2, 0.5, 1.0),
    n_repeats: int = 5,
    metric: str = "auc",
    random_state: int | None = None,
) -> pd.DataFrame:
    """Train on stratified subsamples of the training set and score each on a fixed test set (the paper's
    limited-data experiment).

    Returns
    -------
    pandas.DataFrame
        One row per (fraction, repeat): ``fraction``, ``repeat``, ``n_train``, ``score``. At fraction 1.0
        the repeats differ only by the estimator's own randomness, so one repeat is run.
    """
    from sklearn.base import clone

    X_train, y_train, _ = drop_missing(X_train, y_train)
    X_test, y_test, _ = drop_missing(X_test, y_test)
    y_arr = np.asarray(y_train)
    rows = []
    rng = np.random.default_rng(random_state)
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"fractions must lie in (0, 1], got {fraction}")
        repeats = 1 if fraction == 1 else int(n_repeats)
        for r in range(repeats):
            if fraction == 1:
                idx = np.arange(len(y_arr))
            else:
                split = StratifiedShuffleSplit(n_splits=1, train_size=fraction,
                                               random_state=int(rng.integers(2**31 - 1)))
                idx, _ = next(split.split(np.zeros(len(y_arr)), y_arr))
            model = clone(estimator)
            Xs = X_train.iloc[idx] if isinstance(X_train, pd.DataFrame) else np.asarray(X_train)[idx]
            model.fit(Xs, y_arr[idx])
            proba = _align_proba(model.predict_proba(X_test), model.classes_, np.unique(y_test))
            rows.append({"fraction": float(fraction), "repeat": r, "n_train": len(idx),
                         "score": score_metric(metric, y_test, proba)})
    return pd.DataFrame(rows)
