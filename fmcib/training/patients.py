"""Supervised fine-tuning of a longitudinal encoder on patient labels, and its predictions.

The classifier is the encoder, the masked mean of its token outputs over each patient's valid tokens, and
an MLP head (Li et al.'s fine-tuning recipe). Every encoder layer trains. Labels are per patient: a column
of the long table whose value is the same on every row of a patient (rows without one are ignored;
patients without any are left out of training). The engine, the tuning split (``tune_col`` or a stratified
20 %), the limited-data ``fraction`` and the tuning metrics are those of image fine-tuning
(:func:`fmcib.training.finetune`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from ..distributed import init_distributed
from ..exceptions import FmcibError, TableError
from ..files import read_table
from ..models.heads import build_head, new_head
from .engine import Trainer, TrainingConfig
from .finetune import ClassificationTask, FineTuneResult, _split, _stratified_subset
from .folders import best_weights
from .longitudinal import (
    HEAD_NAME,
    Architecture,
    Sequences,
    TableColumns,
    load_longitudinal,
    prepare_longitudinal,
    read_sequences,
    save_longitudinal,
    stage_config,
)

__all__ = ["PatientClassifier", "finetune_patients", "patient_labels", "predict_patients"]

logger = logging.getLogger(__name__)


class PatientClassifier(nn.Module):
    """A longitudinal encoder (masked mean pooling of its tokens) followed by a head: patients -> logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder(batch))


class _LabelledPatients(Dataset):
    def __init__(self, sequences: Sequences, indices: np.ndarray, targets: np.ndarray) -> None:
        self.sequences, self.indices, self.targets = sequences, np.asarray(indices), np.asarray(targets)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input": self.sequences.item(int(self.indices[index])), "target": int(self.targets[index])}


def patient_labels(table: pd.DataFrame, patient_col: str, column: str, name: str = "table") -> pd.Series:
    """One value of ``column`` per patient (index: patient ids, table order; NaN where a patient has none).

    Raises
    ------
    TableError
        A patient with two different values; the message names the patients and their values.
    """
    if column not in table.columns:
        raise TableError(f"{name}: no column {column!r}", cli=f"{name} has no column {column!r}")
    values = table[[patient_col, column]].dropna(subset=[column])
    distinct = values.groupby(patient_col, sort=False)[column].nunique()
    conflicting = distinct[distinct > 1].index.tolist()
    if conflicting:
        shown = {p: sorted(values.loc[values[patient_col] == p, column].unique().tolist()) for p in conflicting[:5]}
        raise TableError(f"{name}: column {column!r} must hold one value per patient; {len(conflicting)} patient(s) "
                         f"have several: {shown}")
    first = values.groupby(patient_col, sort=False)[column].first()
    return first.reindex(pd.unique(table[patient_col]))


