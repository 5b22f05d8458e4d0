"""Benchmark: the longitudinal JEPA family on a synthetic multimodal cohort (fmcib.datasets.make_cohort_benchmark).

    python bench/longitudinal.py --quick   # minutes on a 2-core CPU
    python bench/longitudinal.py           # the run recorded in docs/benchmarks.md

Data: patients with a CT per visit (a lesion that grows, shrinks after treatment, or stays) and clinical
values per visit, driven by hidden binary variables; label = progression (aggressive and not responding),
visible only across visits. Image features per visit come from a fixed random-init resnet10_3d through
``fmcib.extract_features`` (Li et al. also used a frozen image encoder's features), joined with the
clinical columns into the long table.

Protocol: self-supervised stages on the unlabelled pool plus the labelled patients (labels unused); a fixed
stratified 20 % of the labelled patients is the tuning set of the fine-tunes; of the other 80 %, 10/20/50/100 %
(stratified, seeded, ``--repeats`` draws) train:
- linear probes (LogisticProbe, Optuna-tuned) on the patient embeddings of an untrained encoder (random init),
  the JEPA, the JEPA with SIGReg, and the JEPA followed by CLIP-style alignment;
- fine-tunes (masked mean pooling + MLP head, every layer) from random init (supervised), from the JEPA, and
  from JEPA + alignment (the layered schedule: ``train_layered`` runs its first two stages).
Each is scored by AUC on the test patients: the mean over the repeats, with a 95 % CI from a stratified
bootstrap of the test patients (percentile; each resample scores every repeat and averages them). A second
table: probe AUC for every hidden variable with all labelled patients; a third: paired differences between
approaches on the same test patients, with their bootstrap CI. Writes CSVs, markdown tables and a PNG to
--out-dir and a JSON copy to bench/out/.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

# bench/ is the working folder of these scripts: its modules import by name
from extract import environment, report
from pretraining import benchmark_arguments, stratified_subset

from fmcib import embed_patients, extract_features
from fmcib.datasets import COHORT_LATENTS, make_cohort_benchmark
from fmcib.probes import LogisticProbe
from fmcib.training.layered import train_layered
from fmcib.training.longitudinal import Architecture, LongitudinalEncoder, TableColumns, pretrain_longitudinal
from fmcib.training.patients import finetune_patients, predict_patients

SETTINGS = {  # quick: minutes on 2 CPU cores; full: the recorded run
    "quick": {"pool": 120, "labelled": 80, "test": 80, "width": 64, "jepa_epochs": 60, "align_epochs": 30,
              "finetune_epochs": 40, "batch": 32, "trials": 10, "resamples": 999, "repeats": 1,
              "fractions": (0.25, 0.5, 1.0)},
    "full": {"pool": 400, "labelled": 200, "test": 200, "width": 64, "jepa_epochs": 150, "align_epochs": 50,
             "finetune_epochs": 60, "batch": 64, "trials": 20, "resamples": 9999, "repeats": 3,
             "fractions": (0.1, 0.2, 0.5, 1.0)},
}
IMAGE_ENCODER = {"model": "resnet10_3d.random", "patch_size": 20, "spacing_mm": 2.0}
DESCRIPTION = "Synthetic patients of fmcib.datasets.make_cohort_benchmark (not patient data)"


def long_table(csv: Path, device: str | None) -> pd.DataFrame:
    """The cohort table with image features (pred_*) on the visits that have a scan."""
    table = pd.read_csv(csv, keep_default_na=True)
    has_scan = table["image_path"].fillna("").astype(str) != ""
    features = extract_features(table[has_scan].reset_index(drop=True), progress=False, device=device,
                                num_workers=0, **IMAGE_ENCODER)
    return pd.concat([features, table[~has_scan]], ignore_index=True).sort_values(["patient", "month"])


def mean_auc_with_ci(y: np.ndarray, probs: list[np.ndarray], resamples: int, seed: int,
                     keep: bool = False) -> dict[str, Any]:
    """Mean AUC of several repeats' test predictions and its stratified percentile bootstrap 95 % CI (the same
    resamples for the same ``seed``; ``keep``: also the bootstrap values, ``boot``)."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    index = np.concatenate([rng.choice(pos, (resamples, len(pos))), rng.choice(neg, (resamples, len(neg)))], axis=1)
    full = np.concatenate([pos, neg])[None]

    def auc(p: np.ndarray, rows: np.ndarray) -> np.ndarray:  # Mann-Whitney: positives come first in ``rows``
        ranks = rankdata(p[rows], axis=1)
        return (ranks[:, :len(pos)].sum(axis=1) - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))

    estimate = float(np.mean([auc(p, full)[0] for p in probs]))
    boot = np.mean([auc(p, index) for p in probs], axis=0)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"auc": estimate, "ci_low": float(low), "ci_high": float(high), "repeats": len(probs),
            "sd_repeats": float(np.std([auc(p, full)[0] for p in probs], ddof=1)) if len(probs) > 1 else 0.0,
            **({"boot": boot} if keep else {})}


