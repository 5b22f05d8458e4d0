"""The ``fmcib`` command line: extract, models, seeds, weights, probe, survival, stability, qc, tsne, saliency."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .exceptions import FmcibError

# Exit codes: 0 success, 1 error (nothing or not everything could be done), 2 usage error (click),
# 3 finished but some rows failed (good rows written; reasons in the errors file).
EXIT_ROWS_FAILED = 3


def _fail(exc: Exception, debug: bool) -> None:
    """One line for the user (the command-line wording of fmcib's errors), the traceback only with --debug."""
    if debug:
        raise exc
    message = getattr(exc, "cli", None) or str(exc)
    if isinstance(exc, OSError) and not str(exc).startswith("'"):  # full disk, read-only folder, ...
        message = f"{exc.strerror or type(exc).__name__}: {exc.filename or ''}".rstrip(": ")
    raise click.ClickException(message) from exc


class PerAxis(click.ParamType):
    """One positive number, or three separated by commas (x, y, z)."""

    name = "N|X,Y,Z"

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            parts = [self.kind(v) for v in value.split(",")]
        except ValueError:
            self.fail(f"{value!r} is not one number or three separated by commas", param, ctx)
        if len(parts) not in (1, 3) or not all(p > 0 for p in parts):
            self.fail(f"{value!r}: give one positive number or three (x,y,z)", param, ctx)
        return parts[0] if len(parts) == 1 else tuple(parts)


def extraction_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The encoder and loader options shared by every command that extracts features."""
    options = [
        click.option("--model", default="resnet50_3d.fmcib", show_default=True,
                     help="Registry name or hf-hub:org/repo[@rev]."),
        click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
                     help="Local weights file or folder (skips the Hub)."),
        click.option("--device", default="auto", show_default=True, callback=_check_device,
                     help="auto, cpu, cuda, cuda:1, mps."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1)),
        click.option("--num-workers", default=None, type=click.IntRange(min=0),
                     help="Loader processes [default: one per core on CPU (max 4), all but one with a GPU (max 8)]."),
        click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]),
                     help="Coordinate system of coordX/Y/Z."),
        click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"])),
        click.option("--patch-size", default=None, type=PerAxis(int),
                     help="Override the model's patch size in voxels: N or X,Y,Z (e.g. 64 for lesions over 50 mm).",
                     callback=_collect_contract, expose_value=False),
        click.option("--spacing", default=None, type=PerAxis(float),
                     help="Override the model's patch spacing in mm: S or X,Y,Z.", callback=_collect_contract,
                     expose_value=False),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a device this machine's PyTorch cannot use while the options are parsed, before any work."""
    import re

    name = str(value).lower()
    if name in ("auto", "cpu"):
        return name
    if not re.fullmatch(r"cuda(:\d+)?|mps", name):
        raise click.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:<index> or mps")
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use "
                                     "--device cpu, or install a CUDA build of PyTorch")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise click.BadParameter(f"{value!r}: Apple MPS is not available here; use --device cpu")
    return name


def _stop_on_sigterm() -> None:
    """Make SIGTERM (what workflow managers send) end a run as Ctrl-C does: cleanly, progress kept."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _collect_contract(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Keep --patch-size/--spacing in the context, so commands need not list them."""
    ctx.ensure_object(dict).setdefault("contract", {})[param.name] = value


def _extractor(model: str, weights: Path | None, device: str, batch_size: int, num_workers: int | None,
               precision: str, no_progress: bool) -> Any:
    from .extract import FeatureExtractor

    contract = (click.get_current_context().obj or {}).get("contract", {})
    return FeatureExtractor(model=model, weights=weights, device=None if device == "auto" else device,
                            batch_size=batch_size, num_workers=num_workers, precision=precision,
                            progress=not no_progress, patch_size=contract.get("patch_size"),
                            spacing_mm=contract.get("spacing"))


