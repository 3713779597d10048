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
