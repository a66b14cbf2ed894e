"""Shared fixtures: one S3 server on loopback, one local Ray, a tiny BERT, easy data.

The S3 server (behind a fault-injecting proxy, faultproxy.py) starts before Ray so
that every Ray worker inherits the AWS environment pointing at it, as workers on a
cluster inherit an instance profile.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from textlabel import storage

POSITIVE = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "charming", "excellent"]
NEGATIVE = ["awful", "dull", "tedious", "terrible", "boring", "clumsy", "lifeless", "painful"]
FILLER = ["the", "film", "movie", "plot", "acting", "was", "is", "really", "quite", "story", "a", "and", "cast"]


def easy_rows(n: int, seed: int = 0) -> pa.Table:
    """Sentiment rows a tiny model learns in seconds: one polar word among filler."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        words = rng.choices(FILLER, k=rng.randint(3, 10))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return pa.table({"text": texts, "label": labels})


TOPICS = {"acting": ["actor", "actress", "performance"], "music": ["music", "score", "song"],
          "visuals": ["camera", "colour", "scenery"]}


def two_task_rows(n: int, seed: int = 0, missing: float = 0.0) -> pa.Table:
    """Rows with two label sets: sentiment (a polar word) and topic (a topic word); a ``missing`` share
    of each task's labels is null, as rows from mixed sources have."""
    rng = random.Random(seed)
    base = easy_rows(n, seed)
    texts, topics = [], []
    for text in base["text"].to_pylist():
        topic = rng.choice(sorted(TOPICS))
        words = text.split()
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[topic]))
        texts.append(" ".join(words))
        topics.append(topic)
    sentiment = [None if rng.random() < missing else s for s in base["label"].to_pylist()]
    topics = [None if rng.random() < missing else t for t in topics]
    return pa.table({"text": texts, "sentiment": pa.array(sentiment, pa.string()), "topic": pa.array(topics, pa.string())})


@pytest.fixture(scope="session")
def s3_endpoint():
    """The S3 server, behind a fault-injecting proxy that passes everything until a test sets its fail_rate."""
    import os

    from faultproxy import FaultProxy
    from textlabel.s3server import local_s3

    with local_s3(buckets=("tests",)) as endpoint, FaultProxy(int(endpoint.rsplit(":", 1)[1])) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url  # local_s3 restores it on exit
        yield proxy


@pytest.fixture
def s3_faults(s3_endpoint):
    """The session's fault proxy; faults stop when the test ends."""
    yield s3_endpoint
    s3_endpoint.fail_rate = 0.0


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(s3_endpoint):
    """A real `ray start --head` (token auth on) that jobs are submitted to (rayhead.submit), shared by the session."""
    from rayhead import ray_head as start

    with start() as head:
        yield head


@pytest.fixture
def s3_prefix(s3_endpoint) -> str:
    """A fresh, empty s3:// prefix for one test."""
    return f"s3://tests/{uuid.uuid4().hex[:10]}"


_S3: list = []  # one S3 client for the test process: making one costs ~0.2 s


def resolve(url: str) -> storage.Location:
    """storage.resolve, sharing one S3 client across the tests' own reads and writes."""
    if not url.startswith("s3://"):
        return storage.resolve(url)
    if not _S3:
        _S3.append(storage.resolve("s3://tests").fs)
    path = url[len("s3://"):].rstrip("/")
    return storage.Location(url, _S3[0], path)


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with the packaged model's tokenizer (a few MB)."""
    from tinybert import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random GPT-2 with a byte-level BPE trained on the shipped sample, and no pad token (as
    the real gpt2 ships): a decoder, which classifies from each row's last token."""
    from families import tiny_model

    return tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (mlflowserver.py) for the session; its URL."""
    from mlflowserver import mlflow_server as start

    with start(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="session")
def trained(ray_session, tiny_gpt2, s3_endpoint, mlflow_server):
    """One 2-worker run of jobs/train.py from S3 to S3, shared by the tests that inspect it. Its base model is a
    GPT-2 (a decoder without a pad token: the family most unlike BERT); BERTs are trained end to end by
    test_long_texts.py and test_train.py's restart test, a RoBERTa by test_multitask.py."""
    prefix = "s3://tests/train-e2e"
    table = easy_rows(1200, seed=1)
    table = table.sort_by("label")  # one class after the other: training must shuffle globally
    put_parquet(f"{prefix}/data/part-0.parquet", table.slice(0, 600))
    put_parquet(f"{prefix}/data/part-1.parquet", table.slice(600))
    output = f"{prefix}/run"
    args = ["--data", f"{prefix}/data/", "--output", output, "--model", tiny_gpt2, "--num-workers", 2,
            "--epochs", 6, "--early-stopping-patience", 1, "--learning-rate", 3e-3, "--batch-size", 16, "--max-length", 32,
            # Tracked in MLflow, and the model registered as sentiment version 1 (test_tracking.py).
            "--mlflow-tracking-uri", mlflow_server, "--mlflow-experiment", "e2e", "--mlflow-register", "sentiment"]
    from textlabel.cli import train_main

    assert train_main([str(a) for a in args]) == 0
    return {"output": output, "args": args, "rows": table.num_rows, "mlflow": mlflow_server}
