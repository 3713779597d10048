"""Shared fixtures: a small randomly initialised `tiny` model, built once per test session."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


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
