"""Full fine-tuning (the paper's supervised adaptation): every encoder layer trains with a classification head.

:func:`finetune` writes a Hub-layout folder: ``config.json`` (encoder config, contract, head and training
settings), ``model.safetensors`` (encoder), ``head.safetensors``, ``metrics.csv`` and a model card
``README.md``; resume state lives in ``checkpoints/``. ``fmcib extract --weights DIR`` gives the fine-tuned
encoder's features and :func:`predict` its class probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..distributed import init_distributed
from ..exceptions import FmcibError
from ..models import DEFAULT_MODEL, build_model
from ..models.checkpoints import CONFIG_NAME, HEAD_WEIGHTS_NAME
from ..models.heads import build_head, new_head
from ..tables import load_seed_table
from .crops import read_crops
from .data import Augmentation, PatchDataset, report_unreadable
from .engine import Trainer, TrainingConfig, TrainingTask, _to_device
from .folders import best_weights, starting_point, write_trained_folder

__all__ = ["Classifier", "ClassificationTask", "FineTuneResult", "finetune", "predict", "read_finetuned",
           "TUNE_METRICS"]

logger = logging.getLogger(__name__)

TUNE_METRICS = ("auc", "balanced_accuracy", "average_precision")


class Classifier(nn.Module):
    """An encoder followed by a head: ``(N, C, z, y, x)`` patches -> ``(N, classes)`` logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.encoder(x))


def _scores(probs: np.ndarray, targets: np.ndarray, metric: str) -> float:
    """A tuning metric over the classes present in ``targets`` (a tuning set may lack a rare class)."""
    from ..evaluation import score_metric

    present = np.unique(targets)
    if len(present) < 2:
        return float("nan")
    sub = probs[:, present]
    sub = sub / sub.sum(axis=1, keepdims=True)
    return score_metric(metric, targets, sub[:, 1] if len(present) == 2 else sub)


class ClassificationTask(TrainingTask):
    """Cross-entropy on class indices (optionally class-weighted); tuning metric from :mod:`fmcib.evaluation`."""

    def __init__(self, model: Classifier, class_weights: torch.Tensor | None = None, monitor: str = "auc") -> None:
        if monitor not in TUNE_METRICS:
            raise ValueError(f"tune metric must be one of {TUNE_METRICS}, got {monitor!r}")
        self.model = model
        self.monitor = monitor
        self.mode = "max"
        self.class_weights = class_weights

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:  # noqa: D102
        logits = model(batch["input"])
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return nn.functional.cross_entropy(logits.float(), batch["target"].long(), weight=weight)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:  # noqa: D102
        probs, targets, losses = [], [], []
        for batch in loader:
            logits = model(_to_device(batch["input"], device)).float()
            losses.append(float(nn.functional.cross_entropy(logits, batch["target"].long().to(device),
                                                            reduction="sum")))
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            targets.append(batch["target"].numpy())
        p, t = np.concatenate(probs), np.concatenate(targets)
        out = {"loss": sum(losses) / len(t)}
        out.update({m: _scores(p, t, m) for m in TUNE_METRICS})
        return out


@dataclass
class FineTuneResult:
    """A finished fine-tune: its folder, classes, the best epoch's tuning metrics and the row counts."""

    out_dir: Path
    classes: list[Any]
    best_epoch: int | None
    best_metrics: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)


