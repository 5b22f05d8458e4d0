"""Commands on long tables (one row per patient and time point): ``fmcib pretrain jepa-multimodal|align|layered``,
``fmcib embed``, and the ``--table`` routes of ``fmcib finetune`` and ``fmcib predict``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .common import TABLE, check_device
from .training import pretrain

__all__ = [
    "embed",
    "finetune_table",
    "predict_table",
    "pretrain_align_cmd",
    "pretrain_layered_cmd",
    "pretrain_multimodal_cmd",
]


def _column_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def table_columns(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The long table and its columns (patient, time, clinical)."""
    options = [
        click.option("--table", required=True, type=TABLE,
                     help="Long table: one row per patient and time point, image features (pred_*) and clinical "
                          "columns."),
        click.option("--patient-col", default=None, help="Patient id column (needed unless --weights is given)."),
        click.option("--time-col", default=None, help="Months, or dates (needed unless --weights is given)."),
        click.option("--clinical-cols", default=None, callback=_column_list,
                     help="Clinical columns, separated by commas."),
        click.option("--clinical-prefix", default=None, help="Instead of --clinical-cols: every column with this "
                                                             "prefix."),
        click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Start from a longitudinal folder (its columns, normalisation and encoder)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Architecture (for a fresh encoder) and run options of the long-table training commands."""
    options = [
        click.option("--width", default=128, show_default=True, type=click.IntRange(min=8)),
        click.option("--depth", default=2, show_default=True, type=click.IntRange(min=1)),
        click.option("--heads", default=4, show_default=True, type=click.IntRange(min=1)),
        click.option("--time-attention", is_flag=True,
                     help="Attention that fades with the months between visits (TDViT) instead of plain attention."),
        click.option("--data-description", default=None,
                     help="What the patients are (cohort, sites, licence): for the model card."),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=2)),
        click.option("--device", default="auto", show_default=True, callback=check_device),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--no-progress", is_flag=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _columns(patient_col: str | None, time_col: str | None, clinical_cols: list[str] | None,
             clinical_prefix: str | None, weights: Path | None, **architecture: Any) -> dict[str, Any]:
    """``columns``, ``start`` and ``architecture`` of a training call from the command's options."""
    from ..training.longitudinal import Architecture, TableColumns

    if weights is None and (patient_col is None or time_col is None):
        raise click.UsageError("--patient-col and --time-col are needed unless --weights names a longitudinal folder")
    if weights is not None and (clinical_cols or clinical_prefix):
        raise click.UsageError("--weights: the folder's own clinical columns are used; leave out --clinical-cols and "
                               "--clinical-prefix")
    columns = TableColumns(patient_col, time_col, tuple(clinical_cols) if clinical_cols else None, clinical_prefix)
    return {"columns": columns, "start": weights, "architecture": Architecture(**architecture)}


def _echo_done(config: dict[str, Any], out_dir: Path) -> None:
    from ..distributed import is_main_process

    if is_main_process():
        train = config["training"]
        last = train["final_metrics"]
        shown = ", ".join(f"{k[5:]} {last[k]:.3g}" for k in ("tune_rankme", "tune_retrieval_top1") if k in last)
        click.echo(f"{train['method']} on {train['patients']} patients ({train['tokens']} tokens)"
                   f"{': ' + shown if shown else ''}; wrote {out_dir}", err=True)


@pretrain.command("jepa-multimodal")
@table_columns
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mask-ratio", default=0.15, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--sigreg-lambda", default=0.0, show_default=True, type=click.FloatRange(min=0, max=1))
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--warmup-epochs", default=5.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--resume", is_flag=True)
@run_options
def pretrain_multimodal_cmd(table: Path, patient_col: str | None, time_col: str | None,
                            clinical_cols: list[str] | None, clinical_prefix: str | None, weights: Path | None,
                            out_dir: Path, mask_ratio: float, sigreg_lambda: float, epochs: int, lr: float,
                            warmup_epochs: float, resume: bool, width: int, depth: int, heads: int,
                            time_attention: bool,
                            data_description: str | None, batch_size: int, device: str, seed: int,
                            no_progress: bool) -> None:
    """Multimodal longitudinal JEPA over image features and clinical vectors in time (Li et al.).

    \b
    Example:
      fmcib pretrain jepa-multimodal --table long.csv --patient-col patient --time-col month \\
        --clinical-prefix clin_ --out-dir longitudinal/
    """
    from ..training.longitudinal import pretrain_longitudinal

    config = pretrain_longitudinal(
        table, out_dir, **_columns(patient_col, time_col, clinical_cols, clinical_prefix, weights, width=width,
                                   depth=depth, heads=heads, time_attention=time_attention),
        mask_ratio=mask_ratio, sigreg_lambda=sigreg_lambda, epochs=epochs, batch_size=batch_size, lr=lr,
        warmup_epochs=warmup_epochs, data_description=data_description, device=None if device == "auto" else device,
        seed=seed, resume=resume, progress=not no_progress)
    _echo_done(config, out_dir)


@pretrain.command("align")
@table_columns
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--temperature", default=0.1, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--warmup-epochs", default=2.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--resume", is_flag=True)
@run_options
def pretrain_align_cmd(table: Path, patient_col: str | None, time_col: str | None, clinical_cols: list[str] | None,
                       clinical_prefix: str | None, weights: Path | None, out_dir: Path, temperature: float,
                       epochs: int, lr: float, warmup_epochs: float, resume: bool, width: int, depth: int, heads: int,
                       time_attention: bool,
                       data_description: str | None, batch_size: int, device: str, seed: int,
                       no_progress: bool) -> None:
    """CLIP-style alignment of each patient's image and clinical embeddings at the same time point.

    \b
    Example (after the JEPA stage):
      fmcib pretrain align --table long.csv --weights longitudinal/ --out-dir aligned/
    """
    from ..training.alignment import align_longitudinal

    config = align_longitudinal(
        table, out_dir, **_columns(patient_col, time_col, clinical_cols, clinical_prefix, weights, width=width,
                                   depth=depth, heads=heads, time_attention=time_attention),
        temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs,
        data_description=data_description, device=None if device == "auto" else device, seed=seed, resume=resume,
        progress=not no_progress)
    _echo_done(config, out_dir)


