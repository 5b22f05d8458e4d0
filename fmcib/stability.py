"""Feature stability: ICC (Shrout-Fleiss forms, vectorised over features), test-retest, seed perturbation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .probes import complete_rows, feature_matrix

__all__ = ["ICC_FORMS", "icc", "retest_agreement", "perturb_seeds", "perturbation_stability", "prediction_spread",
           "stable_features"]

SEED_ROW = "fmcib_seed_row"  # perturbed rows: which input seed they come from
PERTURBATION = "fmcib_perturbation"

# Shrout & Fleiss (1979) forms; pingouin calls them ICC1, ICC2, ICC3, ICC1k, ICC2k, ICC3k.
ICC_FORMS: tuple[str, ...] = ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)", "ICC(1,k)", "ICC(2,k)", "ICC(3,k)")


def _mean_squares(y: np.ndarray) -> dict[str, np.ndarray]:
    """Two-way ANOVA mean squares of ``y`` (subjects, raters, features), per feature."""
    n, k = y.shape[:2]
    grand = y.mean(axis=(0, 1))
    ss_total = ((y - grand) ** 2).sum(axis=(0, 1))
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum(axis=0)
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum(axis=0)
    ss_error = ss_total - ss_rows - ss_cols
    return {"msr": ss_rows / (n - 1), "msc": ss_cols / (k - 1), "mse": ss_error / ((n - 1) * (k - 1)),
            "msw": (ss_total - ss_rows) / (n * (k - 1))}


def icc(ratings: Any, forms: Sequence[str] = ICC_FORMS, confidence: float = 0.95,
        feature_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Intraclass correlation coefficients with confidence intervals, per feature.

    Parameters
    ----------
    ratings : array-like of shape (n_subjects, n_raters) or (n_subjects, n_raters, n_features)
        One value per subject (lesion) and rater (visit, scan, perturbation). No missing values.
    forms : sequence of str, default: all six
        Any of ``"ICC(1,1)"`` (one-way random), ``"ICC(2,1)"`` (two-way random, absolute agreement),
        ``"ICC(3,1)"`` (two-way mixed, consistency) and their average-measure forms ``"ICC(1,k)"``,
        ``"ICC(2,k)"``, ``"ICC(3,k)"``.
    confidence : float, default=0.95
    feature_names : sequence of str, optional
        Names for the features (default ``0, 1, ...``).

    Returns
    -------
    pandas.DataFrame
        Long format, one row per (feature, form): ``feature, form, icc, ci_low, ci_high, F, df1, df2,
        p_value`` (the F test of ICC = 0), as ``pingouin.intraclass_corr`` reports them.
    """
    y = np.asarray(ratings, dtype=np.float64)
    if y.ndim == 2:
        y = y[:, :, None]
    if y.ndim != 3:
        raise ValueError(f"ratings must be (subjects, raters[, features]), got shape {y.shape}")
    n, k, m = y.shape
    if n < 2 or k < 2:
        raise ValueError(f"need at least 2 subjects and 2 raters, got {n} subjects and {k} raters")
    if not np.all(np.isfinite(y)):
        raise ValueError("ratings contain missing or infinite values; drop those subjects first")
    unknown = [f for f in forms if f not in ICC_FORMS]
    if unknown:
        raise ValueError(f"unknown ICC forms {unknown}; choose from {ICC_FORMS}")
    names = list(feature_names) if feature_names is not None else list(range(m))
    if len(names) != m:
        raise ValueError(f"{len(names)} feature names for {m} features")
    ms = _mean_squares(y)
    msr, msc, mse, msw = ms["msr"], ms["msc"], ms["mse"], ms["msw"]
    alpha = 1 - confidence
    df1, df2_w, df2_e = n - 1, n * (k - 1), (n - 1) * (k - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = {
            "ICC(1,1)": (msr - msw) / (msr + (k - 1) * msw),
            "ICC(2,1)": (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n),
            "ICC(3,1)": (msr - mse) / (msr + (k - 1) * mse),
            "ICC(1,k)": (msr - msw) / msr,
            "ICC(2,k)": (msr - mse) / (msr + (msc - mse) / n),
            "ICC(3,k)": (msr - mse) / msr,
        }
        f1, f3 = msr / msw, msr / mse
        # One-way and consistency forms: exact F-based intervals (Shrout & Fleiss 1979).
        f1_lo, f1_hi = f1 / stats.f.ppf(1 - alpha / 2, df1, df2_w), f1 * stats.f.ppf(1 - alpha / 2, df2_w, df1)
        f3_lo, f3_hi = f3 / stats.f.ppf(1 - alpha / 2, df1, df2_e), f3 * stats.f.ppf(1 - alpha / 2, df2_e, df1)
        # Absolute agreement: Satterthwaite degrees of freedom (McGraw & Wong 1996).
        i2, fj = values["ICC(2,1)"], msc / mse
        vn = df2_e * (k * i2 * fj + n * (1 + (k - 1) * i2) - k * i2) ** 2
        vd = df1 * k**2 * i2**2 * fj**2 + (n * (1 + (k - 1) * i2) - k * i2) ** 2
        v = vn / vd
        fu, fl = stats.f.ppf(1 - alpha / 2, df1, v), stats.f.ppf(1 - alpha / 2, v, df1)
        lo2 = n * (msr - fu * mse) / (fu * (k * msc + (k * n - k - n) * mse) + n * msr)
        hi2 = n * (fl * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fl * msr)
        cis = {
            "ICC(1,1)": ((f1_lo - 1) / (f1_lo + k - 1), (f1_hi - 1) / (f1_hi + k - 1)),
            "ICC(2,1)": (lo2, hi2),
            "ICC(3,1)": ((f3_lo - 1) / (f3_lo + k - 1), (f3_hi - 1) / (f3_hi + k - 1)),
            "ICC(1,k)": (1 - 1 / f1_lo, 1 - 1 / f1_hi),
            "ICC(2,k)": (lo2 * k / (1 + lo2 * (k - 1)), hi2 * k / (1 + hi2 * (k - 1))),
            "ICC(3,k)": (1 - 1 / f3_lo, 1 - 1 / f3_hi),
        }
        tests = {"1": (f1, df1, df2_w), "2": (f3, df1, df2_e), "3": (f3, df1, df2_e)}
    frames = []
    for form in forms:
        f_stat, d1, d2 = tests[form[4]]
        frames.append(pd.DataFrame({
            "feature": names, "form": form, "icc": values[form], "ci_low": cis[form][0], "ci_high": cis[form][1],
            "F": f_stat, "df1": d1, "df2": d2, "p_value": stats.f.sf(f_stat, d1, d2),
        }))
    return pd.concat(frames, ignore_index=True)


def _paired(test: pd.DataFrame, retest: pd.DataFrame, key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    for name, t in (("test", test), ("retest", retest)):
        if key not in t.columns:
            raise ValueError(f"the {name} table has no key column {key!r}")
        dup = t[key][t[key].duplicated()].unique()
        if len(dup):
            raise ValueError(f"the {name} table repeats key values {dup[:5].tolist()} in {key!r}")
    common = pd.Index(test[key]).intersection(pd.Index(retest[key]))
    if len(common) < 2:
        raise ValueError(f"test and retest share {len(common)} values of {key!r}; need at least 2 pairs")
    a = feature_matrix(test.set_index(key).loc[common].reset_index())
    b = feature_matrix(retest.set_index(key).loc[common].reset_index())
    if list(a.columns) != list(b.columns):
        raise ValueError(f"test has {a.shape[1]} feature columns and retest {b.shape[1]}: not the same features")
    ok = complete_rows(a) & complete_rows(b)
    return a[ok], b[ok]


def retest_agreement(test: pd.DataFrame, retest: pd.DataFrame, key: str,
                forms: Sequence[str] = ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)"), confidence: float = 0.95
                ) -> pd.DataFrame:
    """Per-feature agreement between two extractions of the same lesions (rows paired by ``key``).

    Returns
    -------
    pandas.DataFrame
        One row per feature: for each form its ``icc``, ``ci_low`` and ``ci_high`` (columns like
        ``ICC(1,1)``, ``ICC(1,1)_low``, ``ICC(1,1)_high``), ``spearman`` (rank correlation),
        ``r2`` (squared Pearson correlation), and ``n_pairs``. Pairs with a missing feature are dropped.
    """
    a, b = _paired(test, retest, key)
    x, y = a.to_numpy(np.float64), b.to_numpy(np.float64)
    long = icc(np.stack([x, y], axis=1), forms=forms, confidence=confidence, feature_names=list(a.columns))
    out = pd.DataFrame({"feature": list(a.columns)})
    for form in forms:
        part = long[long.form == form].reset_index(drop=True)
        out[form], out[f"{form}_low"], out[f"{form}_high"] = part.icc, part.ci_low, part.ci_high
    out["spearman"] = _columnwise_corr(stats.rankdata(x, axis=0), stats.rankdata(y, axis=0))
    out["r2"] = _columnwise_corr(x, y) ** 2
    out["n_pairs"] = len(x)
    return out


def _columnwise_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xc * yc).sum(axis=0) / np.sqrt((xc**2).sum(axis=0) * (yc**2).sum(axis=0))


