"""Image quality metrics, shared by training (validation), the audit job and ``rdeic eval``.

PSNR, SSIM, MS-SSIM and the colour error ``delta_e`` need no weights. LPIPS (AlexNet), DISTS (VGG16)
and FID/KID (Inception) need pretrained backbones, and NIQE (through the optional ``pyiqa``) a
parameter file; they are read from local files only, never downloaded:

1. an explicit path argument, else
2. a backbones directory given by the caller (``MetricSuite(backbones=...)``), else
3. ``$RDEIC_BACKBONES/<file>``, else
4. the torch hub cache, ``$TORCH_HOME/hub/checkpoints/<file>`` (where torchvision keeps them).

A missing file raises :class:`MissingWeightsError` naming the file to provide; :class:`MetricSuite`
turns it into an *unavailable (missing FILE)* entry instead. The small calibration weights of LPIPS
and DISTS ship inside the ``lpips`` and ``torchmetrics`` wheels.

FID and KID are computed over 256×256 patches as in HiFiC and MS-ILLM: each image is cut
into non-overlapping patches, and again on a grid shifted by half a patch. Only the Inception
features of the patches are kept, so workers can return features and one place combines them
(:func:`fid_kid`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
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
    "niqe": "niqe_modelparameters.mat",  # pyiqa's NIQE natural-scene statistics
}

PAIR_METRICS = ("psnr", "ssim", "ms_ssim", "delta_e", "lpips", "dists", "niqe")
DISTRIBUTION_METRICS = ("fid", "kid")
METRIC_NAMES = PAIR_METRICS + DISTRIBUTION_METRICS
LOWER_IS_BETTER = frozenset({"delta_e", "lpips", "dists", "niqe", "fid", "kid"})  # the others: higher is better
MS_SSIM_MIN_SIDE = 161
INCEPTION_DIM = 2048


class MissingWeightsError(RdeicError, FileNotFoundError):
    """A metric's backbone weights are not on this machine (they are never downloaded); ``file`` names it."""

    file: str = ""


class MetricUnavailableError(RdeicError, RuntimeError):
    """A metric was asked for that this :class:`MetricSuite` could not build (see its ``unavailable``)."""


def backbone_path(name: str, explicit: str | os.PathLike | None = None,
                  directory: str | os.PathLike | None = None) -> Path:
    """The local file of a backbone: ``explicit``, else in ``directory``, ``$RDEIC_BACKBONES``, the torch hub cache."""
    file = BACKBONE_FILES[name]
    candidates = [Path(explicit)] if explicit else []
    if directory:
        candidates.append(Path(directory) / file)
    if os.environ.get("RDEIC_BACKBONES"):
        candidates.append(Path(os.environ["RDEIC_BACKBONES"]) / file)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / file)
    for path in candidates:
        if path.is_file():
            return path
    error = MissingWeightsError(
        f"{name} weights not found: provide the file {file} (looked in {', '.join(str(c) for c in candidates)}); "
        "weights are never downloaded at run time"
    )
    error.file = file
    raise error


def to_unit(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 array or (B, 3, H, W) tensor in [0, 1] → float tensor (B, 3, H, W) in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        array = np.ascontiguousarray(image) if image.flags.writeable else np.array(image, order="C")  # torch wants writable
        return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0
    return image.float()


def psnr(a, b, data_range: float = 1.0) -> float:
    x, y = to_unit(a), to_unit(b)
    mse = float(F.mse_loss(x, y))
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def mse(a, b) -> float:
    """Mean squared error on the 0..255 scale, in float64 (pooled over images it gives the pooled PSNR)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.shape != b.shape:
            raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
        return float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))
    x, y = to_unit(a).double(), to_unit(b).double()
    return float(torch.mean(torch.square(x - y))) * 255.0**2


def psnr_from_mse(value: float) -> float:
    """PSNR in dB of an MSE on the 0..255 scale."""
    return float("inf") if value == 0 else 10 * math.log10(255.0**2 / value)


def pooled_psnr(pairs: Iterable[tuple[float, int]]) -> float | None:
    """PSNR of the MSE pooled over every pixel of several images, from (mse, pixels) pairs (CLIC's way: big
    images weigh more; CompressAI's ``psnr-rgb`` is instead the mean of per-image PSNRs). None without pixels."""
    pairs = [(m, p) for m, p in pairs if m is not None]
    pixels = sum(p for _, p in pairs)
    if not pixels:
        return None
    return psnr_from_mse(sum(m * p for m, p in pairs) / pixels)


def ssim(a, b) -> float:
    """SSIM (11×11 Gaussian window, σ 1.5, data range 1) on the RGB channels, averaged.

    pytorch_msssim on RGB, as CompressAI reports it; note that pyiqa's ``ssim`` is on the Y
    channel by default, so its values differ.
    """
    from pytorch_msssim import ssim as _ssim

    return float(_ssim(to_unit(a), to_unit(b), data_range=1.0, size_average=True, win_size=11, win_sigma=1.5))


def ms_ssim(a, b) -> float:
    """MS-SSIM (5 scales, 11×11 Gaussian window) on RGB; images need both sides > 160 pixels."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    x, y = to_unit(a), to_unit(b)
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        raise ValueError(f"MS-SSIM needs both image sides > 160 pixels, got {tuple(x.shape[-2:])}")
    return float(_ms_ssim(x, y, data_range=1.0, size_average=True))


# sRGB primaries to CIE XYZ, and the D65 white point (IEC 61966-2-1).
_SRGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_D65 = (0.95047, 1.0, 1.08883)
COLOUR_BLOCK = 8  # delta_e compares 8×8-pixel means: a colour cast, not the texture PSNR already measures


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] → CIELAB (L*, a*, b*) under the D65 white, in float64."""
    rgb = rgb.double()
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_SRGB_TO_XYZ, dtype=torch.float64, device=rgb.device)
    white = torch.tensor(_D65, dtype=torch.float64, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white[:, None, None]
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp_min(delta**3) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    return torch.stack((116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])), dim=1)


