"""The codec API every job uses: RGB uint8 images <-> RDEIC bitstreams, batched.

Images of any size are padded (edge replication) to a multiple of 64, grouped by padded
size into batches, and cropped back after decoding. Decoding is reproducible: the relay
sampler's noise comes from the seed stored in each bitstream, drawn on the CPU.

On CPU, oneDNN and MKL split reductions differently for different thread counts, which
changes the last bits of convolutions and so, now and then, a pixel. With
``deterministic=True`` (the default) the codec runs its float work with one intra-op
thread, so the same bitstream decodes to the same bytes whatever the process's thread
settings; scale out with processes (Ray gives each CPU actor one thread anyway).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import bitstream as bs
from .coders import CoderPool, InlineCoder, YStream, make_coder, run_lockstep, run_pipelined
from .compression import DecodedLatents, LatentCode
from .config import TilingConfig
from .errors import BitstreamError, EntropyDesyncError, ModelMismatchError, PayloadError
from .model import RDEIC
from .modeldir import legacy_digest
from .tiling import TilePlan, supported_pixels
from .weights import ModelId, load_model


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a numpy array (H, W, 3) of uint8, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be RGB uint8 of shape (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{what} is empty: shape {image.shape}")
    return image


# compressai's rANS decoder (C++) checks no bounds. Its escape code reads 15 more raw nibbles for every
# 0xF nibble it meets, so a run of 0xFF bytes in a y section sends it gigabytes past its buffer; the
# encoder writes pseudo-random 32-bit words and never such a run.
MAX_FF_RUN = 16


def _check_y(y: bytes) -> None:
    """Refuse a y section the encoder cannot have written and the decoder cannot read safely (see MAX_FF_RUN)."""
    if len(y) < 8 or len(y) % 4:
        raise PayloadError(f"bitstream y section has {len(y)} bytes, not an rANS stream (whole 32-bit words, at least 2)")
    if b"\xff" * MAX_FF_RUN in y:
        raise PayloadError(f"bitstream y section holds a run of {MAX_FF_RUN} bytes 0xFF, which no encoder writes")


def _batches(items: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


class Codec:
    def __init__(
        self,
        model: RDEIC,
        model_id: ModelId,
        device: str | torch.device | None = None,
        max_batch: int = 8,
        deterministic: bool = True,
        model_dir: str | os.PathLike | None = None,
        coder_processes: int = 0,
        tiling: TilingConfig | None = None,
    ) -> None:
        """``model_dir``: where the model was loaded from, to accept bitstreams with its legacy digest.
        ``coder_processes``: entropy coding in that many processes beside the model (0: in this thread);
        see :mod:`rdeic.coders`. The bytes and pixels are the same either way.
        ``tiling``: when to encode an image in tiles, and how (default: the model config's); a tiled
        bitstream carries its plan, so decoding follows the stream, not this setting."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if isinstance(coder_processes, bool) or not isinstance(coder_processes, int) or coder_processes < 0:
            raise ValueError(f"coder_processes must be an integer >= 0, got {coder_processes!r}")
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        self.model_id = model_id
        self.max_batch = max_batch
        self.deterministic = deterministic
        self.model_dir = model_dir
        self.coder_processes = coder_processes
        self.tiling = tiling if tiling is not None else model.config.tiling
        self._coder: InlineCoder | CoderPool | None = None
        self._legacy_digest: bytes | None = None

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch: int = 8,
        deterministic: bool = True,
        coder_processes: int = 0,
        tiling: TilingConfig | None = None,
    ) -> "Codec":
        model, model_id = load_model(model_dir, device=device, dtype=dtype)
        return cls(model, model_id, device=device, max_batch=max_batch, deterministic=deterministic, model_dir=model_dir,
                   coder_processes=coder_processes, tiling=tiling)

    def coder(self) -> InlineCoder | CoderPool:
        """The entropy coder (its processes start on first use)."""
        if self._coder is None:
            self._coder = make_coder(self.model.compression.cdf_tables(), self.coder_processes)
        return self._coder

    def close(self) -> None:
        """Stop the coder processes, if any (also done at exit); the codec stays usable."""
        if self._coder is not None:
            self._coder.close()

    def __enter__(self) -> "Codec":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _numerics(self):
        """One intra-op thread on CPU when deterministic (see the module docstring)."""
        if self.device.type != "cpu" or not self.deterministic:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def warm_up(self) -> None:
        """Run one small image through both directions (allocators, kernel selection)."""
        image = np.full((64, 64, 3), 128, dtype=np.uint8)
        self.decompress(self.compress([image]), steps=1)

    @property
    def config(self):
        return self.model.config

    def tile_plan(self, pad_height: int, pad_width: int) -> TilePlan | None:
        """The plan an image of this padded size is encoded with: None (one piece) up to
        ``tiling.min_pixels`` padded pixels, or when one tile covers it anyway."""
        t = self.tiling
        latent = (pad_height // 8, pad_width // 8)
        if pad_height * pad_width <= t.min_pixels or max(latent) <= t.tile:
            return None
        return TilePlan(t.tile, t.overlap)

    def supported_pixels(self) -> int:
        """The largest image (padded pixels) this codec's device should take, by :func:`rdeic.tiling.supported_pixels`:
        a GPU's memory, or on CPU the machine's memory shared by one worker per core; at most the
        decoders' default limit (:data:`rdeic.bitstream.DEFAULT_MAX_PIXELS`)."""
        if self.device.type == "cuda":
            memory = torch.cuda.get_device_properties(self.device).total_memory
        else:
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (os.cpu_count() or 1)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return supported_pixels(self.config, memory, weights, bs.DEFAULT_MAX_PIXELS)

    def bpp(self, bitstream: bytes, width: int, height: int) -> float:
        return len(bitstream) * 8 / (width * height)

    # ------------------------------------------------------------- compress
    @torch.no_grad()
    def compress(self, images: Sequence[np.ndarray], seeds: Sequence[int] | None = None) -> list[bytes]:
        """One bitstream per image. ``seeds`` fixes the decode noise; by default it derives from the content."""
        images = [check_image(im, f"images[{i}]") for i, im in enumerate(images)]
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[(bs.padded(im.shape[0]), bs.padded(im.shape[1]))].append(i)
        out: list[bytes] = [b""] * len(images)

        def analyse(batch: list[int]):
            ph, pw = bs.padded(images[batch[0]].shape[0]), bs.padded(images[batch[0]].shape[1])
            plan = self.tile_plan(ph, pw)
            tensors = [self._to_tensor(images[i], ph, pw) for i in batch]
            x = (tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)).to(self.device, self.model.encoder_dtype)
            del tensors  # a 24 MP image is 290 MB a copy in float32
            with self._numerics():
                if plan is None:
                    feat = self.model.vae_features(x)[0]
                else:
                    feat = self.model.tiled_features(x, plan, self.tiling.batch)
                del x
                latents = self.model.compression.analyse(feat.float())
            return [(s.symbols, s.indexes) for s in latents], (latents, plan)

        def finish(batch: list[int], analysed, y_strings: list[bytes]) -> None:
            latents, plan = analysed
            for i, latent, y in zip(batch, latents, y_strings):
                seed = latent.symbols_crc if seeds is None else int(seeds[i])
                out[i] = self._write(images[i].shape, latent.code(y), seed, plan)

        # A tiled image is a batch of its own: its tiles batch together, and its whole-image tensors
        # are what memory grows with.
        batches = (batch for (ph, pw), members in groups.items()
                   for batch in _batches(members, 1 if self.tile_plan(ph, pw) else self.max_batch))
        run_pipelined(batches, analyse, self.coder(), finish)
        return out

    @staticmethod
    def _to_tensor(image: np.ndarray, ph: int, pw: int) -> torch.Tensor:
        x = torch.tensor(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        h, w = image.shape[:2]
        if (h, w) != (ph, pw):
            x = F.pad(x[None], (0, pw - w, 0, ph - h), mode="replicate")[0]
        return x

    def _write(self, shape: tuple[int, ...], code: LatentCode, seed: int, plan: TilePlan | None = None) -> bytes:
        h, w = shape[:2]
        bits = self.config.compression.index_bits
        header = bs.Header(
            model_name="",
            model_hash=self.model_id.digest[:bs.V2_HASH_BYTES],
            width=w,
            height=h,
            pad_width=bs.padded(w),
            pad_height=bs.padded(h),
            y_shape=code.y_shape,
            z_shape=tuple(code.hyper_indices.shape),
            index_bits=bits,
            seed=seed & 0xFFFFFFFF,
            symbols_crc=code.symbols_crc,
            version=bs.FORMAT_VERSION,
            tiles=None if plan is None else (plan.tile, plan.overlap),
        )
        return bs.write(header, bs.pack_indices(code.hyper_indices, bits), code.y_string)

    def rewrap(self, data: bytes, version: int = bs.FORMAT_VERSION) -> bytes:
        """The same stream in container ``version`` (1 or 2) for this model: header fields, symbols and
        payload bytes unchanged, no model run; version 1 carries this model's name and full digest."""
        stream = self.parse(data)
        name, digest = (self.model_id.name, self.model_id.digest) if version == 1 else ("", self.model_id.digest[:bs.V2_HASH_BYTES])
        return bs.write(replace(stream.header, version=version, model_name=name, model_hash=digest), stream.hyper, stream.y)

    # ----------------------------------------------------------- decompress
    def parse(self, data: bytes) -> bs.Bitstream:
        """Parse and check a bitstream against this codec's model (no decoding)."""
        stream = bs.read(data)
        h = stream.header
        if h.version == 2:  # a digest prefix: enough to tell the models of an archive apart
            if h.model_hash != self.model_id.digest[:bs.V2_HASH_BYTES]:
                raise ModelMismatchError(f"bitstream was written by a model whose id digest starts {h.model_hash.hex()}, "
                                         f"this decoder has {self.model_id}")
        elif h.model_name != self.model_id.name or (h.model_hash != self.model_id.digest and h.model_hash != self.legacy_digest()):
            raise ModelMismatchError(f"bitstream was written by model {h.model_id}, this decoder has {self.model_id}")
        if h.index_bits != self.config.compression.index_bits:
            raise ModelMismatchError(f"bitstream uses {h.index_bits}-bit indices, the model {self.config.compression.index_bits}")
        return stream

    def legacy_digest(self) -> bytes | None:
        """The digest of this model's files as ids were before rdeic-model-id/2, which older bitstreams carry."""
        if self._legacy_digest is None and self.model_dir is not None:
            self._legacy_digest = legacy_digest(self.model_dir)
        return self._legacy_digest

    def check_decode_args(self, steps: int | None, detail: float, max_pixels: int | None = None) -> int:
        steps = self.config.diffusion.default_steps if steps is None else steps
        used = self.config.diffusion.used_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= used:
            raise ValueError(f"steps must be an integer in [1, {used}], got {steps!r}")
        if not isinstance(detail, (int, float)) or not math.isfinite(detail):
            raise ValueError(f"detail (λs) must be a finite number, got {detail!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive integer (padded pixels) or None, got {max_pixels!r}")
        return steps

    @torch.no_grad()
    def decompress(self, bitstreams: Sequence[bytes], steps: int | None = None, detail: float = 1.0,
                   max_pixels: int | None = bs.DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
        """Decode bitstreams to RGB uint8 images; raises the first bitstream's error, if any.

        ``max_pixels``: see :meth:`decompress_results`.
        """
        results = self.decompress_results(bitstreams, steps=steps, detail=detail, max_pixels=max_pixels)
        for r in results:
            if isinstance(r, BitstreamError):
                raise r
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def decompress_results(self, bitstreams: Sequence[bytes], steps: int | None = None, detail: float = 1.0,
                           max_pixels: int | None = bs.DEFAULT_MAX_PIXELS) -> list[np.ndarray | BitstreamError]:
        """Like :meth:`decompress`, but a bad bitstream yields its error in place of an image.

        ``max_pixels`` bounds the padded size (sides rounded up to multiples of 64) a bitstream may
        claim; over it, the stream is refused (ImageTooLargeError) before anything is allocated for
        it. None: no limit, for trusted streams only.
        """
        steps = self.check_decode_args(steps, detail, max_pixels)
        results: list[np.ndarray | BitstreamError] = [None] * len(bitstreams)  # type: ignore[list-item]

        def job(batch: list[tuple[int, bs.Bitstream]]):
            def done(latents: DecodedLatents) -> None:  # maybe on another thread: grad mode is per thread
                with torch.no_grad(), self._numerics():
                    images = self._diffuse([s for _, s in batch], latents, steps, float(detail))
                for (i, _), image in zip(batch, images):
                    results[i] = image

            return self._decode_job(batch, done)

        # Diffusion on a thread of its own only on an accelerator: on CPU it shares the cores anyway, and
        # torch's intra-op thread setting (one thread, see _numerics) is not per thread for every backend.
        run_lockstep((job(b) for b in self._accepted_batches(bitstreams, max_pixels, results)), self.coder(),
                     finish_in_thread=self.device.type != "cpu")
        return results

    @torch.no_grad()
    def verify(self, bitstreams: Sequence[bytes], max_pixels: int | None = bs.DEFAULT_MAX_PIXELS) -> list[BitstreamError | None]:
        """Check bitstreams as far as entropy decoding, without diffusion: None for a sound one, else its error.

        Covers everything but the pixels: container (magic, version, CRC32), this model, the size limit,
        the payload, and the entropy decoder's symbols against the encoder's CRC.
        """
        results: list[BitstreamError | None] = [None] * len(bitstreams)

        def job(batch: list[tuple[int, bs.Bitstream]]):
            def done(latents: DecodedLatents) -> None:
                for (i, s), crc in zip(batch, latents.symbols_crc):
                    if crc != s.header.symbols_crc:
                        results[i] = _desync()

            return self._decode_job(batch, done)

        run_lockstep((job(b) for b in self._accepted_batches(bitstreams, max_pixels, results)), self.coder())
        return results

    def _decode_job(self, batch: list[tuple[int, bs.Bitstream]], done):
        """A batch as :func:`rdeic.coders.run_lockstep` takes it. The y bytes go to the coders as they are,
        with the length of their safety margin (see :meth:`_latent_code`): the zeros are added where
        the decoder runs, not shipped to it (1.3 MB per sd21-size image)."""
        codes = [self._latent_code(s, margin=False) for _, s in batch]
        ys = [YStream(s.y, self._margin(s.header)) for _, s in batch]
        return ys, self._numerics_steps(self.model.compression.decode_steps(codes)), done

    def _numerics_steps(self, steps):
        """A decode generator whose every step runs under :meth:`_numerics`."""
        request = None
        while True:
            with self._numerics():
                try:
                    values = steps.send(request)
                except StopIteration as stop:
                    return stop.value
            request = yield values

    def _accepted_batches(self, bitstreams: Sequence[bytes], max_pixels: int | None,
                          results: list) -> Iterable[list[tuple[int, bs.Bitstream]]]:
        """Batches (position, stream) of the accepted streams, each of one padded size and so of one latent
        shape; a refused stream's error goes to ``results`` at its position."""
        groups: dict[tuple, list[tuple[int, bs.Bitstream]]] = defaultdict(list)
        for i, data in enumerate(bitstreams):
            try:
                stream = self._accept(data, max_pixels)
            except BitstreamError as exc:
                results[i] = exc
                continue
            groups[(stream.header.pad_height, stream.header.pad_width, stream.header.tiles)].append((i, stream))
        for (_, _, tiles), members in groups.items():
            size = 1 if tiles else self.max_batch  # a tiled image is a batch of its own, as in compress
            for start in range(0, len(members), size):
                yield members[start:start + size]

    def _accept(self, data: bytes, max_pixels: int | None) -> bs.Bitstream:
        """Parse, check the size, then the payload (the indices are unpacked only once the size is acceptable)."""
        stream = self.parse(data)
        bs.check_size(stream.header, max_pixels)
        codes = self.config.compression.codebook_size
        largest = int(stream.hyper_indices.max())
        if largest >= codes:  # possible when the codebook size is not a power of two
            raise PayloadError(f"bitstream holds hyper-latent index {largest}, the model's codebook has {codes} codes")
        _check_y(stream.y)
        return stream

    def _latent_code(self, stream: bs.Bitstream, margin: bool = True) -> LatentCode:
        """The stream's code, its y bytes followed by zeros that keep a damaged stream's decoding in bounds
        (``margin=False``: without them, for a coder that adds them itself, see :class:`rdeic.coders.YStream`).

        When a y section ends early (damaged or forged), the decoder reads on: one 32-bit word per symbol
        at most, and, with runs of 0xFF refused (:func:`_check_y`), a few escape codes' worth more
        (tests/rdeic/test_bitstream_fuzz.py checks this). A valid stream never reaches the zeros.
        """
        h = stream.header
        y = stream.y + bytes(self._margin(h)) if margin else stream.y
        return LatentCode(stream.hyper_indices, y, h.y_shape, h.symbols_crc)

    def _margin(self, h: bs.Header) -> int:
        """Zeros after a y section: one 32-bit word per symbol and room for escape codes (see _latent_code)."""
        return 4 * self.config.compression.M * h.y_shape[0] * h.y_shape[1] + (64 << 10)

    def _diffuse(self, streams: list[bs.Bitstream], latents: DecodedLatents, steps: int,
                 detail: float) -> list[np.ndarray | BitstreamError]:
        """Pixels of the streams whose symbols check out, from their decoded latents."""
        z_c, hint = latents.z_c, latents.guide_hint
        ok = [k for k, (s, crc) in enumerate(zip(streams, latents.symbols_crc)) if crc == s.header.symbols_crc]
        out: list[np.ndarray | BitstreamError] = [_desync()] * len(streams)
        if not ok:
            return out
        dtype = self.model.dtype
        tiles = streams[0].header.tiles  # one plan per batch (see _accepted_batches)
        plan = None if tiles is None else TilePlan(*tiles)
        batch = self.tiling.batch
        start, step_noises = self._noise([streams[k].header.seed for k in ok], tuple(z_c.shape[1:]), steps)
        z0 = self.model.relay_decode(
            z_c[ok].to(dtype), hint[ok].to(dtype), steps, detail, start.to(self.device, dtype), [n.to(self.device, dtype) for n in step_noises],
            plan=plan, batch=batch,
        )
        x = self.model.decode_latent(z0, plan, batch).float()
        pixels = x.clamp_(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        del x
        for row, k in enumerate(ok):
            h = streams[k].header
            out[k] = np.ascontiguousarray(pixels[row, : h.height, : h.width])
        return out

    @staticmethod
    def _noise(seeds: list[int], shape: tuple[int, ...], steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Start noise and per-step noises for each image, drawn on the CPU from its own seed."""
        per_image = []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            per_image.append([torch.randn(shape, generator=g) for _ in range(steps)])
        start = torch.stack([draws[0] for draws in per_image])
        step_noises = [torch.stack([draws[k] for draws in per_image]) for k in range(1, steps)]
        return start, step_noises


def _desync() -> EntropyDesyncError:
    return EntropyDesyncError("entropy decoding desynchronised: decoded symbols do not match the encoder's CRC")
