"""Real servers on 127.0.0.1 for the tests that read shards remotely: an S3-compatible store
(moto's server mode) and a plain HTTP file server that can fail every n-th request."""

from __future__ import annotations

import collections
import functools
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; every ``fail_every``-th request fails, alternately by dropping the
    connection without an answer and by a 503. ``seen`` counts the requests by (method, path)."""

    fail_every = 0
    requests = 0
    failed = 0
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        if not self._failed():
            super().do_HEAD()

    def do_GET(self) -> None:
        if not self._failed():
            super().do_GET()

    def _failed(self) -> bool:
        cls = type(self)
        with cls.lock:
            cls.requests += 1
            n = cls.requests
            cls.seen[(self.command, self.path)] += 1
        if cls.fail_every and n % cls.fail_every == 0:
            with cls.lock:
                cls.failed += 1
            if (n // cls.fail_every) % 2:
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            else:
                self.send_error(503, "try again")
            return True
        return False


@contextmanager
def http_server(folder: Path, fail_every: int = 0) -> Iterator[tuple[str, type]]:
    """(base URL, handler class with .requests, .failed and .seen counts) of a server over ``folder``."""
    counts = {"fail_every": fail_every, "requests": 0, "failed": 0, "seen": collections.Counter()}
    handler = type("Handler", (_FlakyHandler,), counts)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def s3_server() -> Iterator[tuple[str, object]]:
    """(endpoint URL, boto3 client) of a moto S3 server; its credentials are S3_ENV."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield endpoint, boto3.client("s3", endpoint_url=endpoint)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(client, folder: Path, bucket: str, prefix: str) -> str:
    """Every file of ``folder`` to ``s3://bucket/prefix/``; returns that URL."""
    client.create_bucket(Bucket=bucket)
    for file in sorted(folder.iterdir()):
        if file.is_file():
            client.upload_file(str(file), bucket, f"{prefix}/{file.name}")
    return f"s3://{bucket}/{prefix}"
