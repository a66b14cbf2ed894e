"""Nightly runs over a growing corpus: incremental, exactly once, bad rows and files, object-store faults.

All S3 to S3 through the job's entry point, on the session's Ray and S3 server (behind the
fault proxy). The kills of the driver and of a predictor actor are in test_cluster.py,
where the job runs as a submitted Ray job.
"""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import corpus, easy_rows, put_parquet, read_output
from textlabel import storage
from textlabel.cli import label_main

pytestmark = pytest.mark.usefixtures("ray_session")  # the session's one local Ray, not one per job


def _label(model: str, prefix: str, *extra) -> int:
    return label_main(["--model", model, "--input", f"{prefix}/in/", "--output", f"{prefix}/out", "--max-length", "32",
                       "--batch-size", "16", "--label-prefix", "pred_", *map(str, extra)])


def _summary(prefix: str) -> dict:
    return storage.read_json(storage.resolve(f"{prefix}/out/_summary.json"))


def _versions(prefix: str) -> dict[str, str]:
    """Each visible output file and its ETag: a rewritten file gets a new one."""
    out = storage.resolve(f"{prefix}/out")
    return {f["path"][len(out.path) + 1:]: f["fingerprint"] for f in storage.list_versions(out, ".parquet")}


def _assert_exactly_once(prefix: str, expected_ids) -> pa.Table:
    out = read_output(f"{prefix}/out")
    ids = out["id"].to_pylist()
    assert len(ids) == len(set(ids)), "a row is duplicated"
    assert sorted(ids) == sorted(expected_ids), "rows lost or stale"
    assert out["pred_label"].null_count == 0
    return out


def test_each_night_labels_only_new_and_changed_files(tiny_model, s3_prefix, tmp_path):
    rows = corpus(f"{s3_prefix}/in", [200, 150, 100])
    assert _label(tiny_model, s3_prefix) == 0
    first = _versions(s3_prefix)
    assert sorted(first) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())

    # Nothing new: nothing labelled, nothing rewritten.
    assert _label(tiny_model, s3_prefix) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_unchanged"], summary["files_labelled"], summary["rows_out"]) == (3, 0, 0)
    assert _versions(s3_prefix) == first

    # Two new files land: only they are labelled; the old outputs are untouched.
    new = corpus(f"{s3_prefix}/in", [80, 70], first_id=10_000, seed=300, name="late")
    assert _label(tiny_model, s3_prefix) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_unchanged"], summary["files_labelled"], summary["rows_out"]) == (3, 2, 150)
    now = _versions(s3_prefix)
    assert {k: now[k] for k in first} == first and len(now) == 5
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist() + new["id"].to_pylist())

    # A file is replaced upstream with fewer rows, another grows into four row groups: both are
    # labelled again (the big one in parallel parts) and their old outputs replaced.
    smaller = corpus(f"{s3_prefix}/in", [50], first_id=20_000, seed=400, name="part-1-tmp")
    storage.delete(storage.resolve(f"{s3_prefix}/in/part-1-tmp-0.parquet"))
    put_parquet(f"{s3_prefix}/in/part-1.parquet", smaller)
    bigger = easy_rows(400, seed=500).append_column("id", [list(range(30_000, 30_400))])
    put_parquet(f"{s3_prefix}/in/part-0.parquet", bigger, row_group_size=100)
    assert _label(tiny_model, s3_prefix, "--rows-per-file", 150) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_unchanged"], summary["files_labelled"], summary["rows_out"]) == (3, 2, 450)
    now = _versions(s3_prefix)
    assert sorted(now) == ["late-0.parquet", "late-1.parquet", *[f"part-0.part-0000{k}.parquet" for k in range(4)],
                           "part-1.parquet", "part-2.parquet"]
    assert now["part-2.parquet"] == first["part-2.parquet"] and now["part-1.parquet"] != first["part-1.parquet"]
    expected = bigger["id"].to_pylist() + smaller["id"].to_pylist() + rows["id"].to_pylist()[350:] + new["id"].to_pylist()
    _assert_exactly_once(s3_prefix, expected)

    # Another model: refused, so one output never mixes two models' labels unnoticed ...
    other = tmp_path / "retrained"
    shutil.copytree(tiny_model, other)
    assert _label(str(other), s3_prefix) == 2
    # ... unless asked: --relabel labels every file again, replacing each output in place.
    assert _label(str(other), s3_prefix, "--relabel", "--rows-per-file", 150) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_unchanged"], summary["files_labelled"], summary["rows_out"]) == (0, 5, len(expected))
    assert set(_versions(s3_prefix)) == set(now) and str(other) in summary["model"]
    _assert_exactly_once(s3_prefix, expected)


