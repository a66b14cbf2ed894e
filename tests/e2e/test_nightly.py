"""Nightly runs over a growing corpus: incremental, exactly once, bad rows and files, object-store faults.

All S3 to S3 through the job's entry point, on the session's Ray and S3 server (behind the
fault proxy). The kills of the driver at each phase of a run and of a predictor actor are in
test_faults.py.
"""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from support.corpus import corpus, easy_rows, put_parquet, read_output, resolve
from textlabel import storage
from textlabel.cli import label_main

pytestmark = pytest.mark.usefixtures("ray_session")  # the session's one local Ray, not one per job


def _label(model: str, prefix: str, *extra, actors: int | None = 1) -> int:
    # A random model's label shares on random rows mean nothing night to night: no drift verdict here
    # (test_label.py and test_drift.py test drift). One predictor actor unless a test says otherwise: each costs a
    # process that imports torch and transformers, and these corpora are small.
    pool = ["--num-actors", str(actors)] if actors else []
    return label_main(["--model", model, "--input", f"{prefix}/in/", "--output", f"{prefix}/out", "--max-length", "32",
                       "--batch-size", "16", "--label-prefix", "pred_", "--max-drift", "1e9", *pool, *map(str, extra)])


def _summary(prefix: str) -> dict:
    return storage.read_json(resolve(f"{prefix}/out/_summary.json"))


def _versions(prefix: str) -> dict[str, str]:
    """Each visible output file and its ETag: a rewritten file gets a new one."""
    out = resolve(f"{prefix}/out")
    return {f["path"][len(out.path) + 1:]: f["fingerprint"] for f in storage.list_versions(out, ".parquet")}


def _assert_exactly_once(prefix: str, expected_ids) -> pa.Table:
    out = read_output(f"{prefix}/out")
    ids = out["id"].to_pylist()
    assert len(ids) == len(set(ids)), "a row is duplicated"
    assert sorted(ids) == sorted(expected_ids), "rows lost or stale"
    assert out["pred_label"].null_count == 0
    return out


