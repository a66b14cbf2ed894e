"""The tests' S3: moto's server on loopback, behind a fault-injecting HTTP proxy (``s3_server``).

Every S3 request of the test session goes through it (AWS_ENDPOINT_URL_S3 names the
proxy, so Ray workers use it too). It passes everything through until a test sets
``fail_rate``; then exactly that share of requests (every 1/rate-th, counted from when the
rate was set) gets one of the faults an object store really produces, the kinds in turn:

- ``500``: an InternalError answer (the request never reaches the server);
- ``503``: a SlowDown answer (throttling);
- ``reset``: the connection is reset before the request is forwarded;
- ``reset_after``: the request is forwarded (and takes effect) but the connection is
  reset instead of answering, so the client cannot know it succeeded.

``deny`` holds key fragments that always get 403 AccessDenied: a permanent fault.

``hold(...)`` stops the Nth request that matches (a method and a key fragment) until the
test releases it: a test waits for the hold, kills a process at exactly that point, then
releases the request to go on (``then="forward"``: it takes effect after its sender died,
as a request already on the wire does) or to vanish (``then="drop"``). ``delay`` adds
that many seconds to every request (a far-away store).
"""

from __future__ import annotations

import http.client
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

FAULTS = ("500", "503", "reset", "reset_after")
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


class Hold:
    """A request held by the proxy: ``wait()`` until it arrives, then ``release()``."""

    def __init__(self, method: str, fragment: str, nth: int, then: str, ranged: bool | None):
        self.method, self.fragment, self.nth, self.then, self.ranged = method, fragment, nth, then, ranged
        self.seen = 0
        self.target: str | None = None
        self.arrived = threading.Event()
        self.released = threading.Event()

    def matches(self, method: str, target: str, headers: dict[str, str]) -> bool:
        if method != self.method or self.fragment not in target:
            return False
        return self.ranged is None or self.ranged == ("range" in headers)

    def wait(self, timeout: float = 300) -> str:
        """Block until the request is held; returns its target."""
        if not self.arrived.wait(timeout):
            raise TimeoutError(f"no {self.method} request for {self.fragment!r} (#{self.nth}) arrived in {timeout} s")
        return self.target

    def release(self) -> None:
        self.released.set()


class FaultProxy:
    """``with FaultProxy(upstream_port) as proxy: proxy.url ...``; set ``proxy.fail_rate`` to inject faults."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.fail_rate = 0.0
        self.deny: set[str] = set()
        self.faults: Counter = Counter()  # fault kind -> times injected
        self.requests = 0
        self.by_method: Counter = Counter()
        self.delay = 0.0
        self.strip_conditions = False  # forward writes without If-Match/If-None-Match: a store that ignores them
        self.holds: list[Hold] = []
        self._counted = 0  # requests since fail_rate was last set
        self._rate_seen = 0.0
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                proxy._serve(self.connection, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def hold(self, method: str, fragment: str, nth: int = 1, then: str = "forward", ranged: bool | None = None) -> Hold:
        """Hold the ``nth`` ``method`` request whose target contains ``fragment`` (``ranged``: only ranged
        reads, or only whole ones) until released; ``then`` "forward" or "drop" it."""
        found = Hold(method, fragment, nth, then, ranged)
        with self._lock:
            self.holds.append(found)
        return found

    def _held(self, method: str, target: str, headers: dict[str, str]) -> Hold | None:
        with self._lock:
            for h in self.holds:
                if not h.arrived.is_set() and h.matches(method, target, headers):
                    h.seen += 1
                    if h.seen == h.nth:
                        h.target = target
                        return h
        return None

    def _pick(self, target: str) -> str | None:
        if any(key in target for key in self.deny):
            return "403"
        with self._lock:
            self.requests += 1
            if self.fail_rate != self._rate_seen:
                self._rate_seen, self._counted = self.fail_rate, 0
            if self.fail_rate:
                self._counted += 1
                due = int(self._counted * self.fail_rate) > int((self._counted - 1) * self.fail_rate)
                if due:
                    kind = FAULTS[sum(self.faults.values()) % len(FAULTS)]
                    self.faults[kind] += 1
                    return kind
        return None

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        # SO_LINGER 0: close() sends a TCP RST, as a dropped connection does.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def _serve(self, conn: socket.socket, rfile) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            while True:
                line = rfile.readline(65537)
                if not line or not line.strip():
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers = []
                while (h := rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    name, value = h.decode("latin-1").split(":", 1)
                    headers.append((name.strip(), value.strip()))
                lower = {k.lower(): v for k, v in headers}
                if lower.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if lower.get("transfer-encoding", "").lower() == "chunked":
                    body = b""
                    while (size := int(rfile.readline().split(b";")[0], 16)) > 0:
                        body += rfile.read(size)
                        rfile.readline()
                    while rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                else:
                    declared = int(lower.get("content-length", 0) or 0)
                    body = rfile.read(declared)
                    if len(body) < declared:  # the sender went away mid-body: S3 stores nothing of it
                        return
                self.by_method[method] += 1
                if self.delay:
                    time.sleep(self.delay)  # a far-away store, not a wait for some state
                held = self._held(method, target, lower)
                if held is not None:
                    held.arrived.set()
                    held.released.wait(600)
                    if held.then == "drop":
                        self._reset(conn)
                        return
                fault = self._pick(target)
                if fault == "reset":
                    self._reset(conn)
                    return
                if fault in _ERRORS:
                    status, reason, code, message = _ERRORS[fault]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    conn.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + (b"" if method == "HEAD" else payload))
                    continue
                dropped = ("expect", "transfer-encoding", "connection") + (("if-match", "if-none-match") if self.strip_conditions else ())
                forward = {k: v for k, v in headers if k.lower() not in dropped}
                forward["Content-Length"] = str(len(body))
                upstream.request(method, target, body=body, headers=forward)
                resp = upstream.getresponse()
                data = resp.read()
                if fault == "reset_after":
                    self._reset(conn)
                    return
                out = [f"HTTP/1.1 {resp.status} {resp.reason}"]
                out += [f"{k}: {v}" for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "content-length", "connection")]
                # A HEAD answer has no body but tells the object's length.
                length = resp.getheader("Content-Length", "0") if method == "HEAD" else str(len(data))
                out.append(f"Content-Length: {length}")
                conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else data))
        except (ConnectionError, OSError, ValueError):
            return
        finally:
            upstream.close()


@contextmanager
def s3_server(buckets: tuple[str, ...] = ()) -> Iterator[FaultProxy]:
    """moto's S3 server on 127.0.0.1 behind a FaultProxy, the standard AWS environment pointing at the proxy (so
    every process started meanwhile, Ray's workers included, goes through it), ``buckets`` made; yields the proxy."""
    import logging

    from moto.server import ThreadedMotoServer

    from textlabel import storage

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        with FaultProxy(server.get_host_and_port()[1]) as proxy, pytest.MonkeyPatch.context() as env:
            for key, value in {"AWS_ACCESS_KEY_ID": "tests", "AWS_SECRET_ACCESS_KEY": "tests",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": proxy.url}.items():
                env.setenv(key, value)
            env.delenv("AWS_ENDPOINT_URL", raising=False)
            for bucket in buckets:
                storage.s3_filesystem().mkdir(bucket)
            yield proxy
    finally:
        server.stop()
