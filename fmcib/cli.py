"""The ``fmcib`` command line: extract, models, seeds, weights convert."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ._version import __version__

# Exit codes: 0 success, 1 error (nothing or not everything could be done), 2 usage error (click),
# 3 finished but some rows failed (good rows written; reasons in the errors file).
EXIT_ROWS_FAILED = 3


def _fail(exc: Exception, debug: bool) -> None:
    if debug:
        raise exc
    raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--model", default="resnet50_3d.fmcib", show_default=True, help="Registry name or hf-hub:org/repo[@rev].")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Local weights file or folder (skips the Hub).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--num-workers", default=None, type=click.IntRange(min=0), help="Loader processes [default: half the cores].")
@click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]),
              help="Coordinate system of coordX/Y/Z.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--resume", is_flag=True, help="Skip rows already in --out (or saved by an interrupted run).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def extract(ctx: click.Context, table: Path, out: Path, model: str, weights: Path | None, device: str,
            batch_size: int, num_workers: int | None, coords: str, precision: str, resume: bool,
            no_progress: bool) -> None:
    """Extract features for every seed in a table.

    \b
    Example:
      fmcib extract --csv seeds.csv --out features.parquet
    Rows that fail (missing file, seed outside the scan, ...) are listed with their
    reason in <out stem>.errors.csv; the good rows are written and the exit status is 3.
    """
    from .exceptions import FmcibError
    from .extract import FeatureExtractor
    from .runs import run_extraction

    try:
        extractor = FeatureExtractor(model=model, weights=weights, device=None if device == "auto" else device,
                                     batch_size=batch_size, num_workers=num_workers, precision=precision,
                                     progress=not no_progress)
        summary = run_extraction(table, out, extractor, coords=coords, resume=resume)
    except FmcibError as exc:
        _fail(exc, ctx.obj["debug"])
        return
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
        click.echo(f"{name}\t{cfg.num_features} features\t{p.patch_size}^3 @ {p.spacing_mm} mm\t{where}")


@main.command()
@click.option("--mask", type=click.Path(exists=True, path_type=Path), help="One label image.")
@click.option("--image", type=click.Path(path_type=Path), help="CT the mask belongs to (written to the image_path column).")
@click.option("--csv", "table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Table with Image, Mask[, Label] columns: one or more seeds per row.")
@click.option("--label", default=None, type=int, help="Label value [default: 1, or the table's Label].")
@click.option("--all-labels", is_flag=True, help="One seed per non-zero label.")
@click.option("--components", is_flag=True, help="One seed per connected component (several lesions per label).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Seeds table (.csv/.parquet).")
@click.pass_context
def seeds(ctx: click.Context, mask: Path | None, image: Path | None, table: Path | None, label: int | None,
          all_labels: bool, components: bool, out: Path) -> None:
    """Write a seeds table (LPS mm centres of mass) from label masks.

    \b
    Examples:
      fmcib seeds --mask lesion.nii.gz --image ct.nii.gz --components --out seeds.csv
      fmcib seeds --csv radiomics_table.csv --out seeds.csv
    """
    import pandas as pd

    from .exceptions import FmcibError
    from .io import read_table, write_table
    from .seeds import _resolve_path, seeds_from_mask

    if (mask is None) == (table is None):
        raise click.UsageError("give either --mask (with optional --image) or --csv")
    frames, failed = [], []
    try:
        if mask is not None:
            jobs = [(0, mask, image, label if label is not None else 1)]
        else:
            df = read_table(table)
            missing = [c for c in ("Image", "Mask") if c not in df.columns]
            if missing:
                raise click.UsageError(f"'{table}': missing column(s) {missing}")
            jobs = []
            for i, rec in df.iterrows():
                lab = label if label is not None else (int(rec["Label"]) if "Label" in df.columns
                                                       and not pd.isna(rec["Label"]) else 1)
                jobs.append((i, _resolve_path(rec["Mask"], table.parent), _resolve_path(rec["Image"], table.parent), lab))
        for i, m, img, lab in jobs:
            try:
                frames.append(seeds_from_mask(m, image=img, label=None if all_labels else lab,
                                              components=components))
            except FmcibError as exc:
                failed.append(f"row {i}: '{m}': {exc}")
        result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        write_table(result, out)
    except FmcibError as exc:
        _fail(exc, ctx.obj["debug"])
        return
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
    from .exceptions import FmcibError
    from .models import convert_weights

    try:
        path = convert_weights(checkpoint, out_dir, name=model)
    except FmcibError as exc:
        _fail(exc, ctx.obj["debug"])
        return
    click.echo(f"wrote {path}", err=True)


@weights.command("download")
@click.option("--model", default="resnet50_3d.fmcib", show_default=True)
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.pass_context
def weights_download(ctx: click.Context, model: str, revision: str | None) -> None:
    """Fetch a model's weights into the cache (run where there is network, then work offline)."""
    from .exceptions import FmcibError
    from .models import get_model_config
    from .models.hub import resolve_registry_weights

    try:
        path, source = resolve_registry_weights(get_model_config(model), revision)
    except FmcibError as exc:
        _fail(exc, ctx.obj["debug"])
        return
    click.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    main()
