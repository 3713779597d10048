"""Training objectives: the two RDEIC stages, and the base-model pretraining used for small presets.

Stage 1, independent training (t ~ U{0..N−1})::

    rate + L_vq + λ_r·(‖ẑ0 − z0‖² + ‖z_c − z0‖²)

with ẑ0 predicted from z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·(ε + (z_c − z0)/λ).

Stage 2, fixed-step fine-tuning (all L sampler steps with gradients, then the VAE decoder)::

    rate + L_vq + λ_r·(MSE(x̂, x) + w_p·P(x̂, x) + ‖z_c − z0‖²),   P = LPIPS, w_p = 0.5 in the paper

The VAE and UNet are frozen; gradients reach the control and compression modules only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import sample
from .model import RDEIC, randn


def bits_per_pixel(likelihoods: torch.Tensor, num_pixels: int) -> torch.Tensor:
    return likelihoods.log().sum() / (-math.log(2) * num_pixels)


def _psnr(mse: torch.Tensor) -> float:
    """PSNR of an MSE between images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse.item(), 1e-12))


@dataclass(frozen=True)
class LossWeights:
    lambda_r: float = 2.0
    rate: float = 1.0
    perceptual: float = 0.5
    fixed_steps: int = 2


class StageLoss(nn.Module):
    """One training objective as a module, so that DDP can wrap its forward."""

    def __init__(self, model: RDEIC, stage: str, weights: LossWeights, perceptual: nn.Module | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if stage not in ("vae", "denoiser", "stage1", "stage2"):
            raise ValueError(f"stage must be vae, denoiser, stage1 or stage2, got {stage!r}")
        self.model, self.stage, self.w = model, stage, weights
        self.perceptual = perceptual
        self.generator = generator or torch.Generator().manual_seed(0)

    def trainable(self) -> list[nn.Parameter]:
        m = self.model
        parts = {"vae": [m.vae], "denoiser": [m.unet], "stage1": [m.control, m.compression], "stage2": [m.control, m.compression]}
        return [p for part in parts[self.stage] for p in part.parameters()]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return getattr(self, f"_{self.stage}")(x)

    # ----------------------------------------------------------- RDEIC stages
    def _encode(self, x: torch.Tensor):
        with torch.no_grad():
            feat, moments = self.model.vae_features(x)
            z0 = self.model.latent_from_moments(moments, generator=self.generator, sample=True)
        out = self.model.compression(feat.float())
        if out["vq_loss"] is None:  # eval mode: no codebook update, no codebook loss
            out["vq_loss"] = out["z_c"].new_zeros(())
        bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * x.shape[2] * x.shape[3])
        return z0, out, bpp

    def _stage1(self, x: torch.Tensor):
        m, w = self.model, self.w
        z0, out, bpp = self._encode(x)
        z_c = out["z_c"]
        t = torch.randint(0, m.config.diffusion.used_timesteps, (x.shape[0],), generator=self.generator)
        noise = randn(z0.shape, self.generator, z0)
        z_t = m.schedule.q_sample(z0, z_c, t, noise)
        eps = m.eps(z_t, t.to(x.device), out["guide_hint"], 1.0)
        x0_hat = m.schedule.predict_x0(z_t, t, eps)
        l_noise = F.mse_loss(x0_hat, z0)
        l_guide = F.mse_loss(z_c, z0)
        loss = w.lambda_r * (l_noise + l_guide) + w.rate * (bpp + out["vq_loss"])
        return loss, {"loss": loss.item(), "bpp": bpp.item(), "vq": out["vq_loss"].item(),
                      "noise_x0_mse": l_noise.item(), "guide_mse": l_guide.item()}

    def _stage2(self, x: torch.Tensor):
        m, w = self.model, self.w
        z0, out, bpp = self._encode(x)
        z_c, hint = out["z_c"], out["guide_hint"]
        start = m.schedule.start(z_c, randn(z_c.shape, self.generator, z_c))
        noises = [randn(z_c.shape, self.generator, z_c) for _ in range(w.fixed_steps - 1)]
        z0_hat = sample(lambda z, t: m.eps(z, t, hint, 1.0), start, m.schedule, w.fixed_steps, noises)
        x_hat = m.decode_latent(z0_hat)
        l_mse = F.mse_loss(x_hat, x)
        l_p = self.perceptual(x_hat, x).mean() if self.perceptual is not None else x_hat.new_zeros(())
        l_guide = F.mse_loss(z_c, z0)
        loss = w.lambda_r * (l_mse + w.perceptual * l_p + l_guide) + w.rate * (bpp + out["vq_loss"])
        return loss, {"loss": loss.item(), "bpp": bpp.item(), "vq": out["vq_loss"].item(), "mse": l_mse.item(),
                      "perceptual": l_p.item(), "guide_mse": l_guide.item(), "psnr": _psnr(l_mse)}

    # ------------------------------------------- base models of small presets
    def _vae(self, x: torch.Tensor):
        """Autoencoder pretraining: MSE + perceptual + a small KL term (SD-VAE style, no GAN)."""
        vae = self.model.vae
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * randn(posterior.mean.shape, self.generator, posterior.mean)
        x_hat = vae.decode(z).sample
        l_rec = F.mse_loss(x_hat, x)
        l_p = self.perceptual(x_hat, x).mean() if self.perceptual is not None else x_hat.new_zeros(())
        kl = posterior.kl().mean() / (x.shape[2] * x.shape[3])
        loss = l_rec + self.w.perceptual * l_p + 1e-4 * kl
        return loss, {"loss": loss.item(), "mse": l_rec.item(), "perceptual": l_p.item(), "kl": kl.item(),
                      "psnr": _psnr(l_rec)}

    def _denoiser(self, x: torch.Tensor):
        """Plain ε-prediction over all 1000 steps on the frozen VAE's latents, empty-prompt context."""
        m = self.model
        with torch.no_grad():
            _, moments = m.vae_features(x)
            z0 = m.latent_from_moments(moments, generator=self.generator, sample=True)
        t = torch.randint(0, m.config.diffusion.num_train_timesteps, (x.shape[0],), generator=self.generator)
        noise = randn(z0.shape, self.generator, z0)
        z_t = m.schedule.q_sample(z0, z0, t, noise)  # the plain forward process: no relay residual
        eps = m.eps(z_t, t.to(x.device), hint=torch.zeros(()), detail=0.0)
        loss = F.mse_loss(eps, noise)
        return loss, {"loss": loss.item()}
