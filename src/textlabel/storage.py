"""URLs to filesystems: local paths, ``file://`` and ``s3://`` (s3fs under pyarrow).

S3 and S3-compatible stores are configured only through the standard AWS
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3``, instance profiles, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from textlabel.redact import redact

logger = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A URL that cannot be read or written, with the reason and what to check."""


class StorageUnavailable(StorageError):
    """The object store did not answer, or kept answering "try later" (5xx, throttling), after its client's
    retries: nothing is wrong with the options, so a rerun of the same command is the fix."""


# What botocore and s3fs say when the store, not the request, is the problem.
_TRANSIENT = ("Could not connect", "EndpointConnection", "ConnectTimeout", "ReadTimeout", "ConnectionClosed",
              "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttl", "(500)", "(502)",
              "(503)", "(504)", "BadGateway", "GatewayTimeout", "ServerDisconnected", "Connection reset",
              "Connection refused")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or one it was raised from) is the store being unavailable rather than a bad request."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageUnavailable):
            return True
        if not isinstance(exc, StorageError):
            text = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, (ConnectionError, TimeoutError)) or any(t in text for t in _TRANSIENT):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


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


# Timeouts, 5xx, throttling and dropped connections are retried with exponential backoff and
# jitter (botocore's "standard" mode; s3fs retries a few more). AWS_RETRY_MODE and
# AWS_MAX_ATTEMPTS in the environment override these defaults.
S3_RETRIES = {"mode": "standard", "max_attempts": 10}


_THREAD = threading.local()


def s3_filesystem() -> Any:
    """This thread's s3fs filesystem, configured from the AWS environment (no listing cache).

    Made on the thread's first use and kept while the process and its AWS_* environment stay the same. A new one
    costs a botocore client (the S3 service model parsed again, about 0.15 CPU-s) and new connections, which every
    resolved URL used to pay. s3fs's own instance cache stays off: its key does not see the environment."""
    key = (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    held = getattr(_THREAD, "s3", None)
    if held is not None and held[0] == key:
        return held[1]
    import s3fs

    config = {}
    if not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
        config["retries"] = dict(S3_RETRIES)
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True, config_kwargs=config)
    _THREAD.s3 = (key, fs)
    return fs


def fsspec_of(fs: pafs.FileSystem) -> Any | None:
    """The fsspec filesystem under a pyarrow PyFileSystem (s3fs), or None for a local one."""
    handler = getattr(fs, "handler", None)
    return getattr(handler, "fs", None)


