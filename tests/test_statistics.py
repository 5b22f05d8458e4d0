"""Evaluation statistics, probes, ICC and survival against independent references and known ground truth."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
)
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import label_binarize
from sklearn.utils.estimator_checks import parametrize_with_checks

from fmcib.evaluation import (
    auc,
    balanced_accuracy,
    bootstrap_ci,
    mean_average_precision,
    permutation_test,
)
from fmcib.exceptions import FmcibError
from fmcib.probes import LogisticProbe, limited_data_curve, load_probe
from fmcib.stability import icc, perturb_seeds, retest_agreement, stable_features
from fmcib.survival import (
    RiskGroups,
    concordance,
    cox_univariate,
    horizon_labels,
    logrank,
    survival_report,
)


def _binary(n=200, seed=0, signal=0.3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) * 0.6 + signal * y, 2)  # rounding makes ties
    return y, s


def _multiclass(n=150, k=4, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += 0.3
    return y, p / p.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------- metrics
def test_metrics_equal_scikit_learn_binary_with_ties_and_multiclass():
    y, s = _binary()
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert mean_average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert balanced_accuracy(y, s) == pytest.approx(balanced_accuracy_score(y, s >= 0.5), abs=1e-12)
    y3, p = _multiclass()
    assert auc(y3, p) == pytest.approx(roc_auc_score(y3, p, multi_class="ovr"), abs=1e-12)
    assert mean_average_precision(y3, p) == pytest.approx(
        average_precision_score(label_binarize(y3, classes=range(4)), p, average="macro"), abs=1e-12)
    assert balanced_accuracy(y3, p) == pytest.approx(balanced_accuracy_score(y3, p.argmax(1)), abs=1e-12)
    with pytest.raises(ValueError, match="4 classes"):
        auc(y3, p[:, 0])


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_ci_agrees_with_scipy(method):
    y, s = _binary(n=120, seed=4, signal=0.2)
    ours = bootstrap_ci(y, s, metric="auc", n_resamples=3000, method=method, stratified=False, random_state=0)

    def statistic(yy, ss, axis=-1):
        # scipy's vectorised contract: one value per row of a 2-D batch, a scalar for 1-D input
        values = np.array([roc_auc_score(a, b) if 0 < a.sum() < len(a) else np.nan
                           for a, b in zip(np.atleast_2d(yy), np.atleast_2d(ss))])
        return values if np.ndim(yy) > 1 else values[0]

    ref = stats.bootstrap((y, s), statistic, paired=True, vectorized=True, n_resamples=3000, method=method,
                          random_state=1).confidence_interval
    assert ours.estimate == pytest.approx(roc_auc_score(y, s))
    # Monte Carlo error of a 95% bound with 3000 resamples is about 0.005 here
    assert ours.ci_low == pytest.approx(ref.low, abs=0.015)
    assert ours.ci_high == pytest.approx(ref.high, abs=0.015)
    assert ours.ci_low < ours.estimate < ours.ci_high


def test_bootstrap_defaults_are_fast_and_stratified_keeps_classes():
    y3, p = _multiclass(n=300)
    r = bootstrap_ci(y3, p, metric="average_precision", random_state=0)  # 9999 resamples
    assert r.n_resamples == 9999 and r.n_invalid == 0 and len(r.distribution) == 9999
    assert r.ci_low < r.estimate < r.ci_high
    assert r.standard_error == pytest.approx(np.std(r.distribution, ddof=1))
    again = bootstrap_ci(y3, p, metric="average_precision", random_state=0)
    assert again.ci == r.ci  # seeded: reproducible


def test_paired_permutation_test_matches_scipy_exact_enumeration():
    rng = np.random.default_rng(7)
    y = np.array([0, 1] * 5)
    a = y * 0.4 + rng.random(10)
    b = rng.random(10)

    def diff(sa, sb, axis=-1):
        values = np.array([roc_auc_score(y, u) - roc_auc_score(y, v)
                           for u, v in zip(np.atleast_2d(sa), np.atleast_2d(sb))])
        return values if np.ndim(sa) > 1 else values[0]  # a scalar for 1-D input, as scipy expects

    exact = stats.permutation_test((a, b), diff, permutation_type="samples", vectorized=True,
                                   n_resamples=np.inf, alternative="two-sided")  # all 2^10 swaps
    ours = permutation_test(y, a, b, n_permutations=20000, random_state=0)
    assert ours.statistic == pytest.approx(exact.statistic)
    assert ours.p_value == pytest.approx(exact.pvalue, abs=0.02)
    same = permutation_test(y, a, a, n_permutations=200, random_state=0)
    assert same.statistic == 0 and same.p_value == 1.0


# ------------------------------------------------------------------------------------------ probes
@parametrize_with_checks([LogisticProbe(n_trials=2, cv=3, random_state=0)],
                         expected_failed_checks=lambda est: {
                             "check_estimators_nan_inf": "rows with missing features are dropped (with their "
                                                         "labels) in fit by design, not rejected"})
def test_probe_is_a_scikit_learn_estimator(estimator, check):
    check(estimator)


def _signal_features(n=240, d=30, seed=0):
    """Features where only the first three columns carry the label (a known linear signal)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d))
    X[:, :3] += 1.5 * y[:, None]
    cols = [f"pred_{i}" for i in range(d)]
    return pd.DataFrame(X, columns=cols), y


