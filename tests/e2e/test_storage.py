"""Storage against the S3 server and a local disk (no Ray): listings with versions, reads pinned to the listed
version, a model under an s3:// URL fetched again when it changes."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.corpus import put_parquet, resolve
from textlabel import storage


@pytest.fixture(params=["s3", "local"])
def prefix(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3_endpoint")
    return request.getfixturevalue("s3_prefix")


def test_listing_gives_each_visible_file_its_version_in_path_order(prefix):
    """Promise: a listing sees each data file with its version, skipping hidden and temporary ones."""
    for name in ["b.parquet", "a/c.parquet", "_tmp/x.parquet", ".hidden.parquet", "notes.txt"]:
        storage.write_bytes(resolve(f"{prefix}/{name}"), b"PAR1")
    listing = storage.list_table(resolve(prefix), ".parquet")
    root = resolve(prefix).path
    assert [p[len(root) + 1:] for p in listing["path"].to_pylist()] == ["a/c.parquet", "b.parquet"]
    assert listing["size"].to_pylist() == [4, 4]
    before = listing["fingerprint"].to_pylist()
    storage.write_bytes(resolve(f"{prefix}/b.parquet"), b"PAR1 v2")  # replaced: a new version
    after = storage.list_table(resolve(prefix), ".parquet")["fingerprint"].to_pylist()
    assert after[0] == before[0] and after[1] != before[1]
    one = storage.list_table(resolve(f"{prefix}/b.parquet"), ".parquet")  # the URL may name one file
    assert one["fingerprint"].to_pylist() == [after[1]]


def test_a_read_is_pinned_to_the_listed_version(prefix):
    # Incompressible rows, two row groups of ~6 MB: a reader fetches them in separate requests.
    """Promise: a file is read at the version that was listed, or its read fails as changed."""
    blobs = pa.array([os.urandom(60_000) for _ in range(200)], pa.binary())
    put_parquet(f"{prefix}/a.parquet", pa.table({"id": list(range(200)), "blob": blobs}), row_group_size=100)
    loc = resolve(f"{prefix}/a.parquet")
    listed = storage.list_table(loc, ".parquet")["fingerprint"][0].as_py()
    data, version = storage.read_versioned(loc)  # one request: the bytes and the version they are
    assert version == listed and pq.read_table(pa.BufferReader(data)).num_rows == 200
    handle = storage.open_versioned(loc, listed)
    reader = pq.ParquetFile(handle)
    assert reader.read_row_group(0)["id"].to_pylist() == list(range(100))
    replacement = pa.table({"id": list(range(5000, 5200)), "blob": blobs})
    if storage.fsspec_of(loc.fs) is not None:
        put_parquet(f"{prefix}/a.parquet", replacement, row_group_size=100)  # replaced mid-read
        try:  # the rest comes from the version opened (s3fs read ahead), or a ranged read's If-Match refuses it
            assert reader.read_row_group(1)["id"].to_pylist() == list(range(100, 200))
        except OSError as exc:
            assert "pre-conditions" in str(exc)
    else:
        fresh = f"{prefix}/.a.new"
        pq.write_table(replacement, fresh, row_group_size=100)
        os.replace(fresh, loc.path)  # replaced by a rename: the open descriptor still reads what it opened ...
        assert reader.read_row_group(1)["id"].to_pylist() == list(range(100, 200))
        assert not storage.still_version(handle, listed)  # ... and can tell it is no longer the listed file
    handle.close()
    with pytest.raises(storage.VersionChanged, match="changed since it was listed"):
        storage.open_versioned(loc, listed)
    assert storage.read_versioned(loc)[1] != listed


def test_local_fingerprints_see_a_same_size_rewrite_within_the_same_mtime(tmp_path):
    """Promise: on a local disk, a same-size rewrite within one mtime tick is still a new version."""
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1 one")
    st = os.stat(path)
    first = storage.local_fingerprint(st)
    replacement = tmp_path / "b.tmp"
    replacement.write_bytes(b"PAR1 two")
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only inode and ctime differ
    os.replace(replacement, path)
    assert storage.local_fingerprint(os.stat(path)) != first
    assert storage.legacy_fingerprint(first) == f"size:{st.st_size}:mtime_ns:{st.st_mtime_ns}"


def test_a_model_retrained_under_the_same_s3_url_is_fetched_again(s3_prefix, tmp_path, monkeypatch):
    """S3 listings carry no modification time and a retrained model's files keep their sizes: the local copy
    must follow the files' versions, or a nightly job would label with last week's weights."""
    from textlabel.model import local_model_dir

    monkeypatch.setenv("TEXTLABEL_CACHE", str(tmp_path))
    url = f"{s3_prefix}/runs/sentiment/model"
    storage.write_bytes(resolve(url).join("config.json"), b"{}")
    for weights in (b"A" * 64, b"B" * 64):
        storage.write_bytes(resolve(url).join("model.safetensors"), weights)
        local = local_model_dir(url)
        assert open(os.path.join(local, "model.safetensors"), "rb").read() == weights
