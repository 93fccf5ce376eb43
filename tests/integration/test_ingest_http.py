"""HTTP inputs against a local http.server: timeouts, retries with backoff on 5xx, size limit."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sharding.config import IngestConfig
from sharding.ingest import ingest
from sharding.manifest import read_manifest
from sharding.sources import FetchError, fetch

pytestmark = pytest.mark.integration


class _Server:
    def __init__(self, photos_dir):
        self.hits: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.image = (photos_dir / "pillow_hopper.jpg").read_bytes()
        self.big = (photos_dir / "exifsamples_jolla.jpg").read_bytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                path = self.path
                server.hits[path] += 1
                server.times.setdefault(path, []).append(time.monotonic())
                n = server.hits[path]
                if path.startswith("/ok/"):
                    return self._send(200, server.image)
                if path == "/flaky.jpg" and n <= 2:
                    return self._send(503, b"busy")
                if path == "/flaky.jpg":
                    return self._send(200, server.image)
                if path == "/always500.jpg":
                    return self._send(500, b"boom")
                if path == "/slow.jpg":
                    time.sleep(1.0)
                    return self._send(200, server.image)
                if path == "/big.jpg":
                    return self._send(200, server.big)
                if path == "/big-chunked.jpg":  # no Content-Length: the limit applies while reading
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(server.big), 65536):
                        piece = server.big[i : i + 65536]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                return self._send(404, b"nope")

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients that stop reading (size limit, timeout) break the pipe: expected

        Handler.protocol_version = "HTTP/1.1"
        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(photos_dir):
    s = _Server(photos_dir)
    yield s
    s.close()


CFG = IngestConfig(http_timeout_s=0.3, http_retries=2, http_backoff_s=0.1, max_bytes=500_000, progress=False,
                    shuffle=False)  # rows are compared in listing order


def test_fetch_retries_backoff_timeouts_and_limits(server):
    assert fetch(f"{server.url}/flaky.jpg", CFG) == server.image
    assert server.hits["/flaky.jpg"] == 3  # two 503s, then success
    t = server.times["/flaky.jpg"]
    assert t[1] - t[0] >= 0.09 and t[2] - t[1] >= 0.19  # backoff 0.1 s, then doubled

    with pytest.raises(FetchError) as e:
        fetch(f"{server.url}/always500.jpg", CFG)
    assert e.value.reason == "fetch_failed" and "HTTP 500" in str(e.value) and server.hits["/always500.jpg"] == 3

    with pytest.raises(FetchError) as e:
        fetch(f"{server.url}/missing.jpg", CFG)
    assert e.value.reason == "fetch_failed" and server.hits["/missing.jpg"] == 1  # 4xx: no retry

    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch(f"{server.url}/slow.jpg", CFG)
    assert e.value.reason == "fetch_failed" and server.hits["/slow.jpg"] == 3
    assert time.monotonic() - t0 < 3 * 0.3 + 0.3 + 1.0  # each attempt cut at the timeout

    for path in ("/big.jpg", "/big-chunked.jpg"):
        with pytest.raises(FetchError) as e:
            fetch(f"{server.url}{path}", CFG)
        assert e.value.reason == "too_many_bytes", path


def test_ingest_url_list(server, tmp_path):
    urls = [f"{server.url}/ok/a.jpg", f"{server.url}/flaky.jpg", f"{server.url}/missing.jpg", f"{server.url}/big.jpg", f"{server.url}/ok/b%20c.jpg"]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    out = tmp_path / "ds"
    summary = ingest(CFG.replace(inputs=(str(tmp_path / "urls.txt"),), out=str(out)))
    rows = read_manifest(str(out)).to_pylist()
    assert [r["source"] for r in rows] == urls
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("written", None),
        ("duplicate", None),  # same bytes as /ok/a.jpg
        ("rejected", "fetch_failed"),
        ("rejected", "too_many_bytes"),
        ("duplicate", None),
    ]
    assert summary["seen"] == 5 and summary["written"] + summary["duplicate"] + summary["rejected"] == 5
