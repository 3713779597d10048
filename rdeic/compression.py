"""Latent compression module of RDEIC.

Data flow (paper notation; ``f`` is the VAE encoder feature at 1/8 resolution)::

      f ──g_a──▶ y (M ch, 1/16) ──h_a──▶ z (N ch, 1/64) ──VQ──▶ ẑ  (indices: log2(K) bits each)
                 │                                           │
                 │                                          h_s
                 ▼                                           ▼
      10 channel slices y_i, each coded anchor-then-non-anchor in a checkerboard:
        anchor  params = e_a[i](channel_ctx(ŷ_<i), h_s(ẑ))
        non-anc params = e_n[i](local_ctx(ŷ_i anchors), channel_ctx(ŷ_<i), h_s(ẑ))
        ŷ_i = round(y_i − μ) + μ, coded with a Gaussian N(μ, σ) (compressai GaussianConditional, rANS)
                 │
      ŷ ──g_s──▶ guide hint (M ch, 1/8) ──out──▶ z_c (latent channels, 1/8)

``forward`` is the training path (likelihoods, straight-through rounding, codebook loss);
``compress``/``decompress`` produce and consume real symbols. The entropy parameters are
computed in ``config.coding_dtype`` (float64 by default) on both sides, so the CDF index
of each symbol agrees across devices and thread counts; a CRC of the symbols catches the
rest. Entropy tables are built once by :meth:`update` and stored with the weights.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from . import checkerboard as ckbd
from .config import CompressionConfig
from .coders import DecodeSteps, InlineCoder, encode_one, run_lockstep
from .entropy import GaussianConditional
from .errors import ModelFormatError
from .layers import (
    ChannelContext,
    EntropyParameters,
    ResidualBlock,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    conv3x3,
)
from .vq import CodebookQuantizer

ENTROPY_TABLE_KEYS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
CDF_PRECISION = 16  # compressai's rANS coder: every CDF row ends at 2**16
# The coder's escape code loops forever on values of 2**27 or more away from a row's offset;
# no sane latent comes near this.
MAX_SYMBOL = 1 << 24


@dataclass(frozen=True)
class LatentCode:
    """One image's entropy-coded latent: what the bitstream's sections carry."""

    hyper_indices: np.ndarray  # (h/64, w/64) codebook indices
    y_string: bytes  # rANS stream of all y symbols
    y_shape: tuple[int, int]  # (h/16, w/16)
    symbols_crc: int  # CRC32 of hyper indices and y symbols, in coding order
    symbols: np.ndarray | None = field(default=None, compare=False, repr=False)  # y symbols, coding order


@dataclass(frozen=True)
class LatentSymbols:
    """One image's latent before entropy coding: what the model hands to a coder."""

    hyper_indices: np.ndarray  # (h/64, w/64) codebook indices
    symbols: np.ndarray  # y symbols, int32, coding order
    indexes: np.ndarray  # their CDF rows (uint8 for tables of up to 256 rows)
    y_shape: tuple[int, int]
    symbols_crc: int

    def code(self, y_string: bytes) -> LatentCode:
        return LatentCode(self.hyper_indices, y_string, self.y_shape, self.symbols_crc, self.symbols)


@dataclass(frozen=True)
class DecodedLatents:
    z_c: torch.Tensor  # (B, latent_channels, h/8, w/8)
    guide_hint: torch.Tensor  # (B, M, h/8, w/8)
    symbols: list[np.ndarray]  # decoded y symbols per image, coding order
    symbols_crc: list[int]  # CRC32 of each image's decoded hyper indices and y symbols


def scale_table(config: CompressionConfig) -> list[float]:
    """Log-spaced scales of the Gaussian conditional (compressai's default: 0.11 → 256, 64 levels)."""
    c = config
    return torch.exp(torch.linspace(math.log(c.scale_min), math.log(c.scale_max), c.scale_levels)).tolist()


def entropy_buffers(config: CompressionConfig) -> dict[str, torch.Tensor]:
    """The Gaussian conditional's buffers, tables built, as ``LatentCompression`` would hold them."""
    gc = GaussianConditional(None)
    gc.update_scale_table(scale_table(config))
    return dict(gc.state_dict())


def check_entropy_tables(tables: Mapping[str, torch.Tensor], config: CompressionConfig,
                         where: str = "entropy tables") -> None:
    """Refuse tables that compressai's rANS coder cannot use safely, with one line naming ``where``.

    The coder is C++ with its asserts compiled out: a zero frequency divides by zero (SIGFPE), a
    row index past the table reads out of bounds (SIGSEGV), and an offset far from the symbols
    sends its escape code into an endless loop. So every property it relies on is checked here.
    """
    problem = _layout_problem(tables, config.scale_levels)
    problem = problem or _scale_table_problem(tables["scale_table"], config) or _cdf_problem(tables)
    if problem:
        raise ModelFormatError(f"{where}: {problem}")


