"""The RDEIC model: frozen SD VAE and UNet, control module, latent compression module.

One class for every preset; sizes come from :class:`rdeic.config.ModelConfig`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .compression import LatentCompression
from .config import ModelConfig
from .control import ControlModule, predict_noise
from .diffusion import RelaySchedule, sample
from .tiling import SCALE, TilePlan, blend


def randn(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Normal noise drawn on the (CPU) generator, then moved to ``like``'s device and dtype: the same
    numbers on any device, and no CUDA error for a CPU generator."""
    return torch.randn(tuple(shape), generator=generator).to(like)


def _vae_batch(plan: TilePlan, batch: int) -> int:
    """VAE tiles per call: about as many pixels as ``batch`` UNet tiles."""
    vae = plan.vae()
    return max(1, batch * plan.tile**2 // vae.tile**2)


class RDEIC(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vae = AutoencoderKL(**config.vae)
        self.unet = UNet2DConditionModel(**config.unet)
        self.compression = LatentCompression(config.compression)
        self.control = ControlModule(config.unet, config.control, hint_channels=config.compression.M)
        # The empty-prompt text embedding, computed once so no text encoder runs at decode time.
        self.register_buffer("text_context", torch.zeros(1, config.text_context_length, config.context_dim))
        self.schedule = RelaySchedule(config.diffusion)

    @property
    def device(self) -> torch.device:
        return self.text_context.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def set_inference_dtype(self, dtype: torch.dtype) -> None:
        """Run the decoder side (UNet, control, VAE decoder) in ``dtype``. The encoder side (VAE
        encoder, compression module) stays float32, so that an image's bitstream does not depend on
        the runtime precision; on a GPU that side is a small part of the work and the entropy coders
        are the bottleneck anyway (docs/performance.md)."""
        for part in (self.vae.decoder, self.vae.post_quant_conv, self.unet, self.control):
            if part is not None:
                part.to(dtype=dtype)

    def freeze_base(self) -> None:
        """SD stays frozen: only the control and compression modules train."""
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(False)

    # --------------------------------------------------------------- VAE side
    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.vae.encoder.conv_in.weight.dtype

    def vae_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(compression input, latent moments) for images in [-1, 1].

        The compression input is the encoder's last feature map before ``conv_out`` (after
        the final norm + SiLU), times the latent scale factor.
        """
        enc = self.vae.encoder
        h = enc.conv_in(x)
        for block in enc.down_blocks:
            h = block(h)
        h = enc.conv_act(enc.conv_norm_out(enc.mid_block(h)))
        moments = enc.conv_out(h)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return h * self.config.scale_factor, moments

    def tiled_features(self, x: torch.Tensor, plan: TilePlan, batch: int = 4) -> torch.Tensor:
        """The compression input of :meth:`vae_features`, from image tiles (``plan.vae()``) blended at 1/8."""
        channels = self.config.compression.in_channels
        return blend(lambda tiles: self.vae_features(tiles[0])[0], [x], plan.vae(), channels, in_scale=SCALE,
                     batch=_vae_batch(plan, batch), out_dtype=x.dtype)

    def latent_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """z0 = scale·(mean, or a posterior sample when ``sample``)."""
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * randn(mean.shape, generator, mean)
        return z * self.config.scale_factor

    def decode_latent(self, z: torch.Tensor, plan: TilePlan | None = None, batch: int = 4) -> torch.Tensor:
        """VAE decoder: scaled latent -> image in [-1, 1] (not clamped); with ``plan``, over the tiles of
        ``plan.vae()``, blended, in float32."""
        if plan is None:
            return self.vae.decode(z / self.config.scale_factor).sample
        return blend(lambda tiles: self.vae.decode(tiles[0] / self.config.scale_factor).sample, [z], plan.vae(),
                     self.vae.config.out_channels, out_scale=SCALE, batch=_vae_batch(plan, batch))

    # ---------------------------------------------------------- noise estimator
    def context(self, batch: int) -> torch.Tensor:
        return self.text_context.to(self.dtype).expand(batch, -1, -1)

    def eps(self, x_t: torch.Tensor, t: int | torch.Tensor, hint: torch.Tensor, detail: float = 1.0) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        return predict_noise(self.unet, self.control, x_t, t, self.context(x_t.shape[0]), hint, detail)

    def relay_decode(
        self,
        z_c: torch.Tensor,
        hint: torch.Tensor,
        steps: int,
        detail: float,
        start_noise: torch.Tensor,
        step_noises: Sequence[torch.Tensor],
        plan: TilePlan | None = None,
        batch: int = 4,
    ) -> torch.Tensor:
        """ẑ0 from the compressed latent in ``steps`` denoising steps; with ``plan``, every step's noise
        prediction is made per tile and blended (the sampler's update itself is per pixel)."""
        z = self.schedule.start(z_c, start_noise)
        if plan is None:
            return sample(lambda x, t: self.eps(x, t, hint, detail), z, self.schedule, steps, step_noises)

        def tiled_eps(x: torch.Tensor, t: int) -> torch.Tensor:
            return blend(lambda tiles: self.eps(tiles[0], t, tiles[1], detail), [x, hint], plan, x.shape[1],
                         batch=batch, out_dtype=x.dtype)

        return sample(tiled_eps, z, self.schedule, steps, step_noises)

    def unet_passes(self, steps: int, detail: float) -> int:
        return steps * (1 if detail in (0.0, 1.0) else 2)
