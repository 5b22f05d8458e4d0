"""``fmcib finetune`` (full fine-tuning, DDP under torchrun), ``fmcib predict`` (a fine-tuned model's classes) and
``fmcib pretrain simclr|jepa``; the long-table (patient) routes and commands are in :mod:`fmcib.cli.longitudinal`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import EXIT_ROWS_FAILED, TABLE, check_device, echo_finetuned, echo_pretrained, training_options

IMAGE_ONLY = ("model", "optimizer", "accumulate", "clip_grad_norm", "translate", "precision", "num_workers", "coords",
              "patch_size", "spacing", "crop_store")


@click.command()
@click.option("--csv", "table", default=None, type=TABLE, help="Seeds table with a label column.")
@click.option("--table", "long_table", default=None, type=TABLE,
              help="Instead of --csv: a long table (one row per patient and time point) with a per-patient label; "
                   "fine-tunes a longitudinal encoder (--weights DIR from fmcib pretrain jepa-multimodal|align).")
@click.option("--patient-col", default=None, help="--table: patient id column (taken from --weights if omitted).")
@click.option("--time-col", default=None, help="--table: time column (taken from --weights if omitted).")
@click.option("--clinical-prefix", default=None, help="--table with --random-init alone: clinical column prefix.")
@click.option("--label", required=True, help="Column with the classes (rows without one are left out).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the fine-tuned model (config.json, model.safetensors, head.safetensors, metrics.csv).")
@click.option("--tune-col", default=None, help="True/false column marking tuning rows [default: a stratified 20 %].")
@click.option("--model", default="resnet50_3d.fmcib", show_default=True, help="Starting encoder (registry name).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start from local weights (e.g. an earlier fine-tuned folder).")
@click.option("--random-init", is_flag=True, help="Start from random weights (the supervised baseline).")
@click.option("--head", default=None, type=click.Choice(["linear", "mlp"]),
              help="[default: linear for --csv, mlp for --table]")
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
@training_options
@click.pass_context
def finetune(ctx: click.Context, table: Path | None, long_table: Path | None, patient_col: str | None,
             time_col: str | None, clinical_prefix: str | None, label: str, out_dir: Path, tune_col: str | None,
             model: str, weights: Path | None, random_init: bool, head: str | None, epochs: int, batch_size: int,
             lr: float, optimizer: str, weight_decay: float, warmup_epochs: float, accumulate: int,
             clip_grad_norm: float | None,
             class_weights: bool, tune_metric: str, patience: int | None, fraction: float | None, translate: int,
             device: str, precision: str, num_workers: int, crop_store: Path | None, coords: str, patch_size: Any,
             spacing: Any, seed: int, resume: bool, no_progress: bool) -> None:
    """Fine-tune every layer of an encoder with a classification head.

    \b
    Example:
      fmcib finetune --csv train.csv --label malignant --tune-col is_tune --out-dir finetuned/
    Several processes (DDP): torchrun --nproc-per-node 2 -m fmcib finetune ...
    Patients over time (a longitudinal encoder, masked mean pooling and an MLP head):
      fmcib finetune --table long.csv --label progression --weights longitudinal/ --out-dir patients/
    """
    from ..training import Augmentation
    from ..training import finetune as run_finetune

    if (table is None) == (long_table is None):
        raise click.UsageError("give --csv (lesions) or --table (patients over time)")
    if long_table is not None:
        from click.core import ParameterSource

        from .longitudinal import finetune_table

        explicit = [f"--{n.replace('_', '-')}" for n in IMAGE_ONLY
                    if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
        if explicit:
            raise click.UsageError(f"{', '.join(explicit)}: not used with --table (patients are trained with AdamW "
                                   "on their token sequences)")
        finetune_table(long_table, label, out_dir, weights, random_init, patient_col, time_col, clinical_prefix, {
            "head": head or "mlp", "tune_col": tune_col, "fraction": fraction, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
            "class_weights": class_weights, "tune_metric": tune_metric, "patience": patience,
            "device": None if device == "auto" else device, "seed": seed, "resume": resume,
            "progress": not no_progress})
        return
    for name in ("patient_col", "time_col", "clinical_prefix"):
        if ctx.params[name] is not None:
            raise click.UsageError(f"--{name.replace('_', '-')} goes with --table")
    head = head or "linear"
    if random_init and weights is not None:
        raise click.UsageError("--random-init and --weights exclude each other")
    result = run_finetune(
        table, label, out_dir, tune_col=tune_col, model=model, weights=weights, pretrained=not random_init, head=head,
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, accumulate=accumulate, clip_grad_norm=clip_grad_norm,
        class_weights=class_weights, tune_metric=tune_metric, patience=patience, fraction=fraction,
        augmentation=Augmentation(translate_voxels=translate), device=None if device == "auto" else device,
        precision=precision, num_workers=num_workers, crop_store=crop_store, seed=seed, resume=resume, coords=coords,
        patch_size=patch_size, spacing_mm=spacing, progress=not no_progress)
    echo_finetuned(result, tune_metric, out_dir, "rows")


@click.command()
@click.option("--csv", "table", default=None, type=TABLE, help="Seeds table.")
@click.option("--table", "long_table", default=None, type=TABLE,
              help="Instead of --csv: a long table of patients over time (a model from fmcib finetune --table).")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder written by `fmcib finetune`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".csv or .parquet")
@click.option("--device", default="auto", show_default=True, callback=check_device)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--num-workers", default=None, type=click.IntRange(min=0))
@click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]))
@click.option("--no-progress", is_flag=True)
@click.pass_context
def predict(ctx: click.Context, table: Path | None, long_table: Path | None, model_dir: Path, out: Path, device: str,
            batch_size: int, num_workers: int | None, coords: str, no_progress: bool) -> None:
    """Class probabilities (prob_<class>) and prediction of a fine-tuned model, with the input columns.

    Rows that fail are listed in <out stem>.errors.csv and the exit status is 3. With --table: one row per
    patient.
    """
    if (table is None) == (long_table is None):
        raise click.UsageError("give --csv (lesions) or --table (patients over time)")
    if long_table is not None:
        from .longitudinal import predict_table

        predict_table(long_table, model_dir, out)
        return
    from ..files import check_outputs, check_table_output, write_table
    from ..runs import errors_path
    from ..training import predict as run_predict

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
        ctx.exit(EXIT_ROWS_FAILED)


@click.group()
def pretrain() -> None:
    """Pretraining: encoders of lesion patches (simclr, jepa) and of patients over time (jepa-multimodal, align,
    layered)."""


@pretrain.command("simclr")
@click.option("--csv", "table", required=True, type=TABLE, help="Seeds table of the lesions (labels are not needed).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the pretrained encoder (config.json, model.safetensors, metrics.csv, README.md).")
@click.option("--model", default="resnet50_3d.random", show_default=True,
              help="Architecture and starting weights (registry name; *.random: random init).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start from local weights (continue pretraining).")
@click.option("--data-description", default=None,
              help="What the lesions are (cohort, sites, licence): for the model card.")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=2), help="Lesions per process.")
@click.option("--temperature", default=0.1, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--random-negatives", default=1, show_default=True, type=click.IntRange(min=0),
              help="Random patches per lesion from elsewhere in its scan, as extra negatives.")
@click.option("--lr", default=0.3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--optimizer", default="lars", show_default=True, type=click.Choice(["lars", "sgd", "adamw"]))
@click.option("--weight-decay", default=1e-6, show_default=True, type=click.FloatRange(min=0))
@click.option("--warmup-epochs", default=10.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--accumulate", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--monitor-samples", default=256, show_default=True, type=click.IntRange(min=2),
              help="Lesions on which collapse monitors are computed every epoch.")
@training_options
def pretrain_simclr_cmd(table: Path, out_dir: Path, model: str, weights: Path | None, data_description: str | None,
                        epochs: int, batch_size: int, temperature: float, random_negatives: int, lr: float,
                        optimizer: str, weight_decay: float, warmup_epochs: float, accumulate: int,
                        monitor_samples: int, device: str, precision: str, num_workers: int, crop_store: Path | None,
                        coords: str, patch_size: Any, spacing: Any, seed: int, resume: bool, no_progress: bool) -> None:
    """SimCLR as in the paper: two views of each lesion against the batch's other lesions and random patches.

    \b
    Example:
      fmcib pretrain simclr --csv pool.csv --out-dir simclr/ --data-description "NLST nodules, 2002-2004"
    Several processes (DDP, the loss over the global batch): torchrun --nproc-per-node 4 -m fmcib pretrain simclr ...
    """
    from ..training.simclr import pretrain_simclr

    result = pretrain_simclr(
        table, out_dir, model=model, weights=weights, epochs=epochs, batch_size=batch_size, temperature=temperature,
        random_negatives=random_negatives, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, accumulate=accumulate, monitor_samples=monitor_samples,
        data_description=data_description, device=None if device == "auto" else device, precision=precision,
        num_workers=num_workers, crop_store=crop_store, seed=seed, resume=resume, coords=coords, patch_size=patch_size,
        spacing_mm=spacing, progress=not no_progress)
    echo_pretrained(result, out_dir, f"on {result.counts['lesions']} lesions ({result.counts['scans']} scans)")


@pretrain.command("jepa")
@click.option("--csv", "table", required=True, type=TABLE, help="Seeds table of the lesions (labels are not needed).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the pretrained encoder (config.json, model.safetensors, metrics.csv, README.md).")
@click.option("--model", default="vit3d_tiny.random", show_default=True, help="A 3D ViT (vit3d_*) registry name.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start from local weights (continue pretraining).")
@click.option("--mode", default="ema", show_default=True, type=click.Choice(["ema", "lejepa"]),
              help="ema: masked latent prediction against an EMA target (I-JEPA); lejepa: views + SIGReg.")
@click.option("--keep", default=None, type=click.Choice(["target", "context"]),
              help="The encoder the folder holds: the EMA target (default of --mode ema, as I-JEPA evaluates) or the "
                   "context encoder (LeJEPA's only one).")
@click.option("--mask", "mask_kind", default="blocks", show_default=True, type=click.Choice(["blocks", "tubes"]),
              help="ema: 3D target blocks (I-JEPA), or tubes through the whole depth (V-JEPA style).")
@click.option("--targets", default=4, show_default=True, type=click.IntRange(min=1), help="ema: target blocks.")
@click.option("--views", default=4, show_default=True, type=click.IntRange(min=2), help="lejepa: views per lesion.")
@click.option("--sigreg-lambda", default=0.05, show_default=True, type=click.FloatRange(min=0, max=1))
@click.option("--data-description", default=None,
              help="What the lesions are (cohort, sites, licence): for the model card.")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=2), help="Lesions per process.")
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--optimizer", default="adamw", show_default=True, type=click.Choice(["adamw", "sgd", "lars"]))
@click.option("--weight-decay", default=0.04, show_default=True, type=click.FloatRange(min=0))
@click.option("--warmup-epochs", default=10.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--monitor-samples", default=256, show_default=True, type=click.IntRange(min=2))
@training_options
def pretrain_jepa_cmd(table: Path, out_dir: Path, model: str, weights: Path | None, mode: str, keep: str | None,
                      mask_kind: str,
                      targets: int, views: int, sigreg_lambda: float, data_description: str | None, epochs: int,
                      batch_size: int, lr: float, optimizer: str, weight_decay: float, warmup_epochs: float,
                      monitor_samples: int, device: str, precision: str, num_workers: int, crop_store: Path | None,
                      coords: str, patch_size: Any, spacing: Any, seed: int, resume: bool, no_progress: bool) -> None:
    """JEPA on lesion patches with a 3D ViT: masked latent prediction (EMA target) or LeJEPA (SIGReg).

    \b
    Example:
      fmcib pretrain jepa --csv pool.csv --out-dir jepa/ --mode lejepa --data-description "..."
    """
    from ..training.jepa import MaskSpec, pretrain_jepa

    mask = MaskSpec(targets=targets, tube=mask_kind == "tubes")
    result = pretrain_jepa(
        table, out_dir, model=model, weights=weights, mode=mode, keep=keep, mask=mask, views=views, sigreg_lambda=sigreg_lambda, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, monitor_samples=monitor_samples,
        data_description=data_description, device=None if device == "auto" else device, precision=precision,
        num_workers=num_workers, crop_store=crop_store, seed=seed, resume=resume, coords=coords, patch_size=patch_size,
        spacing_mm=spacing, progress=not no_progress)
    echo_pretrained(result, out_dir, f"({mode}) on {result.counts['lesions']} lesions")
