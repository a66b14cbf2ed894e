"""labeller.py: how an actor cuts what it reads into windows (pure), and what one unit's bad cells, bad files and
failures cost (an in-process PartLabeller on local files: no Ray, no S3)."""

from __future__ import annotations

import dataclasses
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.corpus import easy_rows
from textlabel import predict, storage
from textlabel.labeller import LabellerSpec, PartLabeller
from textlabel.plan import Item, PartSpec, Unit
from textlabel.records import FileRecord, Status, file_record, keep_old_labels


def test_reading_windows_are_cut_by_rows_and_with_chunk_by_text_bytes_too():
    """Pure (no Ray, no S3): a window of long texts ends at the byte budget, so --long-texts chunk cannot hold
    8,192 rows x 64 model windows of token ids at once; ends and errors keep their place."""
    from textlabel.labeller import windows_of

    def rows(n: int, width: int):
        return "rows", (None, pa.record_batch({"text": ["x" * width] * n}))

    events = [rows(100, 10), rows(100, 10), ("end", "a"), rows(50, 20_000), rows(50, 20_000), ("error", "b"), rows(10, 10)]
    by_rows = list(windows_of(iter(events), "text", max_rows=200))
    assert [[k for k, _ in w] for w in by_rows] == [["rows", "rows"], ["end", "rows", "rows", "error", "rows"]]
    by_bytes = list(windows_of(iter(events), "text", max_rows=200, max_text_bytes=1_000_000))
    assert [[k for k, _ in w] for w in by_bytes] == [["rows", "rows"], ["end", "rows"], ["rows"], ["error", "rows"]]
    assert [e for w in by_bytes for e in w] == events  # nothing lost, nothing reordered


@pytest.fixture
def labeller(tiny_model, tmp_path):
    def make(rows_per_file: int = 1000) -> PartLabeller:
        spec = LabellerSpec(tiny_model, "tiny", str(tmp_path / "in"), "run-1", str(tmp_path / "out"), "text", "",
                            predict.output_columns([None]), None, 32, {"runtime": "torch"}, rows_per_file, 1 << 30, 2)
        return PartLabeller(dataclasses.asdict(spec))

    return make


def _item(tmp_path, name: str, *tables: pa.Table, part: PartSpec | None = None) -> Item:
    """An input file of one row group per table (an empty table: a row group of zero rows)."""
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    with pq.ParquetWriter(path, tables[0].schema) as writer:
        for table in tables:
            writer.write_table(table)
    return Item(name, str(path), path.stat().st_size, storage.local_fingerprint(path.stat()), part)


def _texts(n: int, seed: int = 1) -> pa.Table:
    return pa.table({"text": easy_rows(n, seed=seed)["text"]})


def _output(tmp_path, name: str) -> pa.Table:
    return pq.read_table(tmp_path / "out" / name)


def test_a_bad_cell_costs_one_row_and_a_file_that_fails_fails_alone(labeller, tmp_path, monkeypatch):
    """One pack: a non-UTF-8 string cell is one skipped row; a file whose rows fail to tokenize or to label, or
    whose text column holds numbers, fails alone and unwritten; an empty file is labelled into an empty output."""
    bad = pa.array([b"a fine film", b"\xff\xfe not text", b"a bad film"], pa.binary()).view(pa.string())
    items = [_item(tmp_path, "good.parquet", _texts(5)), _item(tmp_path, "bad-cell.parquet", pa.table({"text": bad})),
             _item(tmp_path, "no-tokens.parquet", pa.table({"text": pa.array(["x"] * 4, pa.large_string())})),
             _item(tmp_path, "numbers.parquet", pa.table({"text": [1, 2]})),
             _item(tmp_path, "empty.parquet", pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())})),
             _item(tmp_path, "no-labels.parquet", _texts(7, seed=2))]
    prepare = predict.prepare

    def tokenizer_failing_on_large_strings(model, column, *args):
        if pa.types.is_large_string(column.type):
            raise RuntimeError("the tokenizer crashed")
        return prepare(model, column, *args)

    monkeypatch.setattr(predict, "prepare", tokenizer_failing_on_large_strings)
    lab = labeller()
    score = lab.predictor.score

    def model_failing_on_seven_rows(prepared):  # the file of 7 rows, alone or with the others
        if len(prepared) >= 7:
            raise RuntimeError("the model crashed")
        return score(prepared)

    lab.predictor.score = model_failing_on_seven_rows
    results = {r.input: r for r in lab.label_unit(Unit(0, items))}
    assert {n for n, r in results.items() if r.error is None} == {"good.parquet", "bad-cell.parquet", "empty.parquet"}
    assert (results["good.parquet"].rows_out, results["good.parquet"].rows_skipped) == (5, {})
    assert (results["bad-cell.parquet"].rows_out, results["bad-cell.parquet"].rows_skipped) == (3, {"invalid_utf8": 1})
    labelled = _output(tmp_path, "bad-cell.parquet")
    assert labelled["skip_reason"].to_pylist() == [None, "invalid_utf8", None]
    assert labelled["label"].is_null().to_pylist() == [False, True, False]
    assert "could not prepare its rows: RuntimeError: the tokenizer crashed" in results["no-tokens.parquet"].error
    assert "could not label its rows: RuntimeError: the model crashed" in results["no-labels.parquet"].error
    assert "column 'text' is int64, not text" in results["numbers.parquet"].error
    assert sorted(os.listdir(tmp_path / "out")) == ["bad-cell.parquet", "empty.parquet", "good.parquet"]
    empty = _output(tmp_path, "empty.parquet")  # the input's columns and the labels', no rows
    assert empty.num_rows == 0 and empty.column_names == ["id", "text"] + predict.output_columns([None])
    assert empty.schema.field("label").type == pa.string() and empty.schema.field("score").type == pa.float32()
    listed = {"input": "empty.parquet", "size": items[4].size, "fingerprint": items[4].fingerprint}
    done = file_record(listed, [results["empty.parquet"]], "tiny", "run-1").record
    assert (done.status, done.outputs, done.rows_out) == (Status.DONE, ["empty.parquet"], 0)  # not retried
    # A failure that wrote nothing keeps the labels of the version before.
    failed = results["no-tokens.parquet"]
    assert not failed.maybe_written
    previous = FileRecord("no-tokens.parquet", "etag:0", 1, Status.DONE, ["no-tokens.parquet"], 4, 4)
    outcome = file_record({"input": failed.input, "size": 1, "fingerprint": failed.fingerprint}, [failed], "tiny", "run-1")
    assert keep_old_labels(outcome.record, previous, outcome.written).status == Status.STALE


