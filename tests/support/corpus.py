"""Corpora the tests write to S3 (or a local folder) and read back, as a user's prefix holds them."""

from __future__ import annotations

import random
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from textlabel import storage
from textlabel.scratch import FILLER, NEGATIVE, POSITIVE, easy_rows

_S3: list = []  # one S3 client for the test process: making one costs ~0.2 s


def resolve(url: str) -> storage.Location:
    """storage.resolve, sharing one S3 client across the tests' own reads and writes."""
    if not url.startswith("s3://"):
        return storage.resolve(url)
    if not _S3:
        _S3.append(storage.resolve("s3://tests").fs)
    path = url[len("s3://"):].rstrip("/")
    return storage.Location(url, _S3[0], path)


def fresh_prefix() -> str:
    """A new, empty s3:// prefix in the tests' bucket."""
    return f"s3://tests/{uuid.uuid4().hex[:10]}"


def put_parquet(url: str, table: pa.Table, **options) -> None:
    loc = resolve(url)
    with loc.fs.open_output_stream(loc.path) as out:
        pq.write_table(table, out, **options)


def corpus(prefix: str, sizes: list[int], first_id: int = 0, seed: int = 100, name: str = "part") -> pa.Table:
    """Parquet files PREFIX/NAME-i.parquet with a unique id, the text, its true label and one more column."""
    parts, start = [], first_id
    for i, n in enumerate(sizes):
        t = easy_rows(n, seed=seed + i)
        t = pa.table({"id": pa.array(range(start, start + n), pa.int64()), "text": t["text"],
                      "label": t["label"], "source": pa.array([f"feed-{i}"] * n)})
        put_parquet(f"{prefix}/{name}-{i}.parquet", t)
        parts.append(t)
        start += n
    return pa.concat_tables(parts)


def read_output(url: str) -> pa.Table:
    """Every row a reader of the output prefix sees (visible *.parquet files; _ and . names are not data)."""
    import pyarrow.dataset as pads

    loc = resolve(url)
    files = [f.path for f in storage.list_files(loc, ".parquet")] if storage.exists(loc) else []
    return pads.dataset(files, filesystem=loc.fs).to_table() if files else pa.table({})


def document(rng: random.Random, label: str, words: int, after: int = 0) -> str:
    """Neutral filler with one polar word of ``label``, placed after the first ``after`` words."""
    text = rng.choices(FILLER, k=words)
    text.insert(rng.randint(after, words), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
    return " ".join(text)


def documents(n: int, seed: int, words: tuple[int, int] = (40, 90), after: int = 0) -> pa.Table:
    """Long documents (text, label): ``words`` words each, the one polar word anywhere after ``after``."""
    rng = random.Random(seed)
    labels = [rng.choice(["negative", "positive"]) for _ in range(n)]
    return pa.table({"text": [document(rng, y, rng.randint(*words), after) for y in labels], "label": labels})
