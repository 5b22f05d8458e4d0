"""SimCLR for CT lesions, as in Pai et al.: contrast two views of each lesion against every other lesion of the
global batch and against random patches from elsewhere in the same scans.

- **Positives**: two augmented views of the patch around the same seed (the training engine's MONAI
  augmentations on the model's own contract: flips, 90-degree and small rotations, random resized crops,
  shifts, intensity and histogram shifts, noise, blur).
- **Negatives**: the other lesions' views in the global batch, plus ``random_negatives`` patches per lesion
  sampled at random in its scan, inside the body (mean intensity above ``BODY_HU``) and away from every
  seed of that scan (:func:`background_points`). Random patches only act as negatives, never as anchors.
- **Loss**: NT-Xent (normalised temperature-scaled cross-entropy, temperature 0.1 by default) on the
  output of a projection head ``D -> D/2 -> 128`` (4096 -> 2048 -> 128 for the paper's encoder). Under
  ``torchrun`` the embeddings are gathered across ranks with their gradients (:func:`nt_xent`), so the
  loss and its gradient are those of the global batch.
- **Output**: the encoder alone (the projection head is dropped) in fmcib's Hub layout with a model card
  that names the data; ``fmcib extract --weights DIR`` uses it.
- **Health**: each epoch, :mod:`~fmcib.training.monitors` figures on a fixed set of lesions go to
  ``metrics.csv``, and a collapse is logged as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..distributed import DistributedContext, gather_with_grad, init_distributed, on_main_process
from ..models import build_model
from ..preprocessing import PreprocessConfig
from ..scans import plan_scans
from ..tables import SERIES_COLUMN, load_seed_table
from .crops import StoredCrops, read_crops
from .data import Augmentation, PatchDataset, report_unreadable
from .engine import Trainer, TrainingConfig, TrainingTask
from .folders import best_weights, starting_point, write_trained_folder
from .monitors import collapse_warning, embedding_health

__all__ = ["SimCLRModel", "SimCLRTask", "ContrastiveViews", "PretrainResult", "nt_xent", "projection_head",
           "background_points", "pretrain_simclr", "SIMCLR_AUGMENTATION", "BODY_HU"]

logger = logging.getLogger(__name__)

# The paper's CT augmentations in place of colour jitter.
SIMCLR_AUGMENTATION = Augmentation(translate_voxels=4, flip=True, rotate90=True, rotate_degrees=10.0, scale=0.15,
                                   intensity_shift_hu=40.0, noise_hu=15.0, histogram_shift=True, blur_sigma=1.0)
# A random patch whose mean is below this (HU) is mostly air: outside the body, not a useful negative.
BODY_HU = -500.0


def projection_head(num_features: int, out_features: int = 128) -> nn.Sequential:
    """SimCLR's projection MLP: ``D -> D/2`` (BatchNorm, ReLU) ``-> out_features``; dropped after training."""
    hidden = max(num_features // 2, out_features)
    return nn.Sequential(nn.Linear(num_features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features))


class SimCLRModel(nn.Module):
    """Encoder + projection head; ``forward`` gives the projections (the embeddings the loss compares)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.projector(self.encoder(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, negatives: torch.Tensor | None = None, temperature: float = 0.1,
            context: DistributedContext | None = None) -> torch.Tensor:
    """NT-Xent of this rank's ``n`` pairs against the global batch (mean over its ``2n`` anchors).

    Each view's positive is the other view of its lesion; its negatives are every other view of the global
    batch and every extra ``negatives`` row (random patches, gathered from all ranks too). With DDP's
    gradient averaging the update equals the single-process update on the whole global batch (every rank
    must hold the same ``n``: the trainer drops last partial batches under torchrun).
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    all1, all2 = gather_with_grad(z1, context), gather_with_grad(z2, context)
    total = all1.shape[0]
    candidates = [all1, all2]
    if negatives is not None and negatives.numel():
        candidates.append(gather_with_grad(F.normalize(negatives.float(), dim=1), context))
    candidates_ = torch.cat(candidates, dim=0)
    anchors = torch.cat([z1, z2], dim=0)
    logits = anchors @ candidates_.T / temperature
    offset = (context.rank if context is not None and context.distributed else 0) * n
    own = torch.arange(n, device=z1.device) + offset
    self_index = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    logits[torch.arange(2 * n, device=z1.device), self_index] = float("-inf")
    return F.cross_entropy(logits, positive)


class ContrastiveViews(Dataset):
    """Two augmented views of each lesion and one view of each of its random negative patches.

    Item ``i``: ``{"input": view 1, "view2": view 2, "negatives": (K, channels, z, y, x), "row": table row}``;
    the two views and the negatives draw from independent streams of ``(seed, epoch, index)``.
    """

    def __init__(self, crops: np.ndarray, config: PreprocessConfig, augmentation: Augmentation,
                 negatives: np.ndarray | None = None, rows: Any = None, margin: int | None = None,
                 seed: int = 0) -> None:
        self.views = [PatchDataset(crops, config, rows=rows, augmentation=augmentation, margin=margin,
                                   seed=seed * 3 + k) for k in range(2)]
        self.k = 0 if negatives is None else int(negatives.shape[1])
        self.negatives = None if not self.k else PatchDataset(
            negatives.reshape(-1, *negatives.shape[2:]), config, augmentation=augmentation, margin=margin,
            seed=seed * 3 + 2)

    def __len__(self) -> int:
        return len(self.views[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        for part in (*self.views, self.negatives):
            if part is not None:
                part.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        first, second = (v[index] for v in self.views)
        item = {"input": first["input"], "view2": second["input"], "row": first["row"]}
        if self.negatives is not None:
            item["negatives"] = torch.stack([self.negatives[index * self.k + j]["input"] for j in range(self.k)])
        return item


class SimCLRTask(TrainingTask):
    """NT-Xent on the projections; each epoch, embedding health on a fixed set of lesions (``tune_*``)."""

    monitor = None  # self-supervised: the last epoch is kept

    def __init__(self, model: SimCLRModel, temperature: float = 0.1, context: DistributedContext | None = None) -> None:
        self.model = model
        self.temperature = float(temperature)
        self.context = context
        self._previous_std: float | None = None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:  # noqa: D102
        views = [batch["input"], batch["view2"]]
        k = 0
        if "negatives" in batch:
            negs = batch["negatives"]
            k = negs.shape[1]
            views.append(negs.reshape(-1, *negs.shape[2:]))
        z = model(torch.cat(views))  # one pass: BatchNorm sees lesions and background together
        n = batch["input"].shape[0]
        return nt_xent(z[:n], z[n:2 * n], z[2 * n:] if k else None, self.temperature, self.context)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:  # noqa: D102
        feats, proj, proj2 = [], [], []
        for batch in loader:
            f = model.encoder(batch["input"].to(device))
            feats.append(f.float().cpu())
            proj.append(model.projector(f).float().cpu())
            proj2.append(model(batch["view2"].to(device)).float().cpu())
        # collapse is judged on the projections the loss compares (encoder features come after a ReLU: all
        # positive, so their cosines are high even when healthy); the features' effective rank is reported too
        p1, p2 = torch.cat(proj), torch.cat(proj2)
        metrics = embedding_health(p1, p2)
        metrics["feature_rankme"] = embedding_health(torch.cat(feats))["rankme"]
        metrics["loss"] = float(nt_xent(p1, p2, temperature=self.temperature))
        warning, previous = collapse_warning(metrics), self._previous_std
        self._previous_std = metrics["std"]
        if warning and previous is None:
            logger.info("SimCLR: after the first epoch %s; a random-init start begins this way, and the embeddings "
                        "should spread from here", warning.split(":")[0].replace("are collapsing", "are collapsed"))
        elif warning and metrics["std"] <= previous * 1.05:  # collapsed and not spreading out again
            logger.warning("SimCLR: %s", warning)
        return metrics


def background_points(table: pd.DataFrame, per_lesion: int, config: PreprocessConfig, seed: int = 0,
                      base_dir: str | os.PathLike | None = None, rows: Any = None, oversample: int = 4,
                      coords: str = "lps", name: str = "table") -> pd.DataFrame:
    """Candidate random patches for each lesion: uniform in its scan (the patch inside the image where the
    image is large enough) and farther than half a patch width from every seed of the scan, so the random
    patch's centre lies outside every lesion patch. ``oversample`` candidates per wanted patch:
    :func:`pretrain_simclr` keeps the first that lie in the body. Columns: ``image_path``
    (+ ``SeriesInstanceUID``), ``coordX/Y/Z`` (LPS mm), ``lesion`` (table row).
    """
    from ..io import open_scan
    from ..seeds import to_lps

    rng = np.random.default_rng(seed)
    half_mm = np.asarray(config.size_xyz, float) * np.asarray(config.spacing_xyz, float) / 2
    keep_away = float(half_mm.max())  # the random patch's centre lies outside every lesion patch
    out: list[dict[str, Any]] = []
    for task in plan_scans(table, base_dir=base_dir, rows=rows, name=name):
        try:
            geometry = open_scan(task.image, task.series_uid).geometry
        except Exception:  # noqa: BLE001 - an unreadable scan is reported when its crops are read
            continue
        seeds = np.array([to_lps(s.point, coords, geometry) for s in task.seeds if s.point is not None])
        size, spacing = np.asarray(geometry.size, float), np.asarray(geometry.spacing, float)
        border = np.minimum(half_mm / spacing, (size - 1) / 2)
        for s in task.seeds:
            found = 0
            for _ in range(50 * per_lesion * oversample):  # bounded: a scan may be mostly lesion
                if found == per_lesion * oversample:
                    break
                index = rng.uniform(border, size - 1 - border)
                point = np.asarray(geometry.TransformContinuousIndexToPhysicalPoint(index.tolist()))
                if len(seeds) and np.min(np.linalg.norm(seeds - point, axis=1)) < keep_away:
                    continue
                row = {"image_path": task.image, "coordX": point[0], "coordY": point[1], "coordZ": point[2],
                       "lesion": s.row}
                if task.series_uid is not None:
                    row[SERIES_COLUMN] = task.series_uid
                out.append(row)
                found += 1
    return pd.DataFrame(out, columns=["image_path", "coordX", "coordY", "coordZ", "lesion",
                                      *([SERIES_COLUMN] if any(SERIES_COLUMN in r for r in out) else [])])


def _negative_crops(table: pd.DataFrame, lesion_rows: np.ndarray, lesion_crops: np.ndarray, per_lesion: int,
                    contract: PreprocessConfig, margin: int, seed: int, base_dir: Any, coords: str, name: str,
                    store: str | os.PathLike | None = None, context: DistributedContext | None = None,
                    ) -> tuple[np.ndarray, int]:
    """``(n, per_lesion, ...)`` crops of random body patches for each lesion (the next lesion's crop stands in
    where a scan offers too few); and how many were found. With a crop ``store`` the candidates are read into
    ``store/random-patches`` and the result is a memory-mapped file of the store that rank 0 writes."""
    context = context or DistributedContext()
    candidates = background_points(table, per_lesion, contract, seed, base_dir, rows=lesion_rows.tolist(),
                                   coords=coords, name=name)
    n = len(lesion_crops)
    chosen = np.full((n, per_lesion), -1)  # the candidate crop taken, or -1: the next lesion stands in
    cand_crops = lesion_crops[:0]
    if not candidates.empty:
        cand_rows, cand_crops, _ = read_crops(candidates, contract, margin=margin, coords="lps", name="random patches",
                                              store=None if store is None else Path(store) / "random-patches",
                                              context=context)
        z, y, x = cand_crops.shape[1:]
        hu = np.concatenate([contract.to_hu(cand_crops[i:i + 256, margin:z - margin, margin:y - margin,
                                                       margin:x - margin].mean(axis=(1, 2, 3)))
                             for i in range(0, len(cand_crops), 256)]) if len(cand_crops) else np.zeros(0)
        body = hu > BODY_HU  # the patch itself, not the margin around it
        position = {int(r): i for i, r in enumerate(lesion_rows)}
        taken = np.zeros(n, int)
        for crop_index, cand_index in enumerate(cand_rows):
            lesion = position[int(candidates["lesion"].iloc[cand_index])]
            if body[crop_index] and taken[lesion] < per_lesion:
                chosen[lesion, taken[lesion]] = crop_index
                taken[lesion] += 1
    others = np.roll(np.arange(n), -1)

    def fill(target: np.ndarray) -> np.ndarray:
        for lesion in range(n):
            for k in range(per_lesion):
                c = chosen[lesion, k]
                target[lesion, k] = cand_crops[c] if c >= 0 else lesion_crops[others[lesion]]
        return target

    shape = (n, per_lesion, *lesion_crops.shape[1:])
    found = int((chosen >= 0).sum())
    if store is None:
        return fill(np.empty(shape, np.float32)), found
    path = Path(store) / "random-negatives.f32"

    def write() -> None:
        fill(np.memmap(path, np.float32, mode="w+", shape=shape)).flush()

    on_main_process(write, context)
    return StoredCrops(path, np.float32, mode="r", shape=shape), found


@dataclass
class PretrainResult:
    """What :func:`pretrain_simclr` leaves: the folder, the per-epoch history and the data counts."""

    out_dir: Path
    history: list[dict[str, Any]]
    counts: dict[str, int]


def pretrain_simclr(
    table: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    model: str = "resnet50_3d.random",
    weights: str | os.PathLike | None = None,
    epochs: int = 100,
    batch_size: int = 32,
    temperature: float = 0.1,
    random_negatives: int = 1,
    projection_dim: int = 128,
    lr: float = 0.3,
    optimizer: Literal["sgd", "adamw", "lars"] = "lars",
    weight_decay: float = 1e-6,
    warmup_epochs: float = 10.0,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    augmentation: Augmentation = SIMCLR_AUGMENTATION,
    monitor_samples: int = 256,
    data_description: str | None = None,
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
) -> PretrainResult:
    """Pretrain an encoder with SimCLR on the lesions of a seeds table (no labels needed).

    Parameters
    ----------
    table : path or DataFrame
        A seeds table as for :func:`fmcib.extract_features`; extra columns are ignored.
    out_dir : path
        The folder written (fmcib's Hub layout, encoder only, with a model card).
    model, weights
        Architecture and starting weights: ``resnet50_3d.random`` (the paper's encoder, random init) by
        default, a registered model's published weights, or a local folder (continue pretraining).
    epochs, batch_size, lr, optimizer, weight_decay, warmup_epochs, accumulate, clip_grad_norm, precision,
    num_workers, seed
        See :class:`~fmcib.training.TrainingConfig` (batch size per process; LARS, warm-up then cosine as in
        the paper).
    temperature : float
        NT-Xent temperature.
    random_negatives : int
        Random patches per lesion from elsewhere in its scan, used as extra negatives (0: none).
    projection_dim : int
        Output width of the projection head.
    augmentation : Augmentation
        Default: :data:`SIMCLR_AUGMENTATION`.
    monitor_samples : int
        Lesions on which the embedding health is measured every epoch.
    data_description : str, optional
        What the lesions are (cohort, sites, scanner, licence); written to the model card. Default: a line
        naming the table.
    device : str, optional
        Default: CUDA (``cuda:<LOCAL_RANK>`` under torchrun), MPS, CPU.
    resume : bool
        Continue the run in ``out_dir`` from its last checkpoint.
    coords, patch_size, spacing_mm
        As for extraction; the folder records the contract trained with.
    crop_store : folder, optional
        Keep the training crops on disk, memory-mapped, instead of in every process's memory (pools too
        large for it; see :mod:`fmcib.training.crops`). A store made for the same rows, files and contract
        is reused; under torchrun the processes share it.
    """
    context = init_distributed(device)
    out = Path(out_dir)
    df, table_dir, name = load_seed_table(table)
    resolved, contract, config = starting_point(model, weights, True, patch_size, spacing_mm)
    margin = augmentation.margin(contract)
    rows, crops, errors = read_crops(df, contract, margin=margin, coords=coords, base_dir=table_dir,
                                     num_workers=num_workers, name=name, store=crop_store, context=context)
    report_unreadable(errors, context.is_main)
    if len(rows) < 2:
        raise ValueError(f"{name}: SimCLR needs at least 2 readable lesions, found {len(rows)}")
    negatives, found = None, 0
    if random_negatives:
        negatives, found = _negative_crops(df, rows, crops, random_negatives, contract, margin, seed, table_dir,
                                           coords, name, store=crop_store, context=context)
        wanted = len(rows) * random_negatives
        if found < wanted and context.is_main:
            logger.warning("%s: %d of %d random negative patches found in the body; other lesions stand in for "
                           "the rest", name, found, wanted)
    train_set = ContrastiveViews(crops, contract, augmentation, negatives, rows=rows, margin=margin, seed=seed)
    pick = np.random.default_rng(seed).permutation(len(rows))[:max(2, monitor_samples)]
    monitor_set = ContrastiveViews(crops[np.sort(pick)], contract, augmentation, rows=rows[np.sort(pick)],
                                   margin=margin, seed=seed + 7919)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_model(resolved, device="cpu").train()
        num_features = resolved.config.num_features
        network = SimCLRModel(encoder, projection_head(num_features, projection_dim))
    settings = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                              weight_decay=weight_decay, warmup_epochs=warmup_epochs, accumulate=accumulate,
                              clip_grad_norm=clip_grad_norm, precision=precision, seed=seed, num_workers=num_workers)
    task = SimCLRTask(network, temperature, context)
    result = Trainer(task, settings, out, device=context.device, progress=progress).fit(train_set, monitor_set,
                                                                                         resume=resume)
    counts = {"rows": len(df), "lesions": len(rows), "scans": len(plan_scans(df, base_dir=table_dir, name=name)),
              "unreadable": len(errors), "random_negatives_found": found}
    if context.is_main:
        description = data_description or f"Lesions of the seeds table {name} (no description was given)"
        record = {"training": {
            "method": "simclr", "started_from": resolved.record(), "base_model": resolved.config.name,
            "table": name, "data_description": description, "counts": counts, "settings": settings.to_dict(),
            "temperature": temperature, "random_negatives": random_negatives,
            "projection": [num_features, max(num_features // 2, projection_dim), projection_dim],
            "augmentation": dataclasses.asdict(augmentation), "monitor_samples": len(monitor_set),
            "final_metrics": result.history[-1] if result.history else {}}}
        write_trained_folder(out, config, f"{resolved.config.name.split('.')[0]}.simclr",
                             f"{resolved.config.architecture} encoder pretrained with SimCLR on {len(rows)} lesions "
                             f"({name})", best_weights(out, "encoder")["encoder"], record)
    context.barrier()
    return PretrainResult(out, result.history, counts)
