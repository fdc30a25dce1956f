"""Real servers for the remote tests, started by the tests on free local ports: an HTTP file server
(Python's http.server), moto's S3 server, and a TCP proxy that can freeze an upload in flight."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import unquote

#: credentials moto accepts (any); no real account is ever reached: the endpoint is 127.0.0.1
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(root: Path):
    """Serve ``root`` over HTTP on 127.0.0.1 (a free port); yields the base URL (no trailing slash)."""
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def moto_s3():
    """moto's S3 server on 127.0.0.1 (a free port), in a thread; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/[^ \r\n]*) HTTP/1\.[01]\r\n")


class FreezingProxy:
    """A TCP proxy to ``target`` (host, port) that, once a client request contains ``trigger`` (bytes, e.g.
    b"PUT /bucket/out/a.tar"), forwards ``after`` more bytes of it and then holds the connection: the upload
    is in flight and never completes. ``frozen`` is set then. Everything else passes through. ``requests``
    lists the (method, path) of every request seen (``trigger`` None: a proxy that only records)."""

    def __init__(self, target: tuple[str, int], trigger: bytes | None = None, after: int = 4096):
        self.target, self.trigger, self.after = target, trigger, after
        self.requests: list[tuple[str, str]] = []
        self.frozen = threading.Event()
        self._release = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for args in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pipe, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        seen, budget = b"", None
        try:
            while data := src.recv(65536):
                if watch:  # request lines (a body that happened to hold one would count too: not ours)
                    self.requests += [(m.decode(), unquote(p.decode())) for m, p in _REQUEST_LINE.findall(data)]
                if watch and self.trigger is not None and budget is None and not self.frozen.is_set():
                    seen = (seen + data)[-(len(self.trigger) + 65536):]
                    if self.trigger in seen:
                        budget = self.after
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                    dst.sendall(data)
                    if budget <= 0:
                        self.frozen.set()
                        self._release.wait()  # hold the upload here until the process is killed
                        return
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._release.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def s3_env(endpoint: str) -> dict:
    """The environment of a CLI subprocess that talks to the moto server (fake credentials)."""
    return {**os.environ, **FAKE_AWS}