class _Commands(click.Group):
    """The command group: fmcib's errors (and full disks, unreadable files, bad values) end any command with
    one line, in command-line wording; ``--debug`` shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (FmcibError, ValueError, OSError) as exc:
            _fail(exc, bool((ctx.obj or {}).get("debug")))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="fmcib")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of short error messages.")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Foundation-model features for CT lesions (seed points -> 4096 features)."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"debug": debug}


@main.command()
@click.option("--csv", "table", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Seeds table (CSV or Parquet): image_path, coordX, coordY, coordZ (or Image, Mask[, Label]).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output table: .parquet or .csv.")
@extraction_options
@click.option("--resume", is_flag=True, help="Skip rows already in --out (or saved by an interrupted run).")
@click.option("--overwrite", is_flag=True, help="Discard the saved progress of an interrupted run on --out.")
@click.pass_context
def extract(ctx: click.Context, table: Path, out: Path, model: str, weights: Path | None, device: str,
            batch_size: int, num_workers: int | None, coords: str, precision: str, resume: bool, overwrite: bool,
            no_progress: bool) -> None:
    """Extract features for every seed in a table.

    \b
    Example:
      fmcib extract --csv seeds.csv --out features.parquet
    Rows that fail (missing file, seed outside the scan, ...) are listed with their
    reason in <out stem>.errors.csv; the good rows are written and the exit status is 3.
    """
    from .runs import partial_dir, run_extraction, saved_rows

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    _stop_on_sigterm()
    try:
        extractor = _extractor(model, weights, device, batch_size, num_workers, precision, no_progress)
        summary = run_extraction(table, out, extractor, coords=coords, resume=resume, overwrite=overwrite, cli=True)
    except KeyboardInterrupt:
        saved = saved_rows(out)
        where = f" in '{partial_dir(out)}'" if saved else ""
        click.echo(f"interrupted: {saved} row(s) saved{where}; run the same command with --resume to continue",
                   err=True)
        ctx.exit(130)
    reused = f" ({summary.n_reused} reused)" if summary.n_reused else ""
    click.echo(f"wrote {summary.n_written} of {summary.n_rows} rows{reused} to {summary.output}", err=True)
    if summary.n_failed:
        click.echo(f"{summary.n_failed} row(s) failed; reasons in {summary.errors_file}", err=True)
        ctx.exit(EXIT_ROWS_FAILED)


@main.command("models")
@click.argument("pattern", default="*")
def models_cmd(pattern: str) -> None:
    """List the registered encoders (name, features, weights location)."""
    from .models import get_model_config, list_models

    for name in list_models(pattern):
        cfg = get_model_config(name)
        src = cfg.weights
        where = "random init" if src is None else f"hf-hub:{src.hf_hub_id}/{src.hf_filename}" + (
            f" (+{len(src.urls)} mirror)" if src.urls else "")
        p = cfg.preprocess
        click.echo(f"{name}\t{cfg.num_features} features\t{p.describe()}\t{where}\t"
                   f"{cfg.description}")


@main.command()
@click.option("--mask", type=click.Path(exists=True, path_type=Path), help="One label image.")
@click.option("--image", type=click.Path(path_type=Path), help="CT the mask belongs to (written to the image_path column).")
@click.option("--csv", "table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Table with Image, Mask[, Label] columns: one or more seeds per row.")
@click.option("--label", default=None, type=int, help="Label value [default: 1, or the table's Label].")
@click.option("--all-labels", is_flag=True, help="One seed per non-zero label.")
@click.option("--components", is_flag=True, help="One seed per connected component (several lesions per label).")
@click.option("--rtstruct", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A DICOM RTSTRUCT: one seed per ROI (its CT series: --image, or found beside it).")
@click.option("--roi", "rois", multiple=True, help="With --rtstruct: only these ROIs (repeatable).")
@click.option("--seg", "seg", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A DICOM SEG: one seed per segment (its CT series: --image, or found beside it).")
@click.option("--segment", "segments", multiple=True, help="With --seg: only these segments, by label or number.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Seeds table (.csv/.parquet).")
@click.pass_context
def seeds(ctx: click.Context, mask: Path | None, image: Path | None, table: Path | None, label: int | None,
          all_labels: bool, components: bool, rtstruct: Path | None, rois: tuple[str, ...], seg: Path | None,
          segments: tuple[str, ...], out: Path) -> None:
    """Write a seeds table (LPS mm centres of mass) from label masks, RTSTRUCT contours or DICOM SEG segments.

    \b
    Examples:
      fmcib seeds --mask lesion.nii.gz --image ct.nii.gz --components --out seeds.csv
      fmcib seeds --csv radiomics_table.csv --out seeds.csv
      fmcib seeds --rtstruct RS.dcm --image CT_SERIES_DIR --roi GTV --out seeds.csv
      fmcib seeds --seg SEG.dcm --segment 1 --out seeds.csv
    """
    import pandas as pd

    from .files import read_table, write_table
    from .seeds import seeds_from_mask
    from .tables import resolve_path

    from .files import check_outputs, check_table_output

    if sum(x is not None for x in (mask, table, rtstruct, seg)) != 1:
        raise click.UsageError("give one of --mask (with optional --image), --csv, --rtstruct or --seg")
    from .dicom import dicom_modality

    modality = dicom_modality(mask) if mask is not None else None
    if modality == "RTSTRUCT":  # an RTSTRUCT or SEG given as --mask: read as such, not as an image
        mask, rtstruct = None, mask
    elif modality == "SEG":
        mask, seg = None, mask
    frames, failed = [], []
    check_table_output(out)
    check_outputs({"--mask": mask, "--image": image, "--csv": table, "--rtstruct": rtstruct, "--seg": seg},
                  {"--out": out})
    if rtstruct is not None or seg is not None:
        from .dicom import seeds_from_rtstruct, seeds_from_seg

        result = (seeds_from_rtstruct(rtstruct, image=image, rois=list(rois) or None, components=components)
                  if rtstruct is not None else
                  seeds_from_seg(seg, image=image, segments=list(segments) or None, components=components))
        write_table(result, out)
        click.echo(f"wrote {len(result)} seed(s) to {out}", err=True)
        return
    if mask is not None:
        jobs = [(0, mask, image, label if label is not None else 1, {})]
    else:
        df = read_table(table)
        missing = [c for c in ("Image", "Mask") if c not in df.columns]
        if missing:
            raise click.UsageError(f"'{table}': missing column(s) {missing}")
        jobs = []
        for i, rec in df.iterrows():
            lab = label if label is not None else (int(rec["Label"]) if "Label" in df.columns
                                                   and not pd.isna(rec["Label"]) else 1)
            own = {c: rec[c] for c in df.columns if c not in ("Image", "Mask", "Label")}  # ids carried
            jobs.append((i, resolve_path(rec["Mask"], table.parent), resolve_path(rec["Image"], table.parent), lab,
                         own))
    for i, m, img, lab, own in jobs:
        try:
            found = seeds_from_mask(m, image=img, label=None if all_labels else lab, components=components)
            for k, (col, value) in enumerate(c for c in own.items() if c[0] not in found.columns):
                found.insert(k, col, value)
            frames.append(found)
        except FmcibError as exc:
            failed.append(f"row {i}: '{m}': {exc}")
    if not frames:  # nothing to write: say why instead of leaving an empty table behind
        raise FmcibError("no seeds: " + "; ".join(failed))
    result = pd.concat(frames, ignore_index=True)
    write_table(result, out)
    click.echo(f"wrote {len(result)} seed(s) to {out}", err=True)
    if failed:
        click.echo("\n".join(failed), err=True)
        ctx.exit(EXIT_ROWS_FAILED)


@main.group()
def weights() -> None:
    """Manage model weights."""


@weights.command("convert")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", default="resnet50_3d.fmcib", show_default=True, help="Architecture the weights belong to.")
@click.pass_context
def weights_convert(ctx: click.Context, checkpoint: Path, out_dir: Path, model: str) -> None:
    """Convert an original .torch / Lightning checkpoint to config.json + model.safetensors.

    \b
    Example:
      fmcib weights convert model_weights.torch fmcib-resnet50/
    """
    from .models import convert_weights

    path = convert_weights(checkpoint, out_dir, name=model)
    click.echo(f"wrote {path}", err=True)


@weights.command("download")
@click.option("--model", default="resnet50_3d.fmcib", show_default=True)
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.pass_context
def weights_download(ctx: click.Context, model: str, revision: str | None) -> None:
    """Fetch a model's weights into the cache (run where there is network, then work offline)."""
    from .models import get_model_config
    from .models.hub import resolve_registry_weights

    path, source = resolve_registry_weights(get_model_config(model), revision)
    click.echo(str(path))