def _fuzz_corpus(prefix: str) -> dict:
    """Every kind of bad row and bad file beside good ones; returns what each row and file should become."""
    base = f"{prefix}/in"
    good = easy_rows(60, seed=1).append_column("id", [list(range(60))])
    put_parquet(f"{base}/good.parquet", good)
    long_text = "a great film " * 400  # far beyond --max-length 32 tokens
    bad_rows = [(100, None, "null_text"), (101, "", "blank_text"), (102, " \t\n  ", "blank_text"),
                (103, long_text, None), (104, "a wonderful film", None), (105, "ça va 🎬 great", None)]
    put_parquet(f"{base}/rows.parquet", pa.table({"id": [r[0] for r in bad_rows], "text": pa.array([r[1] for r in bad_rows], pa.string())}))
    binary = [(200, b"a great movie", None), (201, b"\xff\xfe\xfa bad bytes", "invalid_utf8"), (202, None, "null_text"),
              (203, b"   ", "blank_text")]
    put_parquet(f"{base}/binary.parquet", pa.table({"id": [r[0] for r in binary], "text": pa.array([r[1] for r in binary], pa.binary())}))
    numbers = [(300, 7, "not_text"), (301, 8, "not_text"), (302, None, "null_text")]
    put_parquet(f"{base}/numbers.parquet", pa.table({"id": [r[0] for r in numbers], "text": pa.array([r[1] for r in numbers], pa.int64())}))
    other = easy_rows(5, seed=2)
    put_parquet(f"{base}/reordered.parquet", pa.table({"text": other["text"], "extra": [1.5] * 5, "id": list(range(400, 405))}))
    put_parquet(f"{base}/large.parquet", pa.table({"id": list(range(500, 505)), "text": pa.array(other["text"].to_pylist(), pa.large_string())}))
    put_parquet(f"{base}/dictionary.parquet", pa.table({"id": list(range(600, 605)), "text": other["text"].dictionary_encode()}))
    # Bad files.
    put_parquet(f"{base}/empty.parquet", pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}))
    storage.write_bytes(storage.resolve(f"{base}/corrupt.parquet"), b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    whole = pa.BufferOutputStream()
    pq.write_table(good, whole)
    storage.write_bytes(storage.resolve(f"{base}/cut-short.parquet"), whole.getvalue().to_pybytes()[:700])
    put_parquet(f"{base}/no-text.parquet", pa.table({"id": [700], "body": ["a great film"]}))
    storage.write_bytes(storage.resolve(f"{base}/README.txt"), b"not data: ignored")
    reasons = {i: None for i in range(60)} | {r[0]: r[2] for r in bad_rows + binary + numbers}
    reasons |= {i: None for i in [*range(400, 405), *range(500, 505), *range(600, 605)]}
    failed = {"empty.parquet": "zero rows", "corrupt.parquet": "unreadable Parquet", "cut-short.parquet": "unreadable Parquet",
              "no-text.parquet": "no column 'text'"}
    return {"reasons": reasons, "failed": failed}


def test_bad_rows_and_bad_files_are_accounted_for_and_the_rest_labelled(tiny_model, s3_prefix, caplog):
    expected = _fuzz_corpus(s3_prefix)
    assert _label(tiny_model, s3_prefix) == 3  # finished, but some files need a look
    out = storage.resolve(f"{s3_prefix}/out")
    # Each output file is read alone: like their inputs, they do not share one schema.
    tables = {f.base_name: pq.read_table(f.path, filesystem=out.fs) for f in storage.list_files(out, ".parquet")}
    assert sorted(tables) == ["binary.parquet", "dictionary.parquet", "good.parquet", "large.parquet", "numbers.parquet",
                              "reordered.parquet", "rows.parquet"]
    columns = ["id", "pred_label", "pred_label_id", "pred_score", "pred_truncated", "pred_skip_reason"]
    rows = pa.concat_tables([t.select(columns).rename_columns([c.removeprefix("pred_") for c in columns])
                             for t in tables.values()])
    got = dict(zip(rows["id"].to_pylist(), rows["skip_reason"].to_pylist()))
    assert len(got) == rows.num_rows == len(expected["reasons"])  # every row of every readable file, once
    assert got == expected["reasons"]
    labelled = rows.filter(pc.is_null(rows["skip_reason"]))
    skipped = rows.filter(pc.is_valid(rows["skip_reason"]))
    assert labelled["label"].null_count == 0 and set(labelled["label"].to_pylist()) <= {"LABEL_0", "LABEL_1"}
    assert skipped["label"].null_count == skipped["label_id"].null_count == skipped["score"].null_count == skipped.num_rows
    truncated = dict(zip(labelled["id"].to_pylist(), labelled["truncated"].to_pylist()))
    assert [i for i, t in truncated.items() if t] == [103]
    assert tables["rows.parquet"]["text"].to_pylist()[3] == "a great film " * 400  # the text itself is kept whole
    assert tables["reordered.parquet"].column_names[:3] == ["text", "extra", "id"]  # the file's own columns, as they were
    summary = _summary(s3_prefix)
    assert summary["rows_skipped"] == {"null_text": 3, "blank_text": 3, "invalid_utf8": 1, "not_text": 2}
    assert summary["rows_truncated"] == 1 and summary["rows_out"] == rows.num_rows
    assert summary["rows_labelled"] == rows.num_rows - 9
    assert set(summary["failed"]) == set(expected["failed"])
    for name, reason in expected["failed"].items():
        assert reason in summary["failed"][name]
        assert f"FAILED {name}: " in caplog.text
    assert "reordered.parquet" in summary["files_with_other_columns"]
    # Fix the files: the next run labels exactly them, nothing else.
    storage.delete(storage.resolve(f"{s3_prefix}/in/corrupt.parquet"))
    storage.delete(storage.resolve(f"{s3_prefix}/in/cut-short.parquet"))
    storage.delete(storage.resolve(f"{s3_prefix}/in/empty.parquet"))
    put_parquet(f"{s3_prefix}/in/no-text.parquet", pa.table({"id": [700], "text": ["a great film"]}))
    assert _label(tiny_model, s3_prefix) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_labelled"], summary["files_unchanged"], summary["files_failed"]) == (1, 7, 0)


def test_object_store_faults_are_retried_and_a_permanent_one_fails_only_its_file(tiny_model, s3_prefix, s3_faults):
    rows = corpus(f"{s3_prefix}/in", [100] * 12)
    s3_faults.deny = {f"{s3_prefix[5:]}/in/part-5.parquet"}  # access denied on one object, every time
    s3_faults.fail_rate = 0.25  # and one request in four fails: 500, 503, reset, or reset after taking effect
    before = dict(s3_faults.faults)
    try:
        assert _label(tiny_model, s3_prefix, "--num-actors", 2) == 3
    finally:
        s3_faults.deny, s3_faults.fail_rate = set(), 0.0
    injected = {k: s3_faults.faults[k] - before.get(k, 0) for k in ("500", "503", "reset", "reset_after")}
    assert sum(injected.values()) >= 12 and all(injected.values()), injected  # ~30 expected
    assert list(_summary(s3_prefix)["failed"]) == ["part-5.parquet"]
    ids = rows["id"].to_pylist()
    _assert_exactly_once(s3_prefix, ids[:500] + ids[600:])
    # The store recovers: the next run labels only that file.
    assert _label(tiny_model, s3_prefix) == 0
    assert _summary(s3_prefix)["files_labelled"] == 1
    _assert_exactly_once(s3_prefix, ids)


def test_local_output_cleans_up_after_a_killed_run(tiny_model, tmp_path):
    prefix = str(tmp_path)
    (tmp_path / "in").mkdir()
    rows = corpus(f"{prefix}/in", [30, 20])
    assert _label(tiny_model, prefix) == 0
    _assert_exactly_once(prefix, rows["id"].to_pylist())
    # What a run killed mid-write leaves on a local disk: a hidden temporary file, a file never recorded.
    (tmp_path / "out" / ".part-1.parquet.x1y2.tmp").write_bytes(b"PAR1 half a file")
    (tmp_path / "out" / "part-1.parquet").rename(tmp_path / "out" / "part-9.parquet")
    assert _label(tiny_model, prefix) == 0
    summary = _summary(prefix)
    assert summary["orphans_deleted"] == 2 and summary["outputs_missing_relabelled"] == ["part-1.parquet"]
    assert (summary["files_unchanged"], summary["files_labelled"]) == (1, 1)
    _assert_exactly_once(prefix, rows["id"].to_pylist())
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert [n for n in names if not n.startswith("_runs/")] == ["_manifest.json", "_summary.json", "part-0.parquet",
                                                               "part-1.parquet"]