def resolve(url: str) -> Location:
    """Resolve a local path, ``file://`` or ``s3://`` URL."""
    if url.startswith("s3://"):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        path = url[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{redact(url)}: name a bucket, as in s3://bucket/prefix")
        return Location(url, PyFileSystem(FSSpecHandler(s3_filesystem())), path)
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise StorageError(f"{redact(url)}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")
    local = url[len("file://"):] if url.startswith("file://") else url
    return Location(url, pafs.LocalFileSystem(), str(Path(local).expanduser().absolute()))


def _explain(url: str, exc: Exception) -> StorageError:
    text = f"{type(exc).__name__}: {exc}"
    hint = "check the URL"
    if "NoCredentials" in text or "Unable to locate credentials" in text:
        hint = "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or use an instance profile"
    elif is_transient(exc):
        return StorageUnavailable(redact(f"{url}: the object store is unreachable or overloaded after retries: rerun "
                                         f"later; if it persists check AWS_ENDPOINT_URL_S3 and the network ({text})"))
    elif "AccessDenied" in text or "Forbidden" in text or "403" in text:
        hint = "access denied: check the credentials' permissions on this bucket"
    elif "NoSuchBucket" in text:
        hint = "the bucket does not exist"
    return StorageError(redact(f"{url}: {hint} ({text})"))


def info(loc: Location) -> pafs.FileInfo:
    """File info for a location, turning storage failures into a StorageError."""
    try:
        return loc.fs.get_file_info(loc.path)
    except Exception as exc:  # s3fs/botocore raise many types; each becomes one clear error
        raise _explain(loc.url, exc) from exc


def list_files(loc: Location, suffix: str) -> list[pafs.FileInfo]:
    """Every file under ``loc`` (recursively) whose name ends with ``suffix``, sorted by path (none when
    ``loc`` does not exist); names and folders starting with ``_`` or ``.`` are skipped."""
    try:
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    except Exception as exc:
        raise _explain(loc.url, exc) from exc
    return sorted(
        (f for f in found if f.type == pafs.FileType.File and f.base_name.endswith(suffix)
         and not _hidden(f.path[len(loc.path):])),
        key=lambda f: f.path,
    )


# s3fs uploads an object of at least twice this many bytes as a multipart upload of parts this size (its
# default). A test hook (labeller.py, "multipart_bytes") lowers it to send a small file in parts.
MULTIPART_BYTES = 50 * 2**20


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object atomically: readers see the old object or the new one, never part of one.

    On S3 it is one PUT (or a multipart upload, visible only once completed); a failed
    upload leaves nothing. Locally the bytes go to a hidden temporary file in the same
    folder, which is then renamed over the target.
    """
    remote = fsspec_of(loc.fs)
    try:
        if remote is not None:
            remote.pipe_file(loc.path, bytes(data), chunksize=MULTIPART_BYTES)
            return
        folder = os.path.dirname(loc.path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(loc.path)}.", suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # as open() would make it, not mkstemp's owner-only 0600
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, loc.path)
        except BaseException:
            os.unlink(tmp)
            raise
    except StorageError:
        raise
    except Exception as exc:
        raise _explain(loc.url, exc) from exc


def delete(loc: Location, missing_ok: bool = True) -> None:
    """Delete one file (already gone is fine unless ``missing_ok`` is False)."""
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def delete_many(fs: pafs.FileSystem, paths: list[str]) -> None:
    """Delete files; on S3 in batches of 1,000 per request (DeleteObjects)."""
    remote = fsspec_of(fs)
    if remote is not None and paths:
        remote.rm(list(paths))
        return
    for path in paths:
        delete(Location(path, fs, path))


class VersionChanged(StorageError):
    """The file at a path is no longer the version that was listed (replaced while the run went on)."""


def replaced(exc: BaseException) -> bool:
    """Whether a read failed because its file was replaced meanwhile: a pinned read refused (S3's If-Match,
    which s3fs raises as FileExpired, or a PreconditionFailed) or another version found."""
    from s3fs.utils import FileExpired  # s3fs comes with storage's S3 support; only a failed read gets here

    seen: BaseException | None = exc
    for _ in range(8):  # the exception and what caused it (pyarrow and s3fs each wrap what they raise)
        if seen is None:
            return False
        if isinstance(seen, (VersionChanged, FileExpired)) or "pre-conditions" in str(seen) \
                or "PreconditionFailed" in repr(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hidden(rel: str) -> bool:
    # Like Spark and Hive: _SUCCESS, _temporary/, .staging/ ... are not data.
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def s3_fingerprint(etag: str) -> str:
    """An S3 object version's identity: its ETag."""
    return "etag:" + etag.strip('"')


def local_fingerprint(st: os.stat_result) -> str:
    """A local file version's identity: size and mtime, and inode and ctime (a file replaced by a rename,
    or rewritten within the mtime's resolution, gets a new one)."""
    return f"size:{st.st_size}:mtime_ns:{st.st_mtime_ns}:ino:{st.st_ino}:ctime_ns:{st.st_ctime_ns}"


def legacy_fingerprint(fingerprint: str) -> str:
    """What textlabel before manifest format 2 recorded for the same local file (size and mtime only)."""
    return fingerprint.split(":ino:", 1)[0]


LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("fingerprint", pa.string())])


def _s3_listing(remote: Any, path: str, suffix: str) -> pa.Table:
    """One LIST request per 1,000 objects; entries become Arrow columns page by page (bounded memory)."""
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key else ""

    async def collect() -> list[pa.RecordBatch]:
        batches, rows = [], {"path": [], "size": [], "fingerprint": []}
        async for entry in remote._iterdir(bucket, prefix=prefix, delimiter=""):
            name = entry["Key"]  # bucket/key
            if entry.get("type") != "file" or not name.endswith(suffix) or _hidden(name[len(bucket) + 1 + len(prefix):]):
                continue
            rows["path"].append(name)
            rows["size"].append(entry["size"])
            rows["fingerprint"].append(s3_fingerprint(entry["ETag"]))
            if len(rows["path"]) >= 50_000:
                batches.append(pa.record_batch(rows, schema=LISTING_SCHEMA))
                rows = {k: [] for k in rows}
        return batches + [pa.record_batch(rows, schema=LISTING_SCHEMA)]

    table = pa.Table.from_batches(sync(remote.loop, collect), schema=LISTING_SCHEMA)
    if table.num_rows == 0 and key:  # the URL may name one object
        try:
            entry = remote.info(path)
        except FileNotFoundError:
            return table
        if entry.get("type") == "file":
            return pa.table({"path": [path], "size": [entry["size"]], "fingerprint": [s3_fingerprint(entry["ETag"])]},
                            schema=LISTING_SCHEMA)
    return table