def _layout_problem(tables: Mapping[str, torch.Tensor], rows: int) -> str | None:
    """Keys, dtypes and shapes; ``rows`` is the length of the config's scale table."""
    missing = [k for k in ENTROPY_TABLE_KEYS if k not in tables]
    if missing:
        return f"lacks {', '.join(missing)}"
    extra = sorted(set(tables) - set(ENTROPY_TABLE_KEYS))
    if extra:
        return f"holds unexpected tensors {extra}"
    scale, cdf = tables["scale_table"], tables["_quantized_cdf"]
    if not scale.is_floating_point():
        return f"scale_table has dtype {str(scale.dtype).removeprefix('torch.')}, expected a floating-point type"
    for key in ("_quantized_cdf", "_offset", "_cdf_length"):
        if tables[key].dtype != torch.int32:
            return f"{key} has dtype {str(tables[key].dtype).removeprefix('torch.')}, expected int32"
    if tuple(scale.shape) != (rows,):
        return f"scale_table has shape {tuple(scale.shape)}, but the config's scale table has {rows} (compression.scale_levels)"
    if cdf.dim() != 2 or cdf.shape[0] != rows or cdf.shape[1] < 2:
        return f"_quantized_cdf has shape {tuple(cdf.shape)}, expected ({rows}, width >= 2)"
    for key in ("_offset", "_cdf_length"):
        if tuple(tables[key].shape) != (rows,):
            return f"{key} has shape {tuple(tables[key].shape)}, expected ({rows},)"
    return None


def _scale_table_problem(scale: torch.Tensor, config: CompressionConfig) -> str | None:
    scale = scale.detach().cpu().double()
    if not torch.isfinite(scale).all():
        return "scale_table is not finite"
    expected = torch.tensor(scale_table(config), dtype=torch.float64)
    if not torch.allclose(scale, expected, rtol=1e-5, atol=0.0):  # stored float32: last-bit differences pass
        return (f"scale_table is not the one the config implies ({config.scale_levels} scales from "
                f"{config.scale_min} to {config.scale_max})")
    return None