def test_each_night_labels_only_new_and_changed_files(tiny_model, s3_prefix, tmp_path):
    """Promise: each night labels only new and changed files; another model is refused unless --relabel."""
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

    # A file is replaced upstream with fewer rows, another grows into one row group of 400 rows: both are
    # labelled again (the big one cut into slices of its row group) and their old outputs replaced.
    smaller = corpus(f"{s3_prefix}/in", [50], first_id=20_000, seed=400, name="part-1-tmp")
    storage.delete(resolve(f"{s3_prefix}/in/part-1-tmp-0.parquet"))
    put_parquet(f"{s3_prefix}/in/part-1.parquet", smaller)
    bigger = easy_rows(400, seed=500).append_column("id", [list(range(30_000, 30_400))])
    put_parquet(f"{s3_prefix}/in/part-0.parquet", bigger, row_group_size=400)
    assert _label(tiny_model, s3_prefix, "--rows-per-file", 150) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_unchanged"], summary["files_labelled"], summary["rows_out"]) == (3, 2, 450)
    now = _versions(s3_prefix)
    assert sorted(now) == ["late-0.parquet", "late-1.parquet", *[f"part-0.part-0000{k}.parquet" for k in range(3)],
                           "part-1.parquet", "part-2.parquet"]
    assert now["part-2.parquet"] == first["part-2.parquet"] and now["part-1.parquet"] != first["part-1.parquet"]
    expected = bigger["id"].to_pylist() + smaller["id"].to_pylist() + rows["id"].to_pylist()[350:] + new["id"].to_pylist()
    _assert_exactly_once(s3_prefix, expected)

    # The same model moved elsewhere is the same model (its identity is its content): nothing is labelled again.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model, moved)
    assert _label(str(moved), s3_prefix) == 0
    assert (_summary(s3_prefix)["files_unchanged"], _summary(s3_prefix)["files_labelled"]) == (5, 0)
    # Another model (the same weights, calibrated): refused, so one output never mixes two models' labels unnoticed ...
    other = tmp_path / "retrained"
    shutil.copytree(tiny_model, other)
    (other / "textlabel_calibration.json").write_text('{"tasks": [{"name": "label", "temperature": 2.0}]}')
    assert _label(str(other), s3_prefix) == 2
    # ... unless asked: --relabel labels every file again, replacing each output in place.
    assert _label(str(other), s3_prefix, "--relabel", "--rows-per-file", 150) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_unchanged"], summary["files_labelled"], summary["rows_out"]) == (0, 5, len(expected))
    assert set(_versions(s3_prefix)) == set(now) and summary["model_path"] == str(other)
    assert "temperature 2" in summary["model"] and str(other) not in summary["model"]
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
    empty = pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())})
    put_parquet(f"{base}/empty.parquet", empty)  # labelled: an output of its columns and the labels', no rows
    other = easy_rows(5, seed=2)
    put_parquet(f"{base}/reordered.parquet", pa.table({"text": other["text"], "extra": [1.5] * 5, "id": list(range(400, 405))}))
    put_parquet(f"{base}/large.parquet", pa.table({"id": list(range(500, 505)), "text": pa.array(other["text"].to_pylist(), pa.large_string())}))
    put_parquet(f"{base}/dictionary.parquet", pa.table({"id": list(range(600, 605)), "text": other["text"].dictionary_encode()}))
    # Bad files.
    put_parquet(f"{base}/numbers.parquet", pa.table({"id": [300, 301], "text": pa.array([7, None], pa.int64())}))
    storage.write_bytes(resolve(f"{base}/corrupt.parquet"), b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    whole = pa.BufferOutputStream()
    pq.write_table(good, whole)
    storage.write_bytes(resolve(f"{base}/cut-short.parquet"), whole.getvalue().to_pybytes()[:700])
    put_parquet(f"{base}/no-text.parquet", pa.table({"id": [700], "body": ["a great film"]}))
    storage.write_bytes(resolve(f"{base}/README.txt"), b"not data: ignored")
    reasons = {i: None for i in range(60)} | {r[0]: r[2] for r in bad_rows + binary}
    reasons |= {i: None for i in [*range(400, 405), *range(500, 505), *range(600, 605)]}
    failed = {"numbers.parquet": "column 'text' is int64, not text", "corrupt.parquet": "unreadable Parquet",
              "cut-short.parquet": "unreadable Parquet", "no-text.parquet": "no column 'text'"}
    return {"reasons": reasons, "failed": failed}


def test_bad_rows_and_bad_files_are_accounted_for_and_the_rest_labelled(tiny_model, s3_prefix, caplog):
    """Promise: bad rows and bad files are counted and reported, never dropped silently; the rest is labelled."""
    expected = _fuzz_corpus(s3_prefix)
    assert _label(tiny_model, s3_prefix) == 3  # finished, but some files need a look
    out = resolve(f"{s3_prefix}/out")
    # Each output file is read alone: like their inputs, they do not share one schema.
    tables = {f.base_name: pq.read_table(f.path, filesystem=out.fs) for f in storage.list_files(out, ".parquet")}
    assert sorted(tables) == ["binary.parquet", "dictionary.parquet", "empty.parquet", "good.parquet", "large.parquet",
                              "reordered.parquet", "rows.parquet"]
    assert tables["empty.parquet"].num_rows == 0 and tables["empty.parquet"].column_names == ["id", "text"] + [
        c for c in tables["good.parquet"].column_names if c.startswith("pred_")]
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
    assert summary["rows_skipped"] == {"null_text": 2, "blank_text": 3, "invalid_utf8": 1}
    assert summary["rows_truncated"] == 1 and summary["rows_out"] == rows.num_rows
    assert summary["rows_labelled"] == rows.num_rows - 6
    assert set(summary["failed"]) == set(expected["failed"])
    for name, reason in expected["failed"].items():
        assert reason in summary["failed"][name]
        assert f"FAILED {name}: " in caplog.text
    assert "reordered.parquet" in summary["files_with_other_columns"]
    # Fix the files: the next run labels exactly them, nothing else.
    storage.delete(resolve(f"{s3_prefix}/in/corrupt.parquet"))
    storage.delete(resolve(f"{s3_prefix}/in/cut-short.parquet"))
    put_parquet(f"{s3_prefix}/in/no-text.parquet", pa.table({"id": [700], "text": ["a great film"]}))
    put_parquet(f"{s3_prefix}/in/numbers.parquet", pa.table({"id": [300], "text": ["a fine film"]}))
    assert _label(tiny_model, s3_prefix) == 0
    summary = _summary(s3_prefix)  # the empty file among the unchanged: done, not retried
    assert (summary["files_labelled"], summary["files_unchanged"], summary["files_failed"]) == (2, 7, 0)


def test_one_bad_utf8_cell_among_forty_small_files_costs_one_row(tiny_model, s3_prefix):
    """Promise: a string cell that is not UTF-8 costs its row: not its file, nor the files packed with it."""
    rows = corpus(f"{s3_prefix}/in", [5] * 40)
    cells = [t.encode() for t in rows["text"].to_pylist()[85:90]]
    cells[2] = b"a great \xff\xfe film"  # row 87
    bad = rows.slice(85, 5).set_column(1, "text", pa.array(cells, pa.binary()).view(pa.string()))
    put_parquet(f"{s3_prefix}/in/part-17.parquet", bad)
    written = pq.read_table(resolve(f"{s3_prefix}/in/part-17.parquet").path, filesystem=resolve(s3_prefix).fs)
    assert written["text"].type == pa.string()  # a string column, its bytes unchecked by Parquet readers
    with pytest.raises(pa.ArrowInvalid, match="UTF8"):
        written["text"].combine_chunks().validate(full=True)
    assert _label(tiny_model, s3_prefix) == 0
    out = read_output(f"{s3_prefix}/out").sort_by("id")
    assert out["id"].to_pylist() == rows["id"].to_pylist()  # every row of every file, once
    skipped = out.filter(pc.is_valid(out["pred_skip_reason"]))
    assert skipped["id"].to_pylist() == [87] and skipped["pred_skip_reason"].to_pylist() == ["invalid_utf8"]
    assert out["pred_label"].null_count == 1 and skipped["pred_label"].null_count == 1
    summary = _summary(s3_prefix)
    assert (summary["files_labelled"], summary["files_failed"]) == (40, 0) and summary["units"] < 40  # packed
    assert summary["rows_skipped"] == {"invalid_utf8": 1} and summary["rows_labelled"] == 199


def test_object_store_faults_are_retried_and_a_permanent_one_fails_only_its_file(tiny_model, s3_prefix, s3_faults):
    """Promise: transient S3 faults are retried; a permanent one fails only its file, which the next night labels."""
    rows = corpus(f"{s3_prefix}/in", [100] * 24)
    s3_faults.deny = {f"{s3_prefix[5:]}/in/part-5.parquet"}  # access denied on one object, every time
    s3_faults.fail_rate = 0.25  # and every fourth request fails: 500, 503, reset, or reset after taking effect, in turn
    before = dict(s3_faults.faults)
    try:
        assert _label(tiny_model, s3_prefix) == 3
    finally:
        s3_faults.deny, s3_faults.fail_rate = set(), 0.0
    injected = {k: s3_faults.faults[k] - before.get(k, 0) for k in ("500", "503", "reset", "reset_after")}
    assert sum(injected.values()) >= 16 and all(injected.values()), injected  # a quarter of ~80 requests
    assert list(_summary(s3_prefix)["failed"]) == ["part-5.parquet"]
    ids = rows["id"].to_pylist()
    _assert_exactly_once(s3_prefix, ids[:500] + ids[600:])
    # The store recovers: the next run labels only that file.
    assert _label(tiny_model, s3_prefix) == 0
    assert _summary(s3_prefix)["files_labelled"] == 1
    _assert_exactly_once(s3_prefix, ids)


def _killed_holder(out: str) -> None:
    """A run that takes the lease on ``out`` and is SIGKILLed while it holds it (a real process, really killed)."""
    import subprocess
    import sys

    code = ("import sys; from textlabel import lease, storage; lease.acquire(storage.resolve(sys.argv[1]), 'run-killed', 300); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()


def test_local_output_cleans_up_after_a_killed_run(tiny_model, tmp_path):
    """Promise: on a local disk too, a killed run's leftovers are cleaned up and missing outputs relabelled."""
    prefix = str(tmp_path)
    (tmp_path / "in").mkdir()
    rows = corpus(f"{prefix}/in", [30, 20])
    assert _label(tiny_model, prefix) == 0
    _assert_exactly_once(prefix, rows["id"].to_pylist())
    # What a run killed mid-write leaves on a local disk: its lease, a hidden temporary file, a file never recorded.
    (tmp_path / "out" / ".part-1.parquet.x1y2.tmp").write_bytes(b"PAR1 half a file")
    (tmp_path / "out" / "part-1.parquet").rename(tmp_path / "out" / "part-9.parquet")
    _killed_holder(f"{prefix}/out")
    assert _label(tiny_model, prefix) == 0
    summary = _summary(prefix)
    assert summary["lease_taken_over"].startswith("its driver process") and summary["outputs_swept"]
    assert summary["orphans_deleted"] == 2 and summary["outputs_missing_relabelled"] == ["part-1.parquet"]
    assert (summary["files_unchanged"], summary["files_labelled"]) == (1, 1)
    _assert_exactly_once(prefix, rows["id"].to_pylist())
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert [n for n in names if not n.startswith(("_runs/", "_manifest/", "_report/"))] == ["_summary.json", "part-0.parquet",
                                                                               "part-1.parquet"]
    # Labels deleted by hand after a clean night: a plain night does not list the outputs; --verify-outputs does.
    (tmp_path / "out" / "part-0.parquet").unlink()
    assert _label(tiny_model, prefix) == 0 and _summary(prefix)["files_unchanged"] == 2
    assert _label(tiny_model, prefix, "--verify-outputs") == 0
    assert _summary(prefix)["outputs_missing_relabelled"] == ["part-0.parquet"]
    _assert_exactly_once(prefix, rows["id"].to_pylist())


def _in_thread(target, *args):
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", target(*args)), daemon=True)
    thread.start()
    return thread, result


def test_a_second_run_on_a_held_prefix_is_refused_and_the_first_labels_exactly_once(tiny_model, s3_prefix, s3_faults, caplog):
    """Promise: a second run on the same output is refused at once while the first labels exactly once."""
    rows = corpus(f"{s3_prefix}/in", [40, 30])
    held = s3_faults.hold("PUT", f"{s3_prefix[5:]}/out/part-")  # the first run, caught writing its first output
    first, result = _in_thread(_label, tiny_model, s3_prefix)
    held.wait()
    assert _label(tiny_model, s3_prefix) == 2  # at once, without touching anything
    refusal = next(r.getMessage() for r in caplog.records if "is held by" in r.getMessage())
    assert f"--output {s3_prefix}/out is held by run " in refusal and "since" in refusal and "expires" in refusal
    held.release()
    first.join(300)
    assert result["code"] == 0
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
    assert _summary(s3_prefix)["files_labelled"] == 2
    assert not storage.exists(resolve(f"{s3_prefix}/out/_lease.json"))  # released at the end



def test_a_run_whose_lease_is_replaced_mid_night_stops_and_leaves_the_new_holders_lease(tiny_model, s3_prefix, s3_faults,
                                                                                          caplog):
    """Promise: a run that lost its lease (another run took it over unseen) commits nothing more, exits 75 naming
    the new holder, and leaves that holder's lease alone; the next night labels every row exactly once."""
    import json
    import time

    from textlabel.manifest import Manifest

    rows = corpus(f"{s3_prefix}/in", [40, 30])
    held = s3_faults.hold("PUT", f"{s3_prefix[5:]}/out/part-")  # caught writing its first output
    run, result = _in_thread(_label, tiny_model, s3_prefix, "--commit-every", 1)
    held.wait()
    lease_loc = resolve(f"{s3_prefix}/out/_lease.json")
    other = {**json.loads(storage.read_bytes(lease_loc)), "run": "run-on-node-b", "host": "node-b", "pid": 7,
             "since": time.time(), "expires_at": time.time() + 600, "renewals": 0}
    storage.write_bytes(lease_loc, json.dumps(other).encode())  # node-b took over, and this run did not see it
    held.release()
    run.join(300)
    assert result["code"] == 75  # transient: rerun the same command
    assert json.loads(storage.read_bytes(lease_loc)) == other
    last = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "now held by run run-on-node-b (host node-b, pid 7" in last and "rerun the same command" in last
    assert Manifest.load(resolve(f"{s3_prefix}/out")).state.num_rows == 0  # no record after the loss
    assert not storage.exists(resolve(f"{s3_prefix}/out/_summary.json"))  # nor the summary
    storage.write_bytes(lease_loc, json.dumps({**other, "expires_at": time.time() - 1}).encode())  # node-b ends
    assert _label(tiny_model, s3_prefix) == 0
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
    assert not storage.exists(lease_loc)


def test_a_hung_read_costs_its_file_and_the_night_ends_within_the_part_timeout(tiny_model, s3_prefix, s3_faults):
    """Promise: a read that hangs (it never answers, nothing crashes) costs its file, not the night: the run ends
    within --part-timeout and a margin, exit 3, that file failed with why, every other row labelled."""
    import time

    rows = corpus(f"{s3_prefix}/in", [30, 20])
    fragment = f"{s3_prefix[5:]}/in/part-1.parquet"
    holds = [s3_faults.hold("GET", fragment, ranged=False) for _ in range(3)]  # each whole read of it hangs
    began = time.monotonic()
    code = _label(tiny_model, s3_prefix, "--part-timeout", 3, "--max-attempts", 1)
    took = time.monotonic() - began
    for held in holds:
        held.release()
    assert code == 3 and took < 90, took  # at most two timeouts (its pack's, then its own) and two actor restarts
    summary = _summary(s3_prefix)
    assert summary["files_failed"] == 1 and summary["files_labelled"] == 1
    assert summary["failed"]["part-1.parquet"].startswith("timed out after 3 s without progress while reading part-1.parquet")
    labelled = read_output(f"{s3_prefix}/out")
    assert sorted(labelled["id"].to_pylist()) == rows["id"].to_pylist()[:30]


def test_a_lease_left_by_a_run_elsewhere_is_taken_over_once_it_expires(tiny_model, s3_prefix, caplog):
    """Promise: a lease left by a dead run on another node is taken over once it expires, not before."""
    import json
    import time

    rows = corpus(f"{s3_prefix}/in", [20])
    lease = {"run": "run-on-node-b", "host": "node-b", "boot_id": "b", "pid": 1, "pid_started": None, "ray_job": None,
             "since": time.time() - 600, "expires_at": time.time() + 600, "state": "held", "renewals": 3}
    storage.write_bytes(resolve(f"{s3_prefix}/out/_lease.json"), json.dumps(lease).encode())
    assert _label(tiny_model, s3_prefix) == 2  # alive as far as anyone here can tell
    assert "is held by run run-on-node-b (host node-b" in caplog.text
    lease["expires_at"] = time.time() - 5  # node-b died and its lease ran out
    storage.write_bytes(resolve(f"{s3_prefix}/out/_lease.json"), json.dumps(lease).encode())
    assert _label(tiny_model, s3_prefix) == 0
    summary = _summary(s3_prefix)
    assert summary["lease_taken_over"].startswith("it expired") and summary["outputs_swept"]
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())


def test_a_store_that_ignores_conditional_writes_is_refused_unless_told(tiny_model, s3_prefix, s3_faults, caplog):
    """Promise: a store that ignores conditional writes is refused, unless --no-lease says so."""
    rows = corpus(f"{s3_prefix}/in", [20])
    s3_faults.strip_conditions = True
    try:
        assert _label(tiny_model, s3_prefix) == 2
        assert "ignores conditional writes (If-None-Match and If-Match)" in caplog.text and "--no-lease" in caplog.text
        assert not storage.exists(resolve(f"{s3_prefix}/out"))
        assert _label(tiny_model, s3_prefix, "--no-lease") == 0
    finally:
        s3_faults.strip_conditions = False
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())


