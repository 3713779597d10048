"""Vector quantiser of the hyper-latent with CVQ-VAE online clustered re-initialisation.

Zheng & Vedaldi, "Online Clustered Codebook" (ICCV 2023): codes that are rarely used are
pulled towards the encoder feature closest to them, with a strength that decays with the
code's running usage; a contrastive term keeps codes apart. At coding time only the
nearest-code index is used, so each index costs log2(codebook size) bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CodebookQuantizer(nn.Module):
    def __init__(
        self,
        num_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        contrastive: bool = True,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.num_embed = num_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.decay = decay
        self.contrastive = contrastive
        self.temperature = temperature
        self.embedding = nn.Embedding(num_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embed, 1.0 / num_embed)
        self.register_buffer("embed_prob", torch.zeros(num_embed))

    @staticmethod
    def _flatten(z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    @staticmethod
    def _unflatten(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b, c, h, w = like.shape
        return flat.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    def _neg_sq_distance(self, flat: torch.Tensor) -> torch.Tensor:
        """-(||z||^2 + ||e||^2 - 2 z.e), shape (num_features, num_embed); larger is closer."""
        e = self.embedding.weight
        return -(flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t())

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code for every position: returns (z_q, indices of shape (B, h, w))."""
        flat = self._flatten(z.float())
        idx = self._neg_sq_distance(flat).argmax(dim=1)
        b, _, h, w = z.shape
        return self.lookup(idx.reshape(b, h, w)).to(z.dtype), idx.reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices (B, h, w) as a (B, C, h, w) tensor."""
        b, h, w = indices.shape
        vec = self.embedding(indices.reshape(-1).to(self.embedding.weight.device))
        return vec.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Training/eval forward: (z_q with straight-through gradient, codebook loss or None, indices)."""
        flat = self._flatten(z)
        d = self._neg_sq_distance(flat.detach())
        idx = d.argmax(dim=1)
        z_q = self.embedding.weight[idx]
        loss = None
        if self.training:
            loss = self.beta * F.mse_loss(z_q.detach(), flat) + F.mse_loss(z_q, flat.detach())
            self._reinit_unused_codes(flat.detach(), d.detach(), idx)
            if self.contrastive:
                loss = loss + self._contrastive_loss(d)
            z_q = flat + (z_q - flat).detach()
        b, _, h, w = z.shape
        return self._unflatten(z_q, z), loss, idx.reshape(b, h, w)

    @torch.no_grad()
    def _reinit_unused_codes(self, flat: torch.Tensor, d: torch.Tensor, idx: torch.Tensor) -> None:
        usage = torch.bincount(idx, minlength=self.num_embed).to(flat.dtype) / idx.numel()
        self.embed_prob.mul_(self.decay).add_(usage, alpha=1 - self.decay)
        closest_feature = flat[d.argmax(dim=0)]  # for every code, the feature nearest to it
        strength = torch.exp(-(self.embed_prob * self.num_embed * 10) / (1 - self.decay) - 1e-3).unsqueeze(1)
        w = self.embedding.weight.data
        w.copy_(w * (1 - strength) + closest_feature * strength)

    def _contrastive_loss(self, d: torch.Tensor) -> torch.Tensor:
        n = d.shape[0]
        ranked, _ = d.sort(dim=0)  # ascending: farthest features first, closest last
        positive = ranked[-max(1, n // self.num_embed):].mean(dim=0, keepdim=True)
        negative = ranked[: n // 2]
        logits = torch.cat([positive, negative], dim=0).t() / self.temperature
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)
