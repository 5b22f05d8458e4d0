"""The one training loop every method uses (fine-tuning, SimCLR, JEPA): a :class:`TrainingTask` says what a
batch's loss is and how to score the tuning set; :class:`Trainer` does the rest.

What the loop guarantees:

* one process on CPU, CUDA or MPS, or several under ``torchrun`` with DistributedDataParallel and a
  :class:`~torch.utils.data.DistributedSampler` (gloo on CPU, NCCL on GPUs);
* mixed precision (bf16, or fp16 with a gradient scaler), gradient accumulation and clipping;
* SGD with momentum, LARS or AdamW; linear warm-up, then cosine, step or constant learning rate;
* early stopping on the task's tuning metric, the best weights kept (``best.safetensors``);
* checkpoints that resume exactly: model, optimiser, scheduler, scaler, epoch and step, the position in the
  epoch's sample order, every RNG state; written atomically, read without unpickling code. Datasets with a
  ``set_epoch(epoch)`` method draw their augmentations from ``(seed, epoch, index)``, so a resumed run
  sees the same samples with the same augmentations as an uninterrupted one;
* metrics per epoch in ``metrics.csv`` (and TensorBoard when installed), a progress bar on rank 0 only;
* seeded: on the CPU two runs with the same seed give the same weights.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..distributed import DistributedContext, broadcast_object, gather_objects, init_distributed
from ..files import atomic_path
from .optim import build_optimizer, build_schedule

__all__ = ["TrainingConfig", "TrainingTask", "Trainer", "TrainingResult", "STATE_NAME", "BEST_NAME", "METRICS_NAME",
           "CHECKPOINT_DIR"]

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"  # everything needed to resume
BEST_NAME = "best.safetensors"  # the model's weights at the best tuning metric (or the last epoch without one)
METRICS_NAME = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of a training run (recorded with its checkpoints; a resume must use the same ones).

    Parameters
    ----------
    epochs : int
    batch_size : int
        Samples per process and step (the global batch is ``batch_size * processes * accumulate``).
    lr : float
        Peak learning rate (after warm-up).
    optimizer : {"sgd", "adamw", "lars"}
        SGD with (Nesterov-free) momentum, AdamW, or LARS (SGD with layer-wise trust ratios, for large SSL batches).
    momentum, weight_decay : float
    schedule : {"cosine", "step", "constant"}
        After warm-up: cosine decay to ``min_lr_ratio * lr``, ``step_gamma`` every ``step_epochs``, or constant.
    warmup_epochs : float
        Linear warm-up length in epochs (fractions allowed).
    accumulate : int
        Micro-batches summed into one optimiser step.
    clip_grad_norm : float, optional
        Clip the global gradient norm to this value.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of forward passes; fp16 uses a gradient scaler.
    seed : int
    num_workers : int
        Data loader processes.
    patience : int, optional
        Stop after this many epochs without improvement of the tuning metric.
    checkpoint_every : int, optional
        Also checkpoint every this many optimiser steps (always at each epoch's end).
    recalibrate_batchnorm : bool
        After each epoch, recompute BatchNorm running statistics as exact averages over one pass of the
        training set with the current weights ("precise BN"); short runs otherwise evaluate with statistics
        that lag behind fast-changing weights.
    """

    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: int = 30
    step_gamma: float = 0.1
    accumulate: int = 1
    clip_grad_norm: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    num_workers: int = 0
    patience: int | None = None
    checkpoint_every: int | None = None
    recalibrate_batchnorm: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulate"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        choices = {"optimizer": ("sgd", "adamw", "lars"), "schedule": ("cosine", "step", "constant"),
                   "precision": ("fp32", "bf16", "fp16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {self.clip_grad_norm!r}")
        if self.warmup_epochs < 0 or self.num_workers < 0:
            raise ValueError("warmup_epochs and num_workers must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return dataclasses.asdict(self)


class TrainingTask:
    """What is trained and how it is scored; subclass for each method.

    ``model`` is the module whose parameters are optimised (wrapped in DDP by the trainer when distributed).
    :meth:`loss` gets that (possibly wrapped) module and a batch; :meth:`evaluate` gets the bare module in
    eval mode and a loader over the tuning set. ``monitor`` names the metric that picks the best epoch and
    ``mode`` says whether higher (``"max"``) or lower (``"min"``) is better.
    """

    model: nn.Module
    monitor: str | None = None
    step: int = 0  # optimiser steps done, set by the engine before each loss
    mode: Literal["max", "min"] = "max"

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch (averaged over its samples)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """Metrics on the tuning set; must include ``monitor``."""
        return {}

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Optional optimiser parameter groups (default: every trainable parameter, one group)."""
        return None

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimiser step with the bare module (e.g. to move an EMA target); ``step`` counts
        from 1. The engine also sets ``task.step`` (optimiser steps done) before each :meth:`loss`."""


@dataclass
class TrainingResult:
    """What a finished run leaves: the folder, the per-epoch history, the best epoch and its metrics."""

    out_dir: Path
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metrics: dict[str, Any]
    stopped_early: bool


class _SkipSampler(Sampler[int]):
    """The epoch's sample order of a DistributedSampler, from position ``start`` on (exact mid-epoch resume)."""

    def __init__(self, base: DistributedSampler, start: int) -> None:
        self.indices = list(iter(base))[start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def rng_state() -> dict[str, Any]:
    """Every global RNG state (Python, NumPy, torch CPU and CUDA) as tensors and plain values (no pickle needed)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"python": [version, list(py_state), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
                                                                   int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs a :class:`TrainingTask` with a :class:`TrainingConfig`, writing into ``out_dir``.

    ``out_dir`` receives ``metrics.csv``, and ``checkpoints/`` ``training_state.pt`` (resume) and
    ``best.safetensors``; only rank 0 writes. ``device`` None/"auto" picks CUDA (``cuda:<LOCAL_RANK>`` under torchrun), MPS, then CPU.
    """

    def __init__(self, task: TrainingTask, config: TrainingConfig, out_dir: str | Path,
                 device: str | torch.device | None = None, progress: bool = True) -> None:
        self.task = task
        self.config = config
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        self.context: DistributedContext = init_distributed(device)
        self.progress = progress

    # -- public -----------------------------------------------------------------------------------------
    def fit(self, train: Dataset, tune: Dataset | None = None, resume: bool = False) -> TrainingResult:
        """Train; with ``resume=True`` continue from ``out_dir/training_state.pt`` (it must exist).

        Ctrl-C or SIGTERM (raised as KeyboardInterrupt) writes a checkpoint at the last finished optimiser
        step before the exception propagates, so ``resume=True`` continues from there.
        """
        cfg, ctx = self.config, self.context
        if len(train) == 0:
            raise ValueError("the training set is empty")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        model = self.task.model.to(ctx.device)
        if ctx.device.type == "cpu":
            model = model.to(memory_format=torch.contiguous_format)
        wrapped: nn.Module = model
        if ctx.distributed:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        sampler = DistributedSampler(train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=ctx.distributed)  # equal step counts on every rank
        drop_last = len(sampler) > cfg.batch_size  # no 1-sample batches for BatchNorm, unless the set is tiny
        micro_per_epoch = len(sampler) // cfg.batch_size if drop_last else math.ceil(len(sampler) / cfg.batch_size)
        steps_per_epoch = max(1, micro_per_epoch // cfg.accumulate)
        self._total_steps = steps_per_epoch * cfg.epochs
        micro_per_epoch = steps_per_epoch * cfg.accumulate if micro_per_epoch >= cfg.accumulate else micro_per_epoch
        optimizer = build_optimizer(cfg, self.task.parameter_groups(model) or
                                    [p for p in model.parameters() if p.requires_grad])
        scheduler = build_schedule(cfg, optimizer, steps_per_epoch)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
        state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": None,
                 "bad_epochs": 0, "history": [], "best_metrics": {}}
        if resume:
            state = self._load(model, optimizer, scheduler, scaler)
        else:
            seed_everything(cfg.seed + ctx.rank)
        stopped_early = False
        writer = self._tensorboard()
        try:
            while state["epoch"] < cfg.epochs and not stopped_early:
                epoch = state["epoch"]
                if hasattr(train, "set_epoch"):
                    train.set_epoch(epoch)
                sampler.set_epoch(epoch)
                skip = state["step_in_epoch"] * cfg.accumulate * cfg.batch_size
                loader = self._loader(train, _SkipSampler(sampler, skip), drop_last, epoch)
                started = time.perf_counter()
                losses = self._train_epoch(wrapped, model, loader, optimizer, scheduler, scaler, state,
                                           steps_per_epoch, micro_per_epoch)
                metrics: dict[str, Any] = {"epoch": epoch + 1, "step": state["global_step"],
                                           "lr": optimizer.param_groups[0]["lr"],
                                           "train_loss": float(np.mean(losses)) if losses else float("nan"),
                                           "seconds": round(time.perf_counter() - started, 3)}
                if cfg.recalibrate_batchnorm:
                    self._recalibrate_batchnorm(model, train, sampler, drop_last, epoch)
                metrics.update(self._evaluate(model, tune))
                state["epoch"], state["step_in_epoch"], state["epoch_losses"] = epoch + 1, 0, []
                state["history"].append(metrics)
                stopped_early = self._track_best(model, state, metrics)
                self._save(model, optimizer, scheduler, scaler, state)
                self._write_metrics(state["history"], writer)
                if ctx.is_main:
                    logger.info("epoch %d/%d: %s", epoch + 1, cfg.epochs,
                                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        except KeyboardInterrupt:
            if state.get("_consistent", True) and not ctx.distributed:  # no collectives while ranks may be dying
                self._save(model, optimizer, scheduler, scaler, state)
                if ctx.is_main:
                    logger.warning("interrupted: checkpoint at epoch %d, step %d written to '%s'; resume=True "
                                   "continues from there", state["epoch"] + 1, state["step_in_epoch"],
                                   self.checkpoint_dir / STATE_NAME)
            raise
        finally:
            if writer is not None:
                writer.close()
        if stopped_early and ctx.is_main:
            logger.info("early stop after epoch %d: no better %s for %d epochs", state["epoch"], self.task.monitor,
                        cfg.patience)
        ctx.barrier()
        return TrainingResult(self.out_dir, state["history"], state["best_epoch"], state["best_metrics"],
                              stopped_early)

    # -- the loop ---------------------------------------------------------------------------------------
    def _train_epoch(self, wrapped: nn.Module, model: nn.Module, loader: DataLoader, optimizer: Any, scheduler: Any,
                     scaler: Any, state: dict[str, Any], steps_per_epoch: int, micro_per_epoch: int) -> list[float]:
        cfg, ctx = self.config, self.context
        from tqdm.auto import tqdm

        wrapped.train()
        losses: list[float] = state.setdefault("epoch_losses", [])  # kept in checkpoints: a resumed epoch's mean
        autocast = self._autocast()
        bar = tqdm(total=steps_per_epoch, initial=state["step_in_epoch"], unit="step",
                   desc=f"epoch {state['epoch'] + 1}/{cfg.epochs}", disable=not (self.progress and ctx.is_main) or None)
        micro = state["step_in_epoch"] * cfg.accumulate
        pending_losses: list[float] = []  # of the micro-batches of the step in progress
        try:
            for batch in loader:
                if micro >= micro_per_epoch:
                    break
                last = (micro + 1) % cfg.accumulate == 0
                sync = wrapped.no_sync() if (ctx.distributed and not last) else contextlib.nullcontext()
                with sync:
                    self.task.step = state["global_step"]
                    with autocast:
                        loss = self.task.loss(wrapped, _to_device(batch, ctx.device))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"the loss became {loss.item()} at epoch {state['epoch'] + 1}, "
                                                 f"step {state['step_in_epoch'] + 1}; lower the learning rate")
                    scaler.scale(loss / cfg.accumulate).backward()
                pending_losses.append(float(loss.detach()))
                micro += 1
                if last:
                    state["_consistent"] = False  # the model may be half-updated until the counters follow
                    if cfg.clip_grad_norm is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    self.task.after_step(model, state["global_step"] + 1, self._total_steps)
                    losses.extend(pending_losses)
                    pending_losses.clear()
                    state["step_in_epoch"] += 1
                    state["global_step"] += 1
                    state["_consistent"] = True
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
                    every = cfg.checkpoint_every
                    if every and state["global_step"] % every == 0 and state["step_in_epoch"] < steps_per_epoch:
                        self._save(model, optimizer, scheduler, scaler, state)
        finally:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        return losses

    def _autocast(self) -> Any:
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.context.device.type, dtype=dtype)

    def _loader(self, dataset: Dataset, sampler: Sampler, drop_last: bool, epoch: int) -> DataLoader:
        cfg, ctx = self.config, self.context
        workers = cfg.num_workers
        # its own generator: worker seeds never draw from (and so never shift) the global torch RNG
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + ctx.rank)
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=workers, pin_memory=ctx.device.type == "cuda", generator=generator,
                          persistent_workers=False, prefetch_factor=2 if workers else None)

    def _recalibrate_batchnorm(self, model: nn.Module, train: Dataset, sampler: DistributedSampler, drop_last: bool,
                               epoch: int) -> None:
        """BatchNorm running statistics as cumulative averages over this rank's samples of the epoch."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts equally
        model.train()
        with torch.no_grad(), self._autocast():
            for batch in self._loader(train, _SkipSampler(sampler, 0), drop_last, epoch):
                batch = _to_device(batch, self.context.device)
                model(batch["input"] if isinstance(batch, Mapping) else batch[0])
        for m, momentum in zip(norms, saved):
            m.momentum = momentum

    def _evaluate(self, model: nn.Module, tune: Dataset | None) -> dict[str, Any]:
        """The task's metrics on the tuning set, computed on rank 0 and shared (BatchNorm buffers differ by rank)."""
        if tune is None or len(tune) == 0:
            return {}
        metrics: dict[str, Any] = {}
        if self.context.is_main:
            model.eval()
            loader = DataLoader(tune, batch_size=self.config.batch_size, shuffle=False,
                                num_workers=self.config.num_workers)
            with torch.inference_mode(), self._autocast():
                metrics = {f"tune_{k}": float(v) for k, v in self.task.evaluate(model, loader, self.context.device).items()}
            model.train()
        return broadcast_object(metrics, self.context)

    def _track_best(self, model: nn.Module, state: dict[str, Any], metrics: dict[str, Any]) -> bool:
        """Keep the best weights; True when early stopping should end the run."""
        monitor = self.task.monitor
        key = f"tune_{monitor}" if monitor else None
        value = metrics.get(key) if key else None
        if value is None or not np.isfinite(value):
            improved = key is None or key not in metrics  # no tuning metric: the last epoch is the best
        else:
            best = state["best"]
            improved = best is None or (value > best if self.task.mode == "max" else value < best)
            if improved:
                state["best"] = float(value)
        if improved:
            state["best_epoch"], state["bad_epochs"], state["best_metrics"] = metrics["epoch"], 0, dict(metrics)
            if self.context.is_main:
                from safetensors.torch import save_file

                with atomic_path(self.checkpoint_dir / BEST_NAME) as tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        else:
            state["bad_epochs"] += 1
        patience = self.config.patience
        return patience is not None and state["bad_epochs"] >= patience

    # -- files ------------------------------------------------------------------------------------------
    def _save(self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, state: dict[str, Any]) -> None:
        """Write the resume checkpoint (called on every rank: each rank's RNG states are gathered to rank 0)."""
        rngs = gather_objects(rng_state(), self.context)
        if not self.context.is_main:
            return
        payload = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "world_size": self.context.world_size,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "state": {k: v for k, v in state.items() if not k.startswith("_")},
            "rng": rngs,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with atomic_path(self.checkpoint_dir / STATE_NAME) as tmp:
            tmp.write_bytes(buffer.getvalue())

    def _load(self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any) -> dict[str, Any]:
        from ..exceptions import FmcibError

        path = self.checkpoint_dir / STATE_NAME
        if not path.is_file():
            raise FmcibError(f"nothing to resume: '{path}' does not exist", cli=f"nothing to resume: '{path}' does "
                             "not exist (run without --resume to start)")
        payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
        if payload.get("format") != STATE_FORMAT:
            raise FmcibError(f"'{path}': checkpoint format {payload.get('format')!r}, this fmcib reads {STATE_FORMAT}")
        saved, now = payload["config"], self.config.to_dict()
        differing = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k != "epochs"}
        if differing or payload["world_size"] != self.context.world_size:
            if payload["world_size"] != self.context.world_size:
                differing["processes"] = (payload["world_size"], self.context.world_size)
            shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in
                              ((k, *v) for k, v in differing.items()))
            raise FmcibError(f"'{path}' was written with other settings ({shown}); resume with the same ones, "
                             "or start a new run in another folder")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"][self.context.rank])
        return dict(payload["state"])

    def _write_metrics(self, history: Sequence[dict[str, Any]], writer: Any) -> None:
        if not self.context.is_main or not history:
            return
        columns = list(dict.fromkeys(k for row in history for k in row))
        with atomic_path(self.out_dir / METRICS_NAME) as tmp, open(tmp, "w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=columns)
            out.writeheader()
            out.writerows(history)
        if writer is not None:
            row = history[-1]
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, float):
                    writer.add_scalar(k, v, row["epoch"])

    def _tensorboard(self) -> Any:
        if not self.context.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))
