"""A 3D Vision Transformer family for CT patches (the JEPA encoders): its builder and its named models.

The patch is cut into cubic tokens by a strided 3D convolution, given fixed 3D sine-cosine positions
(computed for whatever token grid the input makes, so a contract override still works), passed through
pre-norm transformer blocks, and the tokens' mean is the feature vector ``(N, dim)``. :meth:`ViT3d.tokens`
gives the token embeddings, optionally for a subset of token positions only (the context of a JEPA).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocessing import PreprocessConfig
from .architectures import register_architecture
from .registry import ModelConfig, register_model

__all__ = ["Block", "ViT3d", "vit3d", "sincos_positions", "VIT3D_TINY_ARGS", "VIT3D_BASE_ARGS"]


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(len(positions), dim)`` sine-cosine codes of positions (``dim`` even), frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_positions(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D positions ``(z*y*x, dim)``: the channels split in three (z, y, x), each a 1D sine-cosine code;
    channels left over by the split stay zero."""
    part = (dim // 3) // 2 * 2
    zz, yy, xx = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    codes = [_sincos_1d(axis.reshape(-1), part) for axis in (zz, yy, xx)]
    out = torch.zeros(zz.numel(), dim, dtype=torch.float64)
    out[:, :3 * part] = torch.cat(codes, dim=1)
    return out.float()


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(N, T, dim)``; ``keys`` ``(N, T)`` booleans: the tokens that may be attended to (padding and
        hidden tokens are not); every row needs at least one."""
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keys is None else keys[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class ViT3d(nn.Module):
    """3D ViT encoder: ``(N, C, z, y, x) -> (N, dim)`` (mean of the final tokens).

    Parameters
    ----------
    patch_size : int
        Token edge in voxels (the input's sizes should be multiples of it; a remainder is cut off).
    in_channels, dim, depth, heads, mlp_ratio
        The usual ViT sizes.
    """

    def __init__(self, patch_size: int = 8, in_channels: int = 1, dim: int = 192, depth: int = 6, heads: int = 3,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.dim = int(dim)
        self.embed = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self._positions: dict[tuple[int, int, int], torch.Tensor] = {}

    def grid(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid ``(z, y, x)`` of an input of spatial shape ``(z, y, x)``."""
        z, y, x = (int(s) // self.patch_size for s in input_shape[-3:])
        return z, y, x

    def positions(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The fixed position codes of a token grid (cached per grid)."""
        if grid not in self._positions:
            self._positions[grid] = sincos_positions(grid, self.dim)
        return self._positions[grid].to(device=device, dtype=dtype)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings with positions, before the blocks: ``(N, T, dim)``."""
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if tokens.device.type == "meta":
            return tokens
        return tokens + self.positions(self.grid(x.shape), tokens.device, tokens.dtype)

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final token embeddings ``(N, T, dim)``; with ``keep`` ``(N, K)`` token indices, only those tokens
        are encoded (they attend to each other only): ``(N, K, dim)``."""
        h = self.embed_tokens(x)
        if keep is not None:
            h = torch.gather(h, 1, keep[..., None].expand(-1, -1, h.shape[-1]))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.tokens(x).mean(dim=1)


@register_architecture("vit3d")
def vit3d(**kwargs: Any) -> nn.Module:
    """Build a :class:`ViT3d` (keyword arguments as its parameters)."""
    return ViT3d(**kwargs)


VIT3D_TINY_ARGS = {"patch_size": 8, "in_channels": 1, "dim": 192, "depth": 6, "heads": 3, "mlp_ratio": 4.0}
VIT3D_BASE_ARGS = {"patch_size": 8, "in_channels": 1, "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0}

register_model(ModelConfig(
    name="vit3d_tiny.random", architecture="vit3d", model_args=VIT3D_TINY_ARGS, num_features=192,
    preprocess=PreprocessConfig(patch_size=48, spacing_mm=1.0),
    description=f"3D ViT-Tiny (8^3 tokens, width 192, depth 6, {math.prod((6, 6, 6))} tokens of a 48^3 patch), "
                "seeded random weights: JEPA tests and CPU demos"))
register_model(ModelConfig(
    name="vit3d_base.random", architecture="vit3d", model_args=VIT3D_BASE_ARGS, num_features=768,
    preprocess=PreprocessConfig(patch_size=64, spacing_mm=1.0),
    description="3D ViT-Base (8^3 tokens, width 768, depth 12, 512 tokens of a 64^3 patch), seeded random weights"))
