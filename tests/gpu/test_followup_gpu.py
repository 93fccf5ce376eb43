"""CUDA paths of the follow-up stages: extraction on the GPU, faiss GPU k-means."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from seerlike.eval.extract import ExtractConfig, extract
from seerlike.eval.features import FeatureStore

pytestmark = pytest.mark.gpu


def _csv(tmp_path, cifar_dir, n=32):
    rows = list(csv.DictReader(open(cifar_dir / "val.csv")))[:n]
    with open(tmp_path / "s.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in rows:
            w.writerow([str(cifar_dir / r["path"]), r["label"]])
    return str(tmp_path / "s.csv")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_extraction_matches_cpu(tmp_path, cifar_dir, precision):
    data = _csv(tmp_path, cifar_dir)
    cfg = ExtractConfig(layer="res5", image_size=32, resize=32, batch_size=16, precision=precision)
    extract("random:resnet10_cifar", data, tmp_path / "cpu", ExtractConfig(**{**cfg.__dict__, "precision": "fp32"}),
            progress=False)
    extract("random:resnet10_cifar", data, tmp_path / "gpu", cfg, device=torch.device("cuda"), progress=False)
    cpu, gpu = FeatureStore(tmp_path / "cpu").load(), FeatureStore(tmp_path / "gpu").load()
    assert cpu.keys == gpu.keys
    tol = 2e-2 if precision == "bf16" else 1e-3  # TF32 / bf16 convolutions on the GPU
    scale = np.abs(cpu.features).max()
    np.testing.assert_allclose(gpu.features / scale, cpu.features / scale, atol=tol)


def test_faiss_gpu_kmeans_recovers_planted_clusters(tmp_path):
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU support here (faiss-cpu)")
    from seerlike.eval import cluster
    from tests.unit.test_cluster import _planted, _purity

    truth = _planted(tmp_path / "feats")
    cluster.run_kmeans(tmp_path / "feats", tmp_path / "out", cluster.KMeansConfig(k=8, niter=20, nredo=3, gpu=True))
    labels = cluster.read_labels(tmp_path / "out")
    pairs = [(c, truth[k]) for k, c in zip(labels["key"].to_pylist(), labels["cluster"].to_pylist())]
    assert _purity(pairs) == (1.0, 1.0)