# ----------------------------------------------------------------------------------------------- downstream
_TABLE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _read(path: Path) -> Any:
    from .files import read_table

    return read_table(path)


@main.group()
def probe() -> None:
    """Linear probes (Optuna-tuned logistic regression) on extracted features."""


@probe.command("fit")
@click.option("--features", required=True, type=_TABLE, help="Table from `fmcib extract` (pred_* columns).")
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
    from .files import check_outputs, read_table_metadata
    from .probes import LogisticProbe, encoder_of, feature_matrix

    check_outputs({"--features": features}, {"--out": out})
    if tune_col and split_col:
        raise click.UsageError("give --tune-col or --split-col, not both")
    table = _read(features)
    for col in [label] + [c for c in (tune_col, split_col) if c]:
        if col not in table.columns:
            raise click.BadParameter(f"column {col!r} not in {features}", param_hint="--label/--tune-col/--split-col")
    table = table[table[label].notna()]
    if split_col:  # the test rows play no part in fitting or tuning
        split = table[split_col].astype(str).str.lower()
        table = table[split.isin(["train", "tune"])].assign(**{"fmcib_is_tune": split == "tune"})
        tune_col = "fmcib_is_tune"
    X, y = feature_matrix(table), table[label].to_numpy()
    model = LogisticProbe(n_trials=n_trials, penalties=penalties, scoring=scoring, cv=cv, random_state=seed)
    if tune_col:
        tune = table[tune_col].fillna(False).astype(bool).to_numpy()
        model.fit(X[~tune], y[~tune], X_tune=X[tune], y_tune=y[tune])
    else:
        model.fit(X, y)
    model.encoder_ = encoder_of(read_table_metadata(features))
    model.save(out)
    click.echo(f"probe: C={model.best_params_['C']:.3g} ({model.best_params_['penalty']}), tuning "
               f"{model._objective_metric()}={model.best_score_:.3f}, {model.n_dropped_} rows dropped; wrote {out}",
               err=True)


