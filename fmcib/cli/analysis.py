"""Downstream analysis commands: ``probe``, ``survival``, ``stability``, ``tsne``, ``saliency``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click

from .common import EXIT_ROWS_FAILED, TABLE, extraction_options, extractor_from_options, read_input


@click.group()
def probe() -> None:
    """Linear probes (Optuna-tuned logistic regression) on extracted features."""


@probe.command("fit")
@click.option("--features", required=True, type=TABLE, help="Table from `fmcib extract` (pred_* columns).")
@click.option("--label", required=True, help="Column holding the class labels.")
@click.option("--tune-col", default=None, help="Column marking tuning rows (truthy); otherwise stratified CV.")
@click.option("--split-col", default=None,
              help="Instead of --tune-col: a column of train/tune/test; fit on train, tune on tune, leave test out.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Probe file (.json).")
@click.option("--n-trials", default=100, show_default=True, type=click.IntRange(min=0))
@click.option("--penalty", "penalties", multiple=True, default=["l2"], show_default=True,
              type=click.Choice(["l2", "l1"]), help="Penalties to search (repeatable).")
@click.option("--scoring", default="auto", show_default=True,
              type=click.Choice(["auto", "auc", "balanced_accuracy", "average_precision"]))
@click.option("--cv", default=5, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
def probe_fit(ctx: click.Context, features: Path, label: str, tune_col: str | None, split_col: str | None, out: Path,
              n_trials: int, penalties: tuple[str, ...], scoring: str, cv: int, seed: int) -> None:
    """Fit a probe on the rows with a label (tuning rows, if marked, only tune).

    \b
    Example:
      fmcib probe fit --features f.parquet --label malignant --split-col split --out probe.json
    """
    from ..files import check_outputs, read_table_metadata
    from ..probes import LogisticProbe, encoder_of, fit_probe

    check_outputs({"--features": features}, {"--out": out})
    if tune_col and split_col:
        raise click.UsageError("give --tune-col or --split-col, not both")
    model = fit_probe(read_input(features), label, tune_col=tune_col, split_col=split_col,
                      probe=LogisticProbe(n_trials=n_trials, penalties=penalties, scoring=scoring, cv=cv,
                                          random_state=seed), name=f"'{features}'")
    model.encoder_ = encoder_of(read_table_metadata(features))
    model.save(out)
    click.echo(f"probe: C={model.best_params_['C']:.3g} ({model.best_params_['penalty']}), tuning "
               f"{model._objective_metric()}={model.best_score_:.3f}, {model.n_dropped_} rows dropped; wrote {out}",
               err=True)


@probe.command("predict")
@click.option("--model", "model_path", required=True, type=TABLE, help="Probe file from `fmcib probe fit`.")
@click.option("--features", required=True, type=TABLE)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".csv or .parquet")
@click.pass_context
def probe_predict(ctx: click.Context, model_path: Path, features: Path, out: Path) -> None:
    """Write every row's class probabilities (prob_<class>) and prediction, with the non-feature columns."""
    from ..files import check_outputs, check_table_output, read_table_metadata, write_table
    from ..probes import encoder_of, load_probe, prediction_table

    check_table_output(out)
    check_outputs({"--features": features, "--model": model_path}, {"--out": out})
    model = load_probe(model_path)
    table = read_input(features)
    made_by, trained_on = encoder_of(read_table_metadata(features)), getattr(model, "encoder_", None)
    if made_by and trained_on and made_by != trained_on:
        click.echo(f"warning: the probe was trained on features of {trained_on['model']} (weights "
                   f"{str(trained_on['weights_sha256'])[:12]}...), these come from {made_by['model']} (weights "
                   f"{str(made_by['weights_sha256'])[:12]}...): its predictions are not meaningful", err=True)
    keep = prediction_table(model, table)
    write_table(keep, out)
    missing = int(keep["prediction"].isna().sum())
    if missing:
        click.echo(f"{missing} row(s) with missing or non-finite features got no prediction", err=True)
    click.echo(f"wrote {len(keep)} rows to {out}", err=True)


