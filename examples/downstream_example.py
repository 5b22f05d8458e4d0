"""End to end downstream analysis: probe -> bootstrap CI -> Kaplan-Meier curves -> QC montage.

    python examples/downstream_example.py [OUT_DIR]

The features are synthetic (a known signal in three of 64 columns, survival simulated from the label)
because no outcome labels can be shipped; the QC montage uses the bundled real CT case.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fmcib.datasets import make_demo_features
from fmcib.evaluation import bootstrap_ci
from fmcib.plots import qc_montage
from fmcib.probes import LogisticProbe, feature_matrix
from fmcib.survival import survival_report

HERE = Path(__file__).resolve().parent


def main(out_dir: Path) -> None:
    """Run the whole chain and write its figures and tables to ``out_dir``."""
    table = make_demo_features(n=300, n_features=64, random_state=0)  # label 1 = worse outcome
    X, y, part = feature_matrix(table), table["label"].to_numpy(), table["split"].to_numpy()

    probe = LogisticProbe(n_trials=30, random_state=0).fit(X[part == "train"], y[part == "train"],
                                                           X_tune=X[part == "tune"], y_tune=y[part == "tune"])
    out_dir.mkdir(parents=True, exist_ok=True)
    probe.save(out_dir / "probe.json")
    table["score"] = probe.predict_proba(X)[:, 1]
    test = part == "test"
    ci = bootstrap_ci(y[test], table.loc[test, "score"], metric="auc", random_state=0)
    print(f"test AUC {ci.estimate:.3f} (95% CI {ci.ci_low:.3f}-{ci.ci_high:.3f}, {ci.n_resamples} resamples)")

    report = survival_report(table, "time", "event", "score", split_col="split", out_dir=out_dir / "survival")
    hr = report.cox_groups
    print(f"KM: log-rank p {report.logrank['p_value']:.3g}, HR high vs low {hr['hr']:.2f} "
          f"({hr['hr_low']:.2f}-{hr['hr_high']:.2f}), C-index {report.c_index:.3f}")

    pages = qc_montage(HERE / "data" / "seeds.csv", out_dir / "qc.png")
    print(f"wrote {out_dir / 'probe.json'}, {out_dir / 'survival'}/km.png and {', '.join(map(str, pages))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("downstream_example_out"))