@probe.command("predict")
@click.option("--model", "model_path", required=True, type=_TABLE, help="Probe file from `fmcib probe fit`.")
@click.option("--features", required=True, type=_TABLE)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".csv or .parquet")
@click.pass_context
def probe_predict(ctx: click.Context, model_path: Path, features: Path, out: Path) -> None:
    """Write every row's class probabilities (prob_<class>) and prediction, with the non-feature columns."""
    from .files import check_outputs, check_table_output, read_table_metadata, write_table
    from .probes import encoder_of, load_probe, prediction_table

    check_table_output(out)
    check_outputs({"--features": features, "--model": model_path}, {"--out": out})
    model = load_probe(model_path)
    table = _read(features)
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


@main.command()
@click.option("--predictions", required=True, type=_TABLE, help="Table with time, event and score columns.")
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
    from .survival import survival_report

    from .files import check_outputs

    check_outputs({"--predictions": predictions},
                  {f"--out-dir {name}": out_dir / name for name in ("km.png", "km.svg", "survival.json", "cox.csv")})
    report = survival_report(_read(predictions), time_col, event_col, score_col, tune_col=tune_col,
                             split_col=split_col, horizon=horizon, out_dir=out_dir)
    if not (tune_col or split_col):
        click.echo(f"note: risk-group threshold chosen on {report.threshold_source}", err=True)
    hr = report.cox_groups
    click.echo(f"log-rank p={report.logrank['p_value']:.3g}; HR high vs low {hr.get('hr', float('nan')):.2f} "
               f"({hr.get('hr_low', float('nan')):.2f}-{hr.get('hr_high', float('nan')):.2f}); "
               f"C-index {report.c_index:.3f}; wrote {out_dir}", err=True)


