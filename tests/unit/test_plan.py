"""The planner and the records, as pure functions: milliseconds each, no Ray, no S3."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from textlabel import plan
from textlabel.records import (FileRecord, ItemResult, Status, adopted_record, file_record, keep_old_labels, part_name,
                               records_table)


def listing(files: dict[str, str]) -> pa.Table:
    names = sorted(files)
    found = pa.table({"path": [f"bucket/in/{n}" for n in names], "size": [100] * len(names),
                      "fingerprint": [files[n] for n in names]})
    return plan.relative(found, "bucket/in")


def state(*records: FileRecord) -> pa.Table:
    return records_table(list(records))


def rec(name: str, fp: str, status: Status = Status.DONE, outputs: list[str] | None = None) -> FileRecord:
    return FileRecord(name, fp, 100, status, [name] if outputs is None and status == Status.DONE else outputs or [])


def test_select_labels_new_changed_failed_and_half_replaced_files_only():
    found = listing({"same.parquet": "etag:1", "changed.parquet": "etag:2", "new.parquet": "etag:3",
                     "failed.parquet": "etag:4", "labelling.parquet": "etag:5", "stale.parquet": "etag:6"})
    recorded = state(rec("same.parquet", "etag:1"), rec("changed.parquet", "etag:1"), rec("failed.parquet", "etag:4", Status.FAILED),
                     rec("labelling.parquet", "etag:5", Status.LABELLING, ["labelling.parquet"]),
                     rec("stale.parquet", "etag:0", Status.STALE, ["stale.parquet"]), rec("gone.parquet", "etag:9"))
    sel = plan.select(found, recorded, root="bucket/in")
    assert [f.input for f in sel.pending] == ["changed.parquet", "failed.parquet", "labelling.parquet", "new.parquet",
                                              "stale.parquet"]
    assert sel.unchanged == 1 and sel.gone == ["gone.parquet"]
    assert sel.pending[0] == plan.Listed("changed.parquet", "bucket/in/changed.parquet", 100, "etag:2")
    assert sel.lost == [] and sel.orphans == []  # outputs not listed: not checked
    relabel = plan.select(found, recorded, relabel=True)
    assert len(relabel.pending) == 6 and relabel.unchanged == 0



def test_a_file_that_ended_its_actor_is_quarantined_at_its_version_keeping_its_old_labels():
    listed = {"input": "poison.parquet", "size": 100, "fingerprint": "etag:2"}
    given_up = ItemResult("poison.parquet", 0, 1, "poison.parquet", "etag:2", error="the predictor process died 3 times",
                          poison=True)
    record = file_record(listed, [given_up], "m", "run-2").record
    assert record.status == Status.QUARANTINED and record.fingerprint == "etag:2" and record.outputs == []
    kept = keep_old_labels(record, rec("poison.parquet", "etag:1"), written=[])
    assert kept.status == Status.QUARANTINED and kept.fingerprint == "etag:2" and kept.outputs == ["poison.parquet"]
    assert "died 3 times" in kept.error
    # The next nights: not retried at that version; retried when it changes, or when asked.
    recorded = state(kept, rec("fine.parquet", "etag:1"))
    same = plan.select(listing({"poison.parquet": "etag:2", "fine.parquet": "etag:1"}), recorded)
    assert same.pending == [] and same.quarantined == ["poison.parquet"] and same.unchanged == 1
    assert same.orphans == [] and plan.select(listing({"poison.parquet": "etag:2"}), recorded,
                                              present=pa.array(["poison.parquet", "fine.parquet"])).orphans == []
    changed = plan.select(listing({"poison.parquet": "etag:3", "fine.parquet": "etag:1"}), recorded)
    assert [f.input for f in changed.pending] == ["poison.parquet"] and changed.quarantined == []
    retried = plan.select(listing({"poison.parquet": "etag:2", "fine.parquet": "etag:1"}), recorded, retry_failed=True)
    assert [f.input for f in retried.pending] == ["poison.parquet"] and retried.quarantined == []
    failed = file_record(listed, [dataclasses.replace(given_up, poison=False)], "m", "run-2").record
    assert failed.status == Status.FAILED  # a plain failure (unreadable, say) is retried every night

def test_select_reads_fingerprints_recorded_before_inode_and_ctime_were_added():
    now = "size:10:mtime_ns:5:ino:77:ctime_ns:6"
    sel = plan.select(listing({"a.parquet": now, "b.parquet": now}),
                      state(rec("a.parquet", "size:10:mtime_ns:5"), rec("b.parquet", "size:10:mtime_ns:4")))
    assert [f.input for f in sel.pending] == ["b.parquet"] and sel.unchanged == 1


def test_select_with_listed_outputs_finds_missing_and_unrecorded_outputs():
    found = listing({"a.parquet": "etag:1", "b.parquet": "etag:1", "c.parquet": "etag:1"})
    recorded = state(rec("a.parquet", "etag:1"), rec("b.parquet", "etag:1", outputs=["b.part-00000.parquet", "b.part-00001.parquet"]),
                     rec("c.parquet", "etag:1", Status.LABELLING, ["c.parquet"]))
    present = pa.array(["a.parquet", "b.part-00000.parquet", "c.parquet", "zombie.parquet"])
    sel = plan.select(found, recorded, present=present)
    assert sel.lost == ["b.parquet"] and [f.input for f in sel.pending] == ["b.parquet", "c.parquet"]
    assert sel.orphans == ["c.parquet", "zombie.parquet"]  # a half-replaced file's output is no longer vouched for
    assert sel.unchanged == 1


def footer(*groups: tuple[int, int], columns=("id", "text")) -> plan.Footer:
    return plan.Footer(tuple(columns), tuple(groups))


def rows_of(parts: list[plan.PartSpec]) -> list[int]:
    return [r for p in parts for r in range(p.start, p.stop)]


@pytest.mark.parametrize("groups, most_rows, most_bytes, expected", [
    ([(100, 1000)], 250, 10**9, [(0, 100, (0,))]),
    ([(100, 1000)] * 4, 150, 10**9, [(0, 100, (0,)), (100, 200, (1,)), (200, 300, (2,)), (300, 400, (3,))]),
    ([(100, 1000)] * 4, 250, 10**9, [(0, 200, (0, 1)), (200, 400, (2, 3))]),
    ([(100, 1000)] * 4, 10**6, 2500, [(0, 200, (0, 1)), (200, 400, (2, 3))]),  # bytes bound the part too
    ([(10, 100), (1000, 10_000), (10, 100)], 400, 10**9, [(0, 10, (0,)), (10, 343, (1,)), (343, 676, (1,)),
                                                          (676, 1010, (1,)), (1010, 1020, (2,))]),  # one giant row group: slices
])
def test_split_cuts_at_row_groups_and_inside_a_giant_one(groups, most_rows, most_bytes, expected):
    parts = plan.split(footer(*groups), most_rows, most_bytes)
    assert [(p.start, p.stop, p.groups) for p in parts] == expected
    assert [(p.index, p.count) for p in parts] == [(k, len(expected)) for k in range(len(expected))]
    assert rows_of(parts) == list(range(sum(n for n, _ in groups)))  # every row in exactly one part


def test_split_bounds_a_ten_million_row_group_and_a_hundred_megabyte_cell():
    parts = plan.split(footer((10_000_000, 5 << 30)), 250_000, 256 << 20)
    assert len(parts) == 40 and max(p.stop - p.start for p in parts) <= 250_000
    assert rows_of(parts) == list(range(10_000_000))
    cell = plan.split(footer((3, 100 << 20)), 250_000, 16 << 20)  # a row group with a 100 MB text cell
    assert [p.stop - p.start for p in cell] == [1, 1, 1] and rows_of(cell) == [0, 1, 2]


def test_part_names_mirror_the_input_names():  # names no two inputs share: test_names.py
    assert part_name("a/b.parquet", 0, 1) == "a/b.parquet"
    assert part_name("a/b.parquet", 3, 12) == "a/b.part-00003.parquet"


def test_footer_checks_and_column_notes():
    assert "no column 'text' (columns: id, body)" in plan.check_footer(footer((1, 1), columns=("id", "body")), "text", [])
    assert plan.check_footer(footer(), "text", []) is None  # zero rows: labelled, into an empty output
    assert "pass --label-prefix" in plan.check_footer(footer((1, 1), columns=("text", "label")), "text", ["label", "score"])
    assert plan.check_footer(footer((1, 1)), "text", ["label"]) is None
    assert plan.columns_note(["text", "id"], ["id", "text"]) == "columns in another order than the run's first file"
    assert plan.columns_note(["id", "text", "x"], ["id", "text"]) == "columns differ from the run's first file: extra ['x']"
    assert plan.columns_note(["id", "text"], None) is None


def test_a_text_column_that_is_not_text_is_a_problem_naming_its_type(tmp_path):
    import pyarrow.parquet as pq

    def checked(column: pa.Array) -> str | None:
        pq.write_table(pa.table({"id": pa.array([1] * len(column)), "text": column}), tmp_path / "f.parquet")
        return plan.check_footer(plan.Footer.of(pq.ParquetFile(tmp_path / "f.parquet").metadata), "text", [])

    assert "column 'text' is int64, not text (string or binary); pass --text-column" in checked(pa.array([7]))
    assert "column 'text' is list<element: string>" in checked(pa.array([["x"]]))
    for column in (pa.array(["x"]), pa.array(["x"], pa.large_string()), pa.array([b"x"]), pa.array(["x"]).dictionary_encode(),
                   pa.nulls(1), pa.array([], pa.string())):
        assert checked(column) is None, column.type  # strings, bytes, all null, no rows at all


@pytest.mark.parametrize("groups, expected", [
    ([(0, 0), (6, 60), (0, 0)], [(0, 3, (1,)), (3, 6, (1,))]),  # before and after a sliced group
    ([(1, 10), (0, 0), (2, 20)], [(0, 3, (0, 2))]),  # between two groups of one part
    ([(6, 60), (0, 0), (2, 20)], [(0, 3, (0,)), (3, 6, (0,)), (6, 8, (2,))]),
    ([(0, 0), (0, 0)], [(0, 0, ())]),  # a file of zero rows: one part without rows
    ([], [(0, 0, ())]),
])
def test_zero_row_groups_are_in_no_part_and_an_empty_file_is_one_empty_part(groups, expected):
    parts = plan.split(footer(*groups), 3, 10**9)
    assert [(p.start, p.stop, p.groups) for p in parts] == expected
    assert [(p.index, p.count) for p in parts] == [(k, len(expected)) for k in range(len(expected))]


def small(n: int, size: int = 1000) -> list[plan.Listed]:
    return [plan.Listed(f"f-{i:05d}.parquet", f"b/f-{i:05d}.parquet", size, f"etag:{i}") for i in range(n)]


def test_small_files_are_packed_into_a_few_units_per_actor_each_file_once():
    files = small(5000)
    units = plan.make_units(files, {}, 250_000, 256 << 20, actors=2)
    assert 8 <= len(units) <= 10  # a few units per actor, not one per file
    names = [i.input for u in units for i in u.items]
    assert sorted(names) == [f.input for f in files]  # every file exactly once
    assert all(i.part is None for u in units for i in u.items)  # read whole by the actor
    few = plan.make_units(small(3), {}, 250_000, 256 << 20, actors=4)
    assert sorted(len(u.items) for u in few) == [1, 1, 1]  # fewer files than actors: one each
    capped = plan.make_units(small(3000, size=10), {}, 250_000, 256 << 20, actors=1)
    assert max(len(u.items) for u in capped) <= plan.PACK_FILES


def test_big_files_are_cut_into_parts_of_their_own_biggest_first():
    big = plan.Listed("big.parquet", "b/big.parquet", 64 << 20, "etag:b")
    files = [*small(30), big]  # enough files to pack: the big one is cut by the part limits alone
    units = plan.make_units(files, {"big.parquet": footer(*[(100_000, 100 << 20)] * 5)}, 250_000, 256 << 20, 2)
    parts = [u for u in units if u.items[0].part]
    assert len(parts) == 3 and units[0].items[0].input == "big.parquet"
    assert rows_of([u.items[0].part for u in parts]) == list(range(500_000))
    assert plan.Unit.from_json(parts[1].to_json()) == parts[1]


def _night(files: int, rows: int = 20_000) -> tuple[list[plan.Listed], dict[str, plan.Footer]]:
    listed = small(files, size=rows * 50)
    return listed, {f.input: footer((rows, rows * 50)) for f in listed}


@pytest.mark.parametrize("files", [1, 2, 8, 1000])
@pytest.mark.parametrize("actors", [1, 2, 64])
def test_every_actor_gets_a_few_units_when_the_rows_allow_each_row_in_exactly_one(files, actors):
    listed, footers = _night(files)
    units = plan.make_units(listed, footers, 250_000, 256 << 20, actors)
    total = 20_000 * files
    # UNITS_PER_ACTOR units per actor, or as many as MIN_PART_ROWS-row parts the night's rows make
    assert len(units) >= min(plan.UNITS_PER_ACTOR * actors, total // plan.MIN_PART_ROWS)
    spans: dict[str, list[tuple[int, int]]] = {}
    sizes = []
    for u in units:
        for i in u.items:
            spans.setdefault(i.input, []).append((i.part.start, i.part.stop) if i.part else (0, 20_000))
        sizes.append(sum(i.part.stop - i.part.start if i.part else 20_000 for i in u.items))
    for name, found in spans.items():  # each file's rows, end to end, once
        found.sort()
        assert found[0][0] == 0 and found[-1][1] == 20_000 and all(a[1] == b[0] for a, b in zip(found, found[1:])), name
    assert sorted(spans) == [f.input for f in listed]
    assert max(sizes) <= 2 * total / len(units)  # even shares: no actor waits on one big unit at the end
    cut = plan.cuts_files(files, actors)
    assert cut == (files < plan.UNITS_PER_ACTOR * actors)
    assert all((i.part is not None) == cut for u in units for i in u.items)  # cut from footers, or packed whole


def test_a_small_night_is_cut_no_finer_than_min_part_rows_and_a_tiny_one_stays_whole():
    listed, footers = _night(2, rows=3000)
    units = plan.make_units(listed, footers, 250_000, 256 << 20, actors=64)
    assert len(units) == 6 and all(u.items[0].part.stop - u.items[0].part.start == 1000 for u in units)
    tiny, tiny_footers = _night(1, rows=40)  # too small to cut: whole, read in one GET
    assert [[(i.input, i.part) for i in u.items] for u in plan.make_units(tiny, tiny_footers, 250_000, 256 << 20, 8)] == [
        [(tiny[0].input, None)]]
    mixed, mixed_footers = _night(2, rows=3000)
    mixed_footers[mixed[1].input] = footer((500, 25_000))  # 3,500 rows on 64 actors: shares of 1,024
    units = plan.make_units(mixed, mixed_footers, 250_000, 256 << 20, actors=64)
    assert sorted((i.input, i.part is None) for u in units for i in u.items) == [
        (mixed[0].input, False)] * 3 + [(mixed[1].input, True)]
    unknown = plan.make_units(listed, {}, 250_000, 256 << 20, actors=2)  # no footer: packed whole, never lost
    assert sorted(i.input for u in unknown for i in u.items) == [f.input for f in listed]


def result(part: int, parts: int, fp: str = "etag:1", **kw) -> ItemResult:
    name = "a.parquet" if parts == 1 else part_name("a.parquet", part, parts)
    return ItemResult("a.parquet", part, parts, name, fp, rows_in=10, rows_out=10, **kw)


LISTED = {"input": "a.parquet", "size": 100, "fingerprint": "etag:1"}


def test_a_files_results_fold_into_one_record():
    done = file_record(LISTED, [result(1, 2, rows_skipped={"null_text": 1}), result(0, 2, rows_truncated=2)], "m", "r")
    assert done.record.status == Status.DONE and not done.changed
    assert done.record.outputs == ["a.part-00000.parquet", "a.part-00001.parquet"]  # part order
    assert (done.record.rows_out, done.record.rows_skipped, done.record.rows_truncated) == (20, {"null_text": 1}, 2)
    failed = file_record(LISTED, [result(0, 2), result(1, 2, error="boom")], "m", "r")
    assert failed.record.status == Status.FAILED and failed.record.outputs == [] and failed.written == ["a.part-00000.parquet"]


def test_a_file_replaced_before_it_was_read_is_recorded_at_the_version_read():
    newer = file_record(LISTED, [result(0, 1, fp="etag:2")], "m", "r")
    assert newer.changed and newer.record.fingerprint == "etag:2" and newer.record.status == Status.DONE
    mixed = file_record(LISTED, [result(0, 2, fp="etag:1"), result(1, 2, fp="etag:2")], "m", "r")
    assert mixed.changed and mixed.record is None  # two versions in one output: not recorded, labelled next run
    refused = file_record(LISTED, [result(0, 1, changed=True, error="changed since listed")], "m", "r")
    assert refused.record is None


def test_a_changed_file_that_fails_keeps_its_old_labels_unless_they_were_overwritten():
    old = FileRecord("a.parquet", "etag:0", 100, Status.DONE, ["a.parquet"], 10, 10, model="m", run="r0")
    failed = file_record(LISTED, [result(0, 1, error="could not read it")], "m", "r1").record
    kept = keep_old_labels(failed, old, written=[])
    assert (kept.status, kept.fingerprint, kept.outputs, kept.error) == (Status.STALE, "etag:0", ["a.parquet"], "could not read it")
    assert keep_old_labels(failed, old, written=["a.parquet"]).status == Status.FAILED
    assert keep_old_labels(failed, None, written=[]).status == Status.FAILED


def meta(part: str, version: str = "etag:1", model: str = "m") -> dict[str, str]:
    return {"input": "a.parquet", "input_version": version, "part": part, "model": model, "run": "r0",
            "rows_in": "10", "rows_skipped": '{"null_text": 1}', "rows_truncated": "2"}


def test_outputs_a_killed_run_left_are_adopted_only_when_complete_and_current():
    whole = [("a.part-00001.parquet", meta("1/2")), ("a.part-00000.parquet", meta("0/2"))]
    record = adopted_record(LISTED, whole, "m")
    assert (record.status, record.outputs, record.rows_out) == (Status.DONE, ["a.part-00000.parquet", "a.part-00001.parquet"], 20)
    assert (record.rows_skipped, record.rows_truncated, record.run) == ({"null_text": 2}, 4, "r0")
    assert adopted_record(LISTED, whole[:1], "m") is None  # a part missing
    assert adopted_record(LISTED, [whole[0], ("a.part-00000.parquet", meta("0/2", version="etag:0"))], "m") is None
    assert adopted_record(LISTED, whole, "another model") is None
    assert adopted_record(LISTED, [("a.parquet", meta("0/2")), whole[0]], "m") is None  # not the name that part gets
