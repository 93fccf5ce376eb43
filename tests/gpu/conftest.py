"""CUDA test helpers: a world-1 NCCL process group and exact fp32 arithmetic (no TF32)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="module")
def nccl():
    """A world-1 NCCL group made by ``init_distributed`` (a second NCCL rank on one GPU is refused)."""
    from seerlike.engine.dist import init_distributed, teardown

    owns = not dist.is_initialized()
    info = init_distributed()
    yield info
    if owns:
        teardown()


@pytest.fixture
def exact_cuda():
    """fp32 matmuls and convolutions in true fp32 with deterministic cuDNN algorithms, restored afterwards."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = flags
