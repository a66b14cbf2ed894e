"""The manifest (snapshot + segments, compaction, format-1 migration) and the committer, on a local
disk: no Ray, no S3 server."""

from __future__ import annotations

import json
import time

import pytest

from textlabel import storage
from textlabel.commit import Committer
from textlabel.manifest import Manifest
from textlabel.records import FileRecord, Status


def rec(name: str, fp: str = "etag:1", status: Status = Status.DONE, run: str = "r1") -> FileRecord:
    return FileRecord(name, fp, 10, status, [name] if status == Status.DONE else [], 5, 5, {"null_text": 1}, model="m", run=run)


def names(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "_manifest").iterdir())


def records(manifest: Manifest) -> dict[str, tuple[str, str]]:
    return {r["input"]: (r["fingerprint"], r["status"]) for r in manifest.state.to_pylist()}


def test_a_night_writes_segments_and_the_next_one_reads_them(tmp_path):
    out = storage.resolve(str(tmp_path))
    first = Manifest.load(out)
    assert not first.found and first.epoch == 1
    first.claim("s3://corpus/")  # an empty snapshot: the prefix is ours before any output exists
    first.write_segment([rec("a"), rec("b")], 1)
    newer = rec("b", "etag:2")  # one record, compared whole (its recorded_at is the second it was made)
    first.write_segment([newer, rec("c", status=Status.FAILED)], 2)
    loaded = Manifest.load(out)  # a run killed here: the next run sees every committed record
    assert loaded.input == "s3://corpus/" and loaded.epoch == 2
    assert records(loaded) == {"a": ("etag:1", "done"), "b": ("etag:2", "done"), "c": ("etag:1", "failed")}
    assert loaded.records(["b"])["b"] == newer
    assert first.finish() == "compacted"  # the segments outgrew the (empty) snapshot
    assert names(tmp_path) == ["snapshot-0000000001.parquet"]
    assert records(Manifest.load(out)) == records(loaded)



def test_two_runs_from_one_epoch_never_write_the_same_name_and_a_later_epoch_wins(tmp_path):
    """A run that lost its lease without knowing it yet (a stalled renewal) and the run that took over both start
    from epoch 2: their files carry their run, so neither overwrites the other's records."""
    out = storage.resolve(str(tmp_path))
    old = Manifest.load(out)
    old.claim("in/")  # written before runs named their files: still read
    old.write_segment([rec("a")], 1)
    assert old.finish() == "compacted" and names(tmp_path) == ["snapshot-0000000001.parquet"]
    stale, taker = Manifest.load(out), Manifest.load(out)
    stale.run, taker.run = "20261203T010000Z-aaaaaa", "20261203T013000Z-bbbbbb"
    taker.write_segment([rec("b", run="taker")], 1)
    stale.write_segment([rec("c", run="stale")], 1)
    assert names(tmp_path) == ["segment-0000000002-000001-20261203T010000Z-aaaaaa.parquet",
                               "segment-0000000002-000001-20261203T013000Z-bbbbbb.parquet", "snapshot-0000000001.parquet"]
    assert sorted(records(Manifest.load(out))) == ["a", "b", "c"]
    assert taker.finish(compact=True) == "compacted"  # the snapshot names the epoch and the run
    assert names(tmp_path) == ["segment-0000000002-000001-20261203T010000Z-aaaaaa.parquet",
                               "snapshot-0000000002-20261203T013000Z-bbbbbb.parquet"]
    latest = Manifest.load(out)  # a snapshot of epoch 2 supersedes every segment of epoch 2 it did not read
    assert latest.epoch == 3 and sorted(records(latest)) == ["a", "b"]
    latest.write_segment([rec("d")], 1)
    latest.finish(compact=True)  # and the next compaction deletes what it superseded
    assert names(tmp_path) == ["snapshot-0000000003.parquet"]

def test_segments_are_merged_until_they_outgrow_a_quarter_of_the_snapshot(tmp_path):
    out = storage.resolve(str(tmp_path))
    night = Manifest.load(out)
    night.claim("in/")
    night.write_segment([rec(f"f{i}") for i in range(100)], 1)
    assert night.finish() == "compacted"
    for epoch in (2, 3):
        night = Manifest.load(out)
        night.write_segment([rec(f"n{epoch}-0")], 1)
        night.write_segment([rec(f"n{epoch}-1"), rec("f0", "etag:9")], 2)
        assert night.finish() == "merged"  # 3 records: far under a quarter of 100
    assert names(tmp_path) == ["segment-0000000002-merged.parquet", "segment-0000000003-merged.parquet",
                               "snapshot-0000000001.parquet"]
    night = Manifest.load(out)
    assert len(night.state) == 104 and records(night)["f0"] == ("etag:9", "done")
    night.write_segment([rec(f"g{i}") for i in range(30)], 1)
    assert night.finish() == "compacted" and names(tmp_path) == ["snapshot-0000000004.parquet"]
    assert len(Manifest.load(out).state) == 134


