"""Benchmark: what SimCLR pretraining buys on the synthetic lesion benchmark (fmcib.datasets.make_lesion_benchmark).

    python bench/pretraining.py --quick   # minutes on a 2-core CPU (resnet10_3d, 16^3 patches at 2 mm)
    python bench/pretraining.py           # the run recorded in docs/benchmarks.md

Protocol: SimCLR on the unlabelled pool; then, for each of the five latent variables (size, elongation,
density, texture, margin) and 10/20/50/100 % of the labelled set (stratified, seeded):
- linear probes (LogisticProbe, Optuna-tuned) on the features of (a) the random-init encoder, (b) the same
  random-init encoder with BatchNorm statistics adapted to the pool (a control: SimCLR's own run also
  adapts them, so any gain of (c) over (b) is what the contrastive objective learned), (c) the SimCLR encoder;
- full fine-tunes (fmcib.training.finetune) from random init (the supervised baseline trained from
  scratch) and from the SimCLR encoder.
Each is scored by AUC on the fixed test set with a stratified bootstrap 95 % CI. Writes a CSV, a markdown
table and a PNG of the curves to --out-dir, and a JSON copy to bench/out/.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
# bench/ is the working folder of these scripts: its modules import by name
from extract import environment, report

from fmcib import extract_features
from fmcib.datasets import LATENTS, make_lesion_benchmark
from fmcib.evaluation import bootstrap_ci
from fmcib.probes import LogisticProbe
from fmcib.tables import feature_matrix
from fmcib.training import Augmentation, finetune, predict
from fmcib.training.simclr import pretrain_simclr

SETTINGS = {  # quick: minutes on 2 CPU cores; full: the recorded run
    "quick": {"pool": 24, "labelled": 16, "test": 16, "patch": 16, "spacing": 2.0, "epochs": 8, "batch": 16,
              "finetune_epochs": 6, "finetune_fractions": (0.5, 1.0), "trials": 10, "resamples": 999},
    "full": {"pool": 64, "labelled": 32, "test": 32, "patch": 20, "spacing": 2.0, "epochs": 20, "batch": 32,
             "finetune_epochs": 8, "finetune_fractions": (0.1, 0.2, 0.5, 1.0), "trials": 30, "resamples": 9999},
}
FRACTIONS = (0.1, 0.2, 0.5, 1.0)


def stratified_subset(labels: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """Positions of a stratified, seeded ``fraction`` of the rows (at least one per class)."""
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in labels.groupby(labels):
        pos = np.flatnonzero(labels.index.isin(group.index))
        keep += rng.choice(pos, size=max(1, round(fraction * len(pos))), replace=False).tolist()
    return np.sort(keep)


def scored(y: np.ndarray, p: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    ci = bootstrap_ci(y, p, "auc", n_resamples=resamples, random_state=seed)
    return {"auc": ci.estimate, "ci_low": ci.ci_low, "ci_high": ci.ci_high}


def benchmark_arguments(doc: str, settings: dict[str, dict], name: str) -> tuple[argparse.Namespace, dict, Path]:
    """The options every learning benchmark takes (--quick, --out-dir, --device, --seed), its settings and its
    working folder (bench/out/<name>-quick|full unless --out-dir); quiets the expected random-weights notices."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    work = args.out_dir or Path(__file__).resolve().parent / "out" / f"{name}-{mode}"
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*random weights.*")
    warnings.filterwarnings("ignore", message=".*contract overridden.*")
    return args, settings[mode], work


