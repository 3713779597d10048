"""Training on one device (``rdeic train``), and the step that ``rdeic-job train`` runs on many.

A run is described by a :class:`TrainConfig` (YAML/JSON, strict keys). Checkpoints are model
directories in our format plus ``trainer_state.pt`` (optimizer, step, RNG, data position),
loadable with ``torch.load(weights_only=True)``; a run restarted with the same config
continues from the newest checkpoint with the same next loss.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import torch
import yaml

from .config import ConfigError, from_dict, to_dict
from .data import CropSpec, ShardImages, batches
from .losses import LossWeights, StageLoss
from .metrics import MS_SSIM_MIN_SIDE
from .model import RDEIC
from .shards import expand
from .weights import init_model, load_model, save_model

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
STAGE_DEFAULTS = {  # the paper's appendix: crops, learning rates
    "stage1": {"crop": 512, "lr": 1e-4},
    "stage2": {"crop": 256, "lr": 2e-5},
    "vae": {"crop": 256, "lr": 1e-4},
    "denoiser": {"crop": 256, "lr": 1e-4},
}


@dataclass(frozen=True)
class DataConfig:
    shards: tuple[str, ...]
    crop: int = 0  # 0: the stage's default (512 in stage 1, 256 in stage 2)
    scale_min: float = 1.0
    scale_max: float = 1.0
    permute_channels: bool = False
    colour_gain: float = 0.0
    batch_size: int = 4
    seed: int = 0
    val_shards: tuple[str, ...] = ()
    val_images: int = 4


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.0  # 0: the stage's default
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: none


@dataclass(frozen=True)
class TrainConfig:
    stage: str  # stage1 | stage2 (RDEIC); vae | denoiser (base models of small presets)
    output: str  # folder or fsspec URL for checkpoints and the final model
    data: DataConfig
    init_model: str = ""  # model directory to start from
    init_preset: str = ""  # or a preset with random weights
    steps: int = 1000
    lambda_r: float = 2.0
    rate_weight: float = 1.0
    fixed_steps: int = 2  # L of stage 2
    perceptual: str = "lpips"  # stage 2 and vae: lpips | ms_ssim | none
    perceptual_weight: float = 0.5
    lpips_weights: str = ""  # AlexNet file; default lookup: see rdeic.metrics
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    validate_every: int = 0  # 0: only at the end
    seed: int = 0
    name: str = ""  # name of the trained model (default: the initial model's)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULTS:
            raise ConfigError(f"stage must be one of {sorted(STAGE_DEFAULTS)}, got {self.stage!r}")
        if bool(self.init_model) == bool(self.init_preset):
            raise ConfigError("give exactly one of init_model and init_preset")
        if self.perceptual not in ("lpips", "ms_ssim", "none"):
            raise ConfigError(f"perceptual must be lpips, ms_ssim or none, got {self.perceptual!r}")
        if self.steps < 1 or self.data.batch_size < 1:
            raise ConfigError("steps and data.batch_size must be >= 1")
        for key in ("checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:  # 0 divided by zero, or deleted each checkpoint as soon as it was written
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.validate_every < 0:
            raise ConfigError(f"validate_every must be >= 0 (0: only at the end), got {self.validate_every}")
        if self.perceptual == "ms_ssim" and self.stage in ("stage2", "vae") and self.crop < MS_SSIM_MIN_SIDE:
            raise ConfigError(f"data.crop must be at least {MS_SSIM_MIN_SIDE} with perceptual: ms_ssim (its five scales), "
                              f"got {self.crop}")

    @property
    def crop(self) -> int:
        return self.data.crop or STAGE_DEFAULTS[self.stage]["crop"]

    @property
    def lr(self) -> float:
        return self.optim.lr or STAGE_DEFAULTS[self.stage]["lr"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        with fsspec.open(str(path), "r") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a training config is a mapping of keys")
        return from_dict(cls, data)


def perceptual_module(cfg: TrainConfig, device: torch.device) -> torch.nn.Module | None:
    from . import metrics

    if cfg.perceptual == "lpips":
        return metrics.LPIPS(weights=cfg.lpips_weights or None).to(device)
    if cfg.perceptual == "ms_ssim":
        return _MsSsimLoss()
    return None


class _MsSsimLoss(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from .metrics import ms_ssim_loss

        return ms_ssim_loss(x, y)


class Trainer:
    """Optimizer, RNG and data position around one StageLoss; ``step`` is the shared step function."""

    def __init__(self, model: RDEIC, cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.model = model.to(device)
        model.requires_grad_(False)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        weights = LossWeights(cfg.lambda_r, cfg.rate_weight, cfg.perceptual_weight, cfg.fixed_steps)
        needs_perceptual = cfg.stage in ("stage2", "vae")
        self.loss = StageLoss(model, cfg.stage, weights, perceptual_module(cfg, device) if needs_perceptual else None, generator)
        params = self.loss.trainable()
        for p in params:
            p.requires_grad_(True)
        if cfg.stage in ("stage1", "stage2"):
            model.freeze_base()
        model.train()
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
        self.forward = self.loss
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.loss, find_unused_parameters=False)
        self.step_count = 0
        urls = expand(list(cfg.data.shards))
        self.data = ShardImages(urls, CropSpec(cfg.crop, cfg.data.scale_min, cfg.data.scale_max, permute_channels=cfg.data.permute_channels,
                                                 colour_gain=cfg.data.colour_gain), cfg.data.seed, rank, world)
        self._stream = None

    # ------------------------------------------------------------------ step
    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch in [-1, 1]; returns the loss terms."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self.forward(x.to(self.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step_count}")
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        if self.world > 1 and self.cfg.stage in ("stage1", "stage2"):
            self._sync_codebook()
        self.step_count += 1
        return terms

    def _sync_codebook(self) -> None:
        """CVQ re-initialises codes from each rank's own features; rank 0's codebook wins."""
        import torch.distributed as dist

        q = self.model.compression.quantizer
        dist.broadcast(q.embedding.weight.data, src=0)
        dist.broadcast(q.embed_prob, src=0)

    def next_batch(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = batches(self.data.iterate(self.data.epoch, self.data.index), self.cfg.data.batch_size)
        return next(self._stream)

    # ------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "step": self.step_count,
            "optimizer": self.optimizer.state_dict(),
            "loss_generator": self.loss.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "data_epoch": self.data.epoch,
            "data_index": self.data.index,
            "config": json.dumps(to_dict(self.cfg), sort_keys=True),
        }

    def load_state(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.generator.set_state(state["loss_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.data.epoch, self.data.index = int(state["data_epoch"]), int(state["data_index"])
        self._stream = None


# ------------------------------------------------------------------ storage
def _fs(url: str):
    return fsspec.core.url_to_fs(url)


def checkpoint_names(output: str) -> list[str]:
    fs, root = _fs(output)
    pattern = root.rstrip("/") + "/checkpoints/step-*"
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(pattern))


def save_checkpoint(trainer: Trainer, name: str | None = None) -> str:
    """Write a checkpoint (model directory + trainer state) under ``output``; returns its URL."""
    cfg = trainer.cfg
    name = name or f"step-{trainer.step_count:08d}"
    target = f"{cfg.output.rstrip('/')}/checkpoints/{name}" if name.startswith("step-") else f"{cfg.output.rstrip('/')}/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        save_model(trainer.model, local)
        torch.save(trainer.state(), local / STATE_FILE)
        fs, path = _fs(target)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        for file in sorted(local.iterdir()):
            fs.put(str(file), f"{path}/{file.name}")
        fs.touch(f"{path}/COMPLETE")  # written last: a checkpoint without it is ignored
    if name.startswith("step-"):
        _prune(cfg)
    return target


def _prune(cfg: TrainConfig) -> None:
    fs, root = _fs(cfg.output)
    complete = [n for n in checkpoint_names(cfg.output) if fs.exists(f"{root.rstrip('/')}/checkpoints/{n}/COMPLETE")]
    for old in complete[: max(0, len(complete) - cfg.keep_checkpoints)]:
        fs.rm(f"{root.rstrip('/')}/checkpoints/{old}", recursive=True)


def latest_checkpoint(output: str) -> str | None:
    fs, root = _fs(output)
    for name in reversed(checkpoint_names(output)):
        if fs.exists(f"{root.rstrip('/')}/checkpoints/{name}/COMPLETE"):
            return f"{output.rstrip('/')}/checkpoints/{name}"
    return None


def _localize(url: str, tmp: str) -> str:
    from fsspec.implementations.local import LocalFileSystem

    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    local = Path(tmp) / "ckpt"
    fs.get(path.rstrip("/") + "/", str(local), recursive=True)
    return str(local)


def build_trainer(cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1, resume: bool = True) -> Trainer:
    """A trainer at the newest checkpoint of ``cfg.output`` (when ``resume``), else at the initial model."""
    torch.manual_seed(cfg.seed * 1000 + rank)
    ckpt = latest_checkpoint(cfg.output) if resume else None
    with tempfile.TemporaryDirectory() as tmp:
        if ckpt:
            local = _localize(ckpt, tmp)
            model, _ = load_model(local)
            state = torch.load(Path(local) / STATE_FILE, map_location="cpu", weights_only=True)
        else:
            model = load_model(cfg.init_model)[0] if cfg.init_model else init_model(cfg.init_preset, seed=cfg.seed)
            state = None
        model = _renamed(model, cfg)
        trainer = Trainer(model, cfg, device, rank, world)
        if state is not None:
            trainer.load_state(state)
            log.info("resumed from %s at step %d", ckpt, trainer.step_count)
    return trainer


def _renamed(model: RDEIC, cfg: TrainConfig) -> RDEIC:
    trained = cfg.stage in ("stage1", "stage2") or model.config.trained
    name = cfg.name or model.config.name
    if (name, trained) != (model.config.name, model.config.trained):
        model.config = replace(model.config, name=name, trained=trained)
    return model


def train(cfg: TrainConfig, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
          report: Callable[[dict], None] | None = None, resume: bool = True) -> Trainer:
    """The training loop of ``rdeic train`` and of each ``rdeic-job train`` worker."""
    device = torch.device(device)
    trainer = build_trainer(cfg, device, rank, world, resume)
    t0, first, last, pending = time.perf_counter(), trainer.step_count, {}, []
    while trainer.step_count < cfg.steps:
        terms = trainer.step(trainer.next_batch())
        step = trainer.step_count
        metrics = {"step": step, **terms}
        if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps and rank == 0:
            metrics.update(validate(trainer))
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = (step - first) / max(time.perf_counter() - t0, 1e-9)
            log.info("step %d/%d %s (%.2f steps/s)", step, cfg.steps, _fmt(terms), rate)
        if report is not None:
            report(metrics)
        pending.append(metrics)
        if rank == 0 and (step % cfg.checkpoint_every == 0) and step < cfg.steps:
            save_checkpoint(trainer)
            append_metrics(cfg.output, pending)
        last = metrics
    final = {}
    if rank == 0:
        trainer.model.eval()
        if cfg.stage == "vae":
            last["scaling_factor"] = calibrate_latent_scale(trainer)
        final = {"final_" + k: v for k, v in validate(trainer).items()}
        last.update(final)
        save_checkpoint(trainer)
        save_checkpoint(trainer, name="final")
        append_metrics(cfg.output, pending + [{"step": trainer.step_count, **final}])
    if report is not None:  # every rank reports as often as the others (Ray Train's report is collective)
        report({"step": trainer.step_count, **final})
    trainer.last_metrics = last
    return trainer


@torch.no_grad()
def calibrate_latent_scale(trainer: Trainer, batches_: int = 16) -> float:
    """Set the VAE's scaling factor so that training latents have unit variance (SD: 0.18215)."""
    model = trainer.model
    stream = batches(ShardImages(trainer.data.urls, trainer.data.crop, seed=4321).iterate(), trainer.cfg.data.batch_size)
    latents = [model.vae.encode(next(stream).to(trainer.device)).latent_dist.mean for _ in range(batches_)]
    scale = float(1.0 / torch.cat(latents).flatten().std())
    model.config = replace(model.config, vae={**model.config.vae, "scaling_factor": round(scale, 6)})
    log.info("latent scaling factor set to %.6f", scale)
    return scale