def test_a_kill_between_any_two_writes_of_a_compaction_loads_the_same(tmp_path):
    out = storage.resolve(str(tmp_path))
    night = Manifest.load(out)
    night.claim("in/")
    night.write_segment([rec("a"), rec("b")], 1)
    night.write_segment([rec("a", "etag:2")], 2)
    expected = records(Manifest.load(out))
    # The new snapshot written, the old files not yet deleted: both are there.
    snapshot = night.current().sort_by("input")
    from textlabel.manifest import _to_parquet

    storage.write_bytes(out.join("_manifest", "snapshot-0000000001.parquet"), _to_parquet(snapshot, night._meta()))
    assert len(names(tmp_path)) == 4 and records(Manifest.load(out)) == expected
    assert Manifest.load(out).epoch == 2


def test_pruned_records_disappear_and_models_and_outputs_are_kept(tmp_path):
    out = storage.resolve(str(tmp_path))
    night = Manifest.load(out)
    night.claim("in/")
    night.write_segment([rec("a"), rec("b")], 1)
    night.finish()
    night = Manifest.load(out)
    night.write_segment([FileRecord("a", "etag:1", 10, Status.PRUNED, [])], 1)
    assert [r["input"] for r in night.current().to_pylist()] == ["b"]
    night.finish()
    loaded = Manifest.load(out)
    assert records(loaded) == {"b": ("etag:1", "done")}
    assert loaded.records(["b"])["b"].model == "m" and loaded.records(["b"])["b"].outputs == ["b"]


def test_a_format_1_manifest_is_read_and_migrated(tmp_path):
    old = {"input": "a.parquet", "fingerprint": "size:1:mtime_ns:2", "size": 1, "status": "done", "error": None,
           "outputs": ["a.parquet"], "rows_in": 3, "rows_out": 3, "rows_skipped": {"blank_text": 1}, "rows_truncated": 0,
           "note": None, "model": "m", "run": "old", "seconds": 1.0, "recorded_at": "2026-11-01T00:00:00+00:00"}
    (tmp_path / "_manifest.json").write_text(json.dumps({"format": 1, "input": "in/", "files": {"a.parquet": old}}))
    (tmp_path / "_manifest").mkdir()
    loose = {**old, "input": "b.parquet", "outputs": ["b.parquet"], "recorded_at": "2026-11-02T00:00:00+00:00"}
    (tmp_path / "_manifest" / "0123456789abcdef01234567.json").write_text(json.dumps(loose))
    out = storage.resolve(str(tmp_path))
    legacy = Manifest.load(out)
    assert legacy.found and legacy.input == "in/" and set(records(legacy)) == {"a.parquet", "b.parquet"}
    assert legacy.records(["a.parquet"])["a.parquet"].rows_skipped == {"blank_text": 1}
    legacy.claim("in/")
    assert not (tmp_path / "_manifest.json").exists() and names(tmp_path) == ["snapshot-0000000000.parquet"]
    assert records(Manifest.load(out)) == records(legacy)


def _wait_for(check, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_committer_writes_batches_by_count_and_by_time_then_deletes_what_they_unvouch(tmp_path):
    out = storage.resolve(str(tmp_path))
    (tmp_path / "old.part-00001.parquet").write_bytes(b"stale")
    manifest = Manifest.load(out)
    committer = Committer(manifest, every=3, seconds=3600)
    for i in range(7):
        committer.add(rec(f"f{i}"), ["old.part-00001.parquet"] if i == 1 else [])
    _wait_for(lambda: len(committer.committed) == 6)  # two full batches of 3; the 7th waits for more, or for time
    assert not (tmp_path / "old.part-00001.parquet").exists()  # deleted once the record unvouching it was written
    assert len(Manifest.load(out).state) == 6
    committer.flush()  # what must be durable before the run goes on (the `labelling` marks) is written now
    assert committer.commits == 3 and len(Manifest.load(out).state) == 7
    committer.close()
    timed = Committer(Manifest.load(out), every=1000, seconds=0.05)
    timed.add(rec("late"))
    _wait_for(lambda: timed.commits == 1)  # nothing else came: the time bound wrote it
    timed.close()


def test_a_committer_that_may_no_longer_commit_writes_nothing(tmp_path):
    def lost():
        raise RuntimeError("lease lost")

    committer = Committer(Manifest.load(storage.resolve(str(tmp_path))), every=1, check=lost)
    committer.add(rec("a"))
    with pytest.raises(RuntimeError, match="lease lost"):
        committer.close()
    assert not (tmp_path / "_manifest").exists()