def paired_difference(y: np.ndarray, ours: list[np.ndarray], theirs: list[np.ndarray], resamples: int,
                      seed: int) -> dict[str, float]:
    """Mean AUC of ``ours`` minus that of ``theirs`` (each the mean over its draws) on the same test patients,
    with a stratified percentile bootstrap 95 % CI that resamples both together (a paired comparison)."""
    a = mean_auc_with_ci(y, ours, resamples, seed, keep=True)
    b = mean_auc_with_ci(y, theirs, resamples, seed, keep=True)
    low, high = np.percentile(a.pop("boot") - b.pop("boot"), [2.5, 97.5])
    return {"difference": a["auc"] - b["auc"], "ci_low": float(low), "ci_high": float(high)}


def per_patient(table: pd.DataFrame, column: str) -> pd.Series:
    return table.groupby("patient", sort=True)[column].first()


def main() -> None:
    args, s, work = benchmark_arguments(__doc__, SETTINGS, "longitudinal")
    torch.manual_seed(args.seed)
    started, timings = time.perf_counter(), {}
    paths = make_cohort_benchmark(work / "data", s["pool"], s["labelled"], s["test"], random_state=args.seed)
    tables = {split: long_table(path, args.device) for split, path in paths.items()}
    timings["data_and_features_s"] = round(time.perf_counter() - started, 1)
    labelled, test = tables["labelled"], tables["test"]
    hidden = ["label", "radius_mm", *COHORT_LATENTS]
    unlabelled = pd.concat([tables["pool"], labelled.drop(columns=hidden)], ignore_index=True)
    cols = {"columns": TableColumns("patient", "month", clinical_prefix="clin_"),
            "architecture": Architecture(width=s["width"])}
    common = {"batch_size": s["batch"], "device": args.device, "seed": args.seed, "progress": False,
              "data_description": DESCRIPTION}

    t = time.perf_counter()
    pretrain_longitudinal(unlabelled, work / "jepa", epochs=s["jepa_epochs"], **cols, **common)
    timings["jepa_s"] = round(time.perf_counter() - t, 1)
    pretrain_longitudinal(unlabelled, work / "jepa-sigreg", epochs=s["jepa_epochs"], sigreg_lambda=0.05, **cols,
                          **common)
    t = time.perf_counter()
    plan = train_layered(unlabelled, work / "layered", stages=("jepa", "align"), **cols,
                         jepa={"epochs": s["jepa_epochs"], "batch_size": s["batch"]},
                         align={"epochs": s["align_epochs"], "batch_size": s["batch"]},
                         data_description=DESCRIPTION, device=args.device, seed=args.seed, progress=False)
    timings["layered_pretraining_s"] = round(time.perf_counter() - t, 1)
    aligned = Path(plan["final"])
    random_dir = work / "random-init"  # the same architecture, untrained
    shutil.copytree(work / "jepa", random_dir, dirs_exist_ok=True)
    from safetensors.torch import load_file, save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        fresh = LongitudinalEncoder(**json.loads((work / "jepa" / "config.json").read_text())["model_args"])
    assert fresh.state_dict().keys() == load_file(str(work / "jepa" / "model.safetensors")).keys()
    save_file(fresh.state_dict(), str(random_dir / "model.safetensors"))

    y_lab, y_test = per_patient(labelled, "label"), per_patient(test, "label")
    tune_ids = set(y_lab.index[stratified_subset(y_lab.reset_index(drop=True), 0.2, args.seed + 1)])
    train_ids = y_lab.index[~y_lab.index.isin(tune_ids)]
    labelled = labelled.assign(is_tune=labelled["patient"].isin(tune_ids))
    y_train = y_lab.loc[train_ids]
    picks = {(fraction, repeat): train_ids[stratified_subset(y_train.reset_index(drop=True), fraction,
                                                              args.seed + 100 * repeat)]
             for fraction in s["fractions"] for repeat in range(s["repeats"] if fraction < 1 else 1)}
    rows, latent_rows = [], []  # probes and fine-tunes train on the same patients (picks)
    predictions: dict[tuple[str, float], list[np.ndarray]] = {}  # test predictions of each approach and fraction
    probes = {"probe: random init": random_dir, "probe: JEPA": work / "jepa", "probe: JEPA + SIGReg":
              work / "jepa-sigreg", "probe: JEPA + alignment": aligned}
    for approach, folder in probes.items():
        train_emb = embed_patients(labelled, folder).set_index("patient").loc[train_ids]
        test_emb = embed_patients(test, folder).set_index("patient").loc[y_test.index]
        for target in ("label", *COHORT_LATENTS):
            y_train_all = per_patient(labelled, target).loc[train_ids]
            fractions = s["fractions"] if target == "label" else (1.0,)
            for fraction in fractions:
                probs, chosen = [], [pick for (f, _), pick in picks.items() if f == fraction]
                for pick in chosen:
                    probe = LogisticProbe(n_trials=s["trials"], random_state=args.seed)
                    probe.fit(train_emb.loc[pick], y_train_all.loc[pick].to_numpy())
                    probs.append(probe.predict_proba(test_emb)[:, 1])
                score = mean_auc_with_ci(per_patient(test, target).loc[y_test.index].to_numpy(), probs,
                                         s["resamples"], args.seed)
                if target == "label":
                    predictions[approach, fraction] = probs
                record = {"target": target, "fraction": fraction, "n_train": len(chosen[0]), "approach": approach,
                          **score}
                (rows if target == "label" else latent_rows).append(record)
    t = time.perf_counter()
    starts = {"fine-tune: random init (supervised)": None, "fine-tune: from JEPA": work / "jepa",
              "fine-tune: layered (JEPA + alignment)": aligned}
    for approach, start in starts.items():
        for fraction in s["fractions"]:
            probs = []
            for (f, repeat), pick in picks.items():
                if f != fraction:
                    continue
                out = work / "finetune" / f"{approach.split(':')[1].split()[0].lower()}-{fraction}-{repeat}"
                kwargs = cols if start is None else {}
                subset = labelled[labelled["patient"].isin(pick) | labelled["is_tune"]]
                result = finetune_patients(subset, "label", out, start=start, tune_col="is_tune",
                                           epochs=s["finetune_epochs"], lr=5e-4, **kwargs,
                                           **{**common, "seed": args.seed + 100 * repeat})
                probs.append(predict_patients(test, out).set_index("patient").loc[y_test.index, "prob_1"].to_numpy())
            predictions[approach, fraction] = probs
            rows.append({"target": "label", "fraction": fraction, "n_train": result.counts["train"],
                         "approach": approach, **mean_auc_with_ci(y_test.to_numpy(), probs, s["resamples"],
                                                                   args.seed)})
    timings["finetunes_s"] = round(time.perf_counter() - t, 1)

    table = pd.DataFrame(rows)
    table.to_csv(work / "longitudinal_benchmark.csv", index=False)
    pairs = [("fine-tune: from JEPA", "fine-tune: random init (supervised)"),
             ("fine-tune: layered (JEPA + alignment)", "fine-tune: random init (supervised)"),
             ("fine-tune: layered (JEPA + alignment)", "fine-tune: from JEPA"),
             ("probe: JEPA", "probe: random init"), ("probe: JEPA + SIGReg", "probe: JEPA")]
    differences = pd.DataFrame([{"comparison": f"{ours} - {theirs}", "fraction": fraction,
                                 **paired_difference(y_test.to_numpy(), predictions[ours, fraction],
                                                     predictions[theirs, fraction], s["resamples"], args.seed)}
                                for ours, theirs in pairs for fraction in s["fractions"]])
    differences.to_csv(work / "longitudinal_differences.csv", index=False)
    summary = table.copy()
    summary["cell"] = [f"{a:.3f} ({lo:.2f}-{hi:.2f})" for a, lo, hi in
                       zip(summary.auc, summary.ci_low, summary.ci_high)]
    summary["column"] = [f"{f:.0%} ({n})" for f, n in zip(summary.fraction, summary.n_train)]
    wide = summary.pivot_table(index="approach", columns="column", values="cell", aggfunc="first")
    wide = wide[sorted(wide.columns, key=lambda c: float(c.split("%")[0]))]
    latents = pd.DataFrame(latent_rows)
    latents["cell"] = [f"{a:.3f} ({lo:.2f}-{hi:.2f})" for a, lo, hi in
                       zip(latents.auc, latents.ci_low, latents.ci_high)]
    latent_wide = latents.pivot_table(index="approach", columns="target", values="cell", aggfunc="first")
    differences["cell"] = [f"{d:+.3f} ({lo:+.2f} to {hi:+.2f})" for d, lo, hi in
                           zip(differences.difference, differences.ci_low, differences.ci_high)]
    paired = differences.pivot_table(index="comparison", columns="fraction", values="cell", aggfunc="first")
    (work / "longitudinal_benchmark.md").write_text("\n\n".join(t.to_markdown() for t in (wide, latent_wide, paired))
                                                    + "\n")
    plot(summary, work / "longitudinal_benchmark.png")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    health = {name: {k: round(float(v), 3) for k, v in pd.read_csv(folder / "metrics.csv").iloc[-1].items()
                     if k.startswith("tune_") or k == "train_loss"}
              for name, folder in (("jepa", work / "jepa"), ("jepa-sigreg", work / "jepa-sigreg"),
                                   ("alignment", aligned))}
    report({**environment(device), "mode": "quick" if args.quick else "full", "settings": s,
            "image_encoder": IMAGE_ENCODER, **timings, "last_epoch": health,
            "mean_auc_by_approach": table.groupby("approach")["auc"].mean().round(3).to_dict(),
            "table": str(work / "longitudinal_benchmark.md")}, "longitudinal", device)
    print(wide.to_markdown())
    print(latent_wide.to_markdown())
    print(paired.to_markdown())


def plot(summary: pd.DataFrame, out: Path) -> None:
    """Test AUC of the progression label against the number of labelled training patients, one line per approach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for approach, group in summary.groupby("approach"):
        group = group.sort_values("n_train")
        style = "--" if approach.startswith("probe") else "-"
        ax.plot(group.n_train, group.auc, style, marker="o", label=approach)
        ax.fill_between(group.n_train, group.ci_low, group.ci_high, alpha=0.08)
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks = sorted(summary.n_train.unique())
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("labelled training patients")
    ax.set_ylabel("test AUC, progression (95% CI)")
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
