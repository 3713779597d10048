"""``rdeic-job train``: the single-device training step on N workers with Ray Train (DDP).

Each worker reads its own subset of the training shards (``shards[rank::N]``), runs the same
``Trainer.step`` as ``rdeic train``, and averages gradients with DDP (gloo on CPU, NCCL on
GPU). Rank 0 writes checkpoints and ``metrics.jsonl`` to the config's ``output`` (any fsspec
URL); a restarted job resumes from the newest checkpoint there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (YAML), the same file `rdeic train` takes")
    p.add_argument("--workers", type=int, help="number of workers (default: one per GPU, or 2 on CPU)")
    p.add_argument("--steps", type=int, help="override the config's number of steps")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the output")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts Ray Train may make (each resumes)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto: one GPU per worker if the cluster has GPUs (NCCL), else CPU workers (gloo)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("-q", "--quiet", action="store_true")


def _worker_loop(loop_config: dict) -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import ray.train
    import ray.train.torch

    from rdeic.config import from_dict
    from rdeic.training import TrainConfig, train

    ctx = ray.train.get_context()
    cfg = from_dict(TrainConfig, loop_config["config"])
    train(cfg, device=ray.train.torch.get_device(), rank=ctx.get_world_rank(), world=ctx.get_world_size(),
          report=ray.train.report, resume=loop_config["resume"])


def run(args: argparse.Namespace) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.distributor import init_ray
    from rdeic.config import to_dict
    from rdeic.training import TrainConfig

    cfg = TrainConfig.load(args.config)
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    init_ray(args.ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = args.device == "gpu" or (args.device == "auto" and gpus > 0)
    workers = args.workers or (gpus if use_gpu else 2)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": to_dict(cfg), "resume": not args.restart},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name="rdeic-train", storage_path=tempfile.mkdtemp(prefix="rdeic-ray-train-"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        print(f"rdeic-job: error: training failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    if result.error:
        print(f"rdeic-job: error: training failed: {result.error}", file=sys.stderr)
        return 1
    import fsspec

    fs, root = fsspec.core.url_to_fs(cfg.output)
    rows = [json.loads(line) for line in fs.cat(root.rstrip("/") + "/metrics.jsonl").decode().splitlines() if line]
    final = {}
    for row in rows:  # the last step's loss terms, then the final validation
        final.update(row)
    print(f"{cfg.output}/final: {cfg.stage} on {workers} workers, step {final.get('step')}; "
          + " ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float)))
    return 0