def test_probe_recovers_a_known_signal_and_round_trips_through_json(tmp_path):
    X, y = _signal_features()
    train, tune, test = slice(0, 120), slice(120, 180), slice(180, 240)
    probe = LogisticProbe(n_trials=15, random_state=0).fit(X[train], y[train], X_tune=X[tune], y_tune=y[tune])
    assert 1e-6 <= probe.best_params_["C"] <= 1e3 and len(probe.study_.trials) == 15
    score = roc_auc_score(y[test], probe.predict_proba(X[test])[:, 1])
    assert score > 0.85  # Bayes AUC for this signal is about 0.97 (d' = 1.5 * sqrt(3))
    coef = np.abs(probe.pipeline_.named_steps["logistic"].coef_[0])
    assert coef[:3].min() > np.median(coef[3:])  # the informative features carry the weight
    probe.save(tmp_path / "probe.json")
    again = load_probe(tmp_path / "probe.json")
    np.testing.assert_array_equal(again.predict_proba(X[test]), probe.predict_proba(X[test]))
    np.testing.assert_array_equal(again.predict(X[test]), probe.predict(X[test]))
    # seeded: the same search again
    twin = LogisticProbe(n_trials=15, random_state=0).fit(X[train], y[train], X_tune=X[tune], y_tune=y[tune])
    assert twin.best_params_ == probe.best_params_


def test_probe_drops_missing_rows_with_their_labels(caplog):
    X, y = _signal_features(n=100)
    X.iloc[[3, 10, 50], 5] = np.nan
    y = y.astype(float)
    y[20] = np.nan  # an unlabeled row goes too
    with caplog.at_level(logging.WARNING, logger="fmcib.probes"):
        probe = LogisticProbe(n_trials=0).fit(X, y)
    assert probe.n_dropped_ == 4 and "dropped 4 of 100" in caplog.text
    keep = np.setdiff1d(np.arange(100), [3, 10, 20, 50])
    reference = make_pipeline(*LogisticProbe(n_trials=0).fit(X.iloc[keep], y[keep]).pipeline_.named_steps.values())
    np.testing.assert_allclose(probe.predict_proba(X.iloc[keep]), reference.predict_proba(X.iloc[keep].to_numpy()))
    with pytest.raises(ValueError, match=r"rows \[3, 10, 50\] have missing features"):
        probe.predict_proba(X)


