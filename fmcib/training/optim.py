"""Optimisers (SGD with momentum, AdamW, LARS) and the learning-rate schedule (linear warm-up, then cosine, step
or constant), stepped once per optimiser step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from .engine import TrainingConfig

__all__ = ["LARS", "build_optimizer", "build_schedule", "lr_factor"]


class LARS(SGD):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, as used by SimCLR).

    Each parameter's update is scaled by the trust ratio ``eta * ||w|| / (||g|| + weight_decay * ||w||)``.
    Biases and normalisation weights (1-D tensors) are left unscaled and without weight decay, as in SimCLR.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars_weight_decay", weight_decay)
            group.setdefault("eta", eta)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        for group in self.param_groups:
            decay, eta = group["lars_weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None or p.ndim <= 1:
                    continue
                if decay:
                    p.grad.add_(p, alpha=decay)
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                ratio = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
                p.grad.mul_(ratio)
        return super().step(closure)


def build_optimizer(config: TrainingConfig, params: Iterable[Any]) -> Optimizer:
    """The optimiser named by ``config.optimizer`` with its learning rate, momentum and weight decay."""
    if config.optimizer == "adamw":
        return AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "lars":
        return LARS(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainingConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier after ``step`` optimiser steps: linear warm-up, then the schedule."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    total = max(1, config.epochs * steps_per_epoch - warmup)
    done = min(step - warmup, total)
    if config.schedule == "cosine":
        floor = config.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done / total))
    if config.schedule == "step":
        return config.step_gamma ** (step // max(1, config.step_epochs * steps_per_epoch))
    return 1.0


def build_schedule(config: TrainingConfig, optimizer: Optimizer, steps_per_epoch: int) -> LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` following :func:`lr_factor`."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, config, steps_per_epoch))


def ema_update(target: torch.nn.Module, online: torch.nn.Module, step: int, total_steps: int,
               momentum: tuple[float, float] = (0.996, 1.0)) -> float:
    """Move ``target``'s parameters towards ``online``'s: ``t = m t + (1 - m) o``, with ``m`` rising linearly from
    ``momentum[0]`` to ``momentum[1]`` over the run (I-JEPA's schedule); returns ``m``."""
    start, end = momentum
    m = start + (end - start) * min(1.0, step / max(1, total_steps))
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.mul_(m).add_(o.detach(), alpha=1 - m)
    return m