def test_a_file_replaced_before_it_is_read_ends_labelled_at_its_new_version(tiny_model, s3_prefix, s3_faults):
    """Promise: a file replaced mid-run ends labelled at the version that was read, never a mix."""
    rows = corpus(f"{s3_prefix}/in", [30, 30, 30])
    held = s3_faults.hold("GET", f"{s3_prefix[5:]}/in/part-1.parquet", ranged=False)  # the actor's read of it
    run, result = _in_thread(_label, tiny_model, s3_prefix)
    held.wait()
    newer = easy_rows(12, seed=77).append_column("id", [list(range(9000, 9012))])
    put_parquet(f"{s3_prefix}/in/part-1.parquet", newer)  # replaced after the listing, before the read
    held.release()
    run.join(300)
    assert result["code"] == 0
    assert _summary(s3_prefix)["files_changed_during_run"] == ["part-1.parquet"]
    ids = rows["id"].to_pylist()
    _assert_exactly_once(s3_prefix, ids[:30] + ids[60:] + list(range(9000, 9012)))
    assert _label(tiny_model, s3_prefix) == 0  # recorded at the version it labelled: nothing left to do
    assert (_summary(s3_prefix)["files_unchanged"], _summary(s3_prefix)["files_labelled"]) == (3, 0)


