"""Multi-task end to end: one encoder, a head per task, trained on rows missing some labels; one labelling pass
labels every task, and evaluate scores each as the job labels it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from support.corpus import put_parquet, read_output, resolve
from textlabel.scratch import two_task_rows
from textlabel import calibration, storage
from textlabel.cli import evaluate_main, label_main, train_main
from textlabel.model import local_model_dir

pytestmark = pytest.mark.xdist_group("multitask")  # one worker: one model


@pytest.fixture(scope="module")
def wider_tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 64-wide random RoBERTa (byte-level BPE trained on the shipped sample; RobertaModel has a pooler). It
    learns both tasks by the third epoch (sentiment 0.69 / topic 0.95 after one, 1.0 / 1.0 after three): 4 are given."""
    from textlabel.scratch import tiny_model

    return tiny_model("roberta", tmp_path_factory.mktemp("tiny-roberta-64"), hidden=64, heads=4, intermediate=128)


@pytest.fixture(scope="module")
def two_task(ray_session, wider_tiny_model):
    prefix = "s3://tests/multitask"
    rows = two_task_rows(1500, seed=11, missing=0.15)
    put_parquet(f"{prefix}/data/part-0.parquet", rows)
    args = ["--data", f"{prefix}/data/", "--output", f"{prefix}/run", "--model", wider_tiny_model, "--label-column", "sentiment",
            "--label-column", "topic", "--num-workers", 1, "--epochs", 4, "--learning-rate", 2e-3, "--batch-size", 16,
            "--max-length", 32, "--head-learning-rate", 2e-3, "--early-stopping-patience", 0]
    assert train_main([str(a) for a in args]) == 0
    return {"prefix": prefix, "rows": rows, "metrics": storage.read_json(resolve(f"{prefix}/run/metrics.json"))}


def test_two_tasks_train_together_with_missing_labels_masked(two_task):
    """Promise: one run trains a head per label column, a missing label training nothing."""
    metrics, rows = two_task["metrics"], two_task["rows"]
    assert [t["name"] for t in metrics["tasks"]] == ["sentiment", "topic"]
    assert metrics["tasks"][1]["labels"] == ["acting", "music", "visuals"]
    both_missing = sum(s is None and t is None for s, t in zip(rows["sentiment"].to_pylist(), rows["topic"].to_pylist()))
    assert metrics["dropped_rows"]["data"] == {"no_label": both_missing}  # only rows with no label at all
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    final = metrics["validation"]  # the exported epoch's
    tasks = final["val_tasks"]
    # Each task is scored on its own labelled rows: fewer than the validation rows, since labels are missing.
    assert all(0.7 * final["val_rows"] < tasks[t]["rows"] < final["val_rows"] for t in tasks)
    assert tasks["sentiment"]["accuracy"] > 0.9 and tasks["topic"]["accuracy"] > 0.9  # chance: 0.5 and 0.33
    assert final["val_accuracy"] == pytest.approx((tasks["sentiment"]["accuracy"] + tasks["topic"]["accuracy"]) / 2)
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    run = resolve(f"{two_task['prefix']}/run")
    for name in ["model/textlabel_tasks.json", "model/heads.safetensors", "model/model.safetensors", "report/report.md",
                 "report/sentiment/confusion_matrix.png", "report/topic/report.md", "report/topic/training_curves.png"]:
        assert storage.exists(run.join(*name.split("/"))), name
    report = storage.read_bytes(run.join("report", "report.md")).decode()
    assert "[sentiment](sentiment/report.md)" in report and "[topic](topic/report.md)" in report
    # One temperature per task, fitted on that task's labelled validation rows.
    fitted = storage.read_json(run.join("model", "textlabel_calibration.json"))["tasks"]
    assert [(t["name"], t["rows"]) for t in fitted] == [(n, tasks[n]["rows"]) for n in ("sentiment", "topic")]
    assert all(t["temperature"] > 0 and t["nll_after"] <= t["nll_before"] for t in fitted)
    counts = storage.read_json(run.join("model", "textlabel_training_labels.json"))["tasks"]
    assert [len(t["counts"]) for t in counts] == [2, 3]
    assert storage.exists(run.join("report", "topic", "reliability.png"))


