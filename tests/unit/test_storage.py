"""storage.py's URL handling and version identities, pure: no S3 server, no network (listings and pinned reads
against a real S3 endpoint are in tests/e2e/test_storage.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from textlabel import storage


def test_local_paths_and_file_urls_resolve_to_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ["out", "file://out", str(tmp_path / "out")]:
        loc = storage.resolve(url)
        assert isinstance(loc.fs, pafs.LocalFileSystem) and loc.path == str(tmp_path / "out") and loc.url == url
    assert storage.resolve("~/x").path == str(Path.home() / "x")


def test_s3_urls_keep_bucket_and_key_and_join_below_them():
    loc = storage.resolve("s3://bucket/runs/")
    assert loc.path == "bucket/runs" and storage.fsspec_of(loc.fs) is not None  # s3fs under pyarrow
    joined = loc.join("_manifest", "segment-1.parquet")
    assert joined.url == "s3://bucket/runs/_manifest/segment-1.parquet"
    assert joined.path == "bucket/runs/_manifest/segment-1.parquet" and joined.fs is loc.fs
    assert storage.resolve("s3://bucket/runs").join("a").url == "s3://bucket/runs/a"
    assert storage.fsspec_of(storage.resolve("/tmp").fs) is None


@pytest.mark.parametrize("url, says", [
    ("s3://", "name a bucket, as in s3://bucket/prefix"),
    ("gs://bucket/x", "unsupported scheme 'gs'; use a local path, file:// or s3://"),
    ("hdfs://nn/x", "unsupported scheme 'hdfs'"),
])
def test_a_url_that_cannot_work_is_refused_with_the_fix(url, says):
    with pytest.raises(storage.StorageError, match=says.replace("(", r"\(").replace(")", r"\)")):
        storage.resolve(url)


@pytest.mark.parametrize("text, hint", [
    ("NoCredentialsError: Unable to locate credentials", "no AWS credentials found: set AWS_ACCESS_KEY_ID"),
    ("EndpointConnectionError: Could not connect to the endpoint URL", "the object store is unreachable or overloaded after retries: rerun later"),
    ("ClientError: An error occurred (SlowDown) when calling the PutObject operation", "the object store is unreachable or overloaded"),
    ("ClientError: An error occurred (AccessDenied)", "access denied"),
    ("ClientError: An error occurred (NoSuchBucket)", "the bucket does not exist"),
    ("ValueError: something else", "check the URL"),
])
def test_storage_failures_become_one_line_naming_the_fix(text, hint):
    error = storage._explain("s3://b/k", RuntimeError(text))
    assert str(error).startswith(f"s3://b/k: {hint}") and str(error).endswith(f"(RuntimeError: {text})")
    assert isinstance(error, storage.StorageUnavailable) == ("overloaded" in hint)  # exit 75, not 2: nothing to fix


@pytest.mark.parametrize("rel, hidden", [
    ("a.parquet", False), ("day-1/a.parquet", False), ("_SUCCESS", True), ("_temporary/0/a.parquet", True),
    (".staging/a.parquet", True), ("day-1/.a.parquet.x1y2.tmp", True), ("day_1/a.parquet", False),
])
def test_names_starting_with_an_underscore_or_a_dot_are_not_data(rel, hidden):
    assert storage._hidden(rel) is hidden


def test_a_version_is_the_etag_on_s3_and_size_mtime_inode_ctime_on_disk(tmp_path):
    assert storage.s3_fingerprint('"9b2cf535f27731c974343645a3985328"') == "etag:9b2cf535f27731c974343645a3985328"
    f = tmp_path / "a.parquet"
    f.write_bytes(b"PAR1")
    st = os.stat(f)
    found = storage.local_fingerprint(st)
    assert found == f"size:4:mtime_ns:{st.st_mtime_ns}:ino:{st.st_ino}:ctime_ns:{st.st_ctime_ns}"
    assert storage.legacy_fingerprint(found) == f"size:4:mtime_ns:{st.st_mtime_ns}"  # what manifest format 1 recorded


def test_a_read_refused_because_its_file_was_replaced_is_told_from_other_failures():
    from s3fs.utils import FileExpired

    def wrapped(cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except BaseException as inner:
                raise OSError("reading the footer failed") from inner
        except OSError as outer:
            return outer

    assert storage.replaced(wrapped(FileExpired("chaos/in/a.parquet", '"etag-1"')))  # s3fs, under pyarrow
    assert storage.replaced(storage.VersionChanged("a.parquet: rewritten while it was read"))
    assert not storage.replaced(wrapped(PermissionError("AccessDenied")))