@main.group()
def stability() -> None:
    """Feature stability: seed perturbation and test-retest ICC."""


@stability.command("perturb")
@click.option("--csv", "table", required=True, type=_TABLE, help="Seeds table (coordX/Y/Z).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Per-feature stability table (.csv or .parquet).")
@click.option("--n", "n_perturbations", default=50, show_default=True, type=click.IntRange(min=2))
@click.option("--variance", default=16.0, show_default=True, type=click.FloatRange(min=0),
              help="Variance per axis, in patch voxels^2.")
@click.option("--features-out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also keep the perturbed seeds' features here.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--probe", "probe_path", default=None, type=_TABLE,
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
    from .extract import extract_features
    from .files import write_table
    from .probes import load_probe
    from .stability import perturb_seeds, perturbation_stability, prediction_spread

    from .files import check_outputs, check_table_output

    spread_out = spread_out or (out.with_name(f"{out.stem}.prediction_spread.csv") if probe_path else None)
    errors_out = out.with_name(f"{out.stem}.errors.csv")
    for path in (out, features_out, spread_out):
        if path is not None:
            check_table_output(path)
    check_outputs({"--csv": table, "--probe": probe_path},
                  {"--out": out, "--features-out": features_out, "--spread-out": spread_out,
                   "errors file": errors_out})
    extractor = _extractor(model, weights, device, batch_size, num_workers, precision, no_progress)
    seeds = _read(table)
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
@click.option("--features", required=True, type=_TABLE, help="Table from `fmcib extract` (pred_* columns).")
@click.option("--stability", "stability_path", required=True, type=_TABLE,
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
    from .files import read_table_metadata, write_table
    from .probes import feature_matrix
    from .stability import stable_features

    from .files import check_outputs, check_table_output

    check_table_output(out)
    check_outputs({"--features": features, "--stability": stability_path}, {"--out": out})
    table = _read(features)
    keep = set(stable_features(_read(stability_path), threshold=threshold, column=column))
    feature_cols = list(feature_matrix(table).columns)
    dropped = [c for c in feature_cols if c not in keep]
    write_table(table.drop(columns=dropped), out, metadata=read_table_metadata(features))
    click.echo(f"kept {len(feature_cols) - len(dropped)} of {len(feature_cols)} features ({column} >= {threshold}); "
               f"wrote {out}", err=True)


@stability.command("icc")
@click.option("--test", "test_path", required=True, type=_TABLE)
@click.option("--retest", "retest_path", required=True, type=_TABLE)
@click.option("--key", required=True, help="Column pairing test and retest rows (e.g. lesion id).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def stability_icc(ctx: click.Context, test_path: Path, retest_path: Path, key: str, out: Path) -> None:
    """Per-feature test-retest ICC(1,1)/(2,1)/(3,1) with 95% CIs, Spearman and R^2."""
    from .files import write_table
    from .stability import retest_agreement

    from .files import check_outputs, check_table_output

    check_table_output(out)
    check_outputs({"--test": test_path, "--retest": retest_path}, {"--out": out})
    result = retest_agreement(_read(test_path), _read(retest_path), key)
    write_table(result, out)
    click.echo(f"{len(result)} features over {int(result.n_pairs.iloc[0])} pairs; median ICC(1,1) "
               f"{result['ICC(1,1)'].median():.3f}; wrote {out}", err=True)


@main.command()
@click.option("--csv", "table", required=True, type=_TABLE, help="Seeds table.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG (pages: _page<i>).")
@click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]))
@click.option("--rows-per-page", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--model", default="resnet50_3d.fmcib", show_default=True, help="Whose patch contract to show.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="A weights folder whose config.json gives the contract.")
@click.pass_context
def qc(ctx: click.Context, table: Path, out: Path, coords: str, rows_per_page: int, model: str,
       weights: Path | None) -> None:
    """Montage of each seed's patch (axial, coronal, sagittal) to check that seeds land on lesions."""
    from .plots import qc_montage

    from .files import check_outputs

    check_outputs({"--csv": table}, {"--out": out})
    from .models import model_contract

    pages = qc_montage(table, out, coords=coords, rows_per_page=rows_per_page, model=model_contract(model, weights))
    click.echo(f"wrote {len(pages)} page(s): {', '.join(map(str, pages))}", err=True)


