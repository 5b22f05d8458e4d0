"""Benchmark: what SimCLR and image-JEPA pretraining buy on the synthetic lesion benchmark
(fmcib.datasets.make_lesion_benchmark).

    python bench/pretraining.py --quick   # minutes on a 2-core CPU (16^3 patches at 2 mm)
    python bench/pretraining.py           # the run recorded in docs/benchmarks.md
    python bench/pretraining.py --quick --methods jepa   # one family only (simclr, jepa)

Protocol: each pretraining on the same unlabelled pool, with the same patches, epochs, batch and optimiser:
- SimCLR on ``resnet10_3d``;
- image JEPA on a ViT-Tiny with 4^3-voxel tokens (64 tokens of a 16^3 patch, 125 of a 20^3 one; the
  registered ``vit3d_tiny`` uses 8^3 tokens, too coarse for patches this small): I-JEPA (masked latent
  prediction against an EMA target; the folder keeps the EMA target, as I-JEPA evaluates, and a second
  run of the same seed keeps the context encoder, probed only) and LeJEPA (views pulled together + 0.05 x
  SIGReg).
Then, for each of the five latent variables (size, elongation, density, texture, margin) and 10/20/50/100 %
of the labelled set (stratified, seeded):
- linear probes (LogisticProbe, Optuna-tuned) on the features of each pretrained encoder and of its
  architecture at random init; for the ResNet also (control) the random-init encoder with BatchNorm
  statistics adapted to the pool (SimCLR's own run also adapts them, so SimCLR's gain over it is what the
  contrastive objective learned; a ViT has no BatchNorm);
- full fine-tunes (fmcib.training.finetune) of each architecture from random init (the supervised baseline
  trained from scratch) and from each pretrained encoder.
Each is scored by AUC on the fixed test set with a stratified bootstrap 95 % CI. Writes a CSV, a markdown
table and a PNG of the curves to --out-dir, and a JSON copy to bench/out/; the pretrained folders stay there,
the fine-tuned ones are removed once scored (several GB in all otherwise).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

# bench/ is the working folder of these scripts: its modules import by name
from extract import environment, report

from fmcib import extract_features
from fmcib.datasets import LATENTS, make_lesion_benchmark
from fmcib.evaluation import bootstrap_ci
from fmcib.models import ModelConfig, register_model
from fmcib.models.vit3d import VIT3D_TINY_ARGS
from fmcib.preprocessing import PreprocessConfig
from fmcib.probes import LogisticProbe
from fmcib.tables import feature_matrix
from fmcib.training import Augmentation, finetune, predict
from fmcib.training.jepa import pretrain_jepa
from fmcib.training.simclr import pretrain_simclr

RESNET = "resnet10_3d.random"
VIT = register_model(ModelConfig(
    name="vit3d_tiny_t4.random", architecture="vit3d", model_args={**VIT3D_TINY_ARGS, "patch_size": 4},
    num_features=VIT3D_TINY_ARGS["dim"], preprocess=PreprocessConfig(patch_size=16, spacing_mm=2.0),
    description="ViT-Tiny with 4^3-voxel tokens (bench/pretraining.py), seeded random weights"), overwrite=True).name
METHODS = ("simclr", "jepa")

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


def benchmark_arguments(doc: str, settings: dict[str, dict], name: str, **extra: tuple[str, ...]
                        ) -> tuple[argparse.Namespace, dict, Path]:
    """The options every learning benchmark takes (--quick, --out-dir, --device, --seed, and ``extra``
    multiple-choice options: name -> choices, all chosen by default), its settings and its working folder
    (bench/out/<name>-quick|full unless --out-dir); quiets the expected random-weights notices."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    for option, values in extra.items():
        p.add_argument(f"--{option}", nargs="+", choices=values, default=list(values))
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    work = args.out_dir or Path(__file__).resolve().parent / "out" / f"{name}-{mode}"
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fmcib.models").addFilter(lambda record: "random weights" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*random weights.*")
    warnings.filterwarnings("ignore", message=".*contract overridden.*")
    return args, settings[mode], work