def test_a_part_that_kills_its_actor_every_time_fails_alone_and_the_night_goes_on(tiny_model, s3_prefix, monkeypatch):
    """Promise: a row that kills its predictor every time fails its file alone; the night goes on, and the file is
    quarantined, not retried every night."""
    rows = corpus(f"{s3_prefix}/in", [30, 30, 30])
    poison = easy_rows(10, seed=5).append_column("id", [list(range(5000, 5010))])
    poison = poison.set_column(0, "text", pa.array(["a POISON pill"] + poison["text"].to_pylist()[1:]))
    put_parquet(f"{s3_prefix}/in/part-1b.parquet", poison)  # packed with the others
    monkeypatch.setenv("TEXTLABEL_TEST_HOOKS", '{"crash_on_text": "POISON"}')  # SIGKILLs its actor on that row
    assert _label(tiny_model, s3_prefix, "--max-attempts", 2) == 3
    summary = _summary(s3_prefix)
    assert list(summary["failed"]) == ["part-1b.parquet"]
    assert "the predictor process died 2 times while labelling this file" in summary["failed"]["part-1b.parquet"]
    assert summary["files_quarantined"] == ["part-1b.parquet"]
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
    # The next night does not burn its attempts again: quarantined at this version, listed, the night clean.
    assert _label(tiny_model, s3_prefix, "--max-attempts", 2) == 0
    summary = _summary(s3_prefix)
    assert (summary["files_labelled"], summary["files_failed"], summary["files_unchanged"]) == (0, 0, 3)
    assert summary["files_quarantined"] == ["part-1b.parquet"]