@click.command()
@click.option("--predictions", required=True, type=TABLE, help="Table with time, event and score columns.")
@click.option("--time", "time_col", required=True)
@click.option("--event", "event_col", required=True, help="1 = event observed, 0 = censored.")
@click.option("--score", "score_col", required=True, help="Risk score (higher = worse).")
@click.option("--tune-col", default=None, help="Column marking tuning rows: the threshold is chosen there.")
@click.option("--split-col", default=None,
              help="Instead of --tune-col: a column of train/tune/test; threshold on tune, statistics on test.")
@click.option("--horizon", default=None, type=float, help="Also report AUC for an event by this time.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
def survival(ctx: click.Context, predictions: Path, time_col: str, event_col: str, score_col: str,
             tune_col: str | None, split_col: str | None, horizon: float | None, out_dir: Path) -> None:
    """Median-split risk groups, KM curves, log-rank, Cox and C-index for a score.

    \b
    Example:
      fmcib survival --predictions p.csv --time os_months --event death --score prob_1 --split-col split --out-dir surv/
    """
    from ..files import check_outputs
    from ..survival import survival_report

    check_outputs({"--predictions": predictions},
                  {f"--out-dir {name}": out_dir / name for name in ("km.png", "km.svg", "survival.json", "cox.csv")})
    report = survival_report(read_input(predictions), time_col, event_col, score_col, tune_col=tune_col,
                             split_col=split_col, horizon=horizon, out_dir=out_dir)
    if not (tune_col or split_col):
        click.echo(f"note: risk-group threshold chosen on {report.threshold_source}", err=True)
    hr = report.cox_groups
    click.echo(f"log-rank p={report.logrank['p_value']:.3g}; HR high vs low {hr.get('hr', float('nan')):.2f} "
               f"({hr.get('hr_low', float('nan')):.2f}-{hr.get('hr_high', float('nan')):.2f}); "
               f"C-index {report.c_index:.3f}; wrote {out_dir}", err=True)


@click.group()
def stability() -> None:
    """Feature stability: seed perturbation and test-retest ICC."""


@stability.command("perturb")
@click.option("--csv", "table", required=True, type=TABLE, help="Seeds table (coordX/Y/Z).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Per-feature stability table (.csv or .parquet).")
@click.option("--n", "n_perturbations", default=50, show_default=True, type=click.IntRange(min=2))
@click.option("--variance", default=16.0, show_default=True, type=click.FloatRange(min=0),
              help="Variance per axis, in patch voxels^2.")
@click.option("--features-out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also keep the perturbed seeds' features here.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--probe", "probe_path", default=None, type=TABLE,
              help="Also report the spread of this probe's predictions over each lesion's perturbed seeds.")
@click.option("--spread-out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Where the prediction spread goes [default: <out stem>.prediction_spread.csv].")
@extraction_options
@click.pass_context
def stability_perturb(ctx: click.Context, table: Path, out: Path, n_perturbations: int, variance: float,
                      features_out: Path | None, seed: int, probe_path: Path | None, spread_out: Path | None,
                      model: str, weights: Path | None, device: str, batch_size: int, num_workers: int | None,
                      coords: str, precision: str, no_progress: bool) -> None:
    """Extract features at perturbed seeds and report per-feature ICC(1,1) and CV.

    \b
    Example:
      fmcib stability perturb --csv seeds.csv --out stab.csv --n 50 --variance 16 --probe probe.json
    With --probe, each lesion's predicted probability (mean, std, min, max over its
    perturbed seeds) goes to <out stem>.prediction_spread.csv.
    """
    from ..extract import extract_features
    from ..files import check_outputs, check_table_output, write_table
    from ..probes import load_probe
    from ..stability import perturb_seeds, perturbation_stability, prediction_spread

    spread_out = spread_out or (out.with_name(f"{out.stem}.prediction_spread.csv") if probe_path else None)
    errors_out = out.with_name(f"{out.stem}.errors.csv")
    for path in (out, features_out, spread_out):
        if path is not None:
            check_table_output(path)
    check_outputs({"--csv": table, "--probe": probe_path},
                  {"--out": out, "--features-out": features_out, "--spread-out": spread_out,
                   "errors file": errors_out})
    extractor = extractor_from_options(model, weights, device, batch_size, num_workers, precision, no_progress)
    seeds = read_input(table)
    if coords == "voxel":
        raise click.BadParameter("perturbation works on physical coordinates (lps/ras)", param_hint="--coords")
    perturbed = perturb_seeds(seeds, n=n_perturbations, variance=variance,
                              spacing_mm=extractor.preprocess_config.spacing_xyz, random_state=seed)
    probe_model = load_probe(probe_path) if probe_path else None  # a bad probe file fails before extraction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # failed rows go to the errors file below
        feats, failed = extract_features(perturbed, model=extractor, coords=coords, base_dir=table.parent,
                                         return_errors=True)
    result = perturbation_stability(feats)
    write_table(result, out)
    if features_out:
        write_table(feats, features_out)
    if probe_model is not None:
        spread = prediction_spread(probe_model, feats)
        write_table(spread, spread_out)
    if len(failed):
        write_table(failed, errors_out)
    elif errors_out.exists():
        errors_out.unlink()
    click.echo(f"{(result.icc >= 0.75).sum()} of {len(result)} features have ICC >= 0.75; wrote {out}", err=True)
    if probe_model is not None:
        click.echo(f"prediction spread over {len(spread)} lesion(s): median std {spread['std'].median():.3g}; "
                   f"wrote {spread_out}", err=True)
    if len(failed):
        click.echo(f"{len(failed)} perturbed seed(s) failed; reasons in {errors_out}", err=True)
        ctx.exit(EXIT_ROWS_FAILED)


@stability.command("select")
@click.option("--features", required=True, type=TABLE, help="Table from `fmcib extract` (pred_* columns).")
@click.option("--stability", "stability_path", required=True, type=TABLE,
              help="Per-feature table from `fmcib stability perturb` or `fmcib stability icc`.")
@click.option("--min", "threshold", default=0.75, show_default=True, type=float, help="Keep features at or above this.")
@click.option("--column", default="icc", show_default=True,
              help="Stability column compared with --min (icc: perturbation ICC, or ICC(1,1) of `stability icc`).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def stability_select(ctx: click.Context, features: Path, stability_path: Path, threshold: float, column: str,
                     out: Path) -> None:
    """Keep only the stable features (and every non-feature column) of a features table.

    \b
    Example:
      fmcib stability select --features f.parquet --stability stab.csv --min 0.75 --out f_stable.parquet
    """
    from ..files import check_outputs, check_table_output, read_table_metadata, write_table
    from ..probes import feature_matrix
    from ..stability import stable_features

    check_table_output(out)
    check_outputs({"--features": features, "--stability": stability_path}, {"--out": out})
    table = read_input(features)
    keep = set(stable_features(read_input(stability_path), threshold=threshold, column=column))
    feature_cols = list(feature_matrix(table).columns)
    dropped = [c for c in feature_cols if c not in keep]
    write_table(table.drop(columns=dropped), out, metadata=read_table_metadata(features))
    click.echo(f"kept {len(feature_cols) - len(dropped)} of {len(feature_cols)} features ({column} >= {threshold}); "
               f"wrote {out}", err=True)


@stability.command("icc")
@click.option("--test", "test_path", required=True, type=TABLE)
@click.option("--retest", "retest_path", required=True, type=TABLE)
@click.option("--key", required=True, help="Column pairing test and retest rows (e.g. lesion id).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def stability_icc(ctx: click.Context, test_path: Path, retest_path: Path, key: str, out: Path) -> None:
    """Per-feature test-retest ICC(1,1)/(2,1)/(3,1) with 95% CIs, Spearman and R^2."""
    from ..files import check_outputs, check_table_output, write_table
    from ..stability import retest_agreement

    check_table_output(out)
    check_outputs({"--test": test_path, "--retest": retest_path}, {"--out": out})
    result = retest_agreement(read_input(test_path), read_input(retest_path), key)
    write_table(result, out)
    click.echo(f"{len(result)} features over {int(result.n_pairs.iloc[0])} pairs; median ICC(1,1) "
               f"{result['ICC(1,1)'].median():.3f}; wrote {out}", err=True)


@click.command()
@click.option("--features", required=True, type=TABLE, help="Table from `fmcib extract` (pred_* columns).")
@click.option("--label", required=True, help="Column the points are coloured by.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG, PDF or SVG.")
@click.option("--perplexity", default=30.0, show_default=True, type=click.FloatRange(min=1.0))
@click.option("--no-contours", is_flag=True, help="Leave out the per-class density contours.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
def tsne(ctx: click.Context, features: Path, label: str, out: Path, perplexity: float, no_contours: bool,
         seed: int) -> None:
    """t-SNE map of the features coloured by a label column, with per-class density contours."""
    from ..files import check_outputs
    from ..plots import new_figure, plot_tsne, save_figure

    check_outputs({"--features": features}, {"--out": out})
    table = read_input(features)
    if label not in table.columns:
        raise ValueError(f"'{features}': no column {label!r} (columns: {list(table.columns)[:20]})")
    ax = plot_tsne(table, table[label].to_numpy(), ax=new_figure(figsize=(5.5, 5)).subplots(), perplexity=perplexity,
                   contours=not no_contours,
                   random_state=seed)
    ax.set_title(f"{features.name}: {label}", fontsize=9)
    save_figure(ax.figure, out, dpi=120, bbox_inches="tight")
    click.echo(f"wrote {out}", err=True)


@click.command()
@click.option("--csv", "table", required=True, type=TABLE, help="Seeds table.")
@click.option("--probe", "probe_path", default=None, type=TABLE, help="Probe file from `fmcib probe fit`.")
@click.option("--head", "head_path", default=None, type=click.Path(exists=True, path_type=Path),
              help="Instead of --probe: the head of a fine-tuned checkpoint (legacy file, head.safetensors or a "
                   "converted folder); pass the same checkpoint as --weights.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--target-class", default=None,
              help="Class whose score is explained: a probe class, or an output index of a head "
                   "[default: each patch's predicted class].")
@click.option("--n-samples", default=25, show_default=True, type=click.IntRange(min=1), help="Noisy copies averaged.")
@click.option("--noise", default=0.15, show_default=True, type=click.FloatRange(min=0),
              help="Noise SD as a share of the patch's value range.")
@click.option("--name-col", default=None, help="Column naming the output files (e.g. a lesion id).")
@click.option("--seed", default=0, show_default=True, type=int)
@extraction_options
@click.pass_context
def saliency(ctx: click.Context, table: Path, probe_path: Path | None, head_path: Path | None, out_dir: Path,
             target_class: str | None,
             n_samples: int, noise: float, name_col: str | None, seed: int, model: str, weights: Path | None,
             device: str, batch_size: int, num_workers: int | None, coords: str, precision: str,
             no_progress: bool) -> None:
    """Smooth guided backpropagation maps of a probe's score for every seed.

    \b
    Examples:
      fmcib saliency --csv seeds.csv --probe probe.json --out-dir saliency/
      fmcib saliency --csv seeds.csv --weights task1.torch --head task1.torch --out-dir saliency/
    Per row: <stem>_patch.nii.gz (HU), <stem>_saliency.nii.gz (same grid, placed in the
    scan's physical space) and <stem>_saliency.png; saliency.csv lists them. Rows that
    fail are listed there with their reason and the exit status is 3.
    """
    from ..files import check_outputs, write_table
    from ..models import load_head
    from ..probes import load_probe
    from ..saliency import saliency_maps

    if (probe_path is None) == (head_path is None):
        raise click.UsageError("give exactly one of --probe and --head")
    check_outputs({"--csv": table, "--probe": probe_path, "--head": head_path},
                  {"--out-dir saliency.csv": out_dir / "saliency.csv"})
    explained: Any
    target: Any = target_class
    if probe_path is not None:
        explained = load_probe(probe_path)
        if target_class is not None:  # a command-line class name is text; match the probe's class type
            target = next((c for c in explained.classes_.tolist() if str(c) == target_class), target_class)
    else:
        explained = load_head(head_path)
        if target_class is not None:
            if not target_class.isdigit():
                raise click.BadParameter("a head's outputs are numbered: give an index", param_hint="--target-class")
            target = int(target_class)
    extractor = extractor_from_options(model, weights, device, batch_size, num_workers, precision, no_progress)
    result = saliency_maps(table, explained, out_dir, model=extractor, coords=coords, target_class=target,
                           n_samples=n_samples, noise=noise, random_state=seed, name_column=name_col)
    write_table(result, out_dir / "saliency.csv")
    failed = int((result.error != "").sum())
    click.echo(f"wrote {len(result) - failed} saliency map(s) to {out_dir}", err=True)
    if failed:
        click.echo(f"{failed} row(s) failed; reasons in {out_dir / 'saliency.csv'}", err=True)
        ctx.exit(EXIT_ROWS_FAILED)