def pretrain(methods: list[str], pool: Path, work: Path, s: dict, common: dict) -> tuple[dict, dict, dict, dict]:
    """Run the pretrainings; returns the probe encoders and fine-tune starts (approach -> (model, folder or
    None)), the seconds each run took and its last epoch's embedding monitors."""
    probes, starts, timings, monitors = {}, {}, {}, {}

    def timed(key: str, run: Any) -> None:
        t = time.perf_counter()
        result = run()
        timings[f"{key}_s"] = round(time.perf_counter() - t, 1)
        last = result.history[-1] if result.history else {}
        monitors[key] = {k[5:]: round(v, 4) for k, v in last.items() if k.startswith("tune_")}

    if "simclr" in methods:
        resnet = {**common, "model": RESNET}
        timed("simclr", lambda: pretrain_simclr(pool, work / "simclr", epochs=s["epochs"], **resnet))
        # control: passes over the pool with a learning rate of ~0: only BatchNorm statistics move (momentum 0.1:
        # they settle within a few dozen steps)
        pretrain_simclr(pool, work / "bn-adapted", epochs=min(3, s["epochs"]), monitor_samples=2,
                        **{**resnet, "lr": 1e-12})
        probes |= {"probe: ResNet random init": (RESNET, None),
                   "probe: ResNet random init, BN adapted": (RESNET, work / "bn-adapted"),
                   "probe: SimCLR": (RESNET, work / "simclr")}
        starts |= {"fine-tune: ResNet from scratch": (RESNET, None), "fine-tune: from SimCLR": (RESNET, work / "simclr")}
    if "jepa" in methods:
        vit = {**common, "model": VIT, "weight_decay": 0.04}
        timed("ijepa", lambda: pretrain_jepa(pool, work / "ijepa", mode="ema", epochs=s["epochs"], **vit))
        # the same run, keeping the context encoder instead of the EMA target (which lags it by ~250 steps)
        timed("ijepa_context", lambda: pretrain_jepa(pool, work / "ijepa-context", mode="ema", keep="context",
                                                     epochs=s["epochs"], **vit))
        timed("lejepa", lambda: pretrain_jepa(pool, work / "lejepa", mode="lejepa", sigreg_lambda=0.05,
                                              epochs=s["epochs"], **vit))
        probes |= {"probe: ViT random init": (VIT, None), "probe: I-JEPA": (VIT, work / "ijepa"),
                   "probe: I-JEPA, context encoder": (VIT, work / "ijepa-context"),
                   "probe: LeJEPA": (VIT, work / "lejepa")}
        starts |= {"fine-tune: ViT from scratch": (VIT, None), "fine-tune: from I-JEPA": (VIT, work / "ijepa"),
                   "fine-tune: from LeJEPA": (VIT, work / "lejepa")}
    return probes, starts, timings, monitors


