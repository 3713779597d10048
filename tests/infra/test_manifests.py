"""The deployment files parse and call the real entry points with valid arguments."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _load(name):
    return yaml.safe_load((INFRA / name).read_text())


@pytest.mark.parametrize("name, job", [("kuberay/rayjob-compress.yaml", "compress"), ("kuberay/rayjob-decode.yaml", "decode")])
def test_rayjobs_run_the_real_jobs_and_resume_on_retry(name, job):
    doc = _load(name)
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["rdeic-job", job]
    args = build_parser().parse_args(argv[1:])  # exits on any unknown or missing argument
    assert args.job == job and "--overwrite" not in argv  # a retry must resume, never replace
    assert args.device == "cuda"  # GPU workers, also where the cluster autoscales them from zero
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = workers[0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_raycluster_has_a_gpu_worker_group():
    doc = _load("kuberay/raycluster.yaml")
    assert doc["kind"] == "RayCluster"
    group = doc["spec"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cluster_launcher_config():
    doc = _load("ray-cluster.yaml")
    assert doc["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    # GPU nodes start at zero: only jobs that ask for GPUs (--device cuda) make the autoscaler start them
    assert doc["available_node_types"]["gpu_worker"]["min_workers"] == 0 and "--device cuda" in (INFRA / "ray-cluster.yaml").read_text()
    assert doc["head_node_type"] in doc["available_node_types"]


def test_container_installs_the_locked_set():
    text = (INFRA / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0-py311" in text
    assert "-c requirements.lock" in text
    lock = (INFRA.parent / "requirements.lock").read_text().splitlines()
    assert "ray==2.60.0" in lock and "torch==2.14.1" in lock
