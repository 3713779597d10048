"""Shared fixtures: a small random `tiny` model, a local S3 server (moto) and a local Ray with logical GPUs.

Tests marked ``gpu`` are skipped, with the reason in the summary (``-ra``), where torch sees no CUDA device.
"""

from __future__ import annotations

import socket
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from rdeic.weights import init_model, save_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    save_model(init_model("tiny", seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_codec(tiny_model_dir):
    from rdeic.codec import Codec

    return Codec.load(tiny_model_dir, max_batch=4)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 (moto) on 127.0.0.1; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request drowns failure reports
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials in the environment (as a user would have them) and an empty bucket."""
    import uuid

    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_server, "region_name": "us-east-1"})
    bucket = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    fs.invalidate_cache()
    return fs, bucket, s3_server


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with two logical GPUs, shared by the tests of a session."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