def delta_e(a, b, block: int = COLOUR_BLOCK) -> float:
    """Mean colour error: the CIE76 ΔE*ab between the two images' ``block``×``block`` pixel means, averaged
    over the blocks (partial blocks at the edges included). About 2.3 is a just-noticeable difference; a
    cast of 5 levels in one channel of a mid-grey image is 2.0 (R) to 3.8 (G)."""
    x, y = to_unit(a), to_unit(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    pool = lambda t: F.avg_pool2d(t.double(), block, ceil_mode=True)  # noqa: E731
    return float(torch.linalg.vector_norm(srgb_to_lab(pool(x)) - srgb_to_lab(pool(y)), dim=1).mean())


def channel_shift(a, b) -> tuple[float, float, float]:
    """Mean of ``b`` minus mean of ``a`` in each of R, G, B, on the 0..255 scale: the direction of a cast."""
    x, y = to_unit(a).double(), to_unit(b).double()
    return tuple(float(v) * 255.0 for v in (y - x).mean(dim=(0, 2, 3)))


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


def inception(weights: str | os.PathLike | None = None, directory: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's InceptionV3 (2048-d pool features; uint8 images in), read from a local file.

    ``antialias=False`` keeps torch-fidelity's TF1-style resize to 299², as torchmetrics did before 1.8
    and as published HiFiC / MS-ILLM FIDs were computed.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = backbone_path("inception", weights, directory)
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_DIM)],
                              feature_extractor_weights_path=str(path), antialias=False)


def patch_features(feature: nn.Module, images: Iterable[np.ndarray], patch: int = 256,
                   device: str | torch.device = "cpu", batch: int = 16) -> np.ndarray:
    """Features (n_patches × d, float32) of the images' HiFiC / MS-ILLM patches; the network gets uint8 (B, 3, p, p)."""
    cut = [piece for image in images for piece in patches(image, patch)]
    if not cut:  # keep the feature width, so empty results concatenate with others
        return np.zeros((0, _feature_width(feature, patch, device)), np.float32)
    out = []
    with torch.inference_mode():
        for start in range(0, len(cut), batch):
            x = torch.from_numpy(np.stack(cut[start:start + batch])).permute(0, 3, 1, 2).contiguous().to(device)
            out.append(feature(x).float().reshape(len(x), -1).cpu().numpy())
    return np.concatenate(out)


def _feature_width(feature: nn.Module, patch: int, device) -> int:
    with torch.inference_mode():
        return int(feature(torch.zeros(1, 3, patch, patch, dtype=torch.uint8, device=device)).reshape(1, -1).shape[1])


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two feature sets: ‖μr − μf‖² + tr(Σr + Σf − 2 (Σr Σf)^½), in float64.

    tr((Σr Σf)^½) is the sum of the square roots of the eigenvalues of Σr Σf (as in torchmetrics):
    the same as scipy's ``sqrtm`` to ~1e-9 at 2048-d, and ten times faster. With fewer samples than
    dimensions the product is singular and rounding makes a few eigenvalues complex: the real part is kept.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    cov_r, cov_f = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    root_trace = np.sqrt(np.linalg.eigvals(cov_r @ cov_f).astype(np.complex128)).real.sum()
    mean_term = np.sum(np.square(real.mean(0) - fake.mean(0)))
    return float(mean_term + np.trace(cov_r) + np.trace(cov_f) - 2 * root_trace)


