"""`rdeic-job train`: two Ray Train workers on CPU (gloo) run the same step and checkpoint format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from jobs.cli import main
from rdeic.training import STATE_FILE, latest_checkpoint
from rdeic.weights import load_model
from tests.helpers import encode, random_image, write_shard

pytestmark = pytest.mark.slow


def test_two_workers_produce_a_checkpoint_in_our_format(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    for s in range(2):  # one shard per worker
        write_shard(tmp_path / f"train-{s}.tar", [{"__key__": f"{s}_{i}", "png": encode(random_image(rng, 80, 96))} for i in range(2)])
    config = {"stage": "stage1", "output": str(tmp_path / "run"), "init_preset": "tiny", "steps": 2, "name": "ddp-test",
              "data": {"shards": [str(tmp_path / "train-*.tar")], "crop": 64, "batch_size": 1},
              "checkpoint_every": 100, "log_every": 1}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--workers", "2", "--device", "cpu", "-q"]) == 0
    ckpt = latest_checkpoint(config["output"])
    model, model_id = load_model(ckpt)
    assert model_id.name == "ddp-test"
    state = torch.load(f"{ckpt}/{STATE_FILE}", weights_only=True)
    assert state["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(np.isfinite(r["bpp"]) for r in rows if "bpp" in r)