def perturb_seeds(table: pd.DataFrame, n: int = 50, variance: float = 16.0,
                  spacing_mm: float | Sequence[float] = 1.0,
                  random_state: int | None = None) -> pd.DataFrame:
    """``n`` perturbed copies of every seed, offsets drawn from N(0, variance * I) voxels (the paper: 50, 16).

    Parameters
    ----------
    table : pandas.DataFrame
        Seeds with ``coordX, coordY, coordZ`` in physical mm (LPS or RAS: the offsets are symmetric).
    n : int, default=50
    variance : float, default=16.0
        Variance per axis in voxels of the patch grid (``spacing_mm`` each), i.e. sigma = 4 voxels.
    spacing_mm : float or (float, float, float), default=1.0
        Patch voxel size, one number or per axis (x, y, z): the model's ``preprocess.spacing_xyz``.
    random_state : int, optional

    Returns
    -------
    pandas.DataFrame
        ``n`` rows per input row, in order: the input columns with shifted coordinates plus
        ``fmcib_seed_row`` (the input row's position), ``fmcib_perturbation`` (0..n-1) and
        ``fmcib_offset_x/y/z_mm``.
    """
    missing = [c for c in ("coordX", "coordY", "coordZ") if c not in table.columns]
    if missing:
        raise ValueError(f"seed table lacks {missing}; perturbation needs coordinates (for mask rows, run "
                         "`fmcib seeds` first to get centroid seeds)")
    if int(n) < 1 or variance < 0:
        raise ValueError(f"need n >= 1 and variance >= 0, got n={n}, variance={variance}")
    rng = np.random.default_rng(random_state)
    reps = table.loc[table.index.repeat(int(n))].reset_index(drop=True)
    offsets = rng.normal(0.0, np.sqrt(variance), size=(len(reps), 3)) * np.broadcast_to(
        np.asarray(spacing_mm, dtype=np.float64), (3,))
    for axis, col in enumerate(("coordX", "coordY", "coordZ")):
        reps[col] = reps[col].astype(np.float64) + offsets[:, axis]
        reps[f"fmcib_offset_{col[-1].lower()}_mm"] = offsets[:, axis]
    reps[SEED_ROW] = np.repeat(np.arange(len(table)), int(n))
    reps[PERTURBATION] = np.tile(np.arange(int(n)), len(table))
    return reps


