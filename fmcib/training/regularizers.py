"""SIGReg (LeJEPA, Balestriero & LeCun 2025): push embeddings towards an isotropic Gaussian, with no EMA
target or stop-gradient heuristics.

The embeddings are projected on random unit directions ("slices"); along each, the Epps-Pulley statistic
compares their empirical characteristic function with the standard normal's:

    T = N * integral over t of |phi_hat(t) - exp(-t^2 / 2)|^2 * exp(-t^2 / 2) dt,
    phi_hat(t) = mean_n exp(i t x_n),

by the trapezoid rule on ``knots`` points of ``[0, t_max]`` (the integrand is even, so the weights are
doubled). SIGReg is the mean over slices. Written from the paper's formulas.
"""

from __future__ import annotations

import torch

from ..distributed import DistributedContext

__all__ = ["sigreg", "slice_generator"]


def slice_generator(step: int, seed: int = 0) -> torch.Generator:
    """The generator of a training step's slices: the same on every rank, fresh each step."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


def _mean_over_ranks(x: torch.Tensor, context: DistributedContext | None) -> torch.Tensor:
    """``x`` averaged over the ranks, differentiably (each rank's share of the gradient flows back to it)."""
    if context is None or not context.distributed:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x) / context.world_size


def sigreg(z: torch.Tensor, num_slices: int = 256, knots: int = 17, t_max: float = 3.0,
           generator: torch.Generator | None = None, context: DistributedContext | None = None) -> torch.Tensor:
    """The SIGReg statistic of embeddings ``z`` ``(N, D)``: a scalar tensor with gradients.

    About 1.05 for N(0, I) samples (its floor, whatever N); far larger for collapsed, scaled, shifted or
    low-rank embeddings (and growing with N). ``generator`` draws the slices (use :func:`slice_generator`
    with the global step, so every rank projects on the same directions); under torchrun (``context``)
    the empirical characteristic function is averaged over the ranks, so the value is the global batch's.
    """
    if z.ndim != 2:
        raise ValueError(f"sigreg expects (N, D) embeddings, got shape {tuple(z.shape)}")
    n, d = z.shape
    directions = torch.randn(d, num_slices, generator=generator)  # on the CPU: identical on every rank
    directions = (directions / directions.norm(dim=0, keepdim=True)).to(device=z.device, dtype=torch.float32)
    projected = z.float() @ directions  # (N, K)
    t = torch.linspace(0.0, float(t_max), int(knots), device=z.device)
    angles = projected[..., None] * t  # (N, K, knots)
    cos_mean = _mean_over_ranks(torch.cos(angles).mean(dim=0), context)
    sin_mean = _mean_over_ranks(torch.sin(angles).mean(dim=0), context)
    gaussian = torch.exp(-t.square() / 2)
    error = (cos_mean - gaussian).square() + sin_mean.square()  # |phi_hat(t) - phi(t)|^2, (K, knots)
    step = float(t_max) / (int(knots) - 1)
    weights = torch.full((int(knots),), 2 * step, device=z.device)  # trapezoid, doubled for the even integrand
    weights[0] = weights[-1] = step
    total = n * (context.world_size if context is not None and context.distributed else 1)
    return total * (error * gaussian * weights).sum(dim=1).mean()
