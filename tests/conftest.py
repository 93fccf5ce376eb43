"""Shared fixtures: real data paths, a real S3 server on loopback, tier markers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT.parent / "shared" / "data").resolve()
PHOTOS = DATA / "photos"
CIFAR = DATA / "cifar10-dev"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny convolutions gain nothing from a second OpenMP
    thread, and on a busy 2-core machine its spin-waiting made them up to 15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    if not PHOTOS.is_dir():
        pytest.fail(f"real test images missing: {PHOTOS} (the shared/ folder must sit beside the repo)")
    return PHOTOS


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not CIFAR.is_dir():
        pytest.fail(f"real test images missing: {CIFAR} (the shared/ folder must sit beside the repo)")
    return CIFAR


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server (moto's server mode) on loopback; yields its endpoint URL.

    Credentials are dummies set in the environment so boto3's standard chain finds them.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback server; yields ``(endpoint, bucket)``."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name
