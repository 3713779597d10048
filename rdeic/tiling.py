"""Tiled execution for large images: the tile plan and the blended passes over it.

A plan is a square tile side and an overlap, both in latent pixels (1/8 of the image). Along each
axis the tiles start every ``tile - overlap`` latent pixels and the last one ends at the edge, so
every tile has the same shape and the tiles of one image (and of several images of one size) run
as one batch. Where tiles overlap, their outputs are averaged with weights that ramp linearly
from the tile's edge, so no tile's border shows.

The plan depends only on the padded image size and the two numbers, which a tiled bitstream
carries (:mod:`rdeic.bitstream`), so every decoder cuts the same tiles. Three passes use it: the UNet
with the control module at every sampler step (blended noise predictions, as in MultiDiffusion), and,
on tiles twice as large (:meth:`TilePlan.vae`), the VAE encoder (image tiles of 8x the latent size,
blended at 1/8) and the VAE decoder (blended pixels). The compression module runs on the whole 1/8 map: it is convolutional and
small, and its memory grows linearly with the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import MAX_TILE, plan_problem

SCALE = 8  # image pixels per latent pixel


@dataclass(frozen=True)
class TilePlan:
    tile: int  # side of a tile, latent pixels
    overlap: int  # latent pixels shared by neighbouring tiles

    def __post_init__(self) -> None:
        problem = plan_problem(self.tile, self.overlap)
        if problem:
            raise ValueError(problem)

    def starts(self, length: int) -> list[int]:
        """Where the tiles start along an axis of ``length`` latent pixels (one tile if it fits)."""
        if length <= self.tile:
            return [0]
        stride = self.tile - self.overlap
        count = -(-(length - self.tile) // stride) + 1
        return [min(i * stride, length - self.tile) for i in range(count)]

    def windows(self, height: int, width: int) -> list[tuple[slice, slice]]:
        """The tiles of a ``height`` x ``width`` latent, row by row, as (rows, columns) slices."""
        th, tw = min(self.tile, height), min(self.tile, width)
        return [(slice(y, y + th), slice(x, x + tw)) for y in self.starts(height) for x in self.starts(width)]

    def count(self, height: int, width: int) -> int:
        return len(self.starts(height)) * len(self.starts(width))

    def vae(self) -> "TilePlan":
        """The VAE's plan: tiles and overlap twice the UNet's (at most MAX_TILE). The VAE's GroupNorm layers
        and mid-block attention see one tile; on larger tiles their statistics stay closer to the whole
        image's (docs/codec.md, "Large images"). Part of the format: a tiled stream decodes with it."""
        return TilePlan(min(2 * self.tile, MAX_TILE), min(2 * self.overlap, MAX_TILE // 2))


def _ramp(length: int, overlap: int, device, dtype) -> torch.Tensor:
    """1-D blending weights of a tile: rising over ``overlap`` pixels from each end, 1 inside, never 0."""
    p = torch.arange(length, device=device, dtype=torch.float64)
    w = torch.minimum((p + 1) / (overlap + 1), (length - p) / (overlap + 1)).clamp(max=1.0)
    return w.to(dtype)


def _weights(rows: int, cols: int, overlap: int, device, dtype) -> torch.Tensor:
    return _ramp(rows, overlap, device, dtype)[:, None] * _ramp(cols, overlap, device, dtype)[None, :]


def blend(
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    inputs: list[torch.Tensor],
    plan: TilePlan,
    out_channels: int,
    in_scale: int = 1,
    out_scale: int = 1,
    batch: int = 4,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``fn`` run over the plan's tiles of ``inputs`` and the tiles' outputs blended into one map.

    ``inputs`` are (B, C, H·in_scale, W·in_scale) tensors cut at the same tiles (the plan's windows
    of the H x W latent, times ``in_scale``); ``fn`` takes a batch of their tiles (at most ``batch``,
    from any of the B images) and returns (n, out_channels, tile·out_scale, tile·out_scale). The
    result is (B, out_channels, H·out_scale, W·out_scale), accumulated in float32 or ``out_dtype``.
    """
    first = inputs[0]
    b = first.shape[0]
    height, width = first.shape[-2] // in_scale, first.shape[-1] // in_scale
    windows = plan.windows(height, width)
    dtype = out_dtype or torch.float32
    out = torch.zeros((b, out_channels, height * out_scale, width * out_scale), device=first.device, dtype=dtype)
    total = torch.zeros((height * out_scale, width * out_scale), device=first.device, dtype=dtype)
    rows, cols = windows[0][0].stop - windows[0][0].start, windows[0][1].stop - windows[0][1].start
    weight = _weights(rows * out_scale, cols * out_scale, plan.overlap * out_scale, first.device, dtype)
    jobs = [(n, w) for n in range(b) for w in windows]

    def scaled(window: tuple[slice, slice], s: int) -> tuple[slice, slice]:
        return tuple(slice(part.start * s, part.stop * s) for part in window)  # type: ignore[return-value]

    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        tiles = [torch.stack([x[n, :, ys, xs] for n, (ys, xs) in ((n, scaled(w, in_scale)) for n, w in chunk)]) for x in inputs]
        result = fn(tiles)
        for k, (n, window) in enumerate(chunk):
            ys, xs = scaled(window, out_scale)
            out[n, :, ys, xs] += result[k].to(dtype) * weight
    for window in windows:
        ys, xs = scaled(window, out_scale)
        total[ys, xs] += weight
    return out.div_(total)


def supported_pixels(config, memory_bytes: int, weight_bytes: int, cap: int) -> int:
    """An estimate of the largest image (padded pixels, at most ``cap``) that a tiled encode and decode
    fit into ``memory_bytes`` beside ``weight_bytes`` of weights.

    Per model call: about six full-resolution maps of the VAE's first block per tile (its decoder's
    activations). Per padded pixel, what grows with the image: float32 copies of the image and of
    the blended output (7 floats), the VAE features at 1/8 (in_channels / 64 floats), the guide hint
    and its synthesis at 1/8 (2 x M / 64 floats), and the compression module's float64 working set
    at 1/16 (0.35 x M bytes, as bench/large_images.py counted it). That is 55 bytes per pixel for the
    tiny preset, whose RSS grew by 29-40 MiB per megapixel as measured, and 182 for sd21, whose
    whole-image tensors the bench projects at 134-143. 20% of the memory is left for the runtime
    and fragmentation.
    """
    t = config.tiling
    tile_bytes = t.batch * (SCALE * t.tile) ** 2 * int(config.vae["block_out_channels"][0]) * 4 * 6
    c = config.compression
    pixel_bytes = 4 * (7 + c.in_channels / 64 + 2 * c.M / 64) + 0.35 * c.M
    room = 0.8 * memory_bytes - weight_bytes - tile_bytes
    return int(max(0, min(cap, room // pixel_bytes)))
