"""Contrastive alignment of a longitudinal encoder's image and clinical embeddings (a CLIP-style stage).

Each epoch draws, for every patient, one time point that has both an image and a clinical token. The encoder
reads each of the two tokens alone and without its time code: both modalities share the visit schedule, and
with it (or with each side's history of visits) pairs could be matched by their dates instead of their
content. The two outputs go through their own projection heads, and a symmetric NT-Xent (CLIP's loss, both
directions) pulls each patient's pair together against the other patients of the global batch; the temporal
context is what the JEPA stage learns. Runs alone from a random encoder or after the JEPA stage (``start``);
the folder keeps the encoder (the projection heads are dropped), so ``fmcib embed`` and later stages read it
as any other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..distributed import DistributedContext, gather_with_grad, init_distributed
from .engine import Trainer, TrainingConfig, TrainingTask
from .folders import best_weights
from .longitudinal import (
    Architecture,
    LongitudinalEncoder,
    Sequences,
    TableColumns,
    prepare_longitudinal,
    save_longitudinal,
    stage_config,
)
from .monitors import feature_health

__all__ = ["AlignmentModel", "AlignmentTask", "align_longitudinal", "symmetric_nt_xent"]


def symmetric_nt_xent(image: torch.Tensor, clinical: torch.Tensor, temperature: float = 0.1,
                      valid: torch.Tensor | None = None, context: DistributedContext | None = None) -> torch.Tensor:
    """CLIP's loss: row ``i`` of ``image`` should pick row ``i`` of ``clinical`` among the global batch's rows,
    and the other way round; the mean of both cross-entropies over the valid pairs.

    ``valid`` ``(n,)`` marks rows that hold a pair (the others are neither anchors nor candidates). Under
    torchrun the candidates are gathered from every rank with gradients, and the value is scaled so that
    DDP's averaged gradient equals the single-process gradient of the whole global batch.
    """
    zi, zc = F.normalize(image.float(), dim=1), F.normalize(clinical.float(), dim=1)
    n = zi.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=zi.device) if valid is None else valid.bool()
    all_i, all_c = gather_with_grad(zi, context), gather_with_grad(zc, context)
    all_valid = gather_with_grad(valid.float(), context).detach() > 0.5
    distributed = context is not None and context.distributed
    offset = context.rank * n if distributed else 0
    target = torch.arange(n, device=zi.device) + offset
    count = all_valid.sum()
    if not bool(valid.any()):  # through the gathered tensors: every rank takes part in their backward
        return (all_i.sum() + all_c.sum()) * 0.0
    excluded = torch.where(all_valid, 0.0, float("-inf"))
    to_clinical = zi[valid] @ all_c.T / temperature + excluded
    to_image = zc[valid] @ all_i.T / temperature + excluded
    total = F.cross_entropy(to_clinical, target[valid], reduction="sum") + \
        F.cross_entropy(to_image, target[valid], reduction="sum")
    world = context.world_size if distributed else 1
    return total * world / (2 * count)


def _head(width: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))


class AlignmentModel(nn.Module):
    """A longitudinal encoder with an image and a clinical projection head."""

    def __init__(self, encoder: LongitudinalEncoder, dim: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_head = _head(encoder.width, dim)
        self.clinical_head = _head(encoder.width, dim)

    def forward(self, batch: dict[str, torch.Tensor], pair: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Patient embeddings; with ``pair`` ``(N, 2)`` (image and clinical token positions of one time point),
        the projected embeddings of those two tokens, each encoded alone and without its time code."""
        if pair is None:
            return self.encoder(batch)
        tokens = self.encoder.embed({**batch, "months": torch.zeros_like(batch["months"])})
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        alone = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        image, clinical = (self.encoder.encode(tokens[rows, pair[:, column]][:, None], alone)[:, 0]
                           for column in (0, 1))
        return self.image_head(image), self.clinical_head(clinical)