def test_one_pass_labels_every_task_in_int8_and_evaluate_scores_each_as_the_job_labels(two_task, s3_prefix):
    """Promise: one labelling pass labels every task (in int8 here), and evaluate.py scores each task with exactly
    the labels the labelling job gives."""
    truth = two_task_rows(300, seed=14, missing=0.2)
    put_parquet(f"{s3_prefix}/holdout.parquet", truth)
    model = f"{two_task['prefix']}/run/model"
    assert evaluate_main(["--model", model, "--data", f"{s3_prefix}/holdout.parquet", "--output", f"{s3_prefix}/eval",
                          "--max-length", "32", "--quantize"]) == 0
    assert label_main(["--model", model, "--input", f"{s3_prefix}/holdout.parquet", "--output", f"{s3_prefix}/out",
                       "--max-length", "32", "--label-prefix", "pred_", "--num-actors", "1", "--quantize"]) == 0
    labelled = read_output(f"{s3_prefix}/out")
    assert labelled.column_names == ["text", "sentiment", "topic", "pred_sentiment_label", "pred_sentiment_label_id",
                                     "pred_sentiment_score", "pred_topic_label", "pred_topic_label_id", "pred_topic_score",
                                     "pred_truncated", "pred_skip_reason"]
    metrics = storage.read_json(resolve(f"{s3_prefix}/eval/metrics.json"))
    for task, names in [("sentiment", ["negative", "positive"]), ("topic", ["acting", "music", "visuals"])]:
        ids = labelled[f"pred_{task}_label_id"].to_numpy()
        assert (np.array(names)[ids] == np.array(labelled[f"pred_{task}_label"].to_pylist())).all()
        y_true = np.array(labelled[task].to_pylist(), dtype=object)
        has = y_true != None  # noqa: E711  (rows with a label for this task)
        accuracy = np.mean(np.array(labelled[f"pred_{task}_label"].to_pylist(), dtype=object)[has] == y_true[has])
        assert metrics["tasks"][task]["rows"] == has.sum() < 300
        assert metrics["tasks"][task]["accuracy"] == pytest.approx(accuracy) and accuracy > 0.9
        # ECE of the scores the labelling job writes, binned as calibration.ece bins them.
        score = np.array(labelled[f"pred_{task}_score"].to_pylist())[has]
        correct = np.array(labelled[f"pred_{task}_label"].to_pylist(), dtype=object)[has] == y_true[has]
        # int8 quantizes each batch's activations with that batch's own scale: a row's score moves in the fourth
        # decimal with its batch-mates (its label does not: near ties are labelled again in full precision).
        assert list(metrics["tasks"][task]["scores"]["ece"].values()) == [pytest.approx(calibration.ece(score, correct), abs=1e-3)]
        assert storage.exists(resolve(f"{s3_prefix}/eval/{task}/confusion_matrix.png"))
    assert "[topic](topic/report.md)" in storage.read_bytes(resolve(f"{s3_prefix}/eval/report.md")).decode()


def test_multi_task_model_loads_in_plain_transformers_as_the_readme_shows(two_task):
    """Promise: a multi-task model loads in plain transformers as the README shows."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from textlabel.predict import Predictor, prepare

    model_dir = local_model_dir(f"{two_task['prefix']}/run/model")
    texts = two_task_rows(20, seed=13)["text"].to_pylist()
    # The README's snippet, as a user would write it:
    tasks = json.load(open(f"{model_dir}/textlabel_tasks.json"))["tasks"]
    encoder, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    heads = load_file(f"{model_dir}/heads.safetensors")
    with torch.no_grad():
        out = encoder(**tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        plain = {t["name"]: [t["labels"][i] for i in (pooled @ heads[f"{t['name']}.weight"].T + heads[f"{t['name']}.bias"]).argmax(-1)]
                 for t in tasks}
    ours = Predictor(model_dir, max_rows=8).label(prepare(model_dir, pa.array(texts), 128))
    assert plain == {"sentiment": ours["sentiment_label"].to_pylist(), "topic": ours["topic_label"].to_pylist()}
