"""Ray distribution: one actor per GPU (or CPU worker), shards as units of work, retries.

The only module of ``pipelines`` that imports ``ray``. Each actor loads the model once and
runs the plain per-shard callables of ``compress.py`` / ``decode.py``. The driver keeps at
most two shards queued per actor, replaces actors that die and resubmits their shards
(the commit markers make a redo idempotent), and gives up on a shard after ``max_retries``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from .archive import ShardStats
from .compress import ShardTask

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2


class WorkerActor:
    """Ray actor body: load the codec on this actor's device, then process tasks."""

    def __init__(self, kind: str, spec) -> None:
        import warnings

        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        import torch

        from rdeic.codec import Codec

        from .storage import localize_model

        device = "cuda:0" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES
        codec = Codec.load(localize_model(spec.model, spec.storage), device=device, max_batch=spec.batch_size)
        codec.warm_up()  # first-call kernel selection happens at start-up, not inside the first shard
        context = ray.get_runtime_context()
        self.info = {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
            "device": device,
            "actor_id": context.get_actor_id(),
        }
        if kind == "compress":
            from .compress import ShardCompressor

            self.worker = ShardCompressor(spec, codec, self.info)
        else:
            from .decode import PartDecoder

            self.worker = PartDecoder(spec, codec, self.info)

    def describe(self) -> dict:
        return self.info

    def run(self, task: ShardTask) -> ShardStats:
        return self.worker(task)


@dataclass
class RunResult:
    stats: list[ShardStats] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    actors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until every actor had loaded its model


class WorkerStartError(RuntimeError):
    """An actor could not start (e.g. the model cannot be loaded)."""


def init_ray(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def actor_resources(num_actors: int | None) -> tuple[int, dict]:
    """(number of actors, per-actor options): one GPU each where the cluster has GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return (num_actors or gpus), {"num_gpus": 1, "num_cpus": 1}
    return (num_actors or 1), {"num_gpus": 0, "num_cpus": 1}


class _Pool:
    def __init__(self, kind: str, spec, count: int, options: dict, max_replacements: int) -> None:
        self.remote_cls = ray.remote(**options, max_restarts=0, max_task_retries=0)(WorkerActor)
        self.kind, self.spec = kind, spec
        self.replacements_left = max_replacements
        self.actors = [self._start() for _ in range(count)]
        self.infos = self._describe(self.actors)

    def _start(self):
        return self.remote_cls.remote(self.kind, self.spec)

    @staticmethod
    def _describe(actors) -> list[dict]:
        try:
            return ray.get([a.describe.remote() for a in actors])
        except RayActorError as exc:
            raise WorkerStartError(f"a worker could not start: {_short(exc)}") from None

    def replace(self, index: int, dead) -> None:
        if self.actors[index] is not dead:
            return  # already replaced after another of its tasks failed
        if self.replacements_left <= 0:
            raise WorkerStartError("workers keep dying; giving up (see the failed shards above)")
        self.replacements_left -= 1
        ray.kill(dead, no_restart=True)
        self.actors[index] = self._start()
        self.infos += self._describe([self.actors[index]])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__


def run_tasks(kind: str, spec, tasks: list[ShardTask], num_actors: int | None, max_retries: int = 3,
              skipped: int = 0, desc: str = "shards") -> RunResult:
    """Run every task on a pool of actors; each task succeeds once or ends in ``failed``."""
    t0 = time.perf_counter()
    result = RunResult()
    if not tasks:
        return result
    count, options = actor_resources(num_actors)
    count = min(count, len(tasks))
    pool = _Pool(kind, spec, count, options, max_replacements=count * (max_retries + 1))
    result.startup_seconds = time.perf_counter() - t0
    queue = deque(tasks)
    inflight: dict = {}  # ObjectRef -> (task, actor index, actor handle)
    load = [0] * count
    images = errors = 0
    bar = tqdm(total=len(tasks) + skipped, initial=skipped, desc=desc, unit="shard", dynamic_ncols=True)
    try:
        while queue or inflight:
            for i in range(count):
                while queue and load[i] < IN_FLIGHT_PER_ACTOR:
                    task = queue.popleft()
                    actor = pool.actors[i]
                    inflight[actor.run.remote(task)] = (task, i, actor)
                    load[i] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                task, i, actor = inflight.pop(ref)
                load[i] -= 1
                try:
                    stats: ShardStats = ray.get(ref)
                except RayActorError as exc:
                    log.warning("worker died during shard %s (attempt %d): %s", task.shard_id, task.attempt, _short(exc))
                    pool.replace(i, actor)
                    bar.update(_retry(task, f"worker died: {_short(exc)}", queue, result, max_retries))
                    continue
                except RayTaskError as exc:
                    log.warning("shard %s failed (attempt %d): %s", task.shard_id, task.attempt, _short(exc))
                    bar.update(_retry(task, _short(exc), queue, result, max_retries))
                    continue
                result.stats.append(stats)
                images += stats.ok
                errors += stats.errors
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(images=images, errors=errors, img_s=f"{images / elapsed:.1f}", failed=len(result.failed))
    finally:
        bar.close()
        result.actors = pool.infos
        for actor in pool.actors:
            ray.kill(actor, no_restart=True)
    result.seconds = time.perf_counter() - t0
    return result


def _retry(task: ShardTask, reason: str, queue: deque, result: RunResult, max_retries: int) -> int:
    """Requeue the task, or record it as failed; returns the number of shards now finished (0 or 1)."""
    if task.attempt >= max_retries:
        result.failed.append({"shard_id": task.shard_id, "source": task.url, "attempts": task.attempt + 1, "error": reason})
        return 1
    queue.appendleft(replace(task, attempt=task.attempt + 1))
    return 0
