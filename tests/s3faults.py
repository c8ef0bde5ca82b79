"""A fault-injecting HTTP proxy in front of the moto S3 server, for the storage
fault tests: the job talks to it exactly as to an S3 endpoint
(`--storage-option endpoint_url=...`), and the test decides which requests
get S3's own error answers (503 SlowDown) and when the endpoint stops
accepting connections altogether.

    proxy = S3FaultProxy(moto_endpoint).start()
    proxy.fail(match=lambda method, path: "/masks/" in path, times=3)   # 3 x 503 SlowDown
    proxy.fail(match=lambda method, path: True, every=4)              # every 4th request
    proxy.down(seconds=4)                                               # connection refused for 4 s
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length"}


@dataclass
class Rule:
    match: Callable[[str, str], bool]
    times: int | None  # None: for ever
    every: int = 1  # fail one matching request in `every`
    seen: int = 0


class S3FaultProxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rules: list[Rule] = []
        self.injected = 0  # error answers given
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request that got through
        self.lock = threading.Lock()
        self.on_request: Callable[[str, str], None] | None = None
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self._up_again: threading.Timer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control -----------------------------------------------------------

    def fail(self, match: Callable[[str, str], bool], times: int | None = None, every: int = 1) -> Rule:
        """Answer matching requests (one in `every`) with 503 SlowDown, `times` times (None: always)."""
        rule = Rule(match, times, every)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def down(self, seconds: float | None = None) -> None:
        """Stop accepting connections (refused), and drop open ones; back after `seconds`."""
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if seconds is not None:
            self._up_again = threading.Timer(seconds, self.start)
            self._up_again.daemon = True
            self._up_again.start()

    def start(self) -> S3FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                if proxy.server is None:  # down: drop the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.on_request:
                    proxy.on_request(self.command, self.path)
                if proxy._should_fail(self.command, self.path):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        server = Server(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server
        return self

    def stop(self) -> None:
        if self._up_again:
            self._up_again.cancel()
        self.down()

    def _should_fail(self, method: str, path: str) -> bool:
        with self.lock:
            for rule in self.rules:
                if (rule.times is None or rule.times > 0) and rule.match(method, path):
                    rule.seen += 1
                    if rule.seen % rule.every:
                        continue
                    if rule.times is not None:
                        rule.times -= 1
                    self.injected += 1
                    return True
        return False


def wait_for(condition: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return condition()
