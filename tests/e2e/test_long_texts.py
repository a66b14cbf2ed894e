"""Long documents end to end (--long-texts chunk): train on windows, then label and evaluate whole documents,
through the jobs' entry points, S3 to S3, on a tiny BERT that reads 32 tokens at a time."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.corpus import FILLER, NEGATIVE, POSITIVE, document, documents, easy_rows, put_parquet, read_output, resolve
from textlabel import chunking, predict, storage
from textlabel.cli import evaluate_main, label_main, train_main

WINDOW = ["--max-length", "32", "--chunk-overlap", "8"]  # 30 content tokens a window, 22 new ones each

pytestmark = pytest.mark.xdist_group("long")  # one worker: one model


@pytest.fixture(scope="module")
def long_model(ray_session, tiny_model, s3_endpoint):
    """jobs/train.py --long-texts chunk on long documents and short rows, validated on held-out ones; then
    jobs/label.py --long-texts chunk on the validation rows (their entry points, on the session's Ray)."""
    prefix = "s3://tests/long-texts"
    put_parquet(f"{prefix}/train.parquet", pa.concat_tables([documents(300, seed=32), easy_rows(300, seed=31)]))
    put_parquet(f"{prefix}/val.parquet", pa.concat_tables([documents(100, seed=33), easy_rows(40, seed=34)]))
    model = f"{prefix}/run/model"
    assert train_main(["--data", f"{prefix}/train.parquet", "--validation-data", f"{prefix}/val.parquet",
                       "--output", f"{prefix}/run", "--model", tiny_model, "--epochs", "4", "--learning-rate", "3e-3",
                       "--head-learning-rate", "3e-3", "--early-stopping-patience", "0", "--num-workers", "1",
                       "--batch-size", "16", "--long-texts", "chunk", *WINDOW]) == 0
    assert label_main(["--model", model, "--input", f"{prefix}/val.parquet", "--output", f"{prefix}/val-labels",
                       "--label-prefix", "pred_", "--long-texts", "chunk", "--num-actors", "1", *WINDOW]) == 0
    return {"prefix": prefix, "model": model, "metrics": storage.read_json(resolve(f"{prefix}/run/metrics.json")),
            "val_labels": read_output(f"{prefix}/val-labels")}


def _accuracy(table: pa.Table, prefix: str = "") -> float:
    return float(np.mean(np.array(table[f"{prefix}label"].to_pylist()) == np.array(table["label"].to_pylist())))


def test_training_on_windows_reports_the_accuracy_labelling_delivers(long_model):
    """Promise: train.py --long-texts chunk learns from every window while
    its validation scores whole documents as the labelling job does: its reported accuracy is the job's."""
    assert [e["epoch"] for e in long_model["metrics"]["epochs"]] == [1, 2, 3, 4]
    final = long_model["metrics"]["validation"]  # the exported epoch's
    assert final["val_rows"] == 140 and final["val_accuracy"] > 0.9  # documents, not windows
    assert long_model["metrics"]["train_rows"] == 600
    counts = long_model["metrics"]["long_texts"]
    assert counts["train_windows"] >= 300 * 2 + 300 and counts["validation_rows_chunked"] == 100  # every document
    labelled = long_model["val_labels"]
    assert abs(_accuracy(labelled, "pred_") - final["val_accuracy"]) <= 1 / 140  # the same up to one borderline document
    report = storage.read_bytes(resolve(f"{long_model['prefix']}/run/report/report.md")).decode()
    chunks = np.array(labelled["pred_chunks"].to_pylist())
    assert (chunks > 1).sum() >= 100 and f"| chunked | {(chunks > 1).sum()} |" in report
    assert f"| one window | {(chunks == 1).sum()} |" in report


def test_a_label_past_the_first_window_is_read_with_chunk_and_missed_with_truncate(long_model, ray_session, s3_prefix):
    """Promise: --long-texts chunk labels a document by all of its text; truncate reads only its first window."""
    rng = random.Random(34)
    buried = documents(150, seed=35, words=(60, 100), after=40)  # the polar word after the first window
    prefix_words = " ".join(rng.choices(FILLER, k=45))  # a controlled pair: one first window, opposite labels
    pair = [f"{prefix_words} it was {POSITIVE[0]} indeed", f"{prefix_words} it was {NEGATIVE[0]} indeed"]
    huge = document(rng, "positive", 3000, after=2000)
    texts = buried["text"].to_pylist() + pair + ["a short and great one", None, "   ", huge]
    labels = buried["label"].to_pylist() + ["positive", "negative", "positive", None, None, "positive"]
    n = len(texts)
    put_parquet(f"{s3_prefix}/in/a.parquet", pa.table({"id": list(range(n)), "text": pa.array(texts, pa.string()),
                                                       "label": labels}))
    common = ["--model", long_model["model"], "--input", f"{s3_prefix}/in/", "--label-prefix", "pred_", "--num-actors", "1",
              *WINDOW]
    assert label_main([*common, "--output", f"{s3_prefix}/chunk", "--long-texts", "chunk", "--max-chunks", "16"]) == 0
    # Truncate sees filler in every first window and gives nearly every document one label: drift flags it (exit 4).
    assert label_main([*common, "--output", f"{s3_prefix}/truncate"]) == 4
    chunk, cut = (read_output(f"{s3_prefix}/{name}").sort_by("id") for name in ("chunk", "truncate"))
    assert chunk["id"].to_pylist() == cut["id"].to_pylist() == list(range(n))
    assert _accuracy(chunk.slice(0, 150), "pred_") > 0.9 and _accuracy(cut.slice(0, 150), "pred_") < 0.75
    assert chunk["pred_label"].to_pylist()[150:152] == ["positive", "negative"]  # both of the pair right...
    first_window = cut["pred_label"].to_pylist()[150:152]
    assert first_window[0] == first_window[1]  # ...where truncate sees one text twice, so one of them is wrong
    # Windows and skip reasons, row by row; the huge text scores at most --max-chunks windows, the rest counted.
    tok = predict.tokenizer_for(predict.model_lib.local_model_dir(long_model["model"]))
    tokens = [len(tok(t, add_special_tokens=False)["input_ids"]) if t else 0 for t in texts]
    windows = [len(chunking.spans(k, 30, 8, 10**6)[0]) for k in tokens]
    assert chunk["pred_chunks"].to_pylist() == windows[:153] + [None, None, 16]
    assert chunk["pred_skip_reason"].to_pylist()[-3:] == cut["pred_skip_reason"].to_pylist()[-3:] == [
        "null_text", "blank_text", None]
    assert chunk["pred_truncated"].to_pylist()[-4:] == [False, None, None, True]
    assert "pred_chunks" not in cut.column_names and all(cut["pred_truncated"].to_pylist()[:150])
    schema = pq.read_schema(pa.BufferReader(storage.read_bytes(resolve(f"{s3_prefix}/chunk/a.parquet"))))
    assert json.loads(schema.metadata[b"textlabel.long_texts"]) == {"mode": "chunk", "overlap": 8, "max_chunks": 16}
    summary = storage.read_json(resolve(f"{s3_prefix}/chunk").join("_summary.json"))
    assert summary["long_texts"] == "chunk" and summary["rows_chunked"] == sum(w > 1 for w in windows)
    assert summary["chunks_dropped"] == windows[-1] - 16 and summary["inference"]["windows"] == sum(windows[:153]) + 16
    assert summary["rows_skipped"] == {"null_text": 1, "blank_text": 1}


def test_evaluate_scores_long_documents_as_the_labelling_job_labels_them(long_model, ray_session, s3_prefix):
    """Promise: evaluate.py --long-texts chunk gives the labelling job's labels, and reports the chunked rows'
    accuracy beside the short ones'."""
    assert evaluate_main(["--model", long_model["model"], "--long-texts", "chunk", *WINDOW, "--data",
                          f"{long_model['prefix']}/val.parquet", "--output", f"{s3_prefix}/eval"]) == 0
    labelled = long_model["val_labels"]
    metrics = storage.read_json(resolve(f"{s3_prefix}/eval/metrics.json"))
    chunks = np.array(labelled["pred_chunks"].to_pylist())
    right = np.array(labelled["pred_label"].to_pylist()) == np.array(labelled["label"].to_pylist())
    assert metrics["accuracy"] == pytest.approx(right.mean()) and right.mean() > 0.9
    groups = metrics["by_length"]
    assert groups["chunked"] == {"rows": int((chunks > 1).sum()), "accuracy": pytest.approx(right[chunks > 1].mean())}
    assert groups["one window"] == {"rows": int((chunks == 1).sum()), "accuracy": pytest.approx(right[chunks == 1].mean())}
    assert metrics["long_texts"] == {"mode": "chunk", "rows_truncated": 0, "rows_chunked": int((chunks > 1).sum()),
                                     "windows": int(chunks.sum())}
    assert "## Long documents" in storage.read_bytes(resolve(f"{s3_prefix}/eval/report.md")).decode()
