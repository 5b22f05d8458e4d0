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

from ..distributed import init_distributed
from ..exceptions import FmcibError, TableError
from ..files import atomic_path, read_table
from ..models.vit3d import Block
from ..tables import FEATURE_PREFIX
from .engine import Trainer, TrainingConfig, TrainingTask
from .optim import ema_update
from .monitors import feature_health
from .regularizers import sigreg, slice_generator

__all__ = ["Sequences", "read_sequences", "LongitudinalEncoder", "LongitudinalJEPA", "LongitudinalTask",
           "pretrain_longitudinal", "load_longitudinal", "embed_patients", "EMBEDDING_PREFIX"]

logger = logging.getLogger(__name__)

EMBEDDING_PREFIX = "emb_"
IMAGE, CLINICAL = 0, 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
DAYS_PER_MONTH = 30.4375


@dataclass
class Sequences:
    """Patients as padded token sequences (``P`` patients, ``L`` tokens at most).

    ``image`` ``(P, L, Di)`` and ``clinical`` ``(P, L, Dc)`` standardised values (zero where the token is of
    the other modality or padding), ``modality`` ``(P, L)`` (0 image, 1 clinical), ``months`` ``(P, L)``
    before the patient's latest time point, ``valid`` ``(P, L)``, ``time_point`` ``(P, L)`` (the token's
    time value as in the table), and ``patients`` (ids in table order).
    """

    patients: list[Any]
    image: np.ndarray
    clinical: np.ndarray
    modality: np.ndarray
    months: np.ndarray
    valid: np.ndarray
    time_point: np.ndarray

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
                    np.zeros((n, length), np.float64))
    for i, (_, seq) in enumerate(keep):
        latest = max(months[r] for r, _ in seq)
        for j, (r, m) in enumerate(seq):
            if m == IMAGE:
                out.image[i, j] = scaled["image"][r]
            else:
                out.clinical[i, j] = np.nan_to_num(scaled["clinical"][r])  # a missing value: the mean
            out.modality[i, j], out.months[i, j], out.valid[i, j] = m, latest - months[r], True
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


