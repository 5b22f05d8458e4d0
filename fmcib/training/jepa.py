"""Image JEPA for CT patches: a 3D ViT learns by predicting, in latent space, what it cannot see.

Two modes, written from the I-JEPA / V-JEPA and LeJEPA papers (their code is under non-commercial
licences; nothing here is taken from it):

- ``"ema"`` (I-JEPA, V-JEPA): each lesion patch is cut into tokens; 3D multi-block masking
  (:func:`multiblock_mask`) picks target blocks (I-JEPA's scale and aspect ranges in 3D, or V-JEPA-style
  tubes through the whole depth) and a context (a large block minus the targets). The encoder sees the
  context tokens only; a narrow predictor, given the context and learned mask tokens at the target
  positions, predicts the target tokens that an EMA copy of the encoder makes from the whole patch
  (smooth L1 against its LayerNorm-ed outputs). The EMA momentum rises linearly from 0.996 to 1.
- ``"lejepa"`` (LeJEPA): ``views`` augmented views of each patch; the embeddings (a projector on the
  encoder's pooled features) of every view are pulled to their mean, and SIGReg
  (:func:`~fmcib.training.regularizers.sigreg`) keeps them an isotropic Gaussian:
  ``L = (1 - lambda) * mean (mu - z_v)^2 + lambda * SIGReg``. No EMA, no stop-gradient.

The folder written holds the encoder only; ``fmcib extract --weights DIR`` gives its pooled features.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..distributed import DistributedContext, init_distributed
from ..models import build_model
from ..models.vit3d import Block, sincos_positions
from ..preprocessing import PreprocessConfig
from ..scans import plan_scans
from ..tables import load_seed_table
from .crops import read_crops
from .data import Augmentation, PatchDataset, report_unreadable
from .engine import Trainer, TrainingConfig, TrainingTask
from .optim import ema_update
from .folders import best_weights, starting_point, write_trained_folder
from .monitors import feature_health
from .regularizers import sigreg, slice_generator
from .simclr import PretrainResult

__all__ = ["JEPA_COLLAPSE_THRESHOLDS", "MaskSpec", "multiblock_mask", "Predictor", "JEPAModel", "MaskedJEPATask",
           "LeJEPATask",
           "JEPAPatches", "pretrain_jepa", "JEPA_AUGMENTATION"]

logger = logging.getLogger(__name__)

# Light augmentation for the masked mode (the masking is the task); the LeJEPA views add intensity changes.
JEPA_AUGMENTATION = Augmentation(translate_voxels=4, flip=True, rotate90=True, intensity_shift_hu=30.0,
                                 noise_hu=10.0)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """3D multi-block masking (I-JEPA's ranges): ``targets`` blocks of ``target_scale`` of the token grid
    each, aspect ratios drawn in ``aspect`` (depth vs in-plane, and height vs width), and a context block
    of ``context_scale`` minus the targets. ``tube``: target blocks span the whole depth (V-JEPA-style)."""

    targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    tube: bool = False


def _block(grid: tuple[int, int, int], scale: float, aspect: tuple[float, float], rng: np.random.Generator,
           tube: bool) -> np.ndarray:
    """A boolean ``grid`` with one box of about ``scale`` of the tokens at a random place."""
    gz, gy, gx = grid
    n = max(1.0, scale * gz * gy * gx)
    a_z, a_hw = rng.uniform(*aspect), rng.uniform(*aspect)
    if tube:
        d = gz
        g = math.sqrt(n / gz)
        h, w = g * math.sqrt(a_hw), g / math.sqrt(a_hw)
    else:
        g = (n / a_z) ** (1 / 3)
        d, h, w = a_z * g, g * math.sqrt(a_hw), g / math.sqrt(a_hw)
    d, h, w = (int(np.clip(round(v), 1, size)) for v, size in zip((d, h, w), grid))
    z0, y0, x0 = (int(rng.integers(0, size - extent + 1)) for size, extent in zip(grid, (d, h, w)))
    box = np.zeros(grid, bool)
    box[z0:z0 + d, y0:y0 + h, x0:x0 + w] = True
    return box


def multiblock_mask(grid: tuple[int, int, int], spec: MaskSpec, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Context and target token masks (flat booleans over the ``z*y*x`` grid), disjoint, each non-empty."""
    targets = np.zeros(grid, bool)
    for _ in range(spec.targets):
        targets |= _block(grid, rng.uniform(*spec.target_scale), spec.aspect, rng, spec.tube)
    context = _block(grid, rng.uniform(*spec.context_scale), (1.0, 1.0), rng, False) & ~targets
    flat_t, flat_c = targets.reshape(-1), context.reshape(-1)
    if not flat_c.any():  # the targets covered the context: give one target token back
        keep = int(rng.choice(np.flatnonzero(flat_t)))
        flat_t[keep], flat_c[keep] = False, True
    if not flat_t.any():
        keep = int(rng.choice(np.flatnonzero(flat_c)))
        flat_t[keep], flat_c[keep] = True, False
    return flat_c, flat_t


def _first_k(mask: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k)`` indices of the first ``k`` True entries of each row of a boolean ``(N, T)`` mask."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return order[:, :k]


class Predictor(nn.Module):
    """I-JEPA's narrow predictor: context tokens and mask tokens (at the target positions) in, predicted
    target tokens out, through ``depth`` transformer blocks of width ``width``."""

    def __init__(self, dim: int, width: int = 96, depth: int = 2, heads: int = 3) -> None:
        super().__init__()
        self.width = width
        self.inward = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.outward = nn.Linear(width, dim)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor,
                grid: tuple[int, int, int]) -> torch.Tensor:  # noqa: D102
        pos = sincos_positions(grid, self.width).to(context.device, context.dtype)
        h = self.inward(context) + pos[context_idx]
        queries = self.mask_token.expand(target_idx.shape[0], target_idx.shape[1], -1) + pos[target_idx]
        h = torch.cat([h, queries], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.outward(self.norm(h[:, context_idx.shape[1]:]))


class JEPAModel(nn.Module):
    """The encoder being trained plus what its mode needs: ``predictor`` and an EMA ``target`` encoder
    (masked mode), or a ``projector`` (LeJEPA). One encoder is kept in the trained folder, and measured by the
    monitors: ``kept`` names it (``"target"``, as I-JEPA evaluates, or ``"encoder"``, the context encoder)."""

    def __init__(self, encoder: nn.Module, mode: Literal["ema", "lejepa"], predictor_width: int = 96,
                 predictor_depth: int = 2, projection_dim: int = 64, kept: Literal["target", "encoder"] = "encoder",
                 ) -> None:
        super().__init__()
        if kept == "target" and mode != "ema":
            raise ValueError("only the masked mode (ema) has an EMA target to keep")
        self.kept = kept
        self.encoder = encoder
        dim = int(encoder.dim)
        if mode == "ema":
            self.predictor = Predictor(dim, predictor_width, predictor_depth)
            self.target = copy.deepcopy(encoder).requires_grad_(False)
        else:
            self.projector = nn.Sequential(nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim), nn.GELU(),
                                           nn.Linear(2 * dim, projection_dim))

    def forward(self, x: torch.Tensor, context_idx: torch.Tensor | None = None, target_idx: torch.Tensor | None = None,
                project: bool = False) -> torch.Tensor:
        """Pooled features of ``x``; with ``project``, the projector's embeddings (LeJEPA); with token indices,
        the predictor's guesses of the target tokens from the context tokens (masked mode). Everything a loss
        needs goes through here, so DistributedDataParallel sees it and synchronises its gradients."""
        if context_idx is not None and target_idx is not None:
            seen = self.encoder.tokens(x, keep=context_idx)
            return self.predictor(seen, context_idx, target_idx, self.encoder.grid(x.shape))
        features = self.encoder(x)
        return self.projector(features) if project else features


