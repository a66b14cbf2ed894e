"""URLs to filesystems: local paths, ``file://`` and ``s3://`` (s3fs under pyarrow).

S3 and S3-compatible stores are configured only through the standard AWS
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3``, instance profiles, ...).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A URL that cannot be read or written, with the reason and what to check."""


@dataclass(frozen=True)
class Location:
    """A URL resolved to a pyarrow filesystem and a path on it."""

    url: str
    fs: pafs.FileSystem
    path: str

    def join(self, *parts: str) -> "Location":
        """The location of ``parts`` below this one."""
        sep = "" if self.url.endswith("/") else "/"
        path = "/".join([self.path.rstrip("/"), *parts])
        return Location(self.url + sep + "/".join(parts), self.fs, path)


def is_remote(url: str) -> bool:
    """True for object-store URLs (``s3://``)."""
    return url.startswith("s3://")


def s3_filesystem() -> Any:
    """A fresh s3fs filesystem configured from the AWS environment (no listing cache)."""
    import s3fs

    return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)


def resolve(url: str) -> Location:
    """Resolve a local path, ``file://`` or ``s3://`` URL."""
    if url.startswith("s3://"):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        path = url[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{url}: name a bucket, as in s3://bucket/prefix")
        return Location(url, PyFileSystem(FSSpecHandler(s3_filesystem())), path)
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise StorageError(f"{url}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")
    local = url[len("file://"):] if url.startswith("file://") else url
    return Location(url, pafs.LocalFileSystem(), str(Path(local).expanduser().absolute()))


def _explain(url: str, exc: Exception) -> StorageError:
    text = f"{type(exc).__name__}: {exc}"
    hint = "check the URL"
    if "NoCredentials" in text or "Unable to locate credentials" in text:
        hint = "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or use an instance profile"
    elif "Could not connect" in text or "Connect" in type(exc).__name__ or "EndpointConnection" in text:
        hint = "the object store is unreachable: check AWS_ENDPOINT_URL_S3 and the network"
    elif "AccessDenied" in text or "Forbidden" in text or "403" in text:
        hint = "access denied: check the credentials' permissions on this bucket"
    elif "NoSuchBucket" in text:
        hint = "the bucket does not exist"
    return StorageError(f"{url}: {hint} ({text})")


def info(loc: Location) -> pafs.FileInfo:
    """File info for a location, turning storage failures into a StorageError."""
    try:
        return loc.fs.get_file_info(loc.path)
    except Exception as exc:  # s3fs/botocore raise many types; each becomes one clear error
        raise _explain(loc.url, exc) from exc


def list_files(loc: Location, suffix: str) -> list[pafs.FileInfo]:
    """Every file under ``loc`` (recursively) whose name ends with ``suffix``, sorted by path;
    names and folders starting with ``_`` or ``.`` are skipped."""
    try:
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except Exception as exc:
        raise _explain(loc.url, exc) from exc
    def visible(f: pafs.FileInfo) -> bool:
        # Like Spark and Hive: _SUCCESS, _temporary/, .staging/ ... are not data.
        return not any(part.startswith((".", "_")) for part in f.path[len(loc.path):].split("/"))

    return sorted(
        (f for f in found if f.type == pafs.FileType.File and f.base_name.endswith(suffix) and visible(f)),
        key=lambda f: f.path,
    )


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object; on object stores a single PUT, so readers see all or nothing."""
    if isinstance(loc.fs, pafs.LocalFileSystem):  # object stores need no directories (and must not create buckets)
        loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
    with loc.fs.open_output_stream(loc.path) as out:
        out.write(data)


def read_bytes(loc: Location) -> bytes:
    """Read a whole object."""
    with loc.fs.open_input_stream(loc.path) as src:
        return src.read()


def write_json(loc: Location, obj: Any) -> None:
    """Write ``obj`` as indented JSON."""
    write_bytes(loc, json.dumps(obj, indent=2, sort_keys=False).encode())


def read_json(loc: Location) -> Any:
    """Read a JSON object."""
    return json.loads(read_bytes(loc))


def exists(loc: Location) -> bool:
    """True when a file or directory exists at ``loc``."""
    return info(loc).type != pafs.FileType.NotFound


def copy_dir(src: Location, dst: Location, suffixes: tuple[str, ...] | None = None,
             exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy the files directly in ``src`` to ``dst`` (optionally only some suffixes, less some names)."""
    copied = []
    for f in src.fs.get_file_info(pafs.FileSelector(src.path)):
        if f.type != pafs.FileType.File or (suffixes and not f.base_name.endswith(suffixes)) or f.base_name in exclude:
            continue
        with src.fs.open_input_stream(f.path) as data:
            write_bytes(dst.join(f.base_name), data.read())
        copied.append(f.base_name)
    return copied


def cache_root() -> Path:
    """Local cache directory for downloaded models (``TEXTLABEL_CACHE`` overrides)."""
    root = os.environ.get("TEXTLABEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "textlabel"
    )
    return Path(root)
