"""Image quality metrics, shared by training (validation) and the audit job.

PSNR and MS-SSIM need no weights. LPIPS (AlexNet), DISTS (VGG16) and FID/KID (Inception)
need pretrained backbones; they are read from local files only, never downloaded:

1. an explicit path argument, else
2. ``$RDEIC_BACKBONES/<file>``, else
3. the torch hub cache, ``$TORCH_HOME/hub/checkpoints/<file>`` (where torchvision keeps them).

A missing file raises :class:`MissingWeightsError` naming the file to provide. The small
calibration weights of LPIPS and DISTS ship inside the ``lpips`` and ``torchmetrics`` wheels.

FID and KID are computed over 256×256 patches as in HiFiC and MS-ILLM: each image is cut
into non-overlapping patches, and again on a grid shifted by half a patch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import RdeicError

BACKBONE_FILES = {
    "alexnet": "alexnet-owt-7be5be79.pth",  # torchvision AlexNet (LPIPS)
    "vgg16": "vgg16-397923af.pth",  # torchvision VGG16 (DISTS)
    "inception": "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity InceptionV3 (FID/KID)
}


class MissingWeightsError(RdeicError, FileNotFoundError):
    """A metric's backbone weights are not on this machine (they are never downloaded)."""


def backbone_path(name: str, explicit: str | os.PathLike | None = None) -> Path:
    file = BACKBONE_FILES[name]
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("RDEIC_BACKBONES"):
        candidates.append(Path(os.environ["RDEIC_BACKBONES"]) / file)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / file)
    for path in candidates:
        if path.is_file():
            return path
    raise MissingWeightsError(
        f"{name} weights not found: provide the file {file} (looked in {', '.join(str(c) for c in candidates)}); "
        "weights are never downloaded at run time"
    )


def to_unit(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 array or (B, 3, H, W) tensor in [0, 1] → float tensor (B, 3, H, W) in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    return image.float()


def psnr(a, b, data_range: float = 1.0) -> float:
    x, y = to_unit(a), to_unit(b)
    mse = float(F.mse_loss(x, y))
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ms_ssim(a, b) -> float:
    """MS-SSIM (5 scales, 11×11 Gaussian window); images need both sides > 160 pixels."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    x, y = to_unit(a), to_unit(b)
    if min(x.shape[-2:]) <= 160:
        raise ValueError(f"MS-SSIM needs both image sides > 160 pixels, got {tuple(x.shape[-2:])}")
    return float(_ms_ssim(x, y, data_range=1.0, size_average=True))


def ms_ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − MS-SSIM for images in [-1, 1], differentiable."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    return 1 - _ms_ssim((x.clamp(-1, 1) + 1) / 2, (y + 1) / 2, data_range=1.0, size_average=True)


def _load_torchvision(name: str, path: Path) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


class LPIPS(nn.Module):
    """LPIPS with the AlexNet backbone (Zhang et al. 2018); inputs in [-1, 1]; lower is better."""

    def __init__(self, weights: str | os.PathLike | None = None, random_backbone: bool = False) -> None:
        super().__init__()
        import lpips

        self.net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        if not random_backbone:
            features = _load_torchvision("alexnet", backbone_path("alexnet", weights)).features
            for slice_ in (self.net.net.slice1, self.net.net.slice2, self.net.net.slice3, self.net.net.slice4, self.net.net.slice5):
                for idx, module in slice_.named_children():
                    module.load_state_dict(features[int(idx)].state_dict())
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y).flatten()


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020), torchmetrics' network over a VGG16 read from a local file; inputs in [0, 1]; lower is better."""

    def __init__(self, weights: str | os.PathLike | None = None, random_backbone: bool = False) -> None:
        super().__init__()
        import torchvision
        from torchmetrics.functional.image import dists

        vgg = (torchvision.models.vgg16(weights=None) if random_backbone
               else _load_torchvision("vgg16", backbone_path("vgg16", weights)))
        # torchmetrics builds its VGG16 with ``weights=DEFAULT``, a download: hand it ours instead.
        library_vgg16 = dists.vgg16
        dists.vgg16 = lambda weights=None: vgg
        try:
            self.net = dists.DISTSNetwork()
        finally:
            dists.vgg16 = library_vgg16
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y, require_grad=torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)).reshape(-1)


def patches(image: np.ndarray, size: int = 256) -> list[np.ndarray]:
    """Non-overlapping size×size patches, then the same grid shifted by size/2 (HiFiC / MS-ILLM)."""
    h, w = image.shape[:2]
    out = []
    for offset in (0, size // 2):
        for top in range(offset, h - size + 1, size):
            for left in range(offset, w - size + 1, size):
                out.append(image[top:top + size, left:left + size])
    return out


class DistributionMetrics:
    """FID and KID between original and decoded images, over 256×256 patches.

    Only the feature network's outputs are kept (2048 floats per patch), never the patches.
    """

    def __init__(self, weights: str | os.PathLike | None = None, feature: nn.Module | None = None,
                 patch: int = 256, kid_subset: int = 1000, kid_subsets: int = 100) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
        from torchmetrics.image.kid import KernelInceptionDistance

        if feature is None:
            feature = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         feature_extractor_weights_path=str(backbone_path("inception", weights)))
        self.patch = patch
        self.kid_subset = kid_subset
        self.patches = 0
        self._fid = FrechetInceptionDistance(feature=feature)
        self._kid = KernelInceptionDistance(feature=feature, subset_size=kid_subset, subsets=kid_subsets)

    def update(self, original: np.ndarray, decoded: np.ndarray) -> int:
        """Add one image pair; returns the number of patches it gave."""
        real, fake = patches(original, self.patch), patches(decoded, self.patch)
        if real:
            for metric in (self._fid, self._kid):
                metric.update(self._batch(real), real=True)
                metric.update(self._batch(fake), real=False)
            self.patches += len(real)
        return len(real)

    @staticmethod
    def _batch(items: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).contiguous()

    def compute(self) -> dict:
        n = self.patches
        if n < 2:
            return {"fid": None, "kid": None, "patches": n}
        self._kid.subset_size = min(self.kid_subset, n)  # KID subsets cannot be larger than the sample
        kid_mean, _ = self._kid.compute()
        return {"fid": float(self._fid.compute()), "kid": float(kid_mean), "patches": n}
