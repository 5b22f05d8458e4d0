"""Global-batch losses under torchrun (NT-Xent, SIGReg, CLIP's symmetric NT-Xent): each rank holds half of a
fixed batch.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/pretraining_toys.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmcib.distributed import init_distributed
from fmcib.training.alignment import symmetric_nt_xent
from fmcib.training.regularizers import sigreg, slice_generator
from fmcib.training.simclr import nt_xent

N, NEG, DIM = 8, 4, 6
PAIRED = torch.tensor([True, False, True, True, True, True, True, True])  # ranks hold 3 and 4 pairs
ONE_SIDED = torch.tensor([False] * 4 + [True] * 4)  # rank 0 holds no pair at all


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views of N samples and NEG extra negatives (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(N, DIM, generator=g)
    x2 = x1 + 0.3 * torch.randn(N, DIM, generator=g)
    return x1, x2, torch.randn(NEG, DIM, generator=g)


def fixed_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(DIM, 4)


def loss_and_grad(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, neg: torch.Tensor, context=None):
    """One forward of everything (as SimCLRTask does), the loss, its backward."""
    z = model(torch.cat([x1, x2, neg]))
    n = x1.shape[0]
    loss = nt_xent(z[:n], z[n:2 * n], z[2 * n:], temperature=0.5, context=context)
    loss.backward()
    return loss


def sigreg_and_grad(model: nn.Module, x: torch.Tensor, context=None):
    """SIGReg of a model's outputs on the slices of step 7, and its backward."""
    value = sigreg(model(x), num_slices=32, generator=slice_generator(7), context=context)
    value.backward()
    return value


def clip_and_grad(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, paired: torch.Tensor, context=None):
    """CLIP's symmetric loss between two "modalities" of the same samples (rows without a pair excluded)."""
    z = model(torch.cat([x1, x2]))
    n = x1.shape[0]
    loss = symmetric_nt_xent(z[:n], z[n:], temperature=0.5, valid=paired, context=context)
    loss.backward()
    return loss


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / torch.distributed.get_world_size()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    context = init_distributed("cpu")
    x1, x2, neg = fixed_batch()
    n, k = N // context.world_size, NEG // context.world_size
    mine = slice(context.rank * n, (context.rank + 1) * n)
    negs = slice(context.rank * k, (context.rank + 1) * k)
    model = nn.parallel.DistributedDataParallel(fixed_model())
    loss = loss_and_grad(model, x1[mine], x2[mine], neg[negs], context)
    mean_loss = mean_over_ranks(loss)
    regulariser = nn.parallel.DistributedDataParallel(fixed_model())
    value = sigreg_and_grad(regulariser, x1[mine], context)
    aligned = nn.parallel.DistributedDataParallel(fixed_model())
    clip = mean_over_ranks(clip_and_grad(aligned, x1[mine], x2[mine], PAIRED[mine], context))
    lopsided = nn.parallel.DistributedDataParallel(fixed_model())
    one_sided = mean_over_ranks(clip_and_grad(lopsided, x1[mine], x2[mine], ONE_SIDED[mine], context))
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"loss": mean_loss, "weight_grad": model.module.weight.grad, "bias_grad": model.module.bias.grad,
                    "sigreg": value.detach(), "sigreg_grad": regulariser.module.weight.grad,
                    "clip": clip, "clip_grad": aligned.module.weight.grad, "one_sided": one_sided,
                    "one_sided_grad": lopsided.module.weight.grad}, out / "ddp.pt")