def _read(table: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if isinstance(table, pd.DataFrame):
        return table.reset_index(drop=True), "table"
    return read_table(table), f"'{table}'"


def finetune_patients(
    table: str | os.PathLike | pd.DataFrame,
    label: str,
    out_dir: str | os.PathLike,
    *,
    start: str | os.PathLike | None = None,
    columns: TableColumns = TableColumns(),
    pretrained: bool = True,
    architecture: Architecture = Architecture(),
    head: Literal["linear", "mlp"] = "mlp",
    tune_col: str | None = None,
    fraction: float | None = None,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup_epochs: float = 2.0,
    class_weights: bool = False,
    tune_metric: str = "auc",
    patience: int | None = None,
    data_description: str | None = None,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> FineTuneResult:
    """Fine-tune a longitudinal encoder with a classification head on per-patient labels.

    Parameters
    ----------
    table : path or DataFrame
        Long table (one row per patient and time point) with the ``label`` column.
    label : str
        Column with the classes, one value per patient.
    out_dir : path
        Folder written like the other longitudinal folders, plus ``head.safetensors`` and the head's classes
        in ``config.json``: ``fmcib embed`` reads its encoder, :func:`predict_patients` its classes.
    columns : TableColumns
        Which columns are what (see :class:`~fmcib.training.longitudinal.TableColumns`).
    start : path, optional
        A longitudinal folder (JEPA, alignment, ...) whose columns, normalisation and encoder are used.
        Without it, a random encoder of ``architecture`` on ``columns``: the supervised baseline.
        ``pretrained=False`` with ``start``: ``start``'s architecture and columns, random weights.
    head : {"mlp", "linear"}
        ``[width, width/2, classes]`` with a ReLU (default), or one linear layer.
    tune_col, fraction, class_weights, tune_metric, patience
        As in :func:`fmcib.training.finetune`, per patient.
    epochs, batch_size, lr, weight_decay, warmup_epochs, device, seed, resume
        AdamW with warm-up and cosine decay; see :class:`~fmcib.training.TrainingConfig`.
    """
    context = init_distributed(device)
    out = Path(out_dir)
    df, name = _read(table)
    sequences, record, encoder, started = prepare_longitudinal(df, start, columns, architecture, seed)
    if not pretrained:
        if start is None:
            raise ValueError("pretrained=False needs a start folder (its architecture); without one the encoder "
                             "is random already")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = type(encoder)(**encoder.args()).train()
    by_patient = patient_labels(df, record["columns"]["patient"], label, name).reindex(sequences.patients)
    frame = pd.DataFrame({label: by_patient.to_numpy()})
    if tune_col is not None:
        frame[tune_col] = patient_labels(df, record["columns"]["patient"], tune_col, name).reindex(
            sequences.patients).to_numpy()
    labelled = np.flatnonzero(frame[label].notna().to_numpy())
    if len(labelled) < len(frame) and context.is_main:
        logger.warning("%s: %d patient(s) without a value in %r left out", name, len(frame) - len(labelled), label)
    frame = frame.iloc[labelled].reset_index(drop=True)
    classes = sorted(int(c) if isinstance(c, float) and c.is_integer() else c for c in frame[label].unique().tolist())
    if len(classes) < 2:
        raise FmcibError(f"{name}: column {label!r} needs at least two classes among the patients, found {classes}")
    code = {c: i for i, c in enumerate(classes)}
    targets = np.array([code[v] for v in frame[label]], dtype=np.int64)
    train_pos, tune_pos, tune_rule = _split(frame, label, tune_col, seed)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        train_pos = train_pos[_stratified_subset(frame[label].iloc[train_pos].reset_index(drop=True), fraction, seed)]
    train_set = _LabelledPatients(sequences, labelled[train_pos], targets[train_pos])
    tune_set = _LabelledPatients(sequences, labelled[tune_pos], targets[tune_pos]) if len(tune_pos) else None
    counts = {"patients": len(sequences), "unlabelled": len(sequences) - len(labelled), "train": len(train_pos),
              "tune": len(tune_pos)}
    counts.update({f"train_{c}": int((targets[train_pos] == i).sum()) for i, c in enumerate(classes)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        classifier = PatientClassifier(encoder, new_head(encoder.width, len(classes), kind=head))
    weights = None
    if class_weights:
        freq = np.bincount(targets[train_pos], minlength=len(classes)).astype(np.float64)
        weights = torch.tensor(len(train_pos) / (len(classes) * np.maximum(freq, 1)), dtype=torch.float32)
    settings = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw", weight_decay=weight_decay,
                              warmup_epochs=warmup_epochs, seed=seed, patience=patience)
    result = Trainer(ClassificationTask(classifier, weights, monitor=tune_metric), settings, out,
                     device=context.device, progress=progress).fit(train_set, tune_set, resume=resume)
    head_name = "an MLP" if head == "mlp" else "a linear"
    summary = (f"Supervised fine-tuning of every layer with {head_name} head on {label!r} ({len(classes)} classes; "
               f"{len(train_pos)} training and {len(tune_pos)} tuning patients, tuning patients: "
               f"{tune_rule.replace('rows', 'patients')}); "
               + (f"started from {start}." if start is not None and pretrained else
                  "random initial weights (the supervised baseline)."))
    config = stage_config(df, encoder, record, sequences, method="finetune", summary=summary, settings=settings,
                          history=result.history, start=start if pretrained else None,
                          started=started if pretrained else None, data_description=data_description, labels=label,
                          counts=counts, fraction=fraction, tune_metric=tune_metric, best_epoch=result.best_epoch,
                          best_metrics=result.best_metrics)
    config["training"]["table"] = name.strip("'")
    config["head"] = {"type": head, "label": label, "classes": [c.item() if isinstance(c, np.generic) else c
                                                                for c in classes],
                      "widths": [encoder.width, *([encoder.width // 2] if head == "mlp" else []), len(classes)]}
    if context.is_main:
        best = best_weights(out, "encoder", "head")
        save_longitudinal(out, config, best["encoder"], best["head"])
    context.barrier()
    return FineTuneResult(out, classes, result.best_epoch, result.best_metrics, counts)


def predict_patients(table: str | os.PathLike | pd.DataFrame, model_dir: str | os.PathLike,
                     batch_size: int = 256) -> pd.DataFrame:
    """Class probabilities (``prob_<class>``) and ``prediction`` per patient of a folder written by
    :func:`finetune_patients`; the table needs the model's columns and is standardised with its statistics."""
    config, encoder = load_longitudinal(model_dir)
    path = Path(model_dir)
    if "head" not in config or not (path / HEAD_NAME).is_file():
        raise FmcibError(f"'{path}' has no classification head (fmcib finetune --table writes one; a pretrained "
                         "folder gives embeddings: fmcib embed)")
    from safetensors.torch import load_file

    head = build_head(load_file(str(path / HEAD_NAME)), str(path / HEAD_NAME))
    cols, classes = config["columns"], config["head"]["classes"]
    sequences, _ = read_sequences(table, cols["patient"], cols["time"], cols["clinical"], None, cols["image"],
                                  normalisation=config["normalisation"])
    model = PatientClassifier(encoder, head).eval()
    probs = []
    with torch.inference_mode():
        for begin in range(0, len(sequences), batch_size):
            probs.append(torch.softmax(model(sequences.batch(begin, begin + batch_size)), dim=1))
    p = torch.cat(probs).numpy()
    frame = pd.DataFrame(p, columns=[f"prob_{c}" for c in classes])
    frame.insert(0, cols["patient"], sequences.patients)
    frame["prediction"] = np.asarray(classes, dtype=object)[p.argmax(axis=1)]
    return frame