def main() -> None:
    args, s, work = benchmark_arguments(__doc__, SETTINGS, "ssl")
    started = time.perf_counter()
    tables = make_lesion_benchmark(work / "data", s["pool"], s["labelled"], s["test"], random_state=args.seed)
    labelled, test = pd.read_csv(tables["labelled"]), pd.read_csv(tables["test"])
    contract = {"patch_size": s["patch"], "spacing_mm": s["spacing"]}
    common = {"model": "resnet10_3d.random", "batch_size": s["batch"], "optimizer": "adamw", "lr": 1e-3,
              "weight_decay": 1e-4, "warmup_epochs": 1.0, "device": args.device, "seed": args.seed,
              "progress": False, "data_description": "Synthetic lesions of fmcib.datasets.make_lesion_benchmark "
              "(not patient data; a benchmark encoder, not a clinical one)", **contract}
    timings = {}
    t = time.perf_counter()
    pretrain_simclr(tables["pool"], work / "simclr", epochs=s["epochs"], **common)
    timings["simclr_s"] = round(time.perf_counter() - t, 1)
    # control: passes over the pool with a learning rate of ~0: only BatchNorm statistics move (momentum 0.1:
    # they settle within a few dozen steps)
    pretrain_simclr(tables["pool"], work / "bn-adapted", epochs=min(3, s["epochs"]), monitor_samples=2,
                    **{**common, "lr": 1e-12})

    rows = []
    extract = {"model": "resnet10_3d.random", "progress": False, "num_workers": 0, "device": args.device, **contract}
    encoders = {"probe: random init": None, "probe: random init, BN adapted": work / "bn-adapted",
                "probe: SimCLR": work / "simclr"}
    for approach, weights in encoders.items():
        train_f = feature_matrix(extract_features(tables["labelled"], weights=weights, **extract))
        test_f = feature_matrix(extract_features(tables["test"], weights=weights, **extract))
        for latent in LATENTS:
            for fraction in FRACTIONS:
                pick = stratified_subset(labelled[latent], fraction, args.seed)
                probe = LogisticProbe(n_trials=s["trials"], random_state=args.seed)
                probe.fit(train_f.iloc[pick], labelled[latent].iloc[pick])
                prob = probe.predict_proba(test_f)[:, 1]
                rows.append({"latent": latent, "fraction": fraction, "n_train": len(pick), "approach": approach,
                             **scored(test[latent].to_numpy(), prob, s["resamples"], args.seed)})
    t = time.perf_counter()
    starts = {"fine-tune: from scratch": None, "fine-tune: from SimCLR": work / "simclr"}
    for approach, weights in starts.items():
        for latent in LATENTS:
            for fraction in s["finetune_fractions"]:
                out = work / "finetune" / f"{approach.split()[-1].lower()}-{latent}-{fraction}"
                result = finetune(tables["labelled"], latent, out, model="resnet10_3d.random", weights=weights,
                                  epochs=s["finetune_epochs"], batch_size=s["batch"] // 2, optimizer="adamw",
                                  lr=3e-4, fraction=None if fraction == 1.0 else fraction,
                                  augmentation=Augmentation(translate_voxels=3), device=args.device, seed=args.seed,
                                  progress=False, **contract)
                prob = predict(tables["test"], out, progress=False, num_workers=0, device=args.device)["prob_1"]
                rows.append({"latent": latent, "fraction": fraction, "n_train": result.counts["train"],
                             "approach": approach, **scored(test[latent].to_numpy(), prob.to_numpy(),
                                                            s["resamples"], args.seed)})
    timings["finetunes_s"] = round(time.perf_counter() - t, 1)
    table = pd.DataFrame(rows)
    table.to_csv(work / "ssl_benchmark.csv", index=False)
    shown = table.assign(cell=[f"{a:.3f} ({lo:.2f}-{hi:.2f})" for a, lo, hi in
                               zip(table.auc, table.ci_low, table.ci_high)])
    wide = shown.pivot_table(index=["latent", "fraction"], columns="approach", values="cell", aggfunc="first")
    (work / "ssl_benchmark.md").write_text(wide.to_markdown())
    plot(table, work / "ssl_benchmark.png")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mean = table.groupby("approach")["auc"].mean().round(3).to_dict()
    report({**environment(device), "mode": "quick" if args.quick else "full", "settings": s, **timings,
            "mean_auc_by_approach": mean, "table": str(work / "ssl_benchmark.md")}, "ssl", device)
    print(wide.to_markdown())


def plot(table: pd.DataFrame, out: Path) -> None:
    """AUC against the labelled fraction, one panel per latent variable, one line per approach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LATENTS), figsize=(3.2 * len(LATENTS), 3.2), sharey=True)
    for ax, latent in zip(axes, LATENTS):
        for approach, group in table[table.latent == latent].groupby("approach"):
            group = group.sort_values("fraction")
            ax.plot(group.fraction, group.auc, marker="o", label=approach)
            ax.fill_between(group.fraction, group.ci_low, group.ci_high, alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks(FRACTIONS, [f"{f:.0%}" for f in FRACTIONS])
        ax.set_title(latent, fontsize=10)
        ax.set_xlabel("labelled fraction")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    axes[0].set_ylabel("test AUC (95% CI)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