def test_many_small_files_are_packed_and_every_row_labelled_once(tiny_model, s3_prefix):
    """Promise: many small files are packed into few units and each still gets its own output."""
    rows = corpus(f"{s3_prefix}/in", [5] * 60)
    assert _label(tiny_model, s3_prefix, "--num-actors", 2, "--cpus-per-actor", 0.5) == 0
    summary = _summary(s3_prefix)
    assert summary["files_labelled"] == 60 and summary["units"] == 8  # 4 packs per actor, not 60 tasks
    assert len(_versions(s3_prefix)) == 60  # still one output per input file
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())


def test_gone_inputs_are_listed_then_pruned_and_a_failed_new_version_keeps_its_old_labels(tiny_model, s3_prefix):
    """Promise: deleted inputs are listed, pruned on request; a broken new version keeps its old labels."""
    rows = corpus(f"{s3_prefix}/in", [20, 20, 20])
    assert _label(tiny_model, s3_prefix, actors=None) == 0
    pool = _summary(s3_prefix)["pool"]  # no pool flags: sized to the tests' Ray (2 CPUs), recorded with the reason
    assert (pool["max_actors"], pool["threads"]) == (2, 1) and pool["why"].startswith("2 CPUs on 1 node(s)")
    storage.delete(resolve(f"{s3_prefix}/in/part-2.parquet"))
    storage.write_bytes(resolve(f"{s3_prefix}/in/part-1.parquet"), b"PAR1 not really")  # a broken new version
    assert _label(tiny_model, s3_prefix) == 3
    summary = _summary(s3_prefix)
    assert summary["inputs_gone"] == ["part-2.parquet"] and summary["files_kept_old_labels"] == ["part-1.parquet"]
    assert "unreadable Parquet" in summary["failed"]["part-1.parquet"]
    ids = rows["id"].to_pylist()
    _assert_exactly_once(s3_prefix, ids)  # the old labels of part-1 and of the gone part-2 are still there
    assert _label(tiny_model, s3_prefix, "--prune-gone") == 3
    summary = _summary(s3_prefix)
    assert summary["inputs_pruned"] == 1 and summary["inputs_gone"] == [] and summary["output_files"] == 2
    _assert_exactly_once(s3_prefix, ids[:40])
    put_parquet(f"{s3_prefix}/in/part-1.parquet", easy_rows(5, seed=8).append_column("id", [list(range(700, 705))]))
    assert _label(tiny_model, s3_prefix) == 0
    _assert_exactly_once(s3_prefix, ids[:20] + list(range(700, 705)))