class JEPAPatches(Dataset):
    """Lesion patches for JEPA: ``views`` augmented views of each (``"input"``: the first, ``"views"``: all
    ``(V, C, z, y, x)``) and, for the masked mode, context and target token masks drawn from
    ``(seed, epoch, index)`` (reproducible and resumable like the augmentations)."""

    def __init__(self, crops: np.ndarray, config: PreprocessConfig, augmentation: Augmentation | None, views: int,
                 grid: tuple[int, int, int] | None = None, mask: MaskSpec | None = None, rows: Any = None,
                 margin: int | None = None, seed: int = 0) -> None:
        self.views = [PatchDataset(crops, config, rows=rows, augmentation=augmentation, margin=margin,
                                   seed=seed * 17 + k) for k in range(views)]
        self.grid, self.mask, self.seed, self.epoch = grid, mask, int(seed), 0

    def __len__(self) -> int:
        return len(self.views[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch``."""
        self.epoch = int(epoch)
        for v in self.views:
            v.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        samples = [v[index] for v in self.views]
        item = {"input": samples[0]["input"], "views": torch.stack([s["input"] for s in samples]),
                "row": samples[0]["row"]}
        if self.mask is not None and self.grid is not None:
            rng = np.random.default_rng([self.seed, 7, self.epoch, int(index)])
            context, target = multiblock_mask(self.grid, self.mask, rng)
            item["context"], item["target"] = torch.from_numpy(context), torch.from_numpy(target)
        return item


# Pooled transformer features (means of LayerNorm-ed tokens) share a large common component, so their angular
# spread is small even when they are healthy (mean cosine ~0.999 at random init): collapse is judged by the
# effective rank of the centred features and by a spread that has fallen to almost nothing.
JEPA_COLLAPSE_THRESHOLDS = {"std": 1e-3, "rankme": 2.0, "mean_cosine": 1.0}


class _JEPAMonitors:
    """Collapse monitors of the encoder's pooled features on a fixed set (two views each), and the SIGReg of
    the standardised features (how far from an isotropic Gaussian a probe would see them)."""

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:  # noqa: D102
        first, second = [], []
        encoder = getattr(model, model.kept)  # the encoder the folder will hold
        for batch in loader:
            views = batch["views"].to(device)
            first.append(encoder(views[:, 0]).float().cpu())
            second.append(encoder(views[:, -1]).float().cpu())
        return feature_health(torch.cat(first), torch.cat(second), JEPA_COLLAPSE_THRESHOLDS, "JEPA")


class MaskedJEPATask(_JEPAMonitors, TrainingTask):
    """I-JEPA / V-JEPA: predict the EMA target's tokens at the masked positions from the context."""

    monitor = None

    def __init__(self, model: JEPAModel, ema: tuple[float, float] = (0.996, 1.0)) -> None:
        self.model, self.ema = model, ema

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:  # noqa: D102
        bare: JEPAModel = getattr(model, "module", model)
        x, context, target = batch["input"], batch["context"], batch["target"]
        k_context, k_target = int(context.sum(1).min()), int(target.sum(1).min())  # equal counts in a batch
        context_idx, target_idx = _first_k(context, k_context), _first_k(target, k_target)
        with torch.no_grad():
            wanted = bare.target.tokens(x)
            wanted = F.layer_norm(wanted, wanted.shape[-1:])
            wanted = torch.gather(wanted, 1, target_idx[..., None].expand(-1, -1, wanted.shape[-1]))
        predicted = model(x, context_idx, target_idx)  # through the (DDP-wrapped) model
        return F.smooth_l1_loss(predicted.float(), wanted.float())

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:  # noqa: D102
        ema_update(model.target, model.encoder, step, total_steps, self.ema)


class LeJEPATask(_JEPAMonitors, TrainingTask):
    """LeJEPA: views pulled to their mean embedding, SIGReg keeping the embeddings Gaussian."""

    monitor = None

    def __init__(self, model: JEPAModel, sigreg_lambda: float = 0.05, num_slices: int = 256, seed: int = 0,
                 context: DistributedContext | None = None) -> None:
        self.model, self.sigreg_lambda, self.num_slices = model, float(sigreg_lambda), int(num_slices)
        self.seed, self.context = int(seed), context

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:  # noqa: D102
        views = batch["views"]
        n, v = views.shape[:2]
        z = model(views.reshape(n * v, *views.shape[2:]), project=True).float().reshape(n, v, -1)
        prediction = (z.mean(dim=1, keepdim=True) - z).square().mean()
        generator = slice_generator(self.step, self.seed)
        regulariser = torch.stack([sigreg(z[:, k], self.num_slices, generator=generator, context=self.context)
                                   for k in range(v)]).mean()
        return (1 - self.sigreg_lambda) * prediction + self.sigreg_lambda * regulariser


def pretrain_jepa(
    table: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    model: str = "vit3d_tiny.random",
    weights: str | os.PathLike | None = None,
    mode: Literal["ema", "lejepa"] = "ema",
    keep: Literal["target", "context"] | None = None,
    mask: MaskSpec = MaskSpec(),
    views: int = 4,
    sigreg_lambda: float = 0.05,
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 5e-4,
    optimizer: Literal["sgd", "adamw", "lars"] = "adamw",
    weight_decay: float = 0.04,
    warmup_epochs: float = 10.0,
    augmentation: Augmentation = JEPA_AUGMENTATION,
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
    """Pretrain a 3D ViT with a JEPA objective on the lesions of a seeds table (no labels needed).

    ``mode="ema"``: masked latent prediction against an EMA target (``mask`` sets the blocks);
    ``mode="lejepa"``: ``views`` views pulled together plus ``sigreg_lambda`` x SIGReg. The folder holds one
    encoder: ``keep="target"`` (the default of the masked mode) the EMA target, as I-JEPA and V-JEPA evaluate;
    ``keep="context"`` the context encoder (LeJEPA's only one). The EMA target lags the context encoder by
    about ``1 / (1 - momentum)`` steps: after a short run it is still close to its starting weights. The
    other parameters are those of :func:`~fmcib.training.simclr.pretrain_simclr`.
    """
    if mode not in ("ema", "lejepa"):
        raise ValueError(f"mode must be 'ema' or 'lejepa', got {mode!r}")
    keep = keep or ("target" if mode == "ema" else "context")
    if keep not in ("target", "context") or (keep == "target" and mode != "ema"):
        raise ValueError(f"keep must be 'target' (mode 'ema' only) or 'context', got {keep!r} with mode {mode!r}")
    kept = "target" if keep == "target" else "encoder"
    context = init_distributed(device)
    out = Path(out_dir)
    df, table_dir, name = load_seed_table(table)
    resolved, contract, config = starting_point(model, weights, True, patch_size, spacing_mm)
    with torch.random.fork_rng(devices=[]):  # the whole network from the seed, not from the process's RNG
        torch.manual_seed(seed)
        encoder = build_model(resolved, device="cpu").train()
        if not hasattr(encoder, "tokens"):
            raise ValueError(f"{resolved.config.name}: JEPA needs a token encoder (a vit3d model), not "
                             f"{resolved.config.architecture}")
        network = JEPAModel(encoder, mode, kept=kept)
    z, y, x = (int(v) for v in contract.input_shape[1:])
    grid = encoder.grid((z, y, x))
    margin = augmentation.margin(contract)
    rows, crops, errors = read_crops(df, contract, margin=margin, coords=coords, base_dir=table_dir,
                                     num_workers=num_workers, name=name, store=crop_store, context=context)
    report_unreadable(errors, context.is_main)
    if len(rows) < 2:
        raise ValueError(f"{name}: JEPA needs at least 2 readable lesions, found {len(rows)}")
    n_views = 1 if mode == "ema" else max(2, int(views))
    train_set = JEPAPatches(crops, contract, augmentation, n_views, grid, mask if mode == "ema" else None,
                            rows=rows, margin=margin, seed=seed)
    pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max(2, monitor_samples)])
    monitor_set = JEPAPatches(crops[pick], contract, augmentation, 2, rows=rows[pick], margin=margin, seed=seed + 7919)
    task: TrainingTask = MaskedJEPATask(network) if mode == "ema" else \
        LeJEPATask(network, sigreg_lambda, seed=seed, context=context)
    settings = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                              weight_decay=weight_decay, warmup_epochs=warmup_epochs, precision=precision,
                              seed=seed, num_workers=num_workers)
    result = Trainer(task, settings, out, device=context.device, progress=progress).fit(train_set, monitor_set,
                                                                                         resume=resume)
    counts = {"rows": len(df), "lesions": len(rows), "scans": len(plan_scans(df, base_dir=table_dir, name=name)),
              "unreadable": len(errors)}
    if context.is_main:
        description = data_description or f"Lesions of the seeds table {name} (no description was given)"
        record = {"training": {
            "method": "jepa", "mode": mode, "started_from": resolved.record(), "base_model": resolved.config.name,
            "table": name, "data_description": description, "counts": counts, "settings": settings.to_dict(),
            "mask": dataclasses.asdict(mask) if mode == "ema" else None, "token_grid": list(grid),
            "views": n_views, "sigreg_lambda": sigreg_lambda if mode == "lejepa" else None, "kept_encoder": keep,
            "augmentation": dataclasses.asdict(augmentation), "monitor_samples": len(monitor_set),
            "final_metrics": result.history[-1] if result.history else {}}}
        write_trained_folder(out, config, f"{resolved.config.name.split('.')[0]}.jepa-{mode}",
                             f"{resolved.config.architecture} encoder pretrained with "
                             f"{'I-JEPA masked prediction (EMA target)' if mode == 'ema' else 'LeJEPA (SIGReg)'} on "
                             f"{len(rows)} lesions ({name}); the {keep} encoder", best_weights(out, kept)[kept], record)
    context.barrier()
    return PretrainResult(out, result.history, counts)
