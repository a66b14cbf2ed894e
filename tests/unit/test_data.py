"""Reading and checking training data (data.py), on local files: pure, no Ray, no S3."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from textlabel import data
from textlabel.storage import StorageError, resolve


@pytest.fixture
def parquet_prefix(tmp_path):
    (tmp_path / "corpus" / "day=1").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a b", "c d"], "label": ["x", "y"]}), tmp_path / "corpus/part-0.parquet")
    pq.write_table(pa.table({"text": ["e f"], "label": ["x"]}), tmp_path / "corpus/day=1/part-1.parquet")
    (tmp_path / "corpus/_SUCCESS").write_text("")
    return tmp_path / "corpus"


def test_reads_every_parquet_file_under_a_prefix(parquet_prefix):
    rows = data.read_labelled(f"file://{parquet_prefix}", "text", "label")
    assert sorted(rows.table["text"].to_pylist()) == ["a b", "c d", "e f"]


def test_reads_csv_with_quotes_and_tsv_without(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"hello, world",1\nplain,0\n')
    (tmp_path / "d.tsv").write_text('text\tlabel\nsays "hi\t1\nplain\t0\n')
    assert data.read_labelled(str(tmp_path / "d.csv"), "text", "label").table["text"].to_pylist() == ["hello, world", "plain"]
    assert data.read_labelled(str(tmp_path / "d.tsv"), "text", "label").table["text"].to_pylist() == ['says "hi', "plain"]


def test_missing_column_names_the_columns_that_exist(parquet_prefix):
    with pytest.raises(data.DataError, match=r"no column 'sentence'; the columns are: text, label"):
        data.read_labelled(str(parquet_prefix), "sentence", "label")


@pytest.mark.parametrize("name, content, message", [
    ("d.json", "{}", "unknown file type"),
    ("empty.csv", "text,label\n", "no rows"),
])
def test_bad_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.read_labelled(str(tmp_path / name), "text", "label")


def test_empty_prefix_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"no \*\.parquet files"):
        data.open_dataset(str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="not found"):
        data.open_dataset(str(tmp_path / "nope.parquet"))
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        resolve("gs://bucket/x")


def test_null_and_blank_rows_are_dropped_and_counted(tmp_path):
    table = pa.table({"text": ["good", None, "  ", "bad", "fine"], "label": ["pos", "neg", "neg", None, "pos"]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows = data.read_labelled(str(tmp_path / "d.parquet"), "text", "label")
    assert rows.table["text"].to_pylist() == ["good", "fine"]
    assert rows.dropped == {"null_text": 1, "blank_text": 1, "null_label": 1}


def test_label_map_is_sorted_stable_and_needs_two_classes(tmp_path):
    (tmp_path / "ints.csv").write_text("text,label\na,10\nb,2\nc,1\nd,2\n")
    rows = data.read_labelled(str(tmp_path / "ints.csv"), "text", "label")
    assert data.label_map(rows, "ints.csv") == ["1", "2", "10"]
    (tmp_path / "one.csv").write_text("text,label\na,x\nb,x\n")
    with pytest.raises(data.DataError, match="only one class"):
        data.label_map(data.read_labelled(str(tmp_path / "one.csv"), "text", "label"), "one.csv")


def test_validation_labels_must_be_known(tmp_path):
    (tmp_path / "v.csv").write_text("text,label\na,x\nb,zzz\n")
    rows = data.read_labelled(str(tmp_path / "v.csv"), "text", "label")
    with pytest.raises(data.DataError, match=r"labels \['zzz'\] do not occur"):
        data.encode_labels(rows, ["x", "y"], "v.csv")


def test_stratified_split_is_seeded_and_keeps_class_shares():
    ids = [0] * 80 + [1] * 20 + [2]  # class 2 has one row: it cannot be split, it trains
    table = pa.table({"text": [str(i) for i in range(len(ids))], "label_id": ids})
    train, val = data.stratified_split(table, 0.2, seed=0)
    again, _ = data.stratified_split(table, 0.2, seed=0)
    assert train.num_rows + val.num_rows == table.num_rows
    assert train["text"].to_pylist() == again["text"].to_pylist()
    assert val["label_id"].to_pylist().count(0) == 16 and val["label_id"].to_pylist().count(1) == 4
    assert 2 in train["label_id"].to_pylist()
    assert not set(train["text"].to_pylist()) & set(val["text"].to_pylist())


def test_s3_without_credentials_or_endpoint_fails_clearly(monkeypatch, tmp_path):
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="no AWS credentials found"):
        data.open_dataset("s3://bucket/train/")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="unreachable"):
        data.open_dataset("s3://bucket/train/")
