"""The training step (both RDEIC stages and the base models), checkpoints and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rdeic.config import from_dict
from rdeic.training import STATE_FILE, Trainer, TrainConfig, latest_checkpoint, train
from rdeic.weights import init_model, load_model
from tests.helpers import encode, random_image, write_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-shards")
    rng = np.random.default_rng(0)
    for s in range(2):
        write_shard(folder / f"train-{s}.tar", [{"__key__": f"{s}_{i}", "png": encode(random_image(rng, 96, 112))} for i in range(3)])
    return str(folder / "train-*.tar")


def _config(shards, tmp_path, **over) -> TrainConfig:
    data = {"stage": "stage1", "output": str(tmp_path / "out") if tmp_path else "", "init_preset": "tiny", "steps": 4,
            "data": {"shards": [shards], "crop": 64, "batch_size": 2}, "perceptual": "none",
            "optim": {"lr": 1e-3}, "checkpoint_every": 2, "log_every": 100}
    data.update(over)
    return from_dict(TrainConfig, data)


def _eval_loss(trainer: Trainer, batch: torch.Tensor) -> float:
    trainer.model.eval()
    trainer.loss.generator.manual_seed(99)
    with torch.no_grad():
        loss, _ = trainer.loss(batch)
    trainer.model.train()
    return loss.item()


@pytest.mark.parametrize("stage", ["stage1", "stage2", "vae", "denoiser"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(shards, tmp_path, stage):
    torch.manual_seed(0)
    trainer = Trainer(init_model("tiny"), _config(shards, tmp_path, stage=stage), torch.device("cpu"))
    batch = trainer.next_batch()
    before = _eval_loss(trainer, batch)
    for _ in range(6):
        trainer.step(batch)
    assert _eval_loss(trainer, batch) < before


def test_only_control_and_compression_train_in_the_rdeic_stages(shards, tmp_path):
    trainer = Trainer(init_model("tiny"), _config(shards, tmp_path), torch.device("cpu"))
    m = trainer.model
    unet_before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    vae_before = m.vae.encoder.conv_in.weight.clone()
    trainer.step(trainer.next_batch())
    assert all(torch.equal(v, m.unet.state_dict()[k]) for k, v in unet_before.items())
    assert torch.equal(vae_before, m.vae.encoder.conv_in.weight)
    trained = {id(p) for p in trainer.params}
    assert trained == {id(p) for p in list(m.control.parameters()) + list(m.compression.parameters())}


def test_checkpoints_are_model_directories(shards, tmp_path):
    cfg = _config(shards, tmp_path, steps=2, name="my-model")
    train(cfg)
    ckpt = latest_checkpoint(cfg.output)
    assert ckpt.endswith("step-00000002")
    model, model_id = load_model(ckpt)
    assert model_id.name == "my-model" and model.config.trained  # RDEIC stages make a trained model
    state = torch.load(f"{ckpt}/{STATE_FILE}", weights_only=True)
    assert state["step"] == 2 and "optimizer" in state and state["data_index"] > 0
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][:2] == [1, 2]
    assert load_model(f"{cfg.output}/final")[1] == model_id


def test_resume_gives_the_same_next_loss(shards, tmp_path):
    straight = []
    train(_config(shards, tmp_path / "a"), report=straight.append)
    resumed = []
    train(_config(shards, tmp_path / "b", steps=2))
    train(_config(shards, tmp_path / "b"), report=resumed.append)
    assert resumed[0]["step"] == 3
    assert resumed[0]["loss"] == straight[2]["loss"] and resumed[1]["loss"] == straight[3]["loss"]


def test_the_logged_rate_counts_only_the_steps_this_run_made(shards, tmp_path, monkeypatch, caplog):
    import types

    import rdeic.training as training

    train(_config(shards, tmp_path, steps=2))
    clock = iter(range(0, 10_000, 10))  # each reading of the clock is 10 s after the last
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    with caplog.at_level("INFO", logger="rdeic"):
        train(_config(shards, tmp_path, steps=3, log_every=1))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 3/3"))
    assert line.endswith("(0.10 steps/s)"), line  # 1 step in 10 s; not the 2 resumed steps too


def test_config_errors_are_readable(shards, tmp_path):
    from rdeic.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one of init_model and init_preset"):
        _config(shards, tmp_path, init_model="x")
    with pytest.raises(ConfigError, match="stage must be one of"):
        _config(shards, tmp_path, stage="stage3")


def test_checkpoints_on_object_storage_and_resume_from_there(shards, s3):
    fs, bucket, _ = s3
    cfg = _config(shards, None, output=f"s3://{bucket}/runs/a", steps=2)
    train(cfg)
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/runs/a/checkpoints/step-00000002/COMPLETE")
    resumed = []
    train(_config(shards, None, output=f"s3://{bucket}/runs/a", steps=3), report=resumed.append)
    assert resumed[0]["step"] == 3


@pytest.mark.parametrize("over, key", [
    ({"checkpoint_every": 0}, "checkpoint_every"),  # was a ZeroDivisionError at the first step
    ({"log_every": 0}, "log_every"),  # the same
    ({"keep_checkpoints": 0}, "keep_checkpoints"),  # deleted every checkpoint right after writing it
    ({"validate_every": -1}, "validate_every"),
    ({"stage": "stage2", "perceptual": "ms_ssim", "data": {"shards": ["x"], "crop": 128}}, "data.crop"),  # an assertion traceback
])
def test_settings_that_would_fail_or_destroy_work_are_refused_when_read(over, key):
    from rdeic.errors import ConfigError

    with pytest.raises(ConfigError, match=key) as info:
        _config("x", None, **over)
    assert "\n" not in str(info.value)


def test_posterior_noise_is_drawn_where_the_generator_is(monkeypatch):
    """The trainer's generator is a CPU one, and torch.randn(device="cuda", generator=<cpu>) raises
    at the first CUDA step. A tensor on the "meta" device stands in for CUDA here, with torch.randn
    refusing a generator of another device as CUDA's does."""
    randn = torch.randn

    def strict_randn(*size, generator=None, device=None, **kw):
        wanted = torch.device(device if device is not None else "cpu").type
        if generator is not None and generator.device.type != wanted:
            raise RuntimeError(f"Expected a '{wanted}' device type for generator but found '{generator.device.type}'")
        return randn(*size, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "randn", strict_randn)
    model = init_model("tiny")
    moments = torch.zeros(2, 2 * model.config.vae["latent_channels"], 4, 4)
    z = model.latent_from_moments(moments.to("meta"), generator=torch.Generator().manual_seed(3), sample=True)
    assert z.device.type == "meta" and z.shape == (2, moments.shape[1] // 2, 4, 4)
    # the same draw as on the CPU, so a run is reproducible on any device
    cpu = model.latent_from_moments(moments, generator=torch.Generator().manual_seed(3), sample=True)
    expected = randn((2, moments.shape[1] // 2, 4, 4), generator=torch.Generator().manual_seed(3)) * model.config.scale_factor
    assert torch.equal(cpu, expected)