def test_probe_in_pipeline_cv_multiclass_and_limited_data_curve():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 150)
    X = rng.normal(size=(150, 8)) + np.eye(3, 8)[y] * 2.0
    scores = cross_val_score(LogisticProbe(n_trials=3, random_state=0), X, y, cv=3, scoring="roc_auc_ovr")
    assert scores.mean() > 0.85
    curve = limited_data_curve(LogisticProbe(n_trials=0), X[:100], y[:100], X[100:], y[100:],
                               fractions=(0.2, 0.5, 1.0), n_repeats=3, random_state=0)
    assert curve.groupby("fraction").size().tolist() == [3, 3, 1]
    assert curve.n_train.tolist()[:3] == [20, 20, 20] and curve.n_train.iloc[-1] == 100
    assert curve.score.between(0.5, 1.0).all()


# --------------------------------------------------------------------------------------------- ICC
def test_l1_probe_matches_a_converged_reference_fit(tmp_path):
    import inspect
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(7)
    y = (rng.random(200) < 0.35).astype(int)
    X = rng.normal(size=(200, 60))
    X[:, :4] += 0.8 * y[:, None]
    probe = LogisticProbe(n_trials=0, C=0.2, penalties=("l1",)).fit(X, y)
    assert probe.best_params_["penalty"] == "l1" and probe.pipeline_.named_steps["logistic"].solver == "liblinear"
    Z = StandardScaler().fit_transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # scikit-learn < 1.8 ignores l1_ratio unless penalty="elasticnet": name the penalty the way each version reads it
        l1 = ({"l1_ratio": 1.0} if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"
              else {"penalty": "l1"})
        ref = LogisticRegression(C=0.2, solver="saga", tol=1e-10, max_iter=100000, **l1).fit(Z, y)
    coef = probe.pipeline_.named_steps["logistic"].coef_
    assert (coef == 0).sum() > 30 and (ref.coef_ == 0).sum() > 30  # an L1 fit: most coefficients exactly zero
    assert set(np.flatnonzero(coef)) == set(np.flatnonzero(ref.coef_))  # same sparsity pattern
    np.testing.assert_allclose(probe.decision_function(X), ref.decision_function(Z), atol=0.02)
    probe.save(tmp_path / "l1.json")
    np.testing.assert_array_equal(load_probe(tmp_path / "l1.json").predict_proba(X), probe.predict_proba(X))
    three = LogisticProbe(n_trials=0, C=0.5, penalties=("l1",)).fit(X, rng.integers(0, 3, 200))
    assert three.pipeline_.named_steps["logistic"].solver == "saga"  # multinomial L1


def test_icc_reproduces_shrout_fleiss_1979_table():
    # Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges, and their published ICCs.
    ratings = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    got = icc(ratings).set_index("form").icc
    published = {"ICC(1,1)": 0.17, "ICC(2,1)": 0.29, "ICC(3,1)": 0.71,
                 "ICC(1,k)": 0.44, "ICC(2,k)": 0.62, "ICC(3,k)": 0.91}
    for form, value in published.items():
        assert got[form] == pytest.approx(value, abs=0.005), form


def test_icc_vectorised_equals_pingouin_per_feature():
    pg = pytest.importorskip("pingouin")
    rng = np.random.default_rng(0)
    n, k, m = 15, 3, 4
    y = rng.normal(size=(n, 1, m)) + rng.normal(0, 0.6, (n, k, m)) + rng.normal(0, 0.3, (1, k, m))
    ours = icc(y)
    for f in range(m):
        long = pd.DataFrame([(i, j, y[i, j, f]) for i in range(n) for j in range(k)], columns=["s", "r", "v"])
        ref = pg.intraclass_corr(long, targets="s", raters="r", ratings="v").reset_index(drop=True)
        mine = ours[ours.feature == f].reset_index(drop=True)
        np.testing.assert_allclose(mine.icc, ref.ICC, atol=1e-10)
        np.testing.assert_allclose(mine.F, ref.F, rtol=1e-10)
        np.testing.assert_allclose(mine.p_value, ref.pval, rtol=1e-6, atol=1e-300)
        ci = np.stack(ref["CI95" if "CI95" in ref.columns else "CI95%"].to_numpy())  # renamed in pingouin 0.5.5+
        np.testing.assert_allclose(mine[["ci_low", "ci_high"]].to_numpy(), ci, atol=0.0051)  # pingouin rounds


