"""Streaming shards from a real S3 server through a proxy that resets connections and answers 503."""

from __future__ import annotations

import http.client
import http.server
import io
import socket
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seerlike import storage
from seerlike.data import DataConfig, build_eval_data, build_train_data
from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.s3stream import S3Stream, ShardReadError, open_shard
from tests.data_fixtures import cifar_images, write_shards

pytestmark = pytest.mark.integration

SMALL = AugmentConfig(views=[ViewConfig(count=2, size=16, scale=(0.2, 1.0))])


class FaultProxy:
    """HTTP proxy on loopback in front of the S3 server.

    GETs of ``.tar`` objects follow a fixed schedule: every ``every``-th answers 503
    SlowDown, the one after it sends half its body and then resets the connection.
    Keys listed in ``dead`` reset every GET before the first body byte.
    """

    def __init__(self, upstream: str, every: int = 3, dead: tuple[str, ...] = ()):
        self.upstream = upstream.removeprefix("http://")
        self.every, self.dead = every, dead
        self.counts = Counter()
        self._lock = threading.Lock()
        self._n = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._fault(self.command, self.path)
                if fault == "503":
                    msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault in ("reset", "dead") and self.command == "GET" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2] if fault == "reset" else b"")
                    self.wfile.flush()
                    # RST instead of FIN: the client sees a connection reset mid-body
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self, method: str, path: str) -> str | None:
        if method != "GET" or ".tar" not in path:
            return None
        with self._lock:
            if any(d in path for d in self.dead):
                self.counts["dead"] += 1
                return "dead"
            self._n += 1
            phase = self._n % self.every
            fault = "503" if phase == 0 else "reset" if phase == 1 else None
            self.counts[fault or "ok"] += 1
            return fault

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_dataset(s3_bucket, tmp_path: Path, cifar_dir: Path):
    """An ingest-style dataset (6 shards + manifest) on S3 and its local copy."""
    endpoint, bucket = s3_bucket
    local = tmp_path / "ds"
    sizes = [20, 25, 15, 30, 22, 18]
    paths = write_shards(cifar_images(cifar_dir, sum(sizes)), local / "shards", sizes, bad_jpeg={9}, missing_image={50})
    names = [f"shards/{p.name}" for p in paths]
    rows = [names[j] for j, n in enumerate(sizes) for _ in range(n)]
    pq.write_table(pa.table({"shard": rows, "status": ["written"] * len(rows)}), local / "manifest.parquet")
    url = f"s3://{bucket}/ds"
    for f in [*paths, local / "manifest.parquet"]:
        storage.put_file(f, storage.join(url, str(f.relative_to(local))), endpoint_url=endpoint)
    return endpoint, url, local


def test_stream_resumes_at_the_byte_offset(s3_dataset) -> None:
    endpoint, url, local = s3_dataset
    with FaultProxy(endpoint, every=3) as proxy:
        stream = S3Stream(f"{url}/shards/000003.tar", endpoint_url=proxy.url, backoff_s=0.01)
        got = io.BufferedReader(stream).read()
    assert got == (local / "shards" / "000003.tar").read_bytes()
    assert stream.resumes >= 1 and proxy.counts["reset"] >= 1


def test_training_and_eval_over_faulty_s3_lose_and_double_nothing(s3_dataset) -> None:
    endpoint, url, local = s3_dataset
    base = dict(batch_size=8, num_workers=2, shuffle_buffer=16, augment=SMALL, s3_backoff_s=0.01)
    local_data = build_train_data(DataConfig(source=str(local), **base), seed=5)
    local_keys = Counter(k for _, b in zip(range(local_data.steps_per_epoch), local_data) for k in b.keys)
    with FaultProxy(endpoint, every=3) as proxy:
        cfg = DataConfig(source=url, s3_endpoint_url=proxy.url, **base)
        remote = build_train_data(cfg, seed=5)
        assert remote.steps_per_epoch == local_data.steps_per_epoch
        remote_keys = Counter(k for _, b in zip(range(remote.steps_per_epoch), remote) for k in b.keys)
        ev = build_eval_data(DataConfig(source=url, s3_endpoint_url=proxy.url, batch_size=16, num_workers=2,
                                        eval_size=16, eval_resize=16, s3_backoff_s=0.01))
        eval_keys = Counter(k for b in ev for k in b.keys)
    assert remote_keys == local_keys and max(remote_keys.values()) == 1
    expected = Counter(f"s{i:06d}" for i in range(130) if i not in (9, 50))  # the bad JPEG and the missing image
    assert eval_keys == expected and ev.corrupt == 2
    assert proxy.counts["503"] >= 2 and proxy.counts["reset"] >= 2


def test_a_dead_shard_is_skipped_or_fatal(s3_dataset) -> None:
    endpoint, url, _ = s3_dataset
    with FaultProxy(endpoint, every=10**9, dead=("000002.tar",)) as proxy:
        with pytest.raises(ShardReadError, match="000002.tar"):
            open_shard(f"{url}/shards/000002.tar", endpoint_url=proxy.url, retries=2, backoff_s=0.01).read()
        base = dict(source=url, s3_endpoint_url=proxy.url, batch_size=8, num_workers=0, s3_retries=2,
                    s3_backoff_s=0.01, eval_size=16, eval_resize=16)
        ev = build_eval_data(DataConfig(**base))
        keys = {k for b in ev for k in b.keys}
        # shard 2 holds samples 45..59 (the missing image, 50, among them); sample 9 is a bad JPEG
        assert keys == {f"s{i:06d}" for i in range(130) if not 45 <= i < 60 and i != 9}
        assert ev.corrupt == 15 + 1 and proxy.counts["dead"] == 3 + 3
        with pytest.raises(ShardReadError, match="000002.tar"):
            for _ in build_eval_data(DataConfig(**base, on_shard_error="fatal")):
                pass


def test_webdataset_reads_s3_through_our_opener(s3_dataset) -> None:
    import webdataset as wds

    from seerlike.data.s3stream import register_webdataset_opener

    import importlib

    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    endpoint, url, _ = s3_dataset
    old = schemes.get("s3")
    with FaultProxy(endpoint, every=3) as proxy:
        register_webdataset_opener(proxy.url)
        try:
            ds = wds.WebDataset(f"{url}/shards/{{000000..000005}}.tar", shardshuffle=False, empty_check=False)
            keys = Counter(sample["__key__"] for sample in ds)
        finally:  # the opener is process-wide: leave webdataset as it was
            schemes.pop("s3")
            if old is not None:
                schemes["s3"] = old
    assert keys == Counter(f"s{i:06d}" for i in range(130)) and proxy.counts["reset"] >= 1
