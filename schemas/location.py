"""Where a run lives: a local path, or a URI (`file:///abs/path`, `s3://bucket/prefix`) opened
through pyarrow's filesystem layer.

A local path is used as is by every writer and reader (POSIX rename, `fcntl`). A URI is opened as
a `pyarrow.fs` filesystem plus the run's base path inside it; every failure to reach it (unknown
scheme, missing bucket, missing credentials, refused endpoint) becomes one line naming the URI.

S3 settings come from the standard AWS variables: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a
profile / instance role), AWS_REGION or AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL for an S3-compatible service (MinIO, moto). Timeouts are bounded so a refused or
silent endpoint is an error within seconds, not a hang.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

# `Path("s3://b/p")` collapses the double slash ("s3:/b/p"); typer hands flags over as Path, so
# both spellings are read as the URI they were typed as.
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):/(?P<rest>.*)$")
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
S3_ATTEMPTS = 3


class LocationError(ValueError):
    """A run location that cannot be opened (one line naming the URI and the reason)."""


def is_uri(location: str | Path) -> bool:
    return _URI.match(str(location)) is not None


def as_uri(location: str | Path) -> str:
    """`location` as the URI it was typed as (`s3:/b/p` -> `s3://b/p`, `file:/x` -> `file:///x`)."""
    m = _URI.match(str(location))
    if m is None:
        raise LocationError(f"{location}: not a URI")
    scheme, rest = m["scheme"].lower(), m["rest"].lstrip("/")
    return f"file:///{rest}" if scheme == "file" else f"{scheme}://{rest}"


@dataclass(frozen=True)
class Location:
    """An opened URI: the filesystem, the run's base path inside it, and the URI for messages."""

    fs: pafs.FileSystem
    base: str
    uri: str

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    @property
    def local_path(self) -> Path | None:
        """The folder on this machine for a `file://` location (None for object storage)."""
        return Path(self.base) if isinstance(self.fs, pafs.LocalFileSystem) else None


def _file_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    path = uri[len("file://"):]
    if not path.startswith("/"):
        raise LocationError(f"{uri}: a file:// URI needs an absolute path (file:///abs/path)")
    return pafs.LocalFileSystem(), path.rstrip("/") or "/"


def _s3_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    base = uri[len("s3://"):].strip("/")
    bucket = base.split("/", 1)[0]
    if not bucket:
        raise LocationError(f"{uri}: no bucket (expected s3://bucket/prefix)")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    fs = pafs.S3FileSystem(
        region=region or "us-east-1", connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS), **kwargs,
    )
    return fs, base


# one builder per supported scheme; pyarrow knows more (gs, hdfs) but only these are tested
SCHEMES = {"file": _file_fs, "s3": _s3_fs}


def open_location(location: str | Path) -> Location:
    """Open the URI `location`; raise LocationError for an unknown scheme or a bad URI."""
    uri = as_uri(location)
    scheme = uri.split("://", 1)[0]
    builder = SCHEMES.get(scheme)
    if builder is None:
        raise LocationError(
            f"{uri}: unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)} "
            "(or a local or shared path)"
        )
    fs, base = builder(uri)
    return Location(fs, base, uri)


def explain(exc: OSError, where: str) -> str:
    """One line for a storage error at `where`: what went wrong and what to check."""
    text = str(exc)
    hints = (
        ("NO_SUCH_BUCKET", "the bucket does not exist (create it first)"),
        ("NETWORK_CONNECTION",
         "cannot reach the endpoint (check AWS_ENDPOINT_URL and the network)"),
        ("ACCESS_DENIED", "access denied (check the credentials and the bucket policy)"),
        ("INVALID_ACCESS_KEY_ID", "the access key is not known (check AWS_ACCESS_KEY_ID)"),
        ("SIGNATURE_DOES_NOT_MATCH", "the secret key is wrong (check AWS_SECRET_ACCESS_KEY)"),
        ("credentials", "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"),
    )
    for needle, hint in hints:
        if needle.lower() in text.lower():
            return f"{where}: {hint}"
    return f"{where}: {text.splitlines()[0] if text else type(exc).__name__}"


def check_reachable(loc: Location) -> None:
    """Raise LocationError in one line when `loc` cannot be listed (bucket, credentials, endpoint),
    before any work is done."""
    try:
        if loc.local_path is None:  # a missing bucket lists as empty: ask for the bucket itself
            bucket = loc.base.split("/", 1)[0]
            if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise LocationError(f"{loc.uri}: the bucket does not exist (create it first)")
        loc.fs.get_file_info(pafs.FileSelector(loc.base, allow_not_found=True))
    except OSError as exc:
        raise LocationError(explain(exc, loc.uri)) from None