def test_test_retest_recovers_a_known_icc():
    rng = np.random.default_rng(3)
    n, m = 400, 50
    truth = rng.normal(0, 1, (n, m))
    noise = np.sqrt(1 / 3)  # ICC = 1 / (1 + 1/3) = 0.75
    cols = [f"pred_{i}" for i in range(m)]
    test = pd.DataFrame(truth + rng.normal(0, noise, (n, m)), columns=cols).assign(lesion=np.arange(n))
    retest = pd.DataFrame(truth + rng.normal(0, noise, (n, m)), columns=cols).assign(lesion=np.arange(n))
    retest = retest.sample(frac=1, random_state=0)  # row order must not matter: rows are paired by key
    out = retest_agreement(test, retest, key="lesion")
    assert out["ICC(1,1)"].mean() == pytest.approx(0.75, abs=0.02)
    inside = (out["ICC(1,1)_low"] <= 0.75) & (0.75 <= out["ICC(1,1)_high"])
    assert inside.mean() > 0.85  # 95% intervals
    assert out.r2.mean() == pytest.approx(0.75**2, abs=0.03)
    assert out.spearman.between(0.6, 0.85).all()
    assert stable_features(out, 0.0, column="ICC(1,1)") == cols
    with pytest.raises(ValueError, match="repeats key values"):
        retest_agreement(pd.concat([test, test.iloc[:1]]), retest, key="lesion")


def test_perturbed_seeds_have_the_requested_spread():
    seeds = pd.DataFrame({"image_path": ["a.nii.gz", "b.nii.gz"], "coordX": [0.0, 10.0], "coordY": [0.0, 5.0],
                          "coordZ": [0.0, -3.0], "lesion_id": ["A", "B"]})
    out = perturb_seeds(seeds, n=4000, variance=16.0, spacing_mm=0.5, random_state=0)
    assert len(out) == 8000 and out.lesion_id.tolist()[:2] == ["A", "A"]  # user columns kept
    assert out.fmcib_seed_row.tolist()[3999:4001] == [0, 1] and out.fmcib_perturbation.max() == 3999
    offsets = out[["fmcib_offset_x_mm", "fmcib_offset_y_mm", "fmcib_offset_z_mm"]].to_numpy()
    np.testing.assert_allclose(offsets.var(axis=0), 16.0 * 0.25, rtol=0.08)  # 16 voxel^2 of 0.5 mm
    np.testing.assert_allclose(out.coordX.to_numpy()[4000:] - 10.0, offsets[4000:, 0])


# ---------------------------------------------------------------------------------------- survival
def _survival(n=600, hr=2.0, seed=0):
    rng = np.random.default_rng(seed)
    score = rng.normal(size=n)
    t = rng.exponential(1.0 / np.exp(np.log(hr) * score))  # proportional hazards, HR per unit of score
    c = rng.exponential(2.0, n)
    return pd.DataFrame({"time": np.minimum(t, c), "event": (t <= c).astype(int), "score": score})


def test_cox_recovers_a_simulated_hazard_ratio_and_c_index_matches_hand_count():
    df = _survival()
    r = cox_univariate(df.time, df.event, df.score)
    assert r["hr_low"] < 2.0 < r["hr_high"] and r["beta"] == pytest.approx(np.log(r["hr"]))
    # Harrell's C by brute force over comparable pairs
    t, e, s = df.time.to_numpy()[:150], df.event.to_numpy()[:150], df.score.to_numpy()[:150]
    num = den = 0.0
    for i in range(150):
        for j in range(150):
            if e[i] and t[i] < t[j]:
                den += 1
                num += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    assert concordance(t, e, s) == pytest.approx(num / den)


