"""Ray distribution: one actor per GPU (or CPU worker), units of work, fair retries.

The only module of ``pipelines`` that imports ``ray``. Each actor loads the model once, checks
that it is the model the driver expects, and runs the plain per-unit callables of
``compress.py`` / ``decode.py`` / ``audit.py``. The driver keeps at most two units queued per actor and starts
work as soon as one actor is up (on an autoscaling cluster the others join when their GPU
nodes arrive; none at all within ``start_timeout`` is an error).

Retries are charged fairly: when an actor dies, only the unit it was running is charged an
attempt; units queued behind it go back to the queue uncharged. A unit that failed is retried
on another actor where there is one, and an actor that fails two units in a row is replaced.
After ``max_retries`` a unit is reported as failed (the job exits 1; re-running retries it).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from .archive import ShardStats
from .compress import DEVICES, ShardTask

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2


class WorkerActor:
    """Ray actor body: load the codec on this actor's device, then process units."""

    def __init__(self, kind: str, spec, coder_processes: int = 0) -> None:
        import warnings

        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from rdeic.codec import Codec

        from .modelcache import localize_model

        device = pick_device(spec.device)
        codec = Codec.load(localize_model(spec.model, spec.storage), device=device, max_batch=spec.batch_size,
                           coder_processes=coder_processes)
        expected = spec.settings.get("model_id")
        if expected and str(codec.model_id) != expected:
            raise RuntimeError(f"this worker loaded model {codec.model_id}, but the driver expected {expected} "
                               f"(did the model at {spec.model} change?)")
        codec.warm_up()  # first-call kernel selection happens at start-up, not inside the first unit
        context = ray.get_runtime_context()
        self.info = {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
            "device": device,
            "actor_id": context.get_actor_id(),
            "coder_processes": coder_processes,
        }
        if kind == "compress":
            from .compress import ShardCompressor

            self.worker = ShardCompressor(spec, codec, self.info)
        elif kind == "decode":
            from .decode import PartDecoder

            self.worker = PartDecoder(spec, codec, self.info)
        else:
            from .audit import PartAuditor

            self.worker = PartAuditor(spec, codec, self.info)

    def describe(self) -> dict:
        return self.info

    def run(self, task: ShardTask) -> ShardStats:
        return self.worker(task)