def test_zero_row_groups_anywhere_are_skipped(labeller, tmp_path):
    none = _texts(6).slice(0, 0)
    item = _item(tmp_path, "f.parquet", none, _texts(6), none)  # split by the actor into parts of 3 rows
    results = sorted(labeller(rows_per_file=3).label_unit(Unit(0, [item])), key=lambda r: r.part)
    assert [(r.output, r.error, r.rows_out) for r in results] == [("f.part-00000.parquet", None, 3),
                                                                  ("f.part-00001.parquet", None, 3)]
    rows = [_output(tmp_path, r.output)["text"].to_pylist() for r in results]
    assert rows[0] + rows[1] == _texts(6)["text"].to_pylist()


class _Expiring(io.RawIOBase):
    """An S3 file as s3fs opens it, replaced after its footer was read: its next read is refused (If-Match)."""

    details = {"ETag": "etag"}

    def __init__(self, data: bytes):
        self.data, self.reads = io.BytesIO(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, *args) -> int:
        return self.data.seek(*args)

    def tell(self) -> int:
        return self.data.tell()

    def read(self, n: int = -1) -> bytes:
        from s3fs.utils import FileExpired

        self.reads += 1
        if self.reads > 1:
            try:
                raise OSError(22, "At least one of the pre-conditions you specified did not hold")
            except OSError as exc:
                raise FileExpired("tests/in/big.parquet", "etag") from exc
        return self.data.read(n)


def test_a_file_replaced_during_a_pinned_read_counts_as_changed_not_failed(labeller, tmp_path, monkeypatch):
    table = pa.table({"text": [os.urandom(200).hex() for _ in range(1000)]})  # beyond the footer's first read
    item = _item(tmp_path, "big.parquet", table, part=PartSpec(0, 1, 0, 1000, (0,)))
    monkeypatch.setattr(storage, "open_versioned", lambda loc, fingerprint: _Expiring(open(loc.path, "rb").read()))
    [result] = labeller().label_unit(Unit(0, [item]))
    assert result.changed and "FileExpired" in result.error
    outcome = file_record({"input": item.input, "size": item.size, "fingerprint": item.fingerprint}, [result], "tiny", "r")
    assert outcome.changed and outcome.record is None  # the next run labels its new version


def test_an_unexpected_error_distrusts_only_the_outputs_whose_write_had_started(labeller, tmp_path, monkeypatch):
    import textlabel.labeller as labeller_lib

    monkeypatch.setattr(labeller_lib, "WINDOW_ROWS", 1)  # a window per batch: a.parquet ends before b's rows fail
    items = [_item(tmp_path, "a.parquet", _texts(3)), _item(tmp_path, "b.parquet", _texts(3, seed=2))]
    lab = labeller()
    events = lab._events

    def lost_after_b_rows(found):
        for kind, value in events(found):
            yield kind, value
            if kind == "rows" and value[0].item.input == "b.parquet":
                raise RuntimeError("lost the connection")

    lab._events = lost_after_b_rows
    results = {r.input: r for r in lab.label_unit(Unit(0, items))}
    assert all("RuntimeError: lost the connection" in r.error for r in results.values())
    assert results["a.parquet"].maybe_written and not results["b.parquet"].maybe_written