def _stratified_subset(labels: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """Positions of a stratified random ``fraction`` of rows (at least one per class), seeded."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for _, positions in labels.groupby(labels, sort=True).indices.items():
        k = max(1, int(round(fraction * len(positions))))
        keep += rng.choice(positions, size=k, replace=False).tolist()
    return np.sort(np.asarray(keep, dtype=np.int64))


def _split(df: pd.DataFrame, label: str, tune_col: str | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and tuning positions: the tune column's truthy rows, else a stratified 20 % held out (seeded)."""
    if tune_col is not None:
        if tune_col not in df.columns:
            raise FmcibError(f"the table has no tune column {tune_col!r}", cli=f"--tune-col: the table has no "
                             f"column {tune_col!r}")
        flags = df[tune_col]
        if flags.isna().any():
            raise FmcibError(f"tune column {tune_col!r} has missing values in rows "
                             f"{np.flatnonzero(flags.isna().to_numpy())[:10].tolist()}")
        values = flags.astype(str).str.strip().str.lower().map(
            {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "1.0": True, "0.0": False})
        if values.isna().any():
            bad = flags[values.isna()].unique()[:5].tolist()
            raise FmcibError(f"tune column {tune_col!r} must hold true/false or 1/0, found {bad}")
        is_tune = values.to_numpy(dtype=bool)
        return np.flatnonzero(~is_tune), np.flatnonzero(is_tune), f"rows where {tune_col} is true"
    tune = _stratified_subset(df[label], 0.2, seed + 1)
    train = np.setdiff1d(np.arange(len(df)), tune)
    return train, tune, "a stratified random 20 % of the labelled rows (seeded)"


def finetune(
    table: str | os.PathLike | pd.DataFrame,
    label: str,
    out_dir: str | os.PathLike,
    *,
    tune_col: str | None = None,
    model: str = DEFAULT_MODEL,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    head: Literal["linear", "mlp"] = "linear",
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 1e-3,
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd",
    weight_decay: float = 0.0,
    warmup_epochs: float = 0.0,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    class_weights: bool = False,
    tune_metric: str = "auc",
    patience: int | None = None,
    recalibrate_batchnorm: bool = True,
    fraction: float | None = None,
    augmentation: Augmentation | None = Augmentation(),
    device: str | None = None,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    num_workers: int = 0,
    crop_store: str | os.PathLike | None = None,
    seed: int = 0,
    resume: bool = False,
    coords: str = "lps",
    patch_size: int | tuple[int, int, int] | None = None,
    spacing_mm: float | tuple[float, float, float] | None = None,
    progress: bool = True,
) -> FineTuneResult:
    """Fine-tune an encoder and a classification head on a labelled seeds table.

    Parameters
    ----------
    table : path or DataFrame
        A seeds table as for :func:`fmcib.extract_features`, with a ``label`` column (binary or multiclass;
        rows with a missing label are dropped and counted).
    label : str
        Column with the classes.
    out_dir : path
        Folder written in fmcib's Hub layout (see the module docstring).
    tune_col : str, optional
        Boolean column marking the tuning rows (the best epoch is chosen on them); default: a stratified,
        seeded 20 % of the labelled rows.
    model, weights, pretrained
        The starting encoder (see :func:`fmcib.create_model`): the published weights (default), random init
        (``pretrained=False``: the paper's supervised baseline), or a folder written by an earlier fine-tune.
    head : {"linear", "mlp"}
        A linear layer, or the original's MLP (``[D, D/2, classes]`` with a ReLU).
    epochs, batch_size, lr, optimizer, weight_decay, warmup_epochs, accumulate, clip_grad_norm, precision,
    num_workers, seed, patience
        See :class:`~fmcib.training.TrainingConfig` (batch size per process).
    recalibrate_batchnorm : bool
        Exact BatchNorm statistics before each evaluation (see :class:`~fmcib.training.TrainingConfig`).
    class_weights : bool
        Weight the loss by inverse class frequency (imbalanced labels).
    tune_metric : {"auc", "balanced_accuracy", "average_precision"}
        Picks the best epoch (macro one-vs-rest for multiclass).
    fraction : float, optional
        Train on a stratified, seeded fraction of the training rows (limited-data curves); the tuning rows
        are kept whole.
    augmentation : Augmentation or None
        Training augmentations (default: the paper's flips, 90-degree rotations and +-10 voxel shifts).
    device : str, optional
        Default: CUDA (``cuda:<LOCAL_RANK>`` under torchrun), MPS, CPU.
    resume : bool
        Continue the run in ``out_dir`` (same settings) from its last checkpoint.
    coords : {"lps", "ras", "voxel"}
    patch_size, spacing_mm : optional
        Override the encoder's patch contract; the folder's config records the contract trained with.
    crop_store : folder, optional
        Keep the training crops on disk, memory-mapped, instead of in every process's memory (pools too
        large for it; ``train`` and ``tune`` sub-folders; see :mod:`fmcib.training.crops`). A store made for the same rows, files and contract
        is reused; under torchrun the processes share it.

    Returns
    -------
    FineTuneResult
    """
    context = init_distributed(device)
    out = Path(out_dir)
    df, table_dir, name = load_seed_table(table)
    if label not in df.columns:
        raise FmcibError(f"{name}: no label column {label!r}", cli=f"--label: {name} has no column {label!r}")
    labelled_pos = np.flatnonzero(df[label].notna().to_numpy())  # table positions of the labelled rows
    labelled = df.iloc[labelled_pos].reset_index(drop=True)
    dropped = len(df) - len(labelled)
    if dropped and context.is_main:
        logger.warning("%s: %d row(s) without a %s label left out", name, dropped, label)
    # a label column with missing values reads as float: its classes 0.0, 1.0 are named 0, 1 (1.0 == 1 as a key)
    classes = sorted(int(c) if isinstance(c, float) and c.is_integer() else c for c in labelled[label].unique().tolist())
    if len(classes) < 2:
        raise FmcibError(f"{name}: column {label!r} needs at least two classes, found {classes}")
    train_pos, tune_pos, tune_rule = _split(labelled, label, tune_col, seed)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        train_pos = train_pos[_stratified_subset(labelled[label].iloc[train_pos].reset_index(drop=True),
                                                 fraction, seed)]
    resolved, contract, config = starting_point(model, weights, pretrained, patch_size, spacing_mm)
    code = {c: i for i, c in enumerate(classes)}

    def crops(pos: np.ndarray, margin: int, part: str) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        return read_crops(df, contract, margin=margin, coords=coords, base_dir=table_dir,
                          rows=labelled_pos[pos].tolist(), num_workers=num_workers, name=name,
                          store=None if crop_store is None else Path(crop_store) / part, context=context)

    margin = augmentation.margin(contract) if augmentation is not None else 0
    train_rows, train_crops, train_errors = crops(train_pos, margin, "train")
    tune_rows, tune_crops, tune_errors = crops(tune_pos, 0, "tune") if len(tune_pos) else (np.zeros(0, int), None, [])
    errors = train_errors + tune_errors
    report_unreadable(errors, context.is_main)
    targets = lambda rows: np.array([code[v] for v in df[label].iloc[rows]], dtype=np.int64)  # noqa: E731
    train_set = PatchDataset(train_crops, contract, targets(train_rows), rows=train_rows, augmentation=augmentation,
                             margin=margin, seed=seed)
    tune_set = PatchDataset(tune_crops, contract, targets(tune_rows), rows=tune_rows) if len(tune_rows) else None
    counts = {"rows": len(df), "unlabelled": dropped, "train": len(train_rows), "tune": len(tune_rows),
              "unreadable": len(errors)}
    counts.update({f"train_{c}": int((targets(train_rows) == i).sum()) for i, c in enumerate(classes)})

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_model(resolved, device="cpu").train()
        num_features = resolved.config.num_features
        classifier = Classifier(encoder, new_head(num_features, len(classes), kind=head))
    weights_tensor = None
    if class_weights:
        freq = np.bincount(train_set.targets, minlength=len(classes)).astype(np.float64)
        weights_tensor = torch.tensor(len(train_set.targets) / (len(classes) * np.maximum(freq, 1)), dtype=torch.float32)
    task = ClassificationTask(classifier, weights_tensor, monitor=tune_metric)
    settings = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                              weight_decay=weight_decay, warmup_epochs=warmup_epochs, accumulate=accumulate,
                              clip_grad_norm=clip_grad_norm, precision=precision, seed=seed, num_workers=num_workers,
                              patience=patience, recalibrate_batchnorm=recalibrate_batchnorm)
    trainer = Trainer(task, settings, out, device=context.device, progress=progress)
    result = trainer.fit(train_set, tune_set, resume=resume)
    if context.is_main:
        best = best_weights(out, "encoder", "head")
        record = {
            "head": {"type": head, "label": label, "classes": [_plain(c) for c in classes],
                     "widths": [num_features, *([num_features // 2] if head == "mlp" else []), len(classes)]},
            "training": {"method": "finetune", "started_from": resolved.record(), "base_model": resolved.config.name,
                         "table": name, "tune_rows": tune_rule, "fraction": fraction, "counts": counts,
                         "settings": settings.to_dict(), "tune_metric": tune_metric,
                         "class_weights": class_weights, "augmentation": dataclasses.asdict(augmentation)
                         if augmentation is not None else None, "best_epoch": result.best_epoch,
                         "best_metrics": result.best_metrics},
        }
        write_trained_folder(out, config, f"{resolved.config.name}.finetuned-{_slug(label)}",
                             f"{resolved.config.name} fine-tuned to predict {label!r} ({len(classes)} classes) on "
                             f"{name}",
                             best["encoder"], record, heads=best["head"])
    context.barrier()
    return FineTuneResult(out, classes, result.best_epoch, result.best_metrics, counts)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text)).strip("-").lower() or "label"


def read_finetuned(folder: str | os.PathLike) -> tuple[dict[str, Any], nn.Module]:
    """The ``config.json`` of a fine-tuned folder and its head (strictly loaded, eval mode)."""
    path = Path(folder)
    config_path = path / CONFIG_NAME
    if not config_path.is_file() or not (path / HEAD_WEIGHTS_NAME).is_file():
        raise FmcibError(f"'{path}' is not a fine-tuned model folder (needs {CONFIG_NAME} and {HEAD_WEIGHTS_NAME}; "
                         "`fmcib finetune` writes them)")
    data = json.loads(config_path.read_text())
    if "head" not in data or "classes" not in data["head"]:
        raise FmcibError(f"'{config_path}' names no head classes; it was not written by `fmcib finetune`")
    from safetensors.torch import load_file

    head = build_head(load_file(str(path / HEAD_WEIGHTS_NAME)), str(path / HEAD_WEIGHTS_NAME))
    if head[-1][0].out_features != len(data["head"]["classes"]):
        raise FmcibError(f"'{path}': the head gives {head[-1][0].out_features} outputs for "
                         f"{len(data['head']['classes'])} classes")
    return data, head


def predict(table: str | os.PathLike | pd.DataFrame, model_dir: str | os.PathLike, *,
            return_errors: bool = False, **extract_kwargs: Any) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Class probabilities of a fine-tuned folder for every seed of a table.

    The encoder runs through :func:`fmcib.extract_features` (same reading, batching, failed-row handling;
    ``extract_kwargs`` are its options), then the head. Returns the input columns, ``prob_<class>`` per class
    and ``prediction`` (the most probable class); with ``return_errors=True`` also the failed rows.
    """
    from ..extract import extract_features
    from ..tables import PADDING_COLUMN, WARNING_COLUMN, feature_matrix

    data, head = read_finetuned(model_dir)
    features, errors = extract_features(table, weights=model_dir, return_errors=True, **extract_kwargs)
    matrix = feature_matrix(features).to_numpy(np.float32)
    with torch.inference_mode():
        probs = torch.softmax(head(torch.from_numpy(matrix)), dim=1).numpy() if len(matrix) else \
            np.zeros((0, len(data["head"]["classes"])))
    classes = data["head"]["classes"]
    base = features.drop(columns=[c for c in features.columns if str(c).startswith("pred_")])
    probs_frame = pd.DataFrame(probs, index=base.index, columns=[f"prob_{c}" for c in classes])
    prediction = pd.Series(np.asarray(classes, dtype=object)[probs.argmax(axis=1)] if len(probs) else [],
                           index=base.index, name="prediction", dtype=object)
    out = pd.concat([base.drop(columns=[PADDING_COLUMN, WARNING_COLUMN]), probs_frame, prediction,
                     base[[PADDING_COLUMN, WARNING_COLUMN]]], axis=1)
    out.attrs["fmcib"] = {**features.attrs.get("fmcib", {}), "head": data["head"]}
    return (out, errors) if return_errors else out