def _by_lesion(features: pd.DataFrame, lesion_col: str, values: pd.DataFrame) -> np.ndarray:
    """(lesions, perturbations, features) array from a long table; lesions with unequal counts are trimmed."""
    groups = [g.to_numpy(np.float64) for _, g in values.groupby(features[lesion_col].to_numpy(), sort=True)]
    k = min(len(g) for g in groups)
    return np.stack([g[:k] for g in groups])


def perturbation_stability(features: pd.DataFrame, lesion_col: str = SEED_ROW, confidence: float = 0.95
                           ) -> pd.DataFrame:
    """Per-feature stability across perturbed seeds of the same lesions.

    Each lesion is a subject and each perturbation a rater drawn at random, so the one-way ICC(1,1) is
    the right form. Rows with missing features (failed perturbations) are dropped; lesions keep as many
    perturbations as the one with fewest.

    Returns
    -------
    pandas.DataFrame
        One row per feature: ``icc``, ``ci_low``, ``ci_high`` (ICC(1,1)) and ``cv`` (the mean over
        lesions of std / |mean| across perturbations).
    """
    feats = feature_matrix(features)
    ok = complete_rows(feats)
    y = _by_lesion(features[ok], lesion_col, feats[ok])
    long = icc(y, forms=("ICC(1,1)",), confidence=confidence, feature_names=list(feats.columns))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature that is 0 for every lesion has no CV: NaN
        cv = np.nanmean(y.std(axis=1, ddof=1) / np.abs(y.mean(axis=1)), axis=0)
    return pd.DataFrame({"feature": list(feats.columns), "icc": long.icc.to_numpy(), "ci_low": long.ci_low.to_numpy(),
                         "ci_high": long.ci_high.to_numpy(), "cv": cv, "n_lesions": y.shape[0],
                         "n_perturbations": y.shape[1]})