class _PairDataset(Dataset):
    """Patients with one (image, clinical) pair of the same time point drawn from ``(seed, epoch, index)``;
    ``has_pair`` is False for a patient without one."""

    def __init__(self, sequences: Sequences, seed: int = 0) -> None:
        self.sequences, self.seed, self.epoch = sequences, int(seed), 0
        self.pairs = [sequences.pairs(i) for i in range(len(sequences))]

    def __len__(self) -> int:
        return len(self.sequences)

    def set_epoch(self, epoch: int) -> None:
        """Select the pairs of ``epoch``."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.sequences.item(index)
        pairs = self.pairs[index]
        choice = pairs[np.random.default_rng([self.seed, 13, self.epoch, int(index)]).integers(len(pairs))] \
            if pairs else (0, 0)
        item["pair"] = torch.tensor(choice, dtype=torch.int64)
        item["has_pair"] = torch.tensor(bool(pairs))
        return item


class AlignmentTask(TrainingTask):
    """Symmetric NT-Xent over the global batch; each epoch, image-to-clinical retrieval (top-1 accuracy and the
    mean rank fraction of the true partner, 0.5 at chance) and embedding health."""

    monitor = None  # self-supervised: the last epoch is kept

    def __init__(self, model: AlignmentModel, temperature: float = 0.1,
                 context: DistributedContext | None = None) -> None:
        self.model, self.temperature, self.context = model, float(temperature), context

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        image, clinical = model(batch, batch["pair"])
        return symmetric_nt_xent(image, clinical, self.temperature, batch["has_pair"], self.context)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        pooled, images, clinicals = [], [], []
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            pooled.append(model.encoder(batch).float().cpu())
            image, clinical = model(batch, batch["pair"])
            images.append(image[batch["has_pair"]].float().cpu())
            clinicals.append(clinical[batch["has_pair"]].float().cpu())
        zi, zc = torch.cat(images), torch.cat(clinicals)
        from .jepa import JEPA_COLLAPSE_THRESHOLDS

        metrics = feature_health(torch.cat(pooled), thresholds=JEPA_COLLAPSE_THRESHOLDS, who="alignment")
        if len(zi):
            similarity = F.normalize(zi, dim=1) @ F.normalize(zc, dim=1).T
            true = similarity.diagonal()[:, None]
            metrics["retrieval_top1"] = float((similarity.argmax(dim=1) == torch.arange(len(zi))).float().mean())
            metrics["retrieval_chance"] = 1.0 / len(zi)
            # rank of the true partner among all candidates, as a fraction: 0 perfect, about 0.5 at chance
            metrics["retrieval_rank"] = float((similarity > true).float().sum(dim=1).mean() / max(len(zi) - 1, 1))
            metrics["loss"] = float(symmetric_nt_xent(zi, zc, self.temperature))
        return metrics


def align_longitudinal(
    table: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    start: str | os.PathLike | None = None,
    columns: TableColumns = TableColumns(),
    architecture: Architecture = Architecture(),
    temperature: float = 0.1,
    projection_dim: int = 64,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.0,
    warmup_epochs: float = 2.0,
    data_description: str | None = None,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Align the image and clinical embeddings of each patient and time point (CLIP-style, see the module
    docstring); writes the encoder folder to ``out_dir`` and returns its config record.

    ``start``: a longitudinal folder to continue from (e.g. the JEPA stage; its columns, normalisation and
    weights); without it, a random encoder of ``architecture`` on ``columns`` (see
    :class:`~fmcib.training.longitudinal.TableColumns`). Patients
    with no time point holding both modalities take part in no pair.
    """
    context = init_distributed(device)
    out = Path(out_dir)
    sequences, record, encoder, started = prepare_longitudinal(table, start, columns, architecture, seed)
    if not record["columns"]["image"] or not record["columns"]["clinical"]:
        from ..exceptions import FmcibError

        raise FmcibError("alignment needs both image feature and clinical columns; the table has "
                         f"{len(record['columns']['image'])} image and {len(record['columns']['clinical'])} clinical")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = AlignmentModel(encoder, projection_dim)
    settings = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw", weight_decay=weight_decay,
                              warmup_epochs=warmup_epochs, seed=seed)
    dataset = _PairDataset(sequences, seed)
    paired = sum(bool(p) for p in dataset.pairs)
    result = Trainer(AlignmentTask(model, temperature, context), settings, out, device=context.device,
                     progress=progress).fit(dataset, _PairDataset(sequences, seed), resume=resume)
    summary = (f"Symmetric NT-Xent (CLIP) at temperature {temperature:g} between the image and clinical embeddings "
               f"of the same patient and time point ({paired} of {len(sequences)} patients have such a pair), each "
               f"token encoded alone without its time code; projection heads to {projection_dim} dimensions, "
               "dropped on save.")
    config = stage_config(table, encoder, record, sequences, method="alignment", summary=summary, settings=settings,
                          history=result.history, start=start, started=started, data_description=data_description,
                          temperature=temperature, paired_patients=paired)
    if context.is_main:
        save_longitudinal(out, config, best_weights(out, "encoder")["encoder"])
    context.barrier()
    return config
