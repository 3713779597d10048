"""Relay residual diffusion: the schedule and the respaced DDPM sampler, as pure functions.

Only the first N (``used_timesteps``) of the 1000 training steps are used. Decoding
starts from the noised compressed latent instead of pure noise::

    z_N = sqrt(ᾱ_N)·z_c + sqrt(1 − ᾱ_N)·ε

and training shifts the noise target by the residual, ε' = ε + (z_c − z0)/λ with
λ = sqrt((1 − ᾱ_N)/ᾱ_N), so that η_N = 1 (appendix, Eq. 19). The model is passed in;
the schedule only holds numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import DiffusionConfig


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` evenly spread steps of ``range(num_timesteps)``, ascending.

    The authors' rule (guided diffusion's): a fractional stride added up in floating point, each
    position rounded; the sums differ from ``i × stride`` in the last bit, which moves a rounding
    for some counts (29 steps: 149, not 150). One step is the exception: their rule takes it at
    t = 0, on a latent the relay has noised to the top; here it is taken at the top.
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {count}")
    if count == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (count - 1)
    taken, position = set(), 0.0
    for _ in range(count):
        taken.add(round(position))
        position += stride
    return sorted(taken)


@dataclass(frozen=True)
class SpacedSchedule:
    """Coefficients of the L-step respaced reverse process, indexed by spaced step (0 = last)."""

    timesteps: tuple[int, ...]  # ascending original timesteps
    sqrt_recip_ab: torch.Tensor
    sqrt_recipm1_ab: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    variance: torch.Tensor


class RelaySchedule:
    def __init__(self, config: DiffusionConfig) -> None:
        self.config = config
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float64, device="cpu") ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.top = config.used_timesteps - 1  # the index N of the paper, counted from 0

    def sqrt_ab(self, t: int | torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t].sqrt()

    def sqrt_one_minus_ab(self, t: int | torch.Tensor) -> torch.Tensor:
        return (1.0 - self.alphas_cumprod[t]).sqrt()

    @property
    def lam(self) -> float:
        """λ = sqrt(1/ᾱ_N − 1)."""
        ab = self.alphas_cumprod[self.top]
        return float(((1.0 - ab) / ab).sqrt())

    def eta(self, t: int | torch.Tensor) -> torch.Tensor:
        """η_t = λ⁻¹·sqrt((1 − ᾱ_t)/ᾱ_t); η_N = 1."""
        ab = self.alphas_cumprod[t]
        return ((1.0 - ab) / ab).sqrt() / self.lam

    def start(self, z_c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_N = sqrt(ᾱ_N)·z_c + sqrt(1 − ᾱ_N)·ε."""
        a, s = (float(v) for v in (self.sqrt_ab(self.top), self.sqrt_one_minus_ab(self.top)))
        return a * z_c + s * noise

    def q_sample(self, z0: torch.Tensor, z_c: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Training forward: z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·(ε + (z_c − z0)/λ)."""
        shape = (-1,) + (1,) * (z0.dim() - 1)
        a = self.sqrt_ab(t.cpu()).to(z0).reshape(shape)
        s = self.sqrt_one_minus_ab(t.cpu()).to(z0).reshape(shape)
        return a * z0 + s * (noise + (z_c - z0) / self.lam)

    def residual_noise(self, z0: torch.Tensor, z_c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The stage-1 noise target ε' = ε + (z_c − z0)/λ."""
        return noise + (z_c - z0) / self.lam

    def predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (z_t.dim() - 1)
        ab = self.alphas_cumprod[t.cpu()]
        return (1.0 / ab).sqrt().to(z_t).reshape(shape) * z_t - (1.0 / ab - 1.0).sqrt().to(z_t).reshape(shape) * eps

    def spaced(self, steps: int) -> SpacedSchedule:
        ts = space_timesteps(self.config.used_timesteps, steps)
        ab = self.alphas_cumprod[ts]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), ab[:-1]])
        betas = 1.0 - ab / ab_prev
        return SpacedSchedule(
            timesteps=tuple(ts),
            sqrt_recip_ab=(1.0 / ab).sqrt(),
            sqrt_recipm1_ab=(1.0 / ab - 1.0).sqrt(),
            coef_x0=betas * ab_prev.sqrt() / (1.0 - ab),
            coef_xt=(1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab),
            variance=betas * (1.0 - ab_prev) / (1.0 - ab),
        )


NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]


def sample(
    eps_fn: NoiseFn,
    z_start: torch.Tensor,
    schedule: RelaySchedule,
    steps: int,
    step_noises: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Respaced DDPM ("fixed_small" variance) from z_N down to ẑ0 in ``steps`` model calls.

    ``eps_fn(x, t)`` predicts the noise at original timestep ``t``; ``step_noises`` holds the
    ``steps − 1`` noise tensors added after every step but the last.
    """
    sp = schedule.spaced(steps)
    if len(step_noises) != steps - 1:
        raise ValueError(f"{steps} steps need {steps - 1} step noises, got {len(step_noises)}")
    x = z_start
    for i, t in enumerate(reversed(sp.timesteps)):
        k = steps - 1 - i
        eps = eps_fn(x, t)
        x0 = float(sp.sqrt_recip_ab[k]) * x - float(sp.sqrt_recipm1_ab[k]) * eps
        x = float(sp.coef_x0[k]) * x0 + float(sp.coef_xt[k]) * x
        if k > 0:
            x = x + float(sp.variance[k].sqrt()) * step_noises[i]
    return x