@main.command()
@click.option("--features", required=True, type=_TABLE, help="Table from `fmcib extract` (pred_* columns).")
@click.option("--label", required=True, help="Column the points are coloured by.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG, PDF or SVG.")
@click.option("--perplexity", default=30.0, show_default=True, type=click.FloatRange(min=1.0))
@click.option("--no-contours", is_flag=True, help="Leave out the per-class density contours.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
def tsne(ctx: click.Context, features: Path, label: str, out: Path, perplexity: float, no_contours: bool,
         seed: int) -> None:
    """t-SNE map of the features coloured by a label column, with per-class density contours."""
    from .plots import new_figure, plot_tsne, save_figure

    from .files import check_outputs

    check_outputs({"--features": features}, {"--out": out})
    table = _read(features)
    if label not in table.columns:
        raise ValueError(f"'{features}': no column {label!r} (columns: {list(table.columns)[:20]})")
    ax = plot_tsne(table, table[label].to_numpy(), ax=new_figure(figsize=(5.5, 5)).subplots(), perplexity=perplexity,
                   contours=not no_contours,
                   random_state=seed)
    ax.set_title(f"{features.name}: {label}", fontsize=9)
    save_figure(ax.figure, out, dpi=120, bbox_inches="tight")
    click.echo(f"wrote {out}", err=True)


@main.command()
@click.option("--csv", "table", required=True, type=_TABLE, help="Seeds table.")
@click.option("--probe", "probe_path", default=None, type=_TABLE, help="Probe file from `fmcib probe fit`.")
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
    from .files import write_table
    from .models import load_head
    from .probes import load_probe
    from .saliency import saliency_maps

    from .files import check_outputs

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
    extractor = _extractor(model, weights, device, batch_size, num_workers, precision, no_progress)
    result = saliency_maps(table, explained, out_dir, model=extractor, coords=coords, target_class=target,
                           n_samples=n_samples, noise=noise, random_state=seed, name_column=name_col)
    write_table(result, out_dir / "saliency.csv")
    failed = int((result.error != "").sum())
    click.echo(f"wrote {len(result) - failed} saliency map(s) to {out_dir}", err=True)
    if failed:
        click.echo(f"{failed} row(s) failed; reasons in {out_dir / 'saliency.csv'}", err=True)
        ctx.exit(EXIT_ROWS_FAILED)


if __name__ == "__main__":  # pragma: no cover
    main()


@main.command()
@click.option("--csv", "table", required=True, type=_TABLE, help="Seeds table with a label column.")
@click.option("--label", required=True, help="Column with the classes (rows without one are left out).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the fine-tuned model (config.json, model.safetensors, head.safetensors, metrics.csv).")
@click.option("--tune-col", default=None, help="True/false column marking tuning rows [default: a stratified 20 %].")
@click.option("--model", default="resnet50_3d.fmcib", show_default=True, help="Starting encoder (registry name).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start from local weights (e.g. an earlier fine-tuned folder).")
@click.option("--random-init", is_flag=True, help="Start from random weights (the supervised baseline).")
@click.option("--head", default="linear", show_default=True, type=click.Choice(["linear", "mlp"]))
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Per process.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adamw", "lars"]))
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--warmup-epochs", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--accumulate", default=1, show_default=True, type=click.IntRange(min=1), help="Micro-batches per step.")
@click.option("--clip-grad-norm", default=None, type=click.FloatRange(min=0, min_open=True))
@click.option("--class-weights", is_flag=True, help="Weight the loss by inverse class frequency.")
@click.option("--tune-metric", default="auc", show_default=True,
              type=click.Choice(["auc", "balanced_accuracy", "average_precision"]))
@click.option("--patience", default=None, type=click.IntRange(min=1), help="Early stopping after N epochs.")
@click.option("--fraction", default=None, type=click.FloatRange(min=0, max=1, min_open=True),
              help="Train on a stratified fraction of the training rows (limited-data curves).")