def kernel_distance(real: np.ndarray, fake: np.ndarray, subset: int = 1000, subsets: int = 100, seed: int = 0) -> float:
    """KID: unbiased MMD² with the kernel (x·y/d + 1)³, mean over random subsets of min(subset, n) samples."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    size = min(subset, len(real), len(fake))
    if size == len(real) == len(fake):
        subsets = 1  # every subset is the whole set
    rng = np.random.default_rng(seed)
    scores = [_poly_mmd(real[rng.choice(len(real), size, replace=False)], fake[rng.choice(len(fake), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(scores))


def _poly_mmd(x: np.ndarray, y: np.ndarray) -> float:
    dim, m = x.shape[1], len(x)
    k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m**2)


def fid_kid(real: np.ndarray, fake: np.ndarray, kid_subset: int = 1000, kid_subsets: int = 100, seed: int = 0) -> dict:
    """FID and KID of two patch-feature sets (n × d) → ``{"fid", "kid", "patches", "warning"}``.

    ``patches`` is the smaller set's size; FID and KID are None below 2 patches, and ``warning``
    says when there are fewer patches than feature dimensions (FID is then biased).
    """
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or (real.size and fake.size and real.shape[1] != fake.shape[1]):
        raise ValueError(f"expected two n × d feature arrays of the same d, got {real.shape} and {fake.shape}")
    n, dim = min(len(real), len(fake)), real.shape[1]
    if n < 2:
        return {"fid": None, "kid": None, "patches": n, "warning": f"{n} patches: FID and KID need at least 2"}
    warning = f"{n} patches < {dim} (the feature dimension): FID is biased" if n < dim else None
    return {"fid": frechet_distance(real, fake), "kid": kernel_distance(real, fake, kid_subset, kid_subsets, seed),
            "patches": n, "warning": warning}


class DistributionMetrics:
    """FID and KID between original and decoded images, over 256×256 patches.

    Only the feature network's outputs are kept (2048 floats per patch), never the patches.
    """

    def __init__(self, weights: str | os.PathLike | None = None, feature: nn.Module | None = None,
                 patch: int = 256, kid_subset: int = 1000, kid_subsets: int = 100, device: str = "cpu") -> None:
        self.feature = (feature if feature is not None else inception(weights)).to(device).eval()
        self.device = device
        self.patch = patch
        self.kid_subset = kid_subset
        self.kid_subsets = kid_subsets
        self.patches = 0
        self._real: list[np.ndarray] = []
        self._fake: list[np.ndarray] = []

    def update(self, original: np.ndarray, decoded: np.ndarray) -> int:
        """Add one image pair; returns the number of patches it gave."""
        count = len(patches(original, self.patch))
        if count:
            self._real.append(patch_features(self.feature, [original], self.patch, self.device))
            self._fake.append(patch_features(self.feature, [decoded], self.patch, self.device))
            self.patches += count
        return count

    def compute(self) -> dict:
        if not self._real:
            return fid_kid(np.zeros((0, INCEPTION_DIM)), np.zeros((0, INCEPTION_DIM)))
        return fid_kid(np.concatenate(self._real), np.concatenate(self._fake), self.kid_subset, self.kid_subsets)


def _lpips(backbones) -> nn.Module:
    return LPIPS(weights=backbone_path("alexnet", directory=backbones))


def _dists(backbones) -> nn.Module:
    return DISTS(weights=backbone_path("vgg16", directory=backbones))


def _niqe(backbones) -> nn.Module:
    """pyiqa's NIQE (optional, not a dependency) with its parameter file from local files only."""
    try:
        from pyiqa.archs.niqe_arch import NIQE
    except ImportError as error:
        absent = isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "pyiqa"
        raise MetricUnavailableError("pyiqa is not installed" if absent else f"pyiqa cannot be imported: {error}") from None
    return NIQE(pretrained_model_path=str(backbone_path("niqe", directory=backbones)))


def _inception(backbones) -> nn.Module:
    return inception(directory=backbones)


_BUILDERS = {"lpips": _lpips, "dists": _dists, "niqe": _niqe, "inception": _inception}
_NIQE_BLOCK = 96