def test_risk_groups_use_the_tuning_threshold_unchanged():
    df = _survival(seed=1)
    tune, test = df.iloc[:200], df.iloc[200:]
    groups = RiskGroups().fit(tune.score)
    assert groups.thresholds_[0] == pytest.approx(np.median(tune.score))
    labels = groups.transform(test.score)
    np.testing.assert_array_equal(labels == "high", test.score.to_numpy() > np.median(tune.score))
    lr = logrank(test.time, test.event, labels)
    assert lr["p_value"] < 1e-4 and lr["degrees_of_freedom"] == 1
    cox = cox_univariate(test.time, test.event, labels, name="group")
    assert cox["reference"] == "low" and cox["hr"] > 1.5
    three = RiskGroups(quantiles=(1 / 3, 2 / 3)).fit(tune.score)
    assert logrank(test.time, test.event, three.transform(test.score))["degrees_of_freedom"] == 2


def test_horizon_labels_drop_patients_censored_before_the_horizon():
    labels, kept = horizon_labels([1.0, 3.0, 1.5, 2.5, 0.5], [1, 1, 0, 0, 0], horizon=2.0)
    np.testing.assert_array_equal(kept, [True, True, False, True, False])
    np.testing.assert_array_equal(labels, [1, 0, 0])


def test_survival_report_writes_km_plots_and_tables(tmp_path):
    df = _survival(seed=2).assign(is_tune=lambda d: np.arange(len(d)) < 200)
    report = survival_report(df, "time", "event", "score", tune_col="is_tune", horizon=1.0, out_dir=tmp_path)
    assert report.n_tune == 200 and report.n_eval == 400
    assert report.horizon["n"] + report.horizon["n_dropped_censored"] == 400
    for name in ("km.png", "km.svg", "survival.json", "cox.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert pd.read_csv(tmp_path / "cox.csv").covariate.tolist() == ["risk_group", "score"]


def test_fit_probe_on_a_table_leaves_test_rows_and_unlabelled_rows_out():
    from fmcib.probes import fit_probe

    X, y = _signal_features(n=120)
    table = X.assign(label=y.astype(float), split=np.array(["train", "tune", "test"])[np.arange(120) % 3])
    table.loc[0, "label"] = np.nan  # no label: left out
    table.loc[table.split == "test", X.columns[:3]] = 1e6  # test rows would wreck the fit if they took part
    probe = fit_probe(table, "label", split_col="split", probe=LogisticProbe(n_trials=4, random_state=0))
    train, tune = (table.split == "train") & table.label.notna(), table.split == "tune"
    twin = LogisticProbe(n_trials=4, random_state=0).fit(X[train], y[train], X_tune=X[tune], y_tune=y[tune])
    np.testing.assert_allclose(probe.pipeline_[-1].coef_, twin.pipeline_[-1].coef_)
    assert probe.best_params_ == twin.best_params_
    with pytest.raises(FmcibError, match="no column 'nope'"):
        fit_probe(table, "nope")


def test_probe_tunes_with_fewer_folds_when_a_class_is_rare(caplog):
    X, y = _signal_features(n=40)
    rare = np.flatnonzero(y == 1)[3:]  # keep 3 rows of class 1
    keep = np.setdiff1d(np.arange(40), rare)
    with caplog.at_level(logging.WARNING, logger="fmcib.probes"):
        probe = LogisticProbe(n_trials=3, random_state=0).fit(X.iloc[keep], y[keep])
    assert probe.cv_folds_ == 3 and "3-fold instead of 5-fold" in caplog.text
    one = np.setdiff1d(np.arange(40), np.flatnonzero(y == 1)[1:])
    untuned = LogisticProbe(n_trials=3, C=0.5, random_state=0).fit(X.iloc[one], y[one])
    assert untuned.best_params_["C"] == 0.5 and untuned.study_ is None