def append_metrics(output: str, rows: list[dict]) -> None:
    """Add rows to ``<output>/metrics.jsonl`` (one JSON object per step) and clear ``rows``."""
    fs, root = _fs(output)
    path = root.rstrip("/") + "/metrics.jsonl"
    old = fs.cat(path).decode() if fs.exists(path) else ""
    new = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    with fs.open(path, "wb") as f:
        f.write((old + new).encode())
    rows.clear()


def _fmt(terms: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in terms.items())


@torch.no_grad()
def validate(trainer: Trainer) -> dict[str, float]:
    """Real coding on held-out images: bpp from the bitstreams and PSNR of the decoded images."""
    cfg = trainer.cfg
    if not cfg.data.val_shards or cfg.stage not in ("stage1", "stage2"):
        return {}
    from .codec import Codec
    from .metrics import psnr
    from .modeldir import ModelId

    model = trainer.model
    was_training = model.training
    model.eval()
    stream = ShardImages(expand(list(cfg.data.val_shards)), CropSpec(256, flip=False), seed=1234).iterate()
    images = [next(stream) for _ in range(cfg.data.val_images)]
    codec = Codec(model, ModelId("validation", bytes(8)), device=trainer.device, deterministic=False)
    streams = codec.compress(images)
    decoded = codec.decompress(streams, steps=cfg.fixed_steps)
    model.train(was_training)
    bpp = float(np.mean([codec.bpp(s, im.shape[1], im.shape[0]) for s, im in zip(streams, images)]))
    return {"val_bpp": bpp, "val_psnr": float(np.mean([psnr(a, b) for a, b in zip(images, decoded)]))}
