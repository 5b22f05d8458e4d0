"""Health of a self-supervised embedding: collapse monitors logged every epoch (SimCLR, JEPA).

A self-supervised run can "succeed" with a falling loss while its embeddings collapse: every input mapped
to (nearly) the same vector, or into a few directions. These figures, computed on a fixed set of samples,
show it:

- ``std``: standard deviation of the L2-normalised embeddings per dimension, averaged, times ``sqrt(d)``;
  about 1 for embeddings spread evenly over the sphere, 0 for complete collapse (Zbontar/Bardes et al.).
- ``rankme``: the effective rank, ``exp`` of the entropy of the normalised singular values of the
  centred embedding matrix (Garrido et al. 2023); from 1 (one direction) up to ``min(n, d)``. It ignores
  scale, so a batch collapsed to one point plus noise still looks full-rank: read it with ``std``.
- ``mean_cosine``: mean cosine similarity of distinct samples; near 1 when collapsed.
- ``alignment``: mean squared distance between the normalised embeddings of two views of the same sample
  (lower: views agree), and ``uniformity``: ``log mean exp(-2 ||z_i - z_j||^2)`` over distinct samples
  (lower: spread over the sphere) (Wang & Isola 2020).

:func:`collapse_warning` turns them into a message when collapse is detected (thresholds in
``COLLAPSE_THRESHOLDS``, documented in docs/training.md).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

__all__ = ["embedding_health", "collapse_warning", "feature_health", "COLLAPSE_THRESHOLDS"]

logger = logging.getLogger(__name__)

# Collapse: spread below a tenth of an even spread, effective rank below 2, or samples almost parallel.
COLLAPSE_THRESHOLDS = {"std": 0.1, "rankme": 2.0, "mean_cosine": 0.95}


def _off_diagonal_mean(matrix: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return (matrix.sum() - matrix.diagonal().sum()) / max(n * (n - 1), 1)


def embedding_health(embeddings: torch.Tensor, views: torch.Tensor | None = None) -> dict[str, float]:
    """Collapse monitors of ``(n, d)`` embeddings; with ``views`` (a second view of each sample, same order)
    also ``alignment``. Computed in float64 on the given tensors (no gradient)."""
    with torch.no_grad():
        z = F.normalize(embeddings.detach().double(), dim=1)
        n, d = z.shape
        if n < 2:
            raise ValueError(f"embedding_health needs at least 2 samples, got {n}")
        out: dict[str, float] = {"std": float(z.std(dim=0).mean() * math.sqrt(d))}
        singular = torch.linalg.svdvals(z - z.mean(dim=0))
        p = singular / singular.sum().clamp_min(1e-12) + 1e-7
        out["rankme"] = float(torch.exp(-(p * p.log()).sum()))
        gram = z @ z.T
        out["mean_cosine"] = float(_off_diagonal_mean(gram))
        squared = (2 - 2 * gram).clamp_min(0)
        mask = ~torch.eye(n, dtype=torch.bool)
        out["uniformity"] = float(torch.log(torch.exp(-2 * squared[mask]).mean()))
        if views is not None:
            v = F.normalize(views.detach().double(), dim=1)
            out["alignment"] = float((z - v).pow(2).sum(dim=1).mean())
    return out


def collapse_warning(health: dict[str, float], thresholds: dict[str, float] | None = None) -> str:
    """A message naming the monitors past their collapse threshold (default :data:`COLLAPSE_THRESHOLDS`), or
    ``""``."""
    limits = {**COLLAPSE_THRESHOLDS, **(thresholds or {})}
    signs = []
    if health.get("std", 1.0) < limits["std"]:
        signs.append(f"std of normalised embeddings {health['std']:.3g} x sqrt(d) (even spread: ~1)")
    if health.get("rankme", math.inf) < limits["rankme"]:
        signs.append(f"effective rank (RankMe) {health['rankme']:.3g}")
    if health.get("mean_cosine", 0.0) > limits["mean_cosine"]:
        signs.append(f"mean cosine between samples {health['mean_cosine']:.3g}")
    if not signs:
        return ""
    return ("the embeddings are collapsing (" + "; ".join(signs) + "): the encoder maps different lesions to "
            "nearly the same features. Lower the learning rate, raise the temperature or the batch, or check "
            "the augmentations")


def feature_health(features: torch.Tensor, views: torch.Tensor | None = None,
                   thresholds: dict[str, float] | None = None, who: str = "training") -> dict[str, float]:
    """:func:`embedding_health` of an encoder's features plus ``sigreg``, the SIGReg statistic of the features
    standardised per dimension (how far from an isotropic Gaussian a linear probe sees them; about 1 at
    best); logs a warning naming ``who`` when :func:`collapse_warning` finds a collapse."""
    from .regularizers import sigreg, slice_generator

    metrics = embedding_health(features, views)
    standardised = (features - features.mean(0)) / features.std(0).clamp_min(1e-6)
    metrics["sigreg"] = float(sigreg(standardised.float(), num_slices=64, generator=slice_generator(0)))
    warning = collapse_warning(metrics, thresholds)
    if warning:
        logger.warning("%s: %s", who, warning)
    return metrics
