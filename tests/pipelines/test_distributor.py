"""The driver's loop over Ray actors: fair retries (local Ray with two logical GPUs)."""

from __future__ import annotations

import pytest

from pipelines.compress import CompressSpec, CrashSpec, ShardTask
from pipelines.distributor import run_tasks
from tests.helpers import make_shards

pytestmark = pytest.mark.slow


def test_a_unit_queued_behind_a_crashing_one_is_not_charged(ray_cluster, tiny_model_dir, tmp_path):
    make_shards(tmp_path / "in", 2, 2)
    # shard 0 kills its worker on every attempt; shard 1 waits behind it on the same (only) worker
    spec = CompressSpec(output=str(tmp_path / "out"), model=str(tiny_model_dir),
                        crash=CrashSpec("shard-000000", after_samples=1, attempts=99))
    tasks = [ShardTask(str(tmp_path / "in" / f"shard-00000{i}.tar"), f"shard-00000{i}") for i in range(2)]
    result = run_tasks("compress", spec, tasks, num_actors=1, max_retries=1, progress=False)
    assert [(f["shard_id"], f["attempts"]) for f in result.failed] == [("shard-000000", 2)]
    assert [(s.shard_id, s.attempt, s.ok) for s in result.stats] == [("shard-000001", 0, 2)]


@pytest.mark.parametrize("device, cluster, asked, expected", [
    ("auto", {"CPU": 16, "GPU": 2}, None, (2, 1, 7)),  # a GPU node: the CPUs beside each GPU's model thread code
    ("cuda", {"CPU": 64, "GPU": 4}, None, (4, 1, 8)),  # at most 8
    ("auto", {"CPU": 2, "GPU": 2}, None, (2, 1, 0)),  # no CPU to spare: coding inline
    ("cuda", {"CPU": 8}, None, (1, 1, 7)),  # no GPU node yet (an autoscaler adds one)
    ("auto", {"CPU": 8}, None, (1, 0, 0)),  # CPU workers code in the model's thread
    ("cpu", {"CPU": 8, "GPU": 1}, 2, (1, 0, 2)),  # asked for: one more CPU each
])
def test_actors_ask_for_a_cpu_per_coder_process(monkeypatch, device, cluster, asked, expected):
    from pipelines import distributor

    monkeypatch.setattr(distributor.ray, "cluster_resources", lambda: cluster)
    count, options, coders = distributor.actor_resources(device, None, asked)
    gpus, processes = expected[1], expected[2]
    assert (count, options, coders) == (expected[0], {"num_gpus": gpus, "num_cpus": 1 + processes}, processes)