def _local_listing(root: str, suffix: str) -> pa.Table:
    if os.path.isfile(root):
        return pa.table({"path": [root], "size": [os.stat(root).st_size],
                         "fingerprint": [local_fingerprint(os.stat(root))]}, schema=LISTING_SCHEMA)
    rows = {"path": [], "size": [], "fingerprint": []}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for name in names:
            if name.startswith((".", "_")) or not name.endswith(suffix):
                continue
            path = os.path.join(folder, name)
            st = os.stat(path)
            rows["path"].append(path)
            rows["size"].append(st.st_size)
            rows["fingerprint"].append(local_fingerprint(st))
    return pa.table(rows, schema=LISTING_SCHEMA)


def list_table(loc: Location, suffix: str) -> pa.Table:
    """Every visible file under ``loc`` (or ``loc`` itself) ending in ``suffix``, with its size and version,
    sorted by path: columns path, size, fingerprint. No object is read; on S3 one LIST per 1,000 files.
    Names and folders starting with ``_`` or ``.`` are skipped."""
    remote = fsspec_of(loc.fs)
    try:
        table = _s3_listing(remote, loc.path, suffix) if remote is not None else _local_listing(loc.path, suffix)
    except StorageError:
        raise
    except Exception as exc:
        raise _explain(loc.url, exc) from exc
    return table.sort_by("path")


def list_versions(loc: Location, suffix: str) -> list[dict[str, Any]]:
    """list_table as a list of ``{"path", "size", "fingerprint"}`` (for small listings)."""
    return list_table(loc, suffix).to_pylist()


def local_temp_files(loc: Location) -> list[str]:
    """Half-written temporary files (write_bytes's ``.NAME.*.tmp``) under a local prefix; none on S3."""
    if fsspec_of(loc.fs) is not None or not os.path.isdir(loc.path):
        return []
    return [os.path.join(folder, n) for folder, _, names in os.walk(loc.path) for n in names
            if n.startswith(".") and n.endswith(".tmp")]


def read_versioned(loc: Location) -> tuple[bytes, str]:
    """A whole file and the fingerprint of the version read (one GET on S3: the bytes and their ETag agree)."""
    remote = fsspec_of(loc.fs)
    if remote is None:
        with open(loc.path, "rb") as fh:
            version = local_fingerprint(os.fstat(fh.fileno()))
            data = fh.read()
            if not still_version(fh, version):  # rewritten in place while read: the bytes may mix versions
                raise VersionChanged(f"{loc.url}: changed while it was read")
            return data, version
    from fsspec.asyn import sync

    bucket, _, key = loc.path.partition("/")

    async def get() -> tuple[bytes, str]:
        resp = await remote._call_s3("get_object", Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            return await body.read(), s3_fingerprint(resp["ETag"])

    return sync(remote.loop, get)


def still_version(handle: Any, fingerprint: str) -> bool:
    """False when a local file open as ``handle`` was rewritten in place since it had version ``fingerprint``
    (an S3 handle cannot be: its reads carry If-Match)."""
    if hasattr(handle, "details"):  # an s3fs file
        return True
    return local_fingerprint(os.fstat(handle.fileno())) == fingerprint


def open_versioned(loc: Location, fingerprint: str) -> Any:
    """A seekable handle on ``loc`` that reads only the version ``fingerprint``, else VersionChanged.

    On S3 every ranged read carries If-Match with the ETag (s3fs does this for files opened for
    reading), so a replacement during the read fails it instead of mixing two versions; on a
    local disk the open descriptor keeps reading the file it opened (a rename over it changes
    nothing), and still_version tells whether it was rewritten in place meanwhile.
    """
    remote = fsspec_of(loc.fs)
    if remote is None:
        fh = open(loc.path, "rb")
        found = local_fingerprint(os.fstat(fh.fileno()))
    else:
        fh = remote.open(loc.path, "rb")
        found = s3_fingerprint(fh.details.get("ETag", ""))
    if found != fingerprint:
        fh.close()
        raise VersionChanged(f"{loc.url}: changed since it was listed ({fingerprint} -> {found})")
    return fh


def read_bytes(loc: Location) -> bytes:
    """Read a whole object: on S3 one GET (s3fs's file object would first ask for the object's size, twice)."""
    s3 = fsspec_of(loc.fs)
    if s3 is not None:
        return s3.cat_file(loc.path)
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


def copy_tree(src: Location, dst: Location) -> int:
    """Copy every file under ``src`` (subfolders too) to the same relative paths under ``dst``; returns how many."""
    copied = 0
    for f in src.fs.get_file_info(pafs.FileSelector(src.path, recursive=True)):
        if f.type == pafs.FileType.File:
            with src.fs.open_input_stream(f.path) as data:
                write_bytes(dst.join(*f.path[len(src.path):].strip("/").split("/")), data.read())
            copied += 1
    return copied


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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a local file, read 4 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Local cache directory for downloaded models (``TEXTLABEL_CACHE`` overrides)."""
    root = os.environ.get("TEXTLABEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "textlabel"
    )
    return Path(root)
