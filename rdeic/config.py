"""Model configuration as data: frozen dataclasses, saved as JSON beside the weights.

Unknown or missing keys raise :class:`ConfigError` at construction, so a typo in a
config file can never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .errors import ConfigError


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown or missing keys raise ConfigError."""
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default:
                continue
            raise ConfigError(f"{where}: missing key {name!r}")
        kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


@dataclass(frozen=True)
class CompressionConfig:
    """Latent compression module (ELIC-style slices, checkerboard context, VQ hyper-latent)."""

    in_channels: int  # VAE feature channels at the tap (512 for SD 2.1)
    latent_channels: int  # channels of the compressed latent z_c (4 for SD)
    N: int  # hyper-latent channels (1/64 resolution)
    M: int  # y channels (1/16 resolution); also the guide hint's channels
    slices: tuple[int, ...]
    codebook_size: int
    context_hidden: tuple[int, ...] = (224, 128)
    scale_min: float = 0.11
    scale_max: float = 256.0
    scale_levels: int = 64
    # Entropy parameters are computed in this dtype on both sides of the channel so that
    # the CDF index of every symbol agrees across devices and thread counts.
    coding_dtype: str = "float64"

    def __post_init__(self) -> None:
        if sum(self.slices) != self.M:
            raise ConfigError(f"compression.slices sum to {sum(self.slices)}, but M = {self.M}; they must be equal")
        if any(s <= 0 for s in self.slices):
            raise ConfigError(f"compression.slices must be positive, got {list(self.slices)}")
        if self.codebook_size < 2:
            raise ConfigError(f"compression.codebook_size must be >= 2, got {self.codebook_size}")
        if len(self.context_hidden) != 2:
            raise ConfigError(f"compression.context_hidden must have 2 entries, got {list(self.context_hidden)}")
        if self.coding_dtype not in ("float32", "float64"):
            raise ConfigError(f"compression.coding_dtype must be 'float32' or 'float64', got {self.coding_dtype!r}")
        if not 0 < self.scale_min < self.scale_max or self.scale_levels < 2:
            raise ConfigError("compression scale table needs 0 < scale_min < scale_max and scale_levels >= 2")

    @property
    def index_bits(self) -> int:
        """Bits per hyper-latent codebook index (14 for 16384 entries)."""
        return max(1, (self.codebook_size - 1).bit_length())


@dataclass(frozen=True)
class ControlConfig:
    """Control module: a narrow copy of the UNet encoder + middle block."""

    channel_ratio: float = 0.2
    attention_head_dim: int = 16  # the authors' num_head_channels for the control copy
    max_norm_groups: int = 32
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.channel_ratio <= 1:
            raise ConfigError(f"control.channel_ratio must be in (0, 1], got {self.channel_ratio}")


@dataclass(frozen=True)
class DiffusionConfig:
    """Relay residual diffusion schedule (ldm 'linear' = diffusers 'scaled_linear' betas)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    used_timesteps: int = 300
    default_steps: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.used_timesteps <= self.num_train_timesteps:
            raise ConfigError(
                f"diffusion.used_timesteps must be in [1, {self.num_train_timesteps}], got {self.used_timesteps}"
            )
        if not 1 <= self.default_steps <= self.used_timesteps:
            raise ConfigError(f"diffusion.default_steps must be in [1, used_timesteps], got {self.default_steps}")


MAX_TILE = 512  # latent pixels (4096 image pixels): the largest tile a bitstream may ask for


def plan_problem(tile: int, overlap: int) -> str | None:
    """Why (tile, overlap) is not a usable tile plan (:mod:`rdeic.tiling`), or None. Tiles are multiples
    of 8 latent pixels so that every UNet preset (three downsamplings at most) divides them."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile % 8 or not 8 <= tile <= MAX_TILE:
        return f"tile must be a multiple of 8 in [8, {MAX_TILE}] latent pixels, got {tile!r}"
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 1 <= overlap <= tile // 2:
        return f"tile overlap must be in [1, {tile // 2}] latent pixels for a tile of {tile}, got {overlap!r}"
    return None


@dataclass(frozen=True)
class TilingConfig:
    """When and how the codec tiles an image (:mod:`rdeic.tiling`). An encoding choice, not part of the
    model id: a tiled bitstream carries its tile and overlap, so decoding never reads these."""

    min_pixels: int = 2048 * 2048  # tile images of more padded pixels than this; smaller run whole
    tile: int = 64  # latent pixels (x8 image pixels): SD's UNet was trained on 64x64 latents
    overlap: int = 16  # latent pixels shared by neighbouring tiles
    batch: int = 4  # tiles per model call (of one image or several)

    def __post_init__(self) -> None:
        problem = plan_problem(self.tile, self.overlap)
        if problem:
            raise ConfigError(f"tiling: {problem}")
        if self.min_pixels < 64 * 64:
            raise ConfigError(f"tiling.min_pixels must be >= 4096 (one padded 64x64 block), got {self.min_pixels}")
        if self.batch < 1:
            raise ConfigError(f"tiling.batch must be >= 1, got {self.batch}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build an RDEIC model; ``vae`` and ``unet`` are diffusers configs."""

    name: str
    vae: dict
    unet: dict
    compression: CompressionConfig
    control: ControlConfig = field(default_factory=ControlConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text_context_length: int = 77
    trained: bool = False
    tiling: TilingConfig = field(default_factory=TilingConfig)

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 64:
            raise ConfigError(f"name must be 1..64 bytes, got {self.name!r}")
        feat = self.vae.get("block_out_channels", [None])[-1]
        if feat != self.compression.in_channels:
            raise ConfigError(
                f"compression.in_channels ({self.compression.in_channels}) must equal the VAE's last "
                f"block_out_channels ({feat})"
            )
        if len(self.vae.get("block_out_channels", ())) != 4:
            raise ConfigError("the VAE must downsample by 8 (four block_out_channels)")
        if "scaling_factor" not in self.vae:
            raise ConfigError("vae config needs an explicit scaling_factor")
        if self.unet.get("in_channels") != self.compression.latent_channels:
            raise ConfigError("unet.in_channels must equal compression.latent_channels")

    @property
    def scale_factor(self) -> float:
        return float(self.vae["scaling_factor"])

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from None
        return from_dict(cls, data)


PRESETS = ("sd21", "tiny")


def load_preset(name: str) -> ModelConfig:
    """The built-in model configurations, stored as JSON in ``rdeic/presets``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    text = resources.files("rdeic.presets").joinpath(f"{name}.json").read_text()
    return ModelConfig.from_json(text)
