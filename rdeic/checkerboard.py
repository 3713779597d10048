"""Checkerboard split of a latent into anchor and non-anchor positions.

Anchors sit at (even row, odd column) and (odd row, even column); they are coded first
and give the spatial context for the non-anchors. "Squeezed" tensors keep only one kind
of position, halving the width, so that no placeholder symbols are entropy coded.
"""

from __future__ import annotations

import torch


def _first_col(anchor: bool, row_parity: int) -> int:
    # anchors: odd columns on even rows, even columns on odd rows; non-anchors the opposite
    return (1 - row_parity) if anchor else row_parity


def mask(y: torch.Tensor, anchor: bool) -> torch.Tensor:
    """``y`` with the other kind of position set to zero."""
    out = torch.zeros_like(y)
    for parity in (0, 1):
        col = _first_col(anchor, parity)
        out[:, :, parity::2, col::2] = y[:, :, parity::2, col::2]
    return out


def squeeze(y: torch.Tensor, anchor: bool) -> torch.Tensor:
    """Keep only anchor (or non-anchor) positions: (B, C, H, W) -> (B, C, H, W/2)."""
    b, c, h, w = y.shape
    out = y.new_empty(b, c, h, w // 2)
    for parity in (0, 1):
        col = _first_col(anchor, parity)
        out[:, :, parity::2] = y[:, :, parity::2, col::2]
    return out


def unsqueeze(y: torch.Tensor, anchor: bool) -> torch.Tensor:
    """Inverse of :func:`squeeze`, zeros at the other positions: (B, C, H, W/2) -> (B, C, H, W)."""
    b, c, h, w = y.shape
    out = y.new_zeros(b, c, h, w * 2)
    for parity in (0, 1):
        col = _first_col(anchor, parity)
        out[:, :, parity::2, col::2] = y[:, :, parity::2]
    return out
