"""``fmcib extract``: features for every seed of a table (one process, or shards under torchrun)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import EXIT_ROWS_FAILED, extraction_options, extractor_from_options, stop_on_sigterm


@click.command()
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
    Several processes share the scans: torchrun --nproc-per-node 4 -m fmcib extract ...
    """
    from ..distributed import is_main_process
    from ..runs import partial_dir, run_extraction, saved_rows

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    stop_on_sigterm()
    try:
        extractor = extractor_from_options(model, weights, device, batch_size, num_workers, precision, no_progress)
        summary = run_extraction(table, out, extractor, coords=coords, resume=resume, overwrite=overwrite, cli=True)
    except KeyboardInterrupt:
        if not is_main_process():
            ctx.exit(130)
        saved = saved_rows(out)
        where = f" in '{partial_dir(out)}'" if saved else ""
        click.echo(f"interrupted: {saved} row(s) saved{where}; run the same command with --resume to continue",
                   err=True)
        ctx.exit(130)
    if not is_main_process():  # under torchrun rank 0 reports for all, and its exit status tells the launcher
        return
    reused = f" ({summary.n_reused} reused)" if summary.n_reused else ""
    click.echo(f"wrote {summary.n_written} of {summary.n_rows} rows{reused} to {summary.output}", err=True)
    if summary.n_failed:
        click.echo(f"{summary.n_failed} row(s) failed; reasons in {summary.errors_file}", err=True)
        ctx.exit(EXIT_ROWS_FAILED)