class LongitudinalEncoder(nn.Module):
    """Token embedding (per-modality projection + time code + modality embedding) and transformer blocks."""

    def __init__(self, image_dim: int, clinical_dim: int, width: int = 128, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.width = width
        self.image_proj = nn.Linear(max(image_dim, 1), width)
        self.clinical_proj = nn.Linear(max(clinical_dim, 1), width)
        self.modality = nn.Embedding(2, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

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

    def encode(self, tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Token outputs; only the ``keys`` tokens are attended to."""
        h = tokens
        for block in self.blocks:
            h = block(h, keys)
        return self.norm(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Patient embeddings ``(N, width)``: masked mean of the token outputs over the valid tokens."""
        h = self.encode(self.embed(batch), batch["valid"])
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
        seen = self.encoder.encode(tokens, valid & ~hidden)
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
    """Latent MSE at the hidden tokens against the EMA target, optional SIGReg; monitors on patient embeddings."""

    monitor = None

    def __init__(self, model: LongitudinalJEPA, sigreg_lambda: float = 0.0, ema: tuple[float, float] = (0.996, 1.0),
                 seed: int = 0) -> None:
        self.model, self.sigreg_lambda, self.ema, self.seed = model, float(sigreg_lambda), ema, int(seed)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:  # noqa: D102
        bare: LongitudinalJEPA = getattr(model, "module", model)
        hidden = batch["hidden"] & batch["valid"]
        predicted = model(batch, hidden)
        with torch.no_grad():
            wanted = bare.target.encode(bare.target.embed(batch), batch["valid"])
            wanted = F.layer_norm(wanted, wanted.shape[-1:])
        if hidden.any():
            loss = (predicted[hidden].float() - wanted[hidden].float()).square().mean()
        else:
            loss = predicted.sum() * 0.0
        if self.sigreg_lambda:
            pooled = model(batch)
            loss = (1 - self.sigreg_lambda) * loss + self.sigreg_lambda * sigreg(
                pooled, num_slices=64, generator=slice_generator(self.step, self.seed))
        return loss

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:  # noqa: D102
        ema_update(model.target, model.encoder, step, total_steps, self.ema)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:  # noqa: D102
        pooled = torch.cat([model.encoder({k: v.to(device) for k, v in batch.items()}).float().cpu()
                            for batch in loader])
        from .jepa import JEPA_COLLAPSE_THRESHOLDS

        return feature_health(pooled, thresholds=JEPA_COLLAPSE_THRESHOLDS, who="longitudinal JEPA")


def pretrain_longitudinal(
    table: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    patient_col: str,
    time_col: str,
    clinical_cols: list[str] | None = None,
    clinical_prefix: str | None = None,
    image_cols: list[str] | None = None,
    width: int = 128,
    depth: int = 2,
    heads: int = 4,
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
    (the context encoder), ``metrics.csv`` and a model card to ``out_dir``; returns the config record."""
    context = init_distributed(device)
    out = Path(out_dir)
    sequences, record = read_sequences(table, patient_col, time_col, clinical_cols, clinical_prefix, image_cols)
    di, dc = len(record["columns"]["image"]), len(record["columns"]["clinical"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = LongitudinalEncoder(di, dc, width, depth, heads)
        model = LongitudinalJEPA(encoder)
    task = LongitudinalTask(model, sigreg_lambda, seed=seed)
    settings = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw", weight_decay=weight_decay,
                              warmup_epochs=warmup_epochs, seed=seed)
    result = Trainer(task, settings, out, device=context.device, progress=progress).fit(
        _PatientDataset(sequences, mask_ratio, seed), _PatientDataset(sequences, 0.0, seed), resume=resume)
    name = "table" if isinstance(table, pd.DataFrame) else f"{table}"
    config = {"fmcib_model": "longitudinal_jepa", "model_args": {"image_dim": di, "clinical_dim": dc, "width": width,
                                                               "depth": depth, "heads": heads}, **record,
              "training": {"method": "longitudinal-jepa", "table": name, "patients": len(sequences.patients),
                           "tokens": int(sequences.valid.sum()), "mask_ratio": mask_ratio,
                           "sigreg_lambda": sigreg_lambda, "settings": settings.to_dict(),
                           "data_description": data_description or f"Patients of {name} (no description was given)",
                           "final_metrics": result.history[-1] if result.history else {},
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}}
    if context.is_main:
        from safetensors.torch import load_file, save_file

        best = load_file(str(out / "checkpoints" / "best.safetensors"))
        state = {k[len("encoder."):]: v for k, v in best.items() if k.startswith("encoder.")}
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp))
        with atomic_path(out / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(config, indent=1))
        _write_card(out, config)
    context.barrier()
    return config


def _write_card(out: Path, config: dict[str, Any]) -> None:
    train, cols = config["training"], config["columns"]
    health = ", ".join(f"{k[5:]} {v:.4g}" for k, v in train["final_metrics"].items() if k.startswith("tune_"))
    lines = ["---", "library_name: fmcib", "tags: [medical-imaging, longitudinal, self-supervised, jepa]", "---", "",
             "# Multimodal longitudinal JEPA", "", "## Training data", f"- {train['data_description']}",
             f"- Table `{train['table']}`: {train['patients']} patients, {train['tokens']} tokens; image columns: "
             f"{len(cols['image'])}, clinical columns: {cols['clinical']}; no labels were used.", "",
             "## Method and settings",
             f"- {train['mask_ratio']:.0%} of each patient's tokens hidden and predicted in latent space against an "
             f"EMA target; SIGReg weight {train['sigreg_lambda']:g}; width {config['model_args']['width']}, depth "
             f"{config['model_args']['depth']}.",
             f"- {train['settings']['epochs']} epochs, batch {train['settings']['batch_size']}, AdamW lr "
             f"{train['settings']['lr']:g}; last epoch: {health or 'n/a'}.", "",
             "## Use", "```bash",
             f"fmcib embed --table long.csv --model . --out embeddings.parquet  # columns {cols['patient']}, "
             f"{cols['time']}, the same feature columns", "```", "",
             "Research use only; not a medical device.", ""]
    with atomic_path(out / CARD_NAME) as tmp:
        tmp.write_text("\n".join(lines))


def load_longitudinal(folder: str | os.PathLike) -> tuple[dict[str, Any], LongitudinalEncoder]:
    """A trained folder's config and its encoder (strictly loaded, eval mode)."""
    path = Path(folder)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FmcibError(f"'{path}' is not a longitudinal model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("fmcib_model") != "longitudinal_jepa":
        raise FmcibError(f"'{path / CONFIG_NAME}' is not a longitudinal JEPA (fmcib pretrain jepa-multimodal "
                         "writes one)")
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
            items = [sequences.item(i) for i in range(start, min(start + batch_size, len(sequences.patients)))]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            outputs.append(encoder.encode(encoder.embed(batch), batch["valid"]) if per_time else encoder(batch))
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
