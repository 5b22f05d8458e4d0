"""Small training tasks for the engine's tests; run as a script under torchrun for the DDP test.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training_toys.py OUT_DIR BATCH
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmcib.training import Trainer, TrainingConfig, TrainingTask  # noqa: E402


class NoisyPoints(Dataset):
    """``n`` points of two Gaussian classes; with ``augment`` each epoch adds noise drawn from (epoch, index)."""

    def __init__(self, n: int = 32, dim: int = 6, augment: bool = True) -> None:
        rng = np.random.default_rng(0)
        self.y = np.arange(n) % 2
        self.x = (rng.normal(size=(n, dim)) + self.y[:, None]).astype(np.float32)
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        if self.augment:
            x = x + np.random.default_rng([self.epoch, i]).normal(scale=0.1, size=x.shape).astype(np.float32)
        return {"input": torch.from_numpy(np.ascontiguousarray(x)), "target": torch.tensor(self.y[i])}


class PointsTask(TrainingTask):
    """Cross-entropy of a small MLP (optionally with BatchNorm); accuracy on the tuning set."""

    monitor = "accuracy"

    def __init__(self, batchnorm: bool = True, seed: int = 0, fail_at_call: int | None = None) -> None:
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else []) + \
            [nn.ReLU(), nn.Linear(16, 2)]
        self.model = nn.Sequential(*layers)
        self.calls = 0
        self.fail_at_call = fail_at_call

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt  # as Ctrl-C or SIGTERM would, in the middle of an epoch
        return nn.functional.cross_entropy(model(batch["input"]), batch["target"])

    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        right = total = 0
        for batch in loader:
            right += int((model(batch["input"].to(device)).argmax(1).cpu() == batch["target"]).sum())
            total += len(batch["target"])
        return {"accuracy": right / total}


def ddp_settings(batch_size: int) -> TrainingConfig:
    """Plain SGD without momentum or BatchNorm: DDP over k ranks of batch b equals one process of batch k * b."""
    return TrainingConfig(epochs=3, batch_size=batch_size, lr=0.2, optimizer="sgd", momentum=0.0, schedule="constant",
                          seed=5)


if __name__ == "__main__":
    out, batch = Path(sys.argv[1]), int(sys.argv[2])
    Trainer(PointsTask(batchnorm=False), ddp_settings(batch), out, device="cpu", progress=False).fit(
        NoisyPoints(augment=False))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