def main() -> None:
    args, s, work = benchmark_arguments(__doc__, SETTINGS, "ssl", methods=METHODS)
    started = time.perf_counter()
    tables = make_lesion_benchmark(work / "data", s["pool"], s["labelled"], s["test"], random_state=args.seed)
    labelled, test = pd.read_csv(tables["labelled"]), pd.read_csv(tables["test"])
    contract = {"patch_size": s["patch"], "spacing_mm": s["spacing"]}
    common = {"batch_size": s["batch"], "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1.0,
              "device": args.device, "seed": args.seed, "progress": False,
              "data_description": "Synthetic lesions of fmcib.datasets.make_lesion_benchmark "
              "(not patient data; a benchmark encoder, not a clinical one)", **contract}
    probes, starts, timings, monitors = pretrain(args.methods, tables["pool"], work, s, common)

    rows = []
    t = time.perf_counter()
    for approach, (model, weights) in probes.items():
        extract = {"model": model, "weights": weights, "progress": False, "num_workers": 0, "device": args.device,
                   **contract}
        train_f = feature_matrix(extract_features(tables["labelled"], **extract))
        test_f = feature_matrix(extract_features(tables["test"], **extract))
        for latent in LATENTS:
            for fraction in FRACTIONS:
                pick = stratified_subset(labelled[latent], fraction, args.seed)
                probe = LogisticProbe(n_trials=s["trials"], random_state=args.seed)
                probe.fit(train_f.iloc[pick], labelled[latent].iloc[pick])
                prob = probe.predict_proba(test_f)[:, 1]
                rows.append({"latent": latent, "fraction": fraction, "n_train": len(pick), "approach": approach,
                             **scored(test[latent].to_numpy(), prob, s["resamples"], args.seed)})
    timings["probes_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    for approach, (model, weights) in starts.items():
        for latent in LATENTS:
            for fraction in s["finetune_fractions"]:
                out = work / "finetune" / f"{approach.split(': ')[-1].replace(' ', '-').lower()}-{latent}-{fraction}"
                result = finetune(tables["labelled"], latent, out, model=model, weights=weights,
                                  epochs=s["finetune_epochs"], batch_size=s["batch"] // 2, optimizer="adamw",
                                  lr=3e-4, fraction=None if fraction == 1.0 else fraction,
                                  augmentation=Augmentation(translate_voxels=3), device=args.device, seed=args.seed,
                                  progress=False, **contract)
                prob = predict(tables["test"], out, progress=False, num_workers=0, device=args.device)["prob_1"]
                shutil.rmtree(out)  # scored; its weights and resume state are tens of MB, 60 folders several GB
                rows.append({"latent": latent, "fraction": fraction, "n_train": result.counts["train"],
                             "approach": approach, **scored(test[latent].to_numpy(), prob.to_numpy(),
                                                            s["resamples"], args.seed)})
    timings["finetunes_s"] = round(time.perf_counter() - t, 1)
    table = pd.DataFrame(rows)
    table.to_csv(work / "ssl_benchmark.csv", index=False)
    shown = table.assign(cell=[f"{a:.3f} ({lo:.2f}-{hi:.2f})" for a, lo, hi in
                               zip(table.auc, table.ci_low, table.ci_high)])
    wide = shown.pivot_table(index=["latent", "fraction"], columns="approach", values="cell", aggfunc="first")
    mean = table.groupby("approach")["auc"].mean().round(3)
    summary = mean.rename("mean test AUC").to_frame().assign(cells=table.groupby("approach").size())
    (work / "ssl_benchmark.md").write_text(summary.to_markdown() + "\n\n" + wide.to_markdown() + "\n")
    plot(table, work / "ssl_benchmark.png")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report({**environment(device), "mode": "quick" if args.quick else "full", "settings": s, **timings,
            "last_epoch_monitors": monitors, "mean_auc_by_approach": mean.to_dict(),
            "table": str(work / "ssl_benchmark.md")}, "ssl", device)
    print(summary.to_markdown())
    print(wide.to_markdown())


def plot(table: pd.DataFrame, out: Path) -> None:
    """AUC against the labelled fraction: a panel per latent variable, probes in the top row and fine-tunes in
    the bottom one, a line (and its 95 % CI band) per approach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("probe", "fine-tune") if table.approach.str.startswith(k + ":").any()]
    fig, axes = plt.subplots(len(kinds), len(LATENTS), figsize=(3.0 * len(LATENTS) + 2.6, 3.0 * len(kinds)),
                             sharey=True, squeeze=False)
    for row, kind in zip(axes, kinds):
        rows = table[table.approach.str.startswith(kind + ":")]
        colours = dict(zip(sorted(rows.approach.unique()), plt.cm.tab10.colors))
        for ax, latent in zip(row, LATENTS):
            for approach, group in rows[rows.latent == latent].groupby("approach"):
                group = group.sort_values("fraction")
                ax.plot(group.fraction, group.auc, marker="o", color=colours[approach],
                        label=approach.split(": ", 1)[1])
                ax.fill_between(group.fraction, group.ci_low, group.ci_high, color=colours[approach], alpha=0.08)
            ax.set_xscale("log")
            ax.set_xticks(FRACTIONS, [f"{f:.0%}" for f in FRACTIONS])
            ax.minorticks_off()
            ax.set_title(f"{latent} ({kind}s)", fontsize=10)
            ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        row[0].set_ylabel("test AUC (95% CI)")
        row[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title=kind + "s", title_fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("labelled fraction")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
