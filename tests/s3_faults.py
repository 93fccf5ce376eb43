"""S3 fault injection for tests: proxies on loopback in front of the moto server.

- ``FaultProxy``: an HTTP proxy with a fixed schedule of 503 SlowDown answers, bodies cut
  in half, dead keys and lost answers (deterministic, per request).
- ``ResetProxy``: a TCP proxy that resets every connection after a random 20-150 KB in
  either direction, wherever that falls: inside a GET body, a PUT body, a listing.
"""

from __future__ import annotations

import http.client
import http.server
import random
import select
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER on, timeout 0): the peer sees 'connection reset'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """HTTP proxy on loopback in front of the S3 server.

    GETs of ``.tar`` objects follow a fixed schedule: every ``every``-th answers 503
    SlowDown, the one after it sends half its body and then resets the connection.
    Keys listed in ``dead`` reset every GET before the first body byte. Requests for which
    ``lose_answer(method, path)`` is true reach the server, but their answer is replaced by
    a connection reset (the client cannot tell whether the request took effect); those for
    which ``answer(method, path)`` gives ``(status, body)`` get that instead of the server's.
    """

    def __init__(self, upstream: str, every: int = 3, dead: tuple[str, ...] = (),
                 lose_answer: Callable[[str, str], bool] | None = None,
                 answer: Callable[[str, str], tuple[int, bytes] | None] | None = None):
        self.upstream = upstream.removeprefix("http://")
        self.every, self.dead, self.lose_answer, self.answer = every, dead, lose_answer, answer
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
                canned = proxy.answer(self.command, self.path) if proxy.answer is not None else None
                if canned is not None:
                    proxy.counts["canned"] += 1
                    self.send_response(canned[0])
                    self.send_header("Content-Length", str(len(canned[1])))
                    self.end_headers()
                    self.wfile.write(canned[1])
                    return
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
                if proxy.lose_answer is not None and proxy.lose_answer(self.command, self.path):
                    proxy.counts["lost_answer"] += 1
                    _reset(self.connection)
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault in ("reset", "dead") and self.command == "GET" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2] if fault == "reset" else b"")
                    self.wfile.flush()
                    _reset(self.connection)  # the client sees a connection reset mid-body
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


class ResetProxy:
    """TCP proxy on loopback that resets each connection once it has relayed ``low``-``high`` bytes.

    The budget is drawn per connection (seeded) and counts both directions, so the cut lands
    inside request bodies (uploads) as well as response bodies (downloads). moto's server
    closes each connection after one answer, so in practice every request gets its own
    budget, and a sequence of requests meets the same cuts on every run. ``resets`` counts
    the connections cut; ``connections`` all that were opened.
    """

    def __init__(self, upstream: str, low: int = 20_000, high: int = 150_000, seed: int = 0):
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.low, self.high = low, high
        self.resets = self.connections = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by __exit__
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            budget = self._rng.randint(self.low, self.high)
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _reset(client)
            return
        peer = {client: upstream, upstream: client}
        open_ends = [client, upstream]
        cut = False
        try:  # one thread, select(): a reset is sent at once, never behind a blocked recv()
            while open_ends and not self._closed:
                readable, _, _ = select.select(open_ends, [], [], 0.5)
                for src in readable:
                    data = src.recv(65536)
                    if not data:  # orderly end of one direction: pass it on
                        peer[src].shutdown(socket.SHUT_WR)
                        open_ends.remove(src)
                        continue
                    take = min(len(data), budget)
                    budget -= take
                    peer[src].sendall(data[:take])
                    if budget == 0:
                        cut = True
                        break
                if cut:
                    break
        except OSError:
            pass
        if cut:
            with self._lock:
                self.resets += 1
            _reset(client)
            _reset(upstream)
        else:
            client.close()
            upstream.close()

    def __enter__(self) -> "ResetProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed = True
        self._listener.close()