def prediction_spread(probe: Any, features: pd.DataFrame, lesion_col: str = SEED_ROW) -> pd.DataFrame:
    """Spread of a probe's predicted probability (last class) across each lesion's perturbed seeds.

    Returns
    -------
    pandas.DataFrame
        One row per lesion: its own columns (ids, labels: everything but features, coordinates and
        ``fmcib_*``), then ``mean``, ``std``, ``min``, ``max`` of the probability and ``n``.
    """
    feats = feature_matrix(features)
    ok = complete_rows(feats)
    proba = probe.predict_proba(feats[ok])[:, -1]
    frame = pd.DataFrame({lesion_col: features.loc[ok, lesion_col].to_numpy(), "p": proba})
    spread = frame.groupby(lesion_col)["p"].agg(["mean", "std", "min", "max", "count"]).rename(
        columns={"count": "n"}).reset_index()
    # the lesion's own columns (ids, labels) from its first perturbed row; not the shifted coordinates
    own = [c for c in features.columns if c not in feats.columns and not str(c).startswith("fmcib_")
           and c not in ("coordX", "coordY", "coordZ") and c not in spread.columns]
    if own:
        first = features.groupby(lesion_col, sort=True)[own].first().reset_index()
        spread = first.merge(spread, on=lesion_col)
    return spread


def stable_features(stability: pd.DataFrame, threshold: float = 0.75, column: str = "icc") -> list[str]:
    """Names of the features whose ``column`` is at least ``threshold``.

    ``column="icc"`` reads the ``icc`` of :func:`perturbation_stability` or, in a :func:`retest_agreement` table,
    its ``ICC(1,1)``.
    """
    if column == "icc" and column not in stability.columns and "ICC(1,1)" in stability.columns:
        column = "ICC(1,1)"
    if column not in stability.columns:
        raise ValueError(f"stability table has no column {column!r} (columns: {list(stability.columns)})")
    return stability.loc[stability[column] >= threshold, "feature"].astype(str).tolist()
