"""Reading and checking labelled data: Parquet, CSV and TSV, local or on object storage."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from textlabel import storage

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used, with what is wrong and how to fix it."""


def _csv_format(delimiter: str) -> pads.CsvFileFormat:
    # TSV exports (GLUE among them) do not quote: a stray " must stay text.
    quote = '"' if delimiter == "," else False
    return pads.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote))


def open_dataset(url: str) -> pads.Dataset:
    """A pyarrow dataset over a Parquet file/prefix or a CSV/TSV file."""
    loc = storage.resolve(url)
    kind = storage.info(loc)
    if kind.type == pafs.FileType.NotFound:
        raise DataError(f"{url}: not found; check the path (a file, or a prefix holding *.parquet files)")
    if kind.type == pafs.FileType.Directory:
        files = storage.list_files(loc, ".parquet")
        if not files:
            raise DataError(f"{url}: no *.parquet files under this prefix; point at a Parquet file/prefix or a .csv/.tsv file")
        return pads.dataset([f.path for f in files], filesystem=loc.fs, format="parquet")
    name = loc.path.lower()
    if name.endswith(".parquet"):
        fmt: pads.FileFormat | str = "parquet"
    elif name.endswith(".csv"):
        fmt = _csv_format(",")
    elif name.endswith(".tsv"):
        fmt = _csv_format("\t")
    else:
        raise DataError(f"{url}: unknown file type; use .parquet (or a prefix of them), .csv or .tsv")
    return pads.dataset(loc.path, filesystem=loc.fs, format=fmt)


def read_columns(url: str, columns: list[str]) -> pa.Table:
    """Read only ``columns``, failing with the columns that exist when one is missing."""
    ds = open_dataset(url)
    missing = [c for c in columns if c not in ds.schema.names]
    if missing:
        raise DataError(
            f"{url}: no column {', '.join(map(repr, missing))}; the columns are: "
            f"{', '.join(ds.schema.names)}. Pass the right --text-column/--label-column."
        )
    try:
        return ds.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{url}: cannot read: {exc}") from exc


@dataclass
class LabelledRows:
    """Clean labelled rows: ``text`` (str) and ``label`` (str) columns, plus what was dropped."""

    table: pa.Table
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def _label_names(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_floating(column.type):
        # Integer labels read through CSV with nulls come back as floats: 1.0 -> "1".
        try:
            return pc.cast(pc.cast(column, pa.int64()), pa.string())
        except pa.ArrowInvalid as exc:
            raise DataError(f"labels must be names or integers, not fractions ({exc}); check --label-column") from exc
    return pc.cast(column, pa.string())


def read_labelled(url: str, text_column: str, label_column: str) -> LabelledRows:
    """Read text and label columns; drop (and count) rows with a null/blank text or null label."""
    return read_multilabelled(url, text_column, [label_column], names=["label"], no_label="null_label")


def read_multilabelled(url: str, text_column: str, label_columns: list[str], names: list[str] | None = None,
                       no_label: str = "no_label") -> LabelledRows:
    """Text and one or more label columns (one per task, named ``names`` or as in the data); a row needs a
    text and at least one label. Rows without are dropped and counted; a null label only masks that task."""
    table = read_columns(url, [text_column, *label_columns])
    if table.num_rows == 0:
        raise DataError(f"{url}: no rows")
    if not (pa.types.is_string(table[text_column].type) or pa.types.is_large_string(table[text_column].type)):
        raise DataError(f"{url}: column {text_column!r} holds {table[text_column].type}, not text; pass the right --text-column")
    text = table[text_column]
    null_text = pc.is_null(text)
    blank_text = pc.and_(pc.invert(null_text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    unlabelled = pc.is_null(table[label_columns[0]])
    for c in label_columns[1:]:
        unlabelled = pc.and_(unlabelled, pc.is_null(table[c]))
    bad_text = pc.or_(null_text, blank_text)
    dropped = {
        "null_text": pc.sum(null_text).as_py() or 0,
        "blank_text": pc.sum(blank_text).as_py() or 0,
        no_label: pc.sum(pc.and_(unlabelled, pc.invert(bad_text))).as_py() or 0,
    }
    clean = pa.table({"text": text, **{n: _label_names(table[c]) for n, c in zip(names or label_columns, label_columns)}})
    clean = clean.filter(pc.invert(pc.or_(bad_text, unlabelled)))
    dropped = {k: v for k, v in dropped.items() if v}
    if dropped:
        logger.warning("%s: dropped %d of %d rows: %s", url, sum(dropped.values()), table.num_rows, dropped)
    if clean.num_rows == 0:
        raise DataError(f"{url}: no usable rows: every row has a null or blank text or no label ({dropped})")
    return LabelledRows(clean, dropped)


def label_map(rows: LabelledRows, url: str, column: str = "label") -> list[str]:
    """The sorted, stable list of label names (numeric labels sort as numbers)."""
    names = [n for n in pc.unique(rows.table[column]).to_pylist() if n is not None]
    if len(names) < 2:
        which = "" if column == "label" else f" in {column!r}"
        raise DataError(f"{url}: only one class{which} ({names[0]!r}); a classifier needs at least two. Check --label-column"
                        if names else f"{url}: no labels{which}; check --label-column")
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=int) if numeric else sorted(names)


def encode_labels(rows: LabelledRows, labels: list[str], url: str) -> pa.Table:
    """``text`` plus an int ``label_id`` column; unknown labels are an error naming them."""
    return pa.table({"text": rows.table["text"], "label_id": label_ids(rows.table["label"], labels, url)})


def label_ids(column: pa.ChunkedArray, labels: list[str], url: str) -> pa.Array:
    """Label names to ids (a null label is -1: masked); unknown labels are an error naming them."""
    ids = pc.index_in(column, value_set=pa.array(labels))
    unknown = [u for u in pc.unique(column.filter(pc.is_null(ids))).to_pylist() if u is not None]
    if unknown:
        raise DataError(f"{url}: labels {unknown[:10]} do not occur in the training data (labels: {labels[:20]})")
    return pc.fill_null(pc.cast(ids, pa.int64()), -1)


def to_dataset(table: pa.Table, blocks: int):
    """A Ray Dataset of ``table`` in about ``blocks`` blocks (so shards and shuffles have something to mix)."""
    import ray

    size = max(1, -(-table.num_rows // blocks))
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])


def stratify_column(table: pa.Table) -> str:
    """The first task's label ids: what a multi-task split keeps the shares of."""
    return next(c for c in table.column_names if c.startswith("label_id:"))


def stratified_split(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Seeded split keeping each class's share; classes too small to split stay in training."""
    from sklearn.model_selection import train_test_split

    ids = table["label_id" if "label_id" in table.column_names else stratify_column(table)].to_numpy() + 1  # -1: no label
    index = np.arange(table.num_rows)
    counts = np.bincount(ids)
    splittable = counts[ids] >= 2
    try:
        train_idx, val_idx = train_test_split(
            index[splittable], test_size=fraction, random_state=seed, stratify=ids[splittable]
        )
    except ValueError as exc:
        raise DataError(f"cannot hold out a stratified --val-fraction {fraction} of {table.num_rows} rows ({exc}); "
                        "pass more rows, a larger --val-fraction or --validation-data") from exc
    train_idx = np.concatenate([train_idx, index[~splittable]])
    return table.take(np.sort(train_idx)), table.take(np.sort(val_idx))
