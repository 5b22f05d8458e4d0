"""Multimodal longitudinal JEPA (Li et al.): patient embeddings from image features and clinical vectors over time.

Input: a long table, one row per patient and time point, with the image features of that time point (the
``pred_*`` columns that ``fmcib extract`` writes, so its output joins directly) and clinical columns.
Either modality may be missing at a time point, and patients have different numbers of time points.

- **Tokens.** Per time point, an image token and a clinical token (each only where its values exist), each
  through its own linear projection to a shared width, plus a sine-cosine code of the months before the
  patient's latest time point and a learned modality embedding. Padding and missing tokens are masked
  out of attention (a key-padding mask, never NaN).
- **Objective.** 15 % of each patient's tokens are hidden (at least one, and at least one left visible);
  the context encoder sees the rest; a narrow predictor gets the context outputs plus mask tokens (time and
  modality codes only) and predicts the hidden tokens' latents, which an EMA copy of the encoder computes
  from the whole sequence (MSE against their LayerNorm). An optional SIGReg term on the pooled context
  embeddings; the collapse monitors on every run (the paper's runs collapsed with the loss going to 0).
- **Output.** The patient embedding is the masked mean of the encoder's token outputs
  (:func:`embed_patients`, ``fmcib embed``), or one per time point.

Written from the paper's description; no code of it is public.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..distributed import DistributedContext, init_distributed
from ..exceptions import FmcibError, TableError
from ..files import atomic_path, read_table
from ..models.vit3d import Block
from ..tables import FEATURE_PREFIX
from .engine import Trainer, TrainingConfig, TrainingTask
from .folders import best_weights
from .monitors import feature_health
from .optim import ema_update
from .regularizers import sigreg, slice_generator

__all__ = [
    "EMBEDDING_PREFIX",
    "LongitudinalEncoder",
    "LongitudinalJEPA",
    "LongitudinalTask",
    "Sequences",
    "embed_patients",
    "load_longitudinal",
    "prepare_longitudinal",
    "pretrain_longitudinal",
    "read_sequences",
    "save_longitudinal",
]

logger = logging.getLogger(__name__)

EMBEDDING_PREFIX = "emb_"
IMAGE, CLINICAL = 0, 1
CONFIG_NAME, WEIGHTS_NAME, HEAD_NAME, CARD_NAME = "config.json", "model.safetensors", "head.safetensors", "README.md"
MODEL_KIND = "longitudinal_jepa"  # config.json's fmcib_model for every folder of this encoder family
DAYS_PER_MONTH = 30.4375


@dataclass
class Sequences:
    """Patients as padded token sequences (``P`` patients, ``L`` tokens at most).

    ``image`` ``(P, L, Di)`` and ``clinical`` ``(P, L, Dc)`` standardised values (zero where the token is of
    the other modality or padding), ``modality`` ``(P, L)`` (0 image, 1 clinical), ``months`` ``(P, L)``
    before the patient's latest time point, ``valid`` ``(P, L)``, ``time_point`` ``(P, L)`` (the token's
    time value as in the table), ``rows`` ``(P, L)`` (the token's table row, -1 for padding) and
    ``patients`` (ids in table order).
    """

    patients: list[Any]
    image: np.ndarray
    clinical: np.ndarray
    modality: np.ndarray
    months: np.ndarray
    valid: np.ndarray
    time_point: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.patients)

    def pairs(self, i: int) -> list[tuple[int, int]]:
        """Patient ``i``'s (image token, clinical token) positions of the same table row (time point)."""
        slots: dict[int, list[int]] = {}
        for j in np.flatnonzero(self.valid[i]):
            slots.setdefault(int(self.rows[i, j]), [-1, -1])[int(self.modality[i, j])] = int(j)
        return [(a, b) for a, b in slots.values() if a >= 0 and b >= 0]

    def batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Patients ``start .. stop - 1`` as one batch of tensors."""
        items = [self.item(i) for i in range(start, min(stop, len(self.patients)))]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def item(self, i: int) -> dict[str, torch.Tensor]:
        """Patient ``i`` as tensors."""
        return {"image": torch.from_numpy(self.image[i]), "clinical": torch.from_numpy(self.clinical[i]),
                "modality": torch.from_numpy(self.modality[i]), "months": torch.from_numpy(self.months[i]),
                "valid": torch.from_numpy(self.valid[i])}


def _months(values: pd.Series, name: str) -> np.ndarray:
    """A time column as months: numbers as they are, dates as days / 30.4375."""
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(np.float64)
    try:
        dates = pd.to_datetime(values)
    except (ValueError, TypeError) as exc:
        raise TableError(f"{name}: the time column is neither numbers (months) nor dates: {exc}") from exc
    return ((dates - dates.min()).dt.total_seconds() / 86400 / DAYS_PER_MONTH).to_numpy(np.float64)


def read_sequences(table: str | os.PathLike | pd.DataFrame, patient_col: str, time_col: str,
                   clinical_cols: list[str] | None = None, clinical_prefix: str | None = None,
                   image_cols: list[str] | None = None, normalisation: dict[str, Any] | None = None,
                   max_tokens: int | None = None) -> tuple[Sequences, dict[str, Any]]:
    """Build :class:`Sequences` from a long table; returns them and the ``columns`` + ``normalisation`` record
    (means and standard deviations; pass a trained model's record to embed new data the same way)."""
    df = table.reset_index(drop=True) if isinstance(table, pd.DataFrame) else read_table(table)
    name = "table" if isinstance(table, pd.DataFrame) else f"'{table}'"
    for col in (patient_col, time_col):
        if col not in df.columns:
            raise TableError(f"{name}: no column {col!r}")
    image_cols = list(image_cols) if image_cols is not None else \
        [c for c in df.columns if str(c).startswith(FEATURE_PREFIX)]
    if clinical_cols is None:
        clinical_cols = [c for c in df.columns if clinical_prefix and str(c).startswith(clinical_prefix)]
    missing = [c for c in [*image_cols, *clinical_cols] if c not in df.columns]
    if missing:
        raise TableError(f"{name}: missing column(s) {missing[:10]}")
    if not image_cols and not clinical_cols:
        raise TableError(f"{name}: no image ({FEATURE_PREFIX}*) or clinical columns")
    img = df[image_cols].to_numpy(np.float64) if image_cols else np.zeros((len(df), 0))
    cli = df[clinical_cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64) if clinical_cols else \
        np.zeros((len(df), 0))
    if normalisation is None:
        normalisation = {key: {"mean": np.nan_to_num(np.nanmean(v, axis=0)).tolist() if v.shape[1] else [],
                               "std": np.nan_to_num(np.nanstd(v, axis=0), nan=1.0).tolist() if v.shape[1] else []}
                         for key, v in (("image", img), ("clinical", cli))}
    scaled = {}
    for key, v in (("image", img), ("clinical", cli)):
        mean, std = np.asarray(normalisation[key]["mean"]), np.asarray(normalisation[key]["std"])
        scaled[key] = (v - mean) / np.where(std > 0, std, 1.0) if v.shape[1] else v
    has_image = np.isfinite(img).all(axis=1) & (img.shape[1] > 0)
    has_clinical = np.isfinite(cli).any(axis=1) & (cli.shape[1] > 0)
    months = _months(df[time_col], name)
    groups = df.groupby(patient_col, sort=False).indices
    tokens: list[list[tuple[int, int]]] = []
    for rows in groups.values():
        rows = rows[np.argsort(months[rows], kind="stable")]
        seq = [(int(r), m) for r in rows for m, ok in ((IMAGE, has_image[r]), (CLINICAL, has_clinical[r])) if ok]
        tokens.append(seq[-max_tokens:] if max_tokens else seq)  # the latest tokens when capped
    empty = [p for p, seq in zip(groups, tokens) if not seq]
    if empty:
        logger.warning("%s: %d patient(s) without any image or clinical values left out: %s", name, len(empty),
                       empty[:10])
    keep = [(p, seq) for p, seq in zip(groups, tokens) if seq]
    if not keep:
        raise FmcibError(f"{name}: no patient has image or clinical values")
    length = max(len(seq) for _, seq in keep)
    n, di, dc = len(keep), img.shape[1], cli.shape[1]
    out = Sequences([p for p, _ in keep], np.zeros((n, length, di), np.float32), np.zeros((n, length, dc), np.float32),
                    np.zeros((n, length), np.int64), np.zeros((n, length), np.float32), np.zeros((n, length), bool),
                    np.zeros((n, length), np.float64), np.full((n, length), -1, np.int64))
    for i, (_, seq) in enumerate(keep):
        latest = max(months[r] for r, _ in seq)
        for j, (r, m) in enumerate(seq):
            if m == IMAGE:
                out.image[i, j] = scaled["image"][r]
            else:
                out.clinical[i, j] = np.nan_to_num(scaled["clinical"][r])  # a missing value: the mean
            out.modality[i, j], out.months[i, j], out.valid[i, j], out.rows[i, j] = m, latest - months[r], True, r
            out.time_point[i, j] = df[time_col].iloc[r] if pd.api.types.is_numeric_dtype(df[time_col]) else months[r]
    record = {"columns": {"patient": patient_col, "time": time_col, "image": image_cols, "clinical": clinical_cols},
              "normalisation": normalisation}
    return out, record


def _time_code(months: torch.Tensor, width: int) -> torch.Tensor:
    """Sine-cosine code of months (periods from 1 month to about 80 years)."""
    half = width // 2
    freq = torch.exp(-np.log(1000.0) * torch.arange(half, device=months.device, dtype=torch.float32) / half)
    angles = months.float()[..., None] * freq
    code = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(code, (0, width - 2 * half))


class TimeDistanceBlock(Block):
    """A transformer block whose attention fades with the time between tokens (time-distance attention, TDViT).

    ``A = softmax((ReLU(Q K^T) * R_hat + M) / sqrt(d))`` with ``R_hat = 1 / (1 + exp(|a| R - |c|))``, ``R`` the
    months between two tokens, ``a`` (decay per month) and ``c`` (offset) learned per head, ``M`` the key mask.
    Initialised at ``a = 0.05``, ``c = 2``: weights fall to half at 40 months apart.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.decay = nn.Parameter(torch.full((heads,), 0.05))
        self.offset = nn.Parameter(torch.full((heads,), 2.0))

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None,  # type: ignore[override]
                months: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(N, T, dim)``, ``keys`` ``(N, T)`` (tokens that may be attended to), ``months`` ``(N, T)``."""
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        months = x.new_zeros(n, t) if months is None else months.to(x.dtype)
        distance = (months[:, None, :, None] - months[:, None, None, :]).abs()  # (N, 1, T, T)
        nearness = torch.sigmoid(self.offset.abs()[:, None, None] - self.decay.abs()[:, None, None] * distance)
        scores = torch.relu(q @ k.transpose(-1, -2)) * nearness / np.sqrt(d // self.heads)
        if keys is not None:
            scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class LongitudinalEncoder(nn.Module):
    """Token embedding (per-modality projection + time code + modality embedding) and transformer blocks
    (with ``time_attention``: :class:`TimeDistanceBlock` instead of plain attention)."""

    def __init__(self, image_dim: int, clinical_dim: int, width: int = 128, depth: int = 2, heads: int = 4,
                 time_attention: bool = False) -> None:
        super().__init__()
        self.width = width
        self.time_attention = bool(time_attention)
        self._args = {"image_dim": image_dim, "clinical_dim": clinical_dim, "width": width, "depth": depth,
                      "heads": heads, "time_attention": self.time_attention}
        self.image_proj = nn.Linear(max(image_dim, 1), width)
        self.clinical_proj = nn.Linear(max(clinical_dim, 1), width)
        self.modality = nn.Embedding(2, width)
        block = TimeDistanceBlock if self.time_attention else Block
        self.blocks = nn.ModuleList(block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def args(self) -> dict[str, Any]:
        """The constructor arguments (``config.json``'s ``model_args``)."""
        return dict(self._args)

    def position(self, modality: torch.Tensor, months: torch.Tensor) -> torch.Tensor:
        """What a token is and when, without its value: time code + modality embedding."""
        return _time_code(months, self.width) + self.modality(modality)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, L, width)`` input tokens."""
        image = batch["image"] if batch["image"].shape[-1] else batch["image"].new_zeros(*batch["image"].shape[:2], 1)
        clinical = batch["clinical"] if batch["clinical"].shape[-1] else \
            batch["clinical"].new_zeros(*batch["clinical"].shape[:2], 1)
        values = torch.where((batch["modality"] == IMAGE)[..., None], self.image_proj(image),
                             self.clinical_proj(clinical))
        return values + self.position(batch["modality"], batch["months"])

    def encode(self, tokens: torch.Tensor, keys: torch.Tensor, months: torch.Tensor | None = None) -> torch.Tensor:
        """Token outputs; only the ``keys`` tokens are attended to (``months``: for time-distance attention)."""
        h = tokens
        for block in self.blocks:
            h = block(h, keys, months) if self.time_attention else block(h, keys)
        return self.norm(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Patient embeddings ``(N, width)``: masked mean of the token outputs over the valid tokens."""
        h = self.encode(self.embed(batch), batch["valid"], batch["months"])
        weights = batch["valid"].float()[..., None]
        return (h * weights).sum(1) / weights.sum(1).clamp_min(1)


class LongitudinalJEPA(nn.Module):
    """Context encoder, EMA target encoder and a narrow predictor over mask tokens."""

    def __init__(self, encoder: LongitudinalEncoder, predictor_depth: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        self.target = copy.deepcopy(encoder).requires_grad_(False)
        width = encoder.width
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.predictor = nn.ModuleList(Block(width, 4 if width % 4 == 0 else 1) for _ in range(predictor_depth))
        self.predictor_norm = nn.LayerNorm(width)

    def forward(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Patient embeddings; with ``hidden`` ``(N, L)``, the predicted latents of every token ``(N, L, width)``
        from the visible ones (only the hidden positions are meant)."""
        if hidden is None:
            return self.encoder(batch)
        valid = batch["valid"]
        tokens = self.encoder.embed(batch)
        seen = self.encoder.encode(tokens, valid & ~hidden, batch["months"])
        queries = self.mask_token + self.encoder.position(batch["modality"], batch["months"])
        h = torch.where(hidden[..., None], queries, seen)
        for block in self.predictor:
            h = block(h, valid)
        return self.predictor_norm(h)


class _PatientDataset(Dataset):
    """Patients with their hidden tokens drawn from ``(seed, epoch, index)``: ``ratio`` of the valid tokens, at
    least one hidden and one left visible (a patient with a single token hides none)."""

    def __init__(self, sequences: Sequences, ratio: float = 0.15, seed: int = 0) -> None:
        self.sequences, self.ratio, self.seed, self.epoch = sequences, float(ratio), int(seed), 0

    def __len__(self) -> int:
        return len(self.sequences.patients)

    def set_epoch(self, epoch: int) -> None:
        """Select the hidden tokens of ``epoch``."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.sequences.item(index)
        valid = np.flatnonzero(self.sequences.valid[index])
        hidden = np.zeros(len(self.sequences.valid[index]), bool)
        if len(valid) >= 2:
            rng = np.random.default_rng([self.seed, 11, self.epoch, int(index)])
            count = int(np.clip(round(self.ratio * len(valid)), 1, len(valid) - 1))
            hidden[rng.choice(valid, size=count, replace=False)] = True
        item["hidden"] = torch.from_numpy(hidden)
        return item


class LongitudinalTask(TrainingTask):
    """Latent MSE at the hidden tokens against the EMA target, optional SIGReg (over the global batch under
    torchrun); monitors on patient embeddings."""

    monitor = None

    def __init__(self, model: LongitudinalJEPA, sigreg_lambda: float = 0.0, ema: tuple[float, float] = (0.996, 1.0),
                 seed: int = 0, context: DistributedContext | None = None) -> None:
        self.model, self.sigreg_lambda, self.ema, self.seed = model, float(sigreg_lambda), ema, int(seed)
        self.context = context

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        bare: LongitudinalJEPA = getattr(model, "module", model)
        hidden = batch["hidden"] & batch["valid"]
        predicted = model(batch, hidden)
        with torch.no_grad():
            wanted = bare.target.encode(bare.target.embed(batch), batch["valid"], batch["months"])
            wanted = F.layer_norm(wanted, wanted.shape[-1:])
        if hidden.any():
            loss = (predicted[hidden].float() - wanted[hidden].float()).square().mean()
        else:
            loss = predicted.sum() * 0.0
        if self.sigreg_lambda:
            pooled = model(batch)
            loss = (1 - self.sigreg_lambda) * loss + self.sigreg_lambda * sigreg(
                pooled, num_slices=64, generator=slice_generator(self.step, self.seed), context=self.context)
        return loss

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        ema_update(model.target, model.encoder, step, total_steps, self.ema)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        pooled = torch.cat([model.encoder({k: v.to(device) for k, v in batch.items()}).float().cpu()
                            for batch in loader])
        from .jepa import JEPA_COLLAPSE_THRESHOLDS

        return feature_health(pooled, thresholds=JEPA_COLLAPSE_THRESHOLDS, who="longitudinal JEPA")


@dataclass(frozen=True)
class TableColumns:
    """Which columns of a long table are what: ``patient`` and ``time`` (months, or dates), the clinical columns
    by name (``clinical``) or by ``clinical_prefix``, and the image feature columns (``image``; default: every
    ``pred_*`` column, as ``fmcib extract`` writes them). A stage that starts from a trained folder takes the
    folder's feature columns; only ``patient`` and ``time`` may then rename its own."""

    patient: str | None = None
    time: str | None = None
    clinical: tuple[str, ...] | None = None
    clinical_prefix: str | None = None
    image: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Architecture:
    """The size of a fresh :class:`LongitudinalEncoder` (a stage that starts from a folder keeps its own)."""

    width: int = 128
    depth: int = 2
    heads: int = 4
    time_attention: bool = False


def prepare_longitudinal(table: str | os.PathLike | pd.DataFrame, start: str | os.PathLike | None,
                         columns: TableColumns, architecture: Architecture = Architecture(), seed: int = 0
                         ) -> tuple[Sequences, dict[str, Any], LongitudinalEncoder, dict[str, Any] | None]:
    """The sequences, column record, encoder and starting config of a training stage.

    From scratch (``start`` None): ``columns``, normalisation from ``table``, a seeded random encoder of
    ``architecture``. From a trained folder: its columns (the patient and time columns may be renamed), its
    normalisation and its encoder, so that the later stage sees the data exactly as the earlier one did.
    """
    if start is None:
        if columns.patient is None or columns.time is None:
            raise FmcibError("the patient and time columns are needed when training from scratch",
                             cli="--patient-col and --time-col are needed when training from scratch")
        sequences, record = read_sequences(
            table, columns.patient, columns.time, None if columns.clinical is None else list(columns.clinical),
            columns.clinical_prefix, None if columns.image is None else list(columns.image))
        di, dc = len(record["columns"]["image"]), len(record["columns"]["clinical"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = LongitudinalEncoder(di, dc, **dataclasses.asdict(architecture))
        return sequences, record, encoder, None
    config, encoder = load_longitudinal(start)
    cols = config["columns"]
    sequences, record = read_sequences(table, columns.patient or cols["patient"], columns.time or cols["time"],
                                       cols["clinical"], None, cols["image"], normalisation=config["normalisation"])
    return sequences, record, encoder.train(), config


def _provenance(start: str | os.PathLike | None, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a stage started from: the folder and its training record (method, table, data description)."""
    if config is None:
        return None
    train = config.get("training", {})
    return {"folder": str(start), "method": train.get("method"), "table": train.get("table"),
            "data_description": train.get("data_description"), "started_from": train.get("started_from")}


def stage_config(table: str | os.PathLike | pd.DataFrame, encoder: LongitudinalEncoder, record: dict[str, Any],
                 sequences: Sequences, *, method: str, summary: str, settings: TrainingConfig,
                 history: list[dict[str, Any]], start: str | os.PathLike | None, started: dict[str, Any] | None,
                 data_description: str | None, labels: str | None = None, **details: Any) -> dict[str, Any]:
    """The ``config.json`` of a trained longitudinal folder: architecture, columns and normalisation, and the
    training record (method, data, settings, what it started from, last epoch's metrics)."""
    name = "table" if isinstance(table, pd.DataFrame) else f"{table}"
    return {"fmcib_model": MODEL_KIND, "model_args": encoder.args(), **record,
            "training": {"method": method, "table": name, "patients": len(sequences.patients),
                         "tokens": int(sequences.valid.sum()), **details, "settings": settings.to_dict(),
                         "started_from": _provenance(start, started), "summary": summary, "labels": labels,
                         "data_description": data_description or f"Patients of {name} (no description was given)",
                         "final_metrics": history[-1] if history else {},
                         "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}}


def pretrain_longitudinal(
    table: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    columns: TableColumns = TableColumns(),
    start: str | os.PathLike | None = None,
    architecture: Architecture = Architecture(),
    mask_ratio: float = 0.15,
    sigreg_lambda: float = 0.0,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_epochs: float = 5.0,
    data_description: str | None = None,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain the multimodal longitudinal JEPA on a long table; writes ``config.json``, ``model.safetensors``
    (the context encoder), ``metrics.csv`` and a model card to ``out_dir``; returns the config record.

    ``columns`` (:class:`TableColumns`) say which columns are what; ``start`` continues from a trained folder
    (its columns, normalisation and weights), otherwise a random encoder of ``architecture``
    (:class:`Architecture`; ``time_attention``: :class:`TimeDistanceBlock`)."""
    context = init_distributed(device)
    out = Path(out_dir)
    sequences, record, encoder, started = prepare_longitudinal(table, start, columns, architecture, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LongitudinalJEPA(encoder)
    task = LongitudinalTask(model, sigreg_lambda, seed=seed, context=context)
    settings = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw", weight_decay=weight_decay,
                              warmup_epochs=warmup_epochs, seed=seed)
    result = Trainer(task, settings, out, device=context.device, progress=progress).fit(
        _PatientDataset(sequences, mask_ratio, seed), _PatientDataset(sequences, 0.0, seed), resume=resume)
    summary = (f"{mask_ratio:.0%} of each patient's tokens hidden and predicted in latent space against an EMA "
               f"target; SIGReg weight {sigreg_lambda:g}.")
    config = stage_config(table, encoder, record, sequences, method="longitudinal-jepa", summary=summary,
                          settings=settings, history=result.history, start=start, started=started,
                          data_description=data_description, mask_ratio=mask_ratio, sigreg_lambda=sigreg_lambda)
    if context.is_main:
        save_longitudinal(out, config, best_weights(out, "encoder")["encoder"])
    context.barrier()
    return config


def save_longitudinal(out_dir: str | os.PathLike, config: dict[str, Any], encoder_state: dict[str, torch.Tensor],
                      head_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a longitudinal folder atomically: ``model.safetensors``, ``head.safetensors`` (fine-tuned
    models), ``config.json`` and the model card (last, so a folder with a card is complete)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file({k: v.contiguous() for k, v in encoder_state.items()}, str(tmp))
    if head_state is not None:
        with atomic_path(out / HEAD_NAME) as tmp:
            save_file({k: v.contiguous() for k, v in head_state.items()}, str(tmp))
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=1, default=_plain))
    _write_card(out, config)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def _write_card(out: Path, config: dict[str, Any]) -> None:
    train, cols, args = config["training"], config["columns"], config["model_args"]
    health = ", ".join(f"{k[5:]} {v:.4g}" for k, v in train["final_metrics"].items()
                       if k.startswith("tune_") and isinstance(v, (int, float)))
    chain, origin = [], train.get("started_from")
    while origin:
        chain.append(f"{origin['method']} (`{origin['folder']}`, table `{origin['table']}`: "
                     f"{origin['data_description']})")
        origin = origin.get("started_from")
    labels = train.get("labels")
    lines = ["---", "library_name: fmcib", "tags: [medical-imaging, longitudinal, jepa]", "---", "",
             f"# Multimodal longitudinal encoder ({train['method']})", "", "## Training data",
             f"- {train['data_description']}",
             f"- Table `{train['table']}`: {train['patients']} patients, {train['tokens']} tokens; image columns: "
             f"{len(cols['image'])}, clinical columns: {cols['clinical']}; "
             + (f"labels: column `{labels}`." if labels else "no labels were used."),
             *(f"- Started from {step}." for step in chain), "",
             "## Method and settings", f"- {train['summary']}",
             f"- Width {args['width']}, depth {args['depth']}; {train['settings']['epochs']} epochs, batch "
             f"{train['settings']['batch_size']}, AdamW lr {train['settings']['lr']:g}; last epoch: "
             f"{health or 'n/a'}.", "",
             "## Use", "```bash",
             f"fmcib embed --table long.csv --model . --out embeddings.parquet  # columns {cols['patient']}, "
             f"{cols['time']}, the same feature columns",
             *(["fmcib predict --table long.csv --model . --out predictions.csv"] if labels else []), "```", "",
             "Research use only; not a medical device.", ""]
    with atomic_path(out / CARD_NAME) as tmp:
        tmp.write_text("\n".join(lines))


def load_longitudinal(folder: str | os.PathLike) -> tuple[dict[str, Any], LongitudinalEncoder]:
    """A trained folder's config and its encoder (strictly loaded, eval mode)."""
    path = Path(folder)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FmcibError(f"'{path}' is not a longitudinal model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("fmcib_model") != MODEL_KIND:
        raise FmcibError(f"'{path / CONFIG_NAME}' is not a multimodal longitudinal model (fmcib pretrain "
                         "jepa-multimodal writes one)")
    from safetensors.torch import load_file

    encoder = LongitudinalEncoder(**config["model_args"])
    encoder.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
    return config, encoder.eval()


def embed_patients(table: str | os.PathLike | pd.DataFrame, model: str | os.PathLike,
                   per_time: bool = False, batch_size: int = 256) -> pd.DataFrame:
    """Embeddings of a long table's patients by a trained folder: one row per patient (``emb_*`` columns),
    or with ``per_time`` one per time point (the mean of that time point's token outputs). The table needs
    the columns the model was trained with; it is standardised with the model's own statistics."""
    config, encoder = load_longitudinal(model)
    cols = config["columns"]
    sequences, _ = read_sequences(table, cols["patient"], cols["time"], cols["clinical"], None, cols["image"],
                                  normalisation=config["normalisation"])
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(sequences.patients), batch_size):
            batch = sequences.batch(start, start + batch_size)
            outputs.append(encoder.encode(encoder.embed(batch), batch["valid"], batch["months"]) if per_time
                           else encoder(batch))
    values = torch.cat(outputs).numpy()
    width = values.shape[-1]
    names = [f"{EMBEDDING_PREFIX}{j}" for j in range(width)]
    if not per_time:
        frame = pd.DataFrame(values, columns=names)
        frame.insert(0, cols["patient"], sequences.patients)
        return frame
    rows = []
    for i, patient in enumerate(sequences.patients):
        valid = sequences.valid[i]
        for t in pd.unique(sequences.time_point[i][valid]):
            pick = valid & (sequences.time_point[i] == t)
            rows.append([patient, t, *values[i][pick].mean(axis=0)])
    return pd.DataFrame(rows, columns=[cols["patient"], cols["time"], *names])