@click.option("--translate", default=10, show_default=True, type=click.IntRange(min=0),
              help="Largest random shift per axis, in patch voxels.")
@click.option("--device", default="auto", show_default=True, callback=_check_device)
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]))
@click.option("--patch-size", default=None, type=PerAxis(int), help="Override the patch size: N or X,Y,Z voxels.")
@click.option("--spacing", default=None, type=PerAxis(float), help="Override the patch spacing: S or X,Y,Z mm.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its last checkpoint.")
@click.option("--no-progress", is_flag=True)
@click.pass_context
def finetune(ctx: click.Context, table: Path, label: str, out_dir: Path, tune_col: str | None, model: str,
             weights: Path | None, random_init: bool, head: str, epochs: int, batch_size: int, lr: float,
             optimizer: str, weight_decay: float, warmup_epochs: float, accumulate: int, clip_grad_norm: float | None,
             class_weights: bool, tune_metric: str, patience: int | None, fraction: float | None, translate: int,
             device: str, precision: str, num_workers: int, coords: str, patch_size: Any, spacing: Any, seed: int,
             resume: bool, no_progress: bool) -> None:
    """Fine-tune every layer of an encoder with a classification head.

    \b
    Example:
      fmcib finetune --csv train.csv --label malignant --tune-col is_tune --out-dir finetuned/
    Several processes (DDP): torchrun --nproc-per-node 2 -m fmcib finetune ...
    """
    from .training import Augmentation
    from .training import finetune as run_finetune

    if random_init and weights is not None:
        raise click.UsageError("--random-init and --weights exclude each other")
    result = run_finetune(
        table, label, out_dir, tune_col=tune_col, model=model, weights=weights, pretrained=not random_init, head=head,
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, accumulate=accumulate, clip_grad_norm=clip_grad_norm,
        class_weights=class_weights, tune_metric=tune_metric, patience=patience, fraction=fraction,
        augmentation=Augmentation(translate_voxels=translate), device=None if device == "auto" else device,
        precision=precision, num_workers=num_workers, seed=seed, resume=resume, coords=coords,
        patch_size=patch_size, spacing_mm=spacing, progress=not no_progress)
    from .training.distributed import init_distributed

    if init_distributed(None if device == "auto" else device).is_main:
        best = result.best_metrics.get(f"tune_{tune_metric}")
        shown = f"tuning {tune_metric} {best:.3f} at epoch {result.best_epoch}" if best is not None else \
            f"epoch {result.best_epoch} kept"
        click.echo(f"fine-tuned on {result.counts['train']} rows ({result.counts['tune']} tuning): {shown}; "
                   f"wrote {out_dir}", err=True)


@main.command()
@click.option("--csv", "table", required=True, type=_TABLE, help="Seeds table.")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder written by `fmcib finetune`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".csv or .parquet")
@click.option("--device", default="auto", show_default=True, callback=_check_device)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--num-workers", default=None, type=click.IntRange(min=0))
@click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]))
@click.option("--no-progress", is_flag=True)
@click.pass_context
def predict(ctx: click.Context, table: Path, model_dir: Path, out: Path, device: str, batch_size: int,
            num_workers: int | None, coords: str, no_progress: bool) -> None:
    """Class probabilities (prob_<class>) and prediction of a fine-tuned model, with the input columns.

    Rows that fail are listed in <out stem>.errors.csv and the exit status is 3.
    """
    from .files import check_outputs, check_table_output, write_table
    from .runs import errors_path
    from .training import predict as run_predict

    check_table_output(out)
    check_outputs({"--csv": table}, {"--out": out})
    preds, errors = run_predict(table, model_dir, device=None if device == "auto" else device, batch_size=batch_size,
                                num_workers=num_workers, coords=coords, progress=not no_progress,
                                return_errors=True)
    write_table(preds, out, metadata=preds.attrs.get("fmcib"))
    click.echo(f"wrote {len(preds)} prediction(s) to {out}", err=True)
    if len(errors):
        write_table(errors, errors_path(out))
        click.echo(f"{len(errors)} row(s) failed; reasons in {errors_path(out)}", err=True)
        ctx.exit(3)
