"""Where shards are read from: one layer for a local folder, ``s3://bucket/prefix`` and
``https://host/path`` (fsspec: s3fs for S3 and S3-compatible stores, aiohttp for HTTP).

``Storage(root)`` reads whole files (index.json, a shard) as bytes. A transient error (connection
reset, a timeout, an HTTP 5xx, S3's slow-down) is retried with exponential backoff up to
``RETRIES`` times, then named in one line; a missing file or a permission error is not retried.
The loader checks every shard's sha256 on the bytes it received, so a shard changed on the server
is named whatever the transport did. S3 credentials, region and endpoint come from the usual
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for a store that
is not AWS, e.g. MinIO).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sessa_train.errors import DataError, redact

RETRIES = 5
BACKOFF_S = 0.2  # first wait; doubled each retry
CONNECT_S = 10.0  # an attempt that cannot connect in this long has failed (and is retried)
READ_S = 60.0  # nor one whose server goes this long without sending a byte


SCHEMES = ("s3", "http", "https")  # what a URL may be read from (file:// is a local path)


def is_remote(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def local_or_url(location: str | Path, what: str = "data.path") -> str:
    """``location`` as the readers take it: a ``file://`` URL as its local path, a URL of a scheme
    in ``SCHEMES`` as it is; DataError for any other scheme (ftp://, zip://, ...)."""
    text = str(location)
    if text.startswith("file://"):
        return text[len("file://") :]
    if "://" in text and (scheme := text.split("://", 1)[0].lower()) not in SCHEMES:
        raise DataError(f"{what}={redact(text)}: the {scheme}:// scheme is not supported; valid: a local path, "
                        f"file://, {', '.join(s + '://' for s in SCHEMES)}")  # fmt: skip
    return text


def _transient(error: BaseException) -> bool:
    """Whether an error is worth another try (the network or the server), not the request."""
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    status = getattr(error, "status", None) or getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    name = type(error).__name__.lower()  # botocore's EndpointConnectionError, aiohttp's ClientConnectorError, ...
    return isinstance(error, OSError | TimeoutError | ConnectionError) or any(
        word in name for word in ("timeout", "connection", "connector", "disconnect")
    )


class Storage:
    """Files under a local folder or a URL prefix."""

    def __init__(self, root: str | Path) -> None:
        self.root = local_or_url(root).rstrip("/") or "/"
        self.remote = is_remote(self.root)
        if self.remote:
            import fsspec

            try:
                self.fs, self.base = fsspec.core.url_to_fs(self.root, **remote_options(self.root))
            except ImportError as e:
                raise DataError(
                    f"data.path={redact(self.root)} needs {e.name or e} (pip install 'sessa-train[cloud]')"
                ) from None
        else:
            self.fs, self.base = None, self.root

    def url(self, name: str) -> str:
        """Where ``name`` is, as messages show it (without a URL's credentials)."""
        return redact(f"{self.root}/{name}") if self.remote else str(Path(self.root) / name)

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (Path(self.root) / name).is_file()
        return self.find(name) is not None  # not fs.exists: it answers False for a server that fails

    def read(self, name: str) -> bytes:
        """The bytes of file ``name`` (retried on transient errors; DataError when it cannot be read)."""
        data = self.find(name)
        if data is None:
            raise DataError(f"{self.url(name)} does not exist")
        return data

    def find(self, name: str) -> bytes | None:
        """The bytes of file ``name``, or None when there is no such file."""
        if not self.remote:
            try:
                return (Path(self.root) / name).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise DataError(f"{self.url(name)} cannot be read ({e.strerror})") from None
        return self._retried(name, lambda: self.fs.cat_file(f"{self.base}/{name}"))

    def _retried(self, name: str, call):
        wait = BACKOFF_S
        for attempt in range(RETRIES + 1):
            try:
                return call()
            except FileNotFoundError:
                return None
            except Exception as e:  # the transport's own error types (aiohttp, botocore)
                if not _transient(e) or attempt == RETRIES:
                    why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
                    after = f" after {RETRIES} retries" if attempt else ""
                    raise DataError(f"{self.url(name)} cannot be read ({why}){after}") from None
                time.sleep(wait)
                wait *= 2
                self.fs.invalidate_cache()
        raise AssertionError("unreachable")


def remote_options(url: str) -> dict:
    """fsspec options: timeouts of our own for each attempt (``CONNECT_S``, ``READ_S``; the libraries'
    defaults hold a silent server for minutes, and botocore's own retries are off: ours count), and
    an S3-compatible endpoint from AWS_ENDPOINT_URL (boto3 reads it too, s3fs only from here)."""
    if url.startswith("s3://"):
        options: dict = {
            "config_kwargs": {"connect_timeout": CONNECT_S, "read_timeout": READ_S, "retries": {"max_attempts": 1}}
        }
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
        return options
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_S, sock_connect=CONNECT_S, sock_read=READ_S)
    return {"client_kwargs": {"timeout": timeout}}