class MetricSuite:
    """The metrics an evaluation asked for, built once (per worker) from local files only.

    ``names``: a subset of :data:`METRIC_NAMES` (a list, or one comma-separated string).
    ``backbones``: a directory looked in first for backbone files. ``modules``: prebuilt networks that
    replace the ones read from files, by key ``lpips``, ``dists``, ``niqe`` or ``inception`` (the
    feature network of fid and kid); tests pass random ones.

    After construction ``unavailable`` maps each asked-for metric that could not be built to
    ``"unavailable (missing FILE)"`` or another one-line reason. :meth:`pair` counts per-image skips in
    ``skipped`` (reason in ``skip_reasons``) and accumulates the time of each metric in ``seconds``.
    """

    def __init__(self, names: Iterable[str] | str, backbones: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", modules: Mapping[str, nn.Module] | None = None) -> None:
        self.names = _checked_names(names)
        self.backbones = backbones
        self.device = torch.device(device)
        self.unavailable: dict[str, str] = {}
        self.skipped: dict[str, int] = {}
        self.skip_reasons: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self._nets: dict[str, nn.Module] = {}
        given = dict(modules or {})
        for key in dict.fromkeys(_network_key(name) for name in self.names):
            if key in _BUILDERS:
                self._build(key, given)

    def _build(self, key: str, modules: dict[str, nn.Module]) -> None:
        try:
            net = modules[key] if key in modules else _BUILDERS[key](self.backbones)
        except MissingWeightsError as error:
            reason = f"unavailable (missing {error.file})"
        except MetricUnavailableError as error:
            reason = f"unavailable ({error})"
        else:
            self._nets[key] = net.to(self.device).eval()
            return
        for name in self.names:
            if _network_key(name) == key:
                self.unavailable[name] = reason

    @property
    def distribution(self) -> list[str]:
        """The asked-for distribution metrics (fid, kid) that are available: call :meth:`features` for them."""
        return [name for name in self.names if name in DISTRIBUTION_METRICS and name not in self.unavailable]

    def pair(self, original: np.ndarray, decoded: np.ndarray) -> dict[str, float | None]:
        """``mse`` and every asked-for per-image metric of one pair (None: unavailable or skipped; niqe is on ``decoded``)."""
        if original.shape != decoded.shape:
            raise ValueError(f"images differ in shape: {original.shape} vs {decoded.shape}")
        out: dict[str, float | None] = {"mse": self._timed("mse", mse, original, decoded)}
        x, y = to_unit(original).to(self.device), to_unit(decoded).to(self.device)
        with torch.inference_mode():
            for name in self.names:
                if name in PAIR_METRICS:
                    out[name] = self._pair_metric(name, x, y, out["mse"])
        return out

    def _pair_metric(self, name: str, x: torch.Tensor, y: torch.Tensor, squared_error: float) -> float | None:
        if name in self.unavailable:
            return None
        reason = _skip_reason(name, x)
        if reason:
            self.skipped[name] = self.skipped.get(name, 0) + 1
            self.skip_reasons[name] = reason
            return None
        return self._timed(name, self._compute, name, x, y, squared_error)

    def _compute(self, name: str, x: torch.Tensor, y: torch.Tensor, squared_error: float) -> float:
        if name == "psnr":
            return psnr_from_mse(squared_error)
        if name == "ssim":
            return ssim(x, y)
        if name == "ms_ssim":
            return ms_ssim(x, y)
        if name == "delta_e":
            return delta_e(x, y)
        if name == "lpips":
            return float(self._nets["lpips"](x * 2 - 1, y * 2 - 1))
        if name == "dists":
            return float(self._nets["dists"](x, y))
        return float(self._nets["niqe"](y).reshape(-1)[0])  # niqe: no reference

    def _timed(self, name: str, fn, *args) -> float:
        start = time.perf_counter()
        value = fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return value

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        """Inception features (n_patches × 2048, float32) of the images' 256² patches, for :func:`fid_kid`."""
        if "inception" not in self._nets:
            reason = self.unavailable.get("fid") or self.unavailable.get("kid")
            raise MetricUnavailableError(f"fid and kid are {reason}" if reason else "fid and kid were not asked for")
        return self._timed("features", patch_features, self._nets["inception"], images, 256, self.device)


def _checked_names(names: Iterable[str] | str) -> list[str]:
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(map(repr, unknown))}: valid metrics are {', '.join(METRIC_NAMES)}")
    return names


def _network_key(name: str) -> str:
    return "inception" if name in DISTRIBUTION_METRICS else name


def _skip_reason(name: str, x: torch.Tensor) -> str | None:
    height, width = x.shape[-2:]
    if name == "ms_ssim" and min(height, width) < MS_SSIM_MIN_SIDE:
        return f"MS-SSIM needs both image sides >= {MS_SSIM_MIN_SIDE} pixels"
    if name == "niqe" and (height // _NIQE_BLOCK) * (width // _NIQE_BLOCK) < 2:
        return f"NIQE needs at least two {_NIQE_BLOCK}×{_NIQE_BLOCK} blocks"
    return None


METRIC_LIBRARIES = ("torch", "torchvision", "torchmetrics", "torch-fidelity", "lpips", "pytorch-msssim",
                    "pillow", "numpy", "pyiqa")


def versions() -> dict[str, str]:
    """Installed versions of the libraries the metrics come from (``"not installed"`` for an absent optional one)."""
    out = {}
    for dist in METRIC_LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
