"""faiss k-means on a features directory recovers planted clusters; stats and parts are consistent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seerlike.config import ConfigError
from seerlike.eval import cluster
from seerlike.eval.features import FeatureStore, finalize, write_chunk


def _planted(tmp_path, k=8, per=60, dim=32, chunks=3, seed=0):
    """Features around ``k`` well-separated centres, shuffled and split into chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 5
    truth = np.repeat(np.arange(k), per)
    x = (centres[truth] + rng.normal(size=(k * per, dim)) * 0.3).astype(np.float32)
    order = rng.permutation(len(truth))
    x, truth = x[order], truth[order]
    keys = [f"s{i:05d}" for i in range(len(truth))]
    for c, part in enumerate(np.array_split(np.arange(len(truth)), chunks)):
        write_chunk(tmp_path, f"{c:03d}", [keys[i] for i in part], x[part])
    finalize(tmp_path, {"layer": "res5", "dim": dim, "dtype": "float32"})
    return dict(zip(keys, truth.tolist()))


def _purity(pairs):
    """Fraction of samples whose cluster's majority true class is their own (both directions)."""
    from collections import Counter

    by_cluster, by_truth = {}, {}
    for c, t in pairs:
        by_cluster.setdefault(c, Counter())[t] += 1
        by_truth.setdefault(t, Counter())[c] += 1
    n = len(pairs)
    return (sum(cnt.most_common(1)[0][1] for cnt in by_cluster.values()) / n,
            sum(cnt.most_common(1)[0][1] for cnt in by_truth.values()) / n)


def test_kmeans_recovers_planted_clusters(tmp_path):
    truth = _planted(tmp_path / "feats")
    stats = cluster.run_kmeans(tmp_path / "feats", tmp_path / "out", cluster.KMeansConfig(k=8, niter=20, nredo=3))
    labels = cluster.read_labels(tmp_path / "out")
    assert labels.num_rows == len(truth)
    assert sorted(labels["key"].to_pylist()) == sorted(truth)
    purity, completeness = _purity([(c, truth[k]) for k, c in zip(labels["key"].to_pylist(), labels["cluster"].to_pylist())])
    assert purity == 1.0 and completeness == 1.0
    assert stats["empty_clusters"] == 0 and stats["size_min"] == stats["size_max"] == 60
    assert stats["effective_clusters"] == pytest.approx(8.0, rel=1e-6)
    # distances are squared L2 on unit vectors, so within [0, 4] and small for tight clusters
    assert 0 <= labels["distance"].to_numpy().max() < 0.1
    saved = json.loads((tmp_path / "out" / "cluster_stats.json").read_text())
    assert sum(saved["sizes"]) == len(truth) and np.load(tmp_path / "out" / "centroids.npy").shape == (8, 32)
    # one label part per feature chunk
    assert len(list((tmp_path / "out" / "labels").glob("*.parquet"))) == len(FeatureStore(tmp_path / "feats").units)


def _kmeans_on_rank(rank, world, feats, out):
    import torch.distributed as dist

    return cluster.run_kmeans(feats, out, cluster.KMeansConfig(k=8, niter=10), rank, world, barrier=dist.barrier)


@pytest.mark.dist
def test_two_ranks_split_the_assignment_and_match_one(tmp_path):
    from seerlike.testing import run_on_ranks

    _planted(tmp_path / "feats", chunks=4)
    single = cluster.run_kmeans(tmp_path / "feats", tmp_path / "one", cluster.KMeansConfig(k=8, niter=10))
    stats = run_on_ranks(_kmeans_on_rank, 2, str(tmp_path / "feats"), str(tmp_path / "two"))
    assert stats[1] == {} and stats[0]["sizes"] == single["sizes"]
    one, two = (cluster.read_labels(tmp_path / d).sort_by("key") for d in ("one", "two"))
    assert one["cluster"].to_pylist() == two["cluster"].to_pylist()