def pick_device(requested: str) -> str:
    """The torch device of a worker: ``cuda`` must exist; ``auto`` takes it when Ray gave this worker a GPU."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
    if requested == "cuda":
        raise RuntimeError("--device cuda, but no CUDA device is visible to this worker "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return "cpu"



@dataclass
class RunResult:
    stats: list[ShardStats] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    actors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until the first actor had loaded its model


class WorkerStartError(RuntimeError):
    """No actor could start (the model cannot be loaded, or no resources appeared in time)."""


def init_ray(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def actor_resources(device: str, num_actors: int | None, coder_processes: int | None = None) -> tuple[int, dict, int]:
    """(number of actors, per-actor options, coder processes per actor). ``cuda`` asks for a GPU per actor
    even when the cluster has none yet, which is what makes an autoscaler start GPU nodes.

    Each coder process (entropy coding beside the model, ``rdeic.coders``) is one more CPU the actor
    asks for. By default GPU actors get the cluster's CPUs per GPU less one for the model's thread
    (at most 8), CPU actors none: there the model and the coders would share the same cores.
    """
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    on_gpu = device == "cuda" or (device == "auto" and gpus)
    if coder_processes is None:
        coder_processes = max(0, min(8, int(resources.get("CPU", 1)) // max(gpus, 1) - 1)) if on_gpu else 0
    if on_gpu:
        return (num_actors or max(gpus, 1)), {"num_gpus": 1, "num_cpus": 1 + coder_processes}, coder_processes
    if device == "auto":
        log.info("no GPUs in the Ray cluster now: CPU workers (on an autoscaling cluster, --device cuda asks for GPU nodes)")
    return (num_actors or 1), {"num_gpus": 0, "num_cpus": 1 + coder_processes}, coder_processes


@dataclass
class _Actor:
    handle: object
    ready: object  # ObjectRef of describe(): resolves once the model is loaded
    up: bool = False
    inflight: deque = field(default_factory=deque)  # ObjectRefs of its tasks, in submission order
    failures_in_a_row: int = 0


class _Pool:
    def __init__(self, kind: str, spec, count: int, options: dict, max_replacements: int, coder_processes: int = 0) -> None:
        self.remote_cls = ray.remote(**options, max_restarts=0, max_task_retries=0)(WorkerActor)
        self.kind, self.spec, self.options, self.coder_processes = kind, spec, options, coder_processes
        self.replacements_left = max_replacements
        self.actors = [self._start() for _ in range(count)]
        self.infos: list[dict] = []

    def _start(self) -> _Actor:
        handle = self.remote_cls.remote(self.kind, self.spec, self.coder_processes)
        return _Actor(handle, handle.describe.remote())

    def starting(self) -> dict:
        return {a.ready: i for i, a in enumerate(self.actors) if not a.up}

    def mark_up(self, index: int) -> None:
        actor = self.actors[index]
        try:
            self.infos.append(ray.get(actor.ready))
        except (RayActorError, RayTaskError) as exc:
            raise WorkerStartError(f"a worker could not start: {_short(exc)}") from None
        actor.up = True

    def replace(self, index: int) -> None:
        if self.replacements_left <= 0:
            raise WorkerStartError("workers keep failing; giving up (see the failed units above)")
        self.replacements_left -= 1
        ray.kill(self.actors[index].handle, no_restart=True)
        self.actors[index] = self._start()

    def kill_all(self) -> None:
        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__


class _Scheduler:
    """The driver's loop over one pool: hand out units, collect results, retry fairly."""

    def __init__(self, pool: _Pool, tasks: list[ShardTask], max_retries: int, result: RunResult) -> None:
        self.pool, self.queue, self.max_retries, self.result = pool, deque(tasks), max_retries, result
        self.inflight: dict = {}  # ObjectRef -> (task, actor index)

    def submit(self) -> None:
        up = [i for i, a in enumerate(self.pool.actors) if a.up]
        for i in up:
            actor = self.pool.actors[i]
            while self.queue and len(actor.inflight) < IN_FLIGHT_PER_ACTOR:
                task = next((t for t in self.queue if t.avoid != i or len(up) == 1), None)
                if task is None:
                    break
                self.queue.remove(task)
                ref = actor.handle.run.remote(task)
                self.inflight[ref] = (task, i)
                actor.inflight.append(ref)

    def collect(self, ref) -> tuple[ShardStats | None, int]:
        """(stats of a finished unit or None, number of units that ended now: 0 or 1)."""
        task, i = self.inflight.pop(ref)
        actor = self.pool.actors[i]
        was_running = actor.inflight[0] == ref  # an actor runs its tasks one at a time, in order
        actor.inflight.remove(ref)
        try:
            stats = ray.get(ref)
        except RayActorError as exc:
            return None, self._actor_died(task, i, was_running, exc)
        except RayTaskError as exc:
            log.warning("unit %s failed on worker %d (attempt %d): %s", task.shard_id, i, task.attempt, _short(exc))
            actor.failures_in_a_row += 1
            if actor.failures_in_a_row >= 2:
                log.warning("worker %d failed %d units in a row; replacing it", i, actor.failures_in_a_row)
                self._requeue(self._take_back(i))
                self.pool.replace(i)
            return None, self._retry(task, i, _short(exc))
        actor.failures_in_a_row = 0
        return stats, 1

    def _actor_died(self, task: ShardTask, i: int, was_running: bool, exc: BaseException) -> int:
        """Only the unit the actor was running is charged an attempt; the ones queued behind it go back free."""
        queued = self._take_back(i)
        running = task if was_running else queued.pop(0)
        if not was_running:
            queued.insert(0, task)
        self._requeue(queued)
        log.warning("worker %d died during unit %s (attempt %d): %s; %d queued unit(s) requeued uncharged",
                    i, running.shard_id, running.attempt, _short(exc), len(queued))
        self.pool.replace(i)
        return self._retry(running, i, f"worker died: {_short(exc)}")

    def _take_back(self, i: int) -> list[ShardTask]:
        """The actor's in-flight units, oldest first, forgotten by the scheduler."""
        actor = self.pool.actors[i]
        tasks = [self.inflight.pop(ref)[0] for ref in actor.inflight]
        actor.inflight.clear()
        return tasks

    def _requeue(self, tasks: list[ShardTask]) -> None:
        for task in reversed(tasks):
            self.queue.appendleft(task)

    def _retry(self, task: ShardTask, i: int, reason: str) -> int:
        if task.attempt >= self.max_retries:
            self.result.failed.append({"shard_id": task.shard_id, "source": task.url, "attempts": task.attempt + 1, "error": reason})
            return 1
        self.queue.appendleft(replace(task, attempt=task.attempt + 1, avoid=i))
        return 0