@pretrain.command("layered")
@table_columns
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="One folder per stage (1-jepa, 2-align, 3-finetune) and layered.json.")
@click.option("--stages", default="jepa,align,finetune", show_default=True, callback=_column_list,
              help="Stages to run, in this order.")
@click.option("--label", default=None, help="Per-patient class column (the finetune stage).")
@click.option("--tune-col", default=None, help="finetune: true/false column marking tuning patients.")
@click.option("--sigreg-lambda", default=0.0, show_default=True, type=click.FloatRange(min=0, max=1),
              help="jepa: SIGReg weight.")
@click.option("--mask-ratio", default=0.15, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--temperature", default=0.1, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="align: NT-Xent temperature.")
@click.option("--jepa-epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--align-epochs", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--finetune-epochs", default=50, show_default=True, type=click.IntRange(min=1))
@run_options
def pretrain_layered_cmd(table: Path, patient_col: str | None, time_col: str | None, clinical_cols: list[str] | None,
                         clinical_prefix: str | None, weights: Path | None, out_dir: Path, stages: list[str],
                         label: str | None, tune_col: str | None, sigreg_lambda: float, mask_ratio: float,
                         temperature: float, jepa_epochs: int, align_epochs: int, finetune_epochs: int, width: int,
                         depth: int, heads: int, time_attention: bool, data_description: str | None, batch_size: int,
                         device: str,
                         seed: int, no_progress: bool) -> None:
    """Layered training: masked prediction (JEPA), then alignment, then supervised fine-tuning.

    Run the same command again to continue: finished stages are kept, an interrupted one resumes.

    \b
    Example:
      fmcib pretrain layered --table long.csv --patient-col patient --time-col month --clinical-prefix clin_ \\
        --label progression --out-dir layered/
    """
    from ..distributed import is_main_process
    from ..training.layered import STAGES, train_layered

    if not stages or any(s not in STAGES for s in stages) or stages != sorted(set(stages), key=STAGES.index):
        raise click.BadParameter(f"choose from {', '.join(STAGES)}, in this order, got {','.join(stages or [])}",
                                 param_hint="--stages")
    columns = _columns(patient_col, time_col, clinical_cols, clinical_prefix, weights, width=width, depth=depth,
                       heads=heads, time_attention=time_attention)
    plan = train_layered(
        table, out_dir, stages=stages, label=label, **columns,
        jepa={"mask_ratio": mask_ratio, "sigreg_lambda": sigreg_lambda, "epochs": jepa_epochs,
              "batch_size": batch_size},
        align={"temperature": temperature, "epochs": align_epochs, "batch_size": batch_size},
        finetune={"epochs": finetune_epochs, "batch_size": batch_size, "tune_col": tune_col},
        data_description=data_description, device=None if device == "auto" else device, seed=seed,
        progress=not no_progress)
    if is_main_process():
        click.echo(f"stages {', '.join(e['folder'] for e in plan['stages'])} done; final model {plan['final']}",
                   err=True)


@click.command()
@click.option("--table", required=True, type=TABLE, help="Long table with the model's columns.")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A longitudinal folder (fmcib pretrain jepa-multimodal|align|layered, fmcib finetune --table).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".csv or .parquet")
@click.option("--per-time", is_flag=True, help="One row per patient and time point instead of per patient.")
def embed(table: Path, model_dir: Path, out: Path, per_time: bool) -> None:
    """Patient embeddings (emb_* columns) of a multimodal longitudinal model."""
    from ..files import check_outputs, check_table_output, write_table
    from ..training.longitudinal import embed_patients

    check_table_output(out)
    check_outputs({"--table": table}, {"--out": out})
    result = embed_patients(table, model_dir, per_time=per_time)
    write_table(result, out)
    click.echo(f"wrote {len(result)} embedding(s) to {out}", err=True)


def finetune_table(table: Path, label: str, out_dir: Path, weights: Path | None, random_init: bool,
                   patient_col: str | None, time_col: str | None, clinical_prefix: str | None,
                   options: dict[str, Any]) -> None:
    """``fmcib finetune --table``: fine-tune a longitudinal encoder on per-patient labels."""
    from ..training.patients import finetune_patients
    from .common import echo_finetuned

    if weights is None and not random_init:
        raise click.UsageError("--table: give --weights DIR (a longitudinal folder to start from) or --random-init "
                               "(a fresh encoder; with --weights: its architecture, random weights)")
    result = finetune_patients(table, label, out_dir, pretrained=not random_init,
                               **_columns(patient_col, time_col, None, clinical_prefix, weights), **options)
    echo_finetuned(result, options["tune_metric"], out_dir, "patients")


def predict_table(table: Path, model_dir: Path, out: Path) -> None:
    """``fmcib predict --table``: class probabilities per patient."""
    from ..files import check_outputs, check_table_output, write_table
    from ..training.patients import predict_patients

    check_table_output(out)
    check_outputs({"--table": table}, {"--out": out})
    preds = predict_patients(table, model_dir)
    write_table(preds, out)
    click.echo(f"wrote {len(preds)} patient prediction(s) to {out}", err=True)