def test_sample_and_config_errors(tmp_path):
    _planted(tmp_path / "feats", k=4, per=10, chunks=2)
    store = FeatureStore(tmp_path / "feats")
    s = cluster.draw_sample(store, 25, seed=1)
    assert s.shape == (25, 32)
    assert len({tuple(r) for r in s.round(5).tolist()}) == 25  # drawn without replacement
    with pytest.raises(ConfigError, match="lower --k"):
        cluster.run_kmeans(tmp_path / "feats", tmp_path / "out", cluster.KMeansConfig(k=100, niter=2))
    with pytest.raises(ValueError, match="sample"):
        cluster.KMeansConfig(k=10, sample=5)
    with pytest.raises(FileNotFoundError, match="seerlike extract"):
        FeatureStore(tmp_path / "nothing")


def test_kmeans_reported_per_iteration_gives_the_centroids_of_one_call():
    # more rows than k x max_points_per_centroid: faiss subsamples, and must draw the same rows every call
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    cfg = cluster.KMeansConfig(k=20, niter=8, max_points_per_centroid=64, seed=3, gpu=False)
    ticks = []
    stepped, obj_stepped = cluster.train_centroids(x, cfg, on_iteration=ticks.append)
    whole, obj_whole = cluster.train_centroids(x, cfg)
    assert ticks == [1] * 8
    np.testing.assert_array_equal(stepped, whole)
    assert obj_stepped == obj_whole


def test_contact_sheet_members_come_from_the_data_by_key(tmp_path, cifar_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from seerlike.eval.extract import list_units
    from seerlike.eval.members import cluster_members

    keys = [s.key for u in list_units(str(cifar_dir / "val"), 4096) for s in u.read()][:40]
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"key": keys, "cluster": pa.array([i % 4 for i in range(40)], pa.int32()),
                             "distance": pa.array([0.0] * 40, pa.float32())}), tmp_path / "labels" / "a.parquet")
    groups = cluster_members(tmp_path, str(cifar_dir / "val"), clusters=3, per_cluster=5, thumb=16)
    rows = [row for rs in groups.values() for row in rs]
    assert len(rows) == 3 and all(len(images) == 5 and images[0].shape == (16, 16, 3) for _, images in rows)
    assert all(title.endswith("(n=10)") for title, _ in rows)


def test_the_default_sample_is_capped_in_memory_and_an_explicit_one_is_not():
    # ClusterFit at 1B: 16,000 x 256 rows of 2,048-d features would be 33.5 GB in one process
    big = cluster.KMeansConfig(k=16000)
    assert big.sample_rows(2048) == int(16e9 // (4 * 2048)) < 16000 * 256
    assert big.sample_rows(128) == 16000 * 256  # small features fit whole
    assert cluster.KMeansConfig(k=16000, max_sample_gb=0).sample_rows(2048) == 16000 * 256
    assert cluster.KMeansConfig(k=16000, sample=5_000_000).sample_rows(2048) == 5_000_000
    with pytest.raises(ConfigError, match="max_sample_gb"):
        cluster.KMeansConfig(k=16000, max_sample_gb=0.01).sample_rows(2048)


def test_k_means_trains_on_the_capped_sample(tmp_path):
    _planted(tmp_path / "feats", k=4, per=60, chunks=2)
    cap_gb = 100 * 32 * 4 / 1e9  # room for 100 rows of 32 dims, k x 256 would be 1,024
    stats = cluster.run_kmeans(tmp_path / "feats", tmp_path / "out",
                               cluster.KMeansConfig(k=4, niter=5, max_sample_gb=cap_gb), progress=False)
    assert stats["sample"] == 100


def test_normalising_a_sample_makes_unit_rows_in_place():
    x = np.random.default_rng(0).normal(size=(40_000, 8)).astype(np.float32)
    out = cluster._prep(x, normalize=True)
    assert out is x  # no second sample-sized array
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