def run_tasks(kind: str, spec, tasks: list[ShardTask], num_actors: int | None, max_retries: int = 3,
              skipped: int = 0, desc: str = "units", start_timeout: float = 600.0,
              check: Callable[[], None] = lambda: None, progress: bool = True,
              coder_processes: int | None = None) -> RunResult:
    """Run every task on a pool of actors; each task succeeds once or ends in ``failed``.

    ``check`` is called between results and may raise to stop the run (e.g. the lease was lost).
    """
    t0 = time.perf_counter()
    result = RunResult()
    if not tasks:
        return result
    count, options, coders = actor_resources(spec.device, num_actors, coder_processes)
    count = min(count, len(tasks))
    pool = _Pool(kind, spec, count, options, max_replacements=count * (max_retries + 1), coder_processes=coders)
    sched = _Scheduler(pool, tasks, max_retries, result)
    images = errors = 0
    bar = tqdm(total=len(tasks) + skipped, initial=skipped, desc=desc, unit="unit", dynamic_ncols=True, disable=not progress)
    waiting_since = time.monotonic()
    try:
        while sched.queue or sched.inflight:
            check()
            if any(a.up for a in pool.actors):
                waiting_since = time.monotonic()
            sched.submit()
            starting = pool.starting()
            ready, _ = ray.wait(list(sched.inflight) + list(starting), num_returns=1, timeout=min(30.0, start_timeout))
            if not ready:
                _report_waiting(pool, options, time.monotonic() - waiting_since, start_timeout)
                continue
            ref = ready[0]
            if ref in starting:
                pool.mark_up(starting[ref])
                result.startup_seconds = result.startup_seconds or time.perf_counter() - t0
                continue
            stats, ended = sched.collect(ref)
            bar.update(ended)
            if stats is not None:
                result.stats.append(stats)
                images, errors = images + stats.ok, errors + stats.errors
                bar.set_postfix(images=images, errors=errors, img_s=f"{images / (time.perf_counter() - t0):.1f}",
                                failed=len(result.failed))
    finally:
        bar.close()
        result.actors = pool.infos
        pool.kill_all()
    result.seconds = time.perf_counter() - t0
    return result


def _report_waiting(pool: _Pool, options: dict, waited: float, start_timeout: float) -> None:
    up = sum(a.up for a in pool.actors)
    if up == len(pool.actors):
        return  # long units, not missing workers
    need = f"{options['num_gpus']} GPU and {options['num_cpus']} CPU each"
    have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    if up == 0 and waited > start_timeout:
        raise WorkerStartError(f"no worker finished starting within {start_timeout:.0f} s (each needs {need}; free now: "
                               f"{have or 'nothing'}): the cluster lacks the resources or loading the model is slow; "
                               "add nodes, choose --device cpu, or raise --start-timeout")
    log.warning("waiting for workers: %d of %d up (%s; free now: %s)", up, len(pool.actors), need, have)
