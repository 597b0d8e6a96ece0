"""Patch layouts of the two MobileViT families (patch size 2x2 everywhere).

A feature map [B, C, H, W] with even H and W has nh = H/2 rows and nw = W/2 columns of 2x2
patches. Pixel (y, x) belongs to patch n = (y // 2) * nw + x // 2 and sits at position
p = (y % 2) * 2 + x % 2 inside it. Attention runs over the N = nh * nw patches separately for
each of the P = 4 positions.

- v1-style tokens: [B * P, N, C], sequence index b * P + p (cvnets v0.1 `unfolding`).
- v2-style tokens: [B, C, P, N] (cvnets v0.2 `F.unfold` with kernel = stride = 2).

Odd sizes are resized by the callers, each family by its own rule (see the blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH = 2
PATCH_AREA = PATCH * PATCH


def even_size(h: int, w: int) -> tuple[int, int]:
    """The smallest multiple-of-patch size that covers (h, w)."""
    return -(-h // PATCH) * PATCH, -(-w // PATCH) * PATCH


def resize_to_even(x: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Bilinear resize of [B, C, H, W] to even (H, W); a no-op when they already are."""
    h, w = x.shape[-2:]
    size = even_size(h, w)
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def to_tokens(fm: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B*P, N, C] (v1-style tokens)."""
    b, c, h, w = fm.shape
    nh, nw = h // PATCH, w // PATCH
    x = fm.reshape(b, c, nh, PATCH, nw, PATCH)  # b c ny py nx px
    x = x.permute(0, 3, 5, 2, 4, 1)  # b py px ny nx c
    return x.reshape(b * PATCH_AREA, nh * nw, c)


def from_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B*P, N, C] -> [B, C, H, W], the inverse of `to_tokens`."""
    bp, n, c = tokens.shape
    nh, nw = h // PATCH, w // PATCH
    x = tokens.reshape(bp // PATCH_AREA, PATCH, PATCH, nh, nw, c)  # b py px ny nx c
    x = x.permute(0, 5, 3, 1, 4, 2)  # b c ny py nx px
    return x.reshape(bp // PATCH_AREA, c, h, w)


def to_patches(fm: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, P, N] (v2-style tokens, the order of F.unfold)."""
    b, c, h, w = fm.shape
    nh, nw = h // PATCH, w // PATCH
    x = fm.reshape(b, c, nh, PATCH, nw, PATCH).permute(0, 1, 3, 5, 2, 4)  # b c py px ny nx
    return x.reshape(b, c, PATCH_AREA, nh * nw)


def from_patches(patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, C, P, N] -> [B, C, H, W], the inverse of `to_patches` (F.fold)."""
    b, c = patches.shape[:2]
    nh, nw = h // PATCH, w // PATCH
    x = patches.reshape(b, c, PATCH, PATCH, nh, nw).permute(0, 1, 4, 2, 5, 3)  # b c ny py nx px
    return x.reshape(b, c, h, w)
