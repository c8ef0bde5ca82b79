"""Shared fixtures: a real S3 endpoint on 127.0.0.1 (moto's server mode), one
embedded Ray per test session, and a tiny DeconvNet model directory.

The environment is set at import time, before anything imports boto or Ray, so
that Ray workers started later inherit it.
"""

from __future__ import annotations

import os
import uuid

import pytest
from clusterutil import free_port

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; `AWS_ENDPOINT_URL` points at it, as a user's
    environment would point at their object store."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket: 's3://<name>'."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One embedded Ray for the whole session, started after the S3 endpoint so
    its workers inherit `AWS_ENDPOINT_URL`."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A model directory holding the tiny preset with seeded random weights."""
    import torch

    from deconvnet.model import PRESETS, DeconvNet
    from deconvnet.weights import ModelInfo, save_model_dir

    torch.manual_seed(0)
    uri = str(tmp_path_factory.mktemp("model"))
    save_model_dir(DeconvNet(PRESETS["tiny"]), uri, ModelInfo(config=PRESETS["tiny"]))
    return uri


@pytest.fixture
def voc(tmp_path):
    """A TrainConfig (tiny recipe, batch 2, in-process) over 6 generated VOC-layout scenes (4 train, 2 val)."""
    from deconvnet.data import synthetic
    from deconvnet.training.recipe import config_for

    synthetic.generate(str(tmp_path / "voc"), images=6, seed=1, size=64, val_fraction=0.34)
    return config_for("tiny", data=str(tmp_path / "voc"), storage=str(tmp_path / "runs"), name="t",
                      num_workers=0, batch_size=2)


@pytest.fixture(scope="session")
def train_job_by_value(ray_session):
    """jobs/train.py's train loop pickled by value, so Ray Train's workers run
    this checkout's code without importing `jobs` themselves."""
    from jobs import train

    ray_session.cloudpickle.register_pickle_by_value(train)
    yield train
    ray_session.cloudpickle.unregister_pickle_by_value(train)