def _first(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def _cdf_problem(tables: Mapping[str, torch.Tensor]) -> str | None:
    """What the coder needs of each row r of length L: cdf[r, 0] = 0 < cdf[r, 1] < ... < cdf[r, L-1] = 2**16."""
    cdf, lengths, offsets = (tables[k].detach().cpu().long() for k in ("_quantized_cdf", "_cdf_length", "_offset"))
    width = cdf.shape[1]
    bad = (lengths < 2) | (lengths > width)
    if bad.any():
        r = _first(bad)
        return f"_cdf_length[{r}] is {int(lengths[r])}, outside [2, {width}] (the CDF width)"
    bad = offsets.abs() > lengths
    if bad.any():
        r = _first(bad)
        return f"_offset[{r}] is {int(offsets[r])}, outside [-{int(lengths[r])}, {int(lengths[r])}] (its row's length)"
    bad = cdf[:, 0] != 0
    if bad.any():
        r = _first(bad)
        return f"row {r} of _quantized_cdf starts at {int(cdf[r, 0])}, not 0"
    ends = cdf.gather(1, (lengths - 1)[:, None])[:, 0]
    bad = ends != 1 << CDF_PRECISION
    if bad.any():
        r = _first(bad)
        return (f"row {r} of _quantized_cdf ends at {int(ends[r])} (position {int(lengths[r]) - 1}, "
                f"its _cdf_length - 1), not {1 << CDF_PRECISION}")
    used = torch.arange(width - 1)[None, :] < (lengths - 1)[:, None]
    bad = ((cdf[:, 1:] <= cdf[:, :-1]) & used).any(dim=1)
    if bad.any():
        r = _first(bad)
        return f"row {r} of _quantized_cdf is not increasing (a symbol would have zero frequency)"
    return None


def _check_symbols(sym: torch.Tensor) -> None:
    if not bool((sym.abs() <= MAX_SYMBOL).all()):  # NaN fails the comparison too
        raise ModelFormatError(f"the model's latents are NaN or beyond ±{MAX_SYMBOL}, which the rANS coder cannot "
                               "code: its weights are broken")


def _quantize_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


class LatentCompression(nn.Module):
    def __init__(self, config: CompressionConfig) -> None:
        super().__init__()
        self.config = config
        c, M, N, slices = config, config.M, config.N, config.slices
        self.g_a = nn.Sequential(
            ResidualBlock(c.in_channels, M),
            *[ResidualBlock(M, M) for _ in range(3)],
            ResidualBlockWithStride(M, M),
            *[ResidualBlock(M, M) for _ in range(3)],
            conv3x3(M, M),
        )
        self.h_a = nn.Sequential(
            ResidualBlock(M, N), ResidualBlock(N, N), ResidualBlockWithStride(N, N), ResidualBlockWithStride(N, N)
        )
        self.h_s = nn.Sequential(
            ResidualBlockUpsample(N, M),
            ResidualBlockUpsample(M, M),
            ResidualBlock(M, M * 3 // 2),
            ResidualBlock(M * 3 // 2, M * 2),
        )
        self.g_s = nn.Sequential(
            conv3x3(M, M),
            *[ResidualBlock(M, M) for _ in range(3)],
            ResidualBlockUpsample(M, M),
            *[ResidualBlock(M, M) for _ in range(4)],
        )
        self.out = conv3x3(M, c.latent_channels)
        self.local_context = nn.ModuleList(nn.Conv2d(s, 2 * s, 5, padding=2) for s in slices)
        self.channel_context = nn.ModuleList(
            [nn.Identity()]
            + [ChannelContext(sum(slices[:i]), 2 * slices[i], c.context_hidden) for i in range(1, len(slices))]
        )
        self.entropy_parameters_anchor = nn.ModuleList(
            EntropyParameters(2 * M + (2 * s if i else 0), 2 * s) for i, s in enumerate(slices)
        )
        self.entropy_parameters_nonanchor = nn.ModuleList(
            EntropyParameters(2 * M + (4 * s if i else 2 * s), 2 * s) for i, s in enumerate(slices)
        )
        self.quantizer = CodebookQuantizer(c.codebook_size, N)
        self.gaussian_conditional = GaussianConditional(None)
        # held in a tuple so that nn.Module does not register the copy as a submodule
        self._coding_copy: tuple[nn.ModuleDict, ...] = ()
        self._cdf_lists: tuple[list, list, list] | None = None

    # ------------------------------------------------------------------ tables
    def update(self, force: bool = False) -> bool:
        """Build the entropy tables (CDFs) from the scale table; done once, then stored with the weights."""
        updated = self.gaussian_conditional.update_scale_table(scale_table(self.config), force=force)
        self._cdf_lists = None
        return updated

    def has_entropy_tables(self) -> bool:
        return self.gaussian_conditional._quantized_cdf.numel() > 0

    def entropy_tables(self) -> dict[str, torch.Tensor]:
        gc = self.gaussian_conditional
        return {k: getattr(gc, k).detach().cpu().contiguous() for k in ENTROPY_TABLE_KEYS}

    def load_entropy_tables(self, tables: dict[str, torch.Tensor]) -> None:
        check_entropy_tables(tables, self.config)
        gc = self.gaussian_conditional
        for k in ENTROPY_TABLE_KEYS:
            current = getattr(gc, k)
            setattr(gc, k, tables[k].to(device=current.device, dtype=current.dtype).clone())
        self._cdf_lists = None

    def _cdfs(self) -> tuple[list, list, list]:
        if not self.has_entropy_tables():
            raise RuntimeError("entropy tables are missing: call update() once after training, then save them")
        if self._cdf_lists is None:
            check_entropy_tables(self.entropy_tables(), self.config)  # whatever set them, the coder trusts them
            gc = self.gaussian_conditional
            lengths = gc._cdf_length.reshape(-1).int().tolist()
            # Each row cut to its own length: the coder reads no further, and it converts every row it
            # is given on every call, 7× more numbers for rows padded to the widest (sd21: 64 × 3133).
            self._cdf_lists = (
                [row[:n] for row, n in zip(gc._quantized_cdf.tolist(), lengths)],
                lengths,
                gc._offset.reshape(-1).int().tolist(),
            )
        return self._cdf_lists

    def _index_dtype(self) -> torch.dtype:
        """CDF rows as the coders are sent them: one byte each for the usual 64-row table."""
        return torch.uint8 if self.config.scale_levels <= 256 else torch.int32

    # ------------------------------------------------- coding-precision copies
    def _coding_modules(self) -> nn.ModuleDict:
        """The modules both encoder and decoder evaluate, in ``coding_dtype`` (cached, no grad)."""
        if not self._coding_copy:
            dtype = getattr(torch, self.config.coding_dtype)
            parts = nn.ModuleDict(
                {
                    "h_s": self.h_s,
                    "local": self.local_context,
                    "channel": self.channel_context,
                    "anchor": self.entropy_parameters_anchor,
                    "nonanchor": self.entropy_parameters_nonanchor,
                }
            )
            self._coding_copy = (copy.deepcopy(parts).to(dtype).requires_grad_(False),)
        return self._coding_copy[0]

    def _invalidate(self) -> None:
        self._coding_copy = ()
        self._cdf_lists = None

    def train(self, mode: bool = True) -> "LatentCompression":
        self._invalidate()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .double() ...
        self._invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._invalidate()
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------ training path
    def _slice_bounds(self) -> list[tuple[int, int]]:
        edges = np.cumsum((0,) + tuple(self.config.slices)).tolist()
        return list(zip(edges[:-1], edges[1:]))

    def forward(self, feat: torch.Tensor) -> dict:
        """Training forward. Returns z_c, guide_hint, y likelihoods (noisy and rounded) and the VQ loss."""
        y = self.g_a(feat)
        z = self.h_a(y)
        z_q, vq_loss, indices = self.quantizer(z)
        hyper = self.h_s(z_q)
        gc = self.gaussian_conditional
        y_hats, lik, qlik = [], [], []
        for i, (a, b) in enumerate(self._slice_bounds()):
            y_i = y[:, a:b]
            ctx = [] if i == 0 else [self.channel_context[i](torch.cat(y_hats, dim=1))]
            s_a, m_a = self.entropy_parameters_anchor[i](torch.cat(ctx + [hyper], dim=1)).chunk(2, 1)
            s_a, m_a = ckbd.mask(s_a, True), ckbd.mask(m_a, True)
            anchor_hat = _quantize_ste(ckbd.mask(y_i, True) - m_a) + m_a
            local = self.local_context[i](anchor_hat)
            s_n, m_n = self.entropy_parameters_nonanchor[i](torch.cat([local] + ctx + [hyper], dim=1)).chunk(2, 1)
            s_n, m_n = ckbd.mask(s_n, False), ckbd.mask(m_n, False)
            scales, means = s_a + s_n, m_a + m_n
            lik.append(gc(y_i, scales, means)[1])
            qlik.append(gc(y_i, scales, means, False)[1])
            nonanchor_hat = _quantize_ste(ckbd.mask(y_i, False) - m_n) + m_n
            y_hats.append(anchor_hat + nonanchor_hat)
        y_hat = torch.cat(y_hats, dim=1)
        guide = self.g_s(y_hat)
        return {
            "z_c": self.out(guide),
            "guide_hint": guide,
            "likelihoods": torch.cat(lik, dim=1),
            "q_likelihoods": torch.cat(qlik, dim=1),
            "vq_loss": vq_loss,
            "indices": indices,
            "y_hat": y_hat,
        }

    # --------------------------------------------------------------- coding path
    def cdf_tables(self) -> tuple[list, list, list]:
        """The entropy tables as the rANS coder takes them (checked once, then cached)."""
        return self._cdfs()

    @torch.no_grad()
    def analyse(self, feat: torch.Tensor) -> list[LatentSymbols]:
        """The model side of :meth:`compress`: each image's symbols and CDF rows, ready for a coder."""
        y = self.g_a(feat)
        _, indices = self.quantizer.quantize(self.h_a(y))
        ctxm = self._coding_modules()
        dtype = getattr(torch, self.config.coding_dtype)
        hyper = ctxm["h_s"](self.quantizer.lookup(indices).to(dtype))
        y = y.to(dtype)
        gc = self.gaussian_conditional
        symbols: list[torch.Tensor] = []
        cdf_idx: list[torch.Tensor] = []
        y_hats: list[torch.Tensor] = []

        def code(values: torch.Tensor, scales: torch.Tensor, means: torch.Tensor, anchor: bool) -> torch.Tensor:
            v, s, m = (ckbd.squeeze(t, anchor) for t in (values, scales, means))
            sym = torch.round(v - m)
            _check_symbols(sym)
            symbols.append(sym.flatten(1).to(torch.int32))
            cdf_idx.append(gc.build_indexes(s).flatten(1).to(self._index_dtype()))
            return ckbd.unsqueeze(sym + m, anchor)

        for i, (a, b) in enumerate(self._slice_bounds()):
            ctx = [] if i == 0 else [ctxm["channel"][i](torch.cat(y_hats, dim=1))]
            s_a, m_a = ctxm["anchor"][i](torch.cat(ctx + [hyper], dim=1)).chunk(2, 1)
            anchor_hat = code(y[:, a:b], s_a, m_a, anchor=True)
            local = ctxm["local"][i](anchor_hat)
            s_n, m_n = ctxm["nonanchor"][i](torch.cat([local] + ctx + [hyper], dim=1)).chunk(2, 1)
            y_hats.append(anchor_hat + code(y[:, a:b], s_n, m_n, anchor=False))

        self._cdfs()  # refuse broken tables before anything is handed to a coder
        sym_all = torch.cat(symbols, dim=1).cpu().numpy()  # (B, symbols), coding order
        idx_all = torch.cat(cdf_idx, dim=1).cpu().numpy()
        hyper_all = indices.cpu().numpy().astype(np.int64)
        out = []
        for n in range(y.shape[0]):
            sym = np.ascontiguousarray(sym_all[n])
            crc = zlib.crc32(sym.astype("<i4").tobytes(), zlib.crc32(hyper_all[n].astype("<i4").tobytes()))
            out.append(LatentSymbols(hyper_all[n], sym, np.ascontiguousarray(idx_all[n]), tuple(y.shape[-2:]), crc))
        return out

    @torch.no_grad()
    def compress(self, feat: torch.Tensor) -> list[LatentCode]:
        """Entropy-code a batch of VAE features (B, in_channels, h/8, w/8) into one LatentCode per image."""
        tables = self._cdfs()
        return [s.code(encode_one(s.symbols, s.indexes, tables)) for s in self.analyse(feat)]

    def decode_steps(self, codes: list[LatentCode]) -> DecodeSteps:
        """The model side of :meth:`decompress`, as a generator: yields each image's CDF rows of the next
        chunk of symbols, receives the chunk's decoded symbols, returns the DecodedLatents
        (:func:`rdeic.coders.run_lockstep` drives it; ``symbols_crc`` of the codes is not consulted)."""
        shapes = {(c.y_shape, c.hyper_indices.shape) for c in codes}
        if len(shapes) != 1:
            raise ValueError(f"decompress takes codes of one shape per call, got {sorted(shapes)}")
        with torch.no_grad():
            device = self.out.weight.device
            dtype = getattr(torch, self.config.coding_dtype)
            indices = torch.from_numpy(np.stack([c.hyper_indices for c in codes])).long().to(device)
            ctxm = self._coding_modules()
            hyper = ctxm["h_s"](self.quantizer.lookup(indices).to(dtype))
            gc = self.gaussian_conditional
            self._cdfs()
        crcs = [zlib.crc32(c.hyper_indices.astype("<i4").tobytes()) for c in codes]
        decoded: list[list[np.ndarray]] = [[] for _ in codes]
        y_hats: list[torch.Tensor] = []
        for i in range(len(self.config.slices)):
            for anchor in (True, False):
                with torch.no_grad():
                    ctx = [] if i == 0 else [ctxm["channel"][i](torch.cat(y_hats, dim=1))]
                    if anchor:
                        s, m = ctxm["anchor"][i](torch.cat(ctx + [hyper], dim=1)).chunk(2, 1)
                    else:
                        local = ctxm["local"][i](anchor_hat)
                        s, m = ctxm["nonanchor"][i](torch.cat([local] + ctx + [hyper], dim=1)).chunk(2, 1)
                    s, m = ckbd.squeeze(s, anchor), ckbd.squeeze(m, anchor)
                    idx = gc.build_indexes(s).flatten(1).to(self._index_dtype()).cpu().numpy()
                values = yield [np.ascontiguousarray(row) for row in idx]
                for n, vals in enumerate(values):
                    crcs[n] = zlib.crc32(vals.astype("<i4").tobytes(), crcs[n])
                    decoded[n].append(vals)
                with torch.no_grad():
                    sym = torch.from_numpy(np.stack(values)).reshape(s.shape).to(device=device, dtype=dtype)
                    hat = ckbd.unsqueeze(sym + m, anchor)
                if anchor:
                    anchor_hat = hat
                else:
                    y_hats.append(anchor_hat + hat)
        with torch.no_grad():
            y_hat = torch.cat(y_hats, dim=1).to(self.out.weight.dtype)
            guide = self.g_s(y_hat)
            return DecodedLatents(self.out(guide), guide, [np.concatenate(d) for d in decoded], crcs)

    def decompress(self, codes: list[LatentCode]) -> DecodedLatents:
        """Decode LatentCodes of one shape (their ``symbols_crc`` is not consulted here)."""
        result: list[DecodedLatents] = []
        run_lockstep([([c.y_string for c in codes], self.decode_steps(codes), result.append)], InlineCoder(self._cdfs()))
        return result[0]
