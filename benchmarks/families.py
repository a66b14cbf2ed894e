"""Every model family through the real jobs: train (2 workers), label (fp32 and --quantize), evaluate, pipeline().

    .venv/bin/python benchmarks/families.py                 # all eight families, about 8 minutes on 2 cores
    .venv/bin/python benchmarks/families.py --only gpt2 llama

For each family a tiny random model (2 layers, 64 wide; its tokenizer a byte-level BPE, WordPiece,
unigram or SentencePiece-style BPE trained on the shipped SST-2 sample: textlabel.scratch) is
fine-tuned by jobs/train.py with 2 Ray Train workers for 3 epochs on 1,200 rows of the test
suite's easy sentiment task (one polar word among filler: a random tiny model cannot learn SST-2
itself in minutes, and a model that predicts one class makes every agreement below trivial);
jobs/label.py labels 600 new rows, in full precision and with --quantize; jobs/evaluate.py
scores the model on the same rows; and the exported model is loaded in
transformers.pipeline("text-classification") and run batched. It reports, per family: the
validation accuracy training reported, the labelling job's accuracy, the evaluation job's
(which must be the same), the share of rows whose int8 label equals the fp32 one, and the share
of rows pipeline() labels as the job did. Then the same family as a two-task model (sentiment and
topic, 15% of each task's labels missing; 4 epochs) is trained with 2 workers and labels 600 new
rows with --quantize: each task's accuracy.

All jobs run in this process against one local Ray (as the test suite runs them).
Writes benchmarks/out/families/results.json and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "families"


def run_family(family: str, work: Path) -> dict:
    import pyarrow.dataset as pads
    from transformers import pipeline

    from textlabel.scratch import tiny_model
    from textlabel import storage
    from textlabel.cli import evaluate_main, label_main, train_main

    shutil.rmtree(work, ignore_errors=True)
    base = tiny_model(family, work / "base", hidden=64, heads=4, intermediate=128)
    start = time.perf_counter()
    assert train_main(["--data", str(OUT / "train.parquet"), "--output", str(work / "run"), "--model", base, "--epochs", "3",
                       "--learning-rate", "3e-3", "--head-learning-rate", "3e-3", "--early-stopping-patience", "0", "--batch-size", "16", "--max-length", "32"]) == 0
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    model = str(work / "run" / "model")
    labelled = {}
    for name, extra in (("fp32", []), ("int8", ["--quantize"])):
        assert label_main(["--model", model, "--input", str(OUT / "corpus"), "--output", str(work / name), "--max-length",
                           "32", "--max-drift", "1e9", *extra]) == 0
        labelled[name] = pads.dataset(str(work / name), format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    assert evaluate_main(["--model", model, "--data", str(OUT / "held_out.parquet"), "--output", str(work / "eval"),
                          "--max-length", "32"]) == 0
    evaluated = storage.read_json(storage.resolve(str(work / "eval" / "metrics.json")))
    truth = pq.read_table(OUT / "held_out.parquet")["label"].to_pylist()
    fp32 = labelled["fp32"]["label"].to_pylist()
    found = pipeline("text-classification", model=model, batch_size=32)(labelled["fp32"]["text"].to_pylist(), truncation=True,
                                                                        max_length=32)
    return {
        "model_type": metrics["model_family"]["model_type"], "pooling": metrics["model_family"]["pooling"],
        "validation_accuracy": round(metrics["epochs"][-1]["val_accuracy"], 4),
        "label_job_accuracy": round(float(np.mean(np.array(fp32) == np.array(truth))), 4),
        "evaluate_job_accuracy": round(evaluated["accuracy"], 4),
        "rows_labelled": labelled["fp32"].num_rows,
        "int8_same_label": round(float(np.mean(np.array(labelled["int8"]["label"].to_pylist()) == np.array(fp32))), 4),
        "pipeline_same_label": round(float(np.mean(np.array([r["label"] for r in found]) == np.array(fp32))), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_two_tasks(family: str, work: Path) -> dict:
    """The same family as a two-task model (sentiment and topic, 15% of each task's labels missing): train with 2
    workers, label with --quantize, each task's accuracy."""
    import pyarrow.dataset as pads

    from textlabel.cli import label_main, train_main

    base = str(work / "base")
    assert train_main(["--data", str(OUT / "two_tasks.parquet"), "--output", str(work / "two-task-run"), "--model", base,
                       "--label-column", "sentiment", "--label-column", "topic", "--epochs", "4", "--learning-rate", "2e-3",
                       "--head-learning-rate", "2e-3", "--early-stopping-patience", "0",
                       "--batch-size", "16", "--max-length", "32"]) == 0
    assert label_main(["--model", str(work / "two-task-run" / "model"), "--input", str(OUT / "two_task_corpus"), "--output",
                       str(work / "two-task-labels"), "--max-length", "32", "--max-drift", "1e9", "--quantize"]) == 0
    out = pads.dataset(str(work / "two-task-labels"), format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    truth = pq.read_table(OUT / "two_task_corpus" / "rows.parquet").sort_by("id")
    return {f"two_task_{t}_accuracy": round(float(np.mean(np.array(out[f"{t}_label"].to_pylist()) ==
                                                          np.array(truth[f"true_{t}"].to_pylist()))), 4)
            for t in ("sentiment", "topic")}


def main() -> None:
    from textlabel.scratch import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=FAMILIES)
    args = parser.parse_args()
    import ray

    from textlabel.cli import setup_logging

    setup_logging()
    from textlabel.scratch import easy_rows, two_task_rows

    OUT.mkdir(parents=True, exist_ok=True)
    pq.write_table(easy_rows(1200, seed=1), OUT / "train.parquet")
    held_out = easy_rows(600, seed=7)
    pq.write_table(held_out, OUT / "held_out.parquet")
    (OUT / "corpus").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(range(held_out.num_rows), pa.int64()), "text": held_out["text"]}),
                   OUT / "corpus" / "held_out.parquet")
    pq.write_table(two_task_rows(1200, seed=11, missing=0.15), OUT / "two_tasks.parquet")
    rows = two_task_rows(600, seed=12)
    (OUT / "two_task_corpus").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(range(600), pa.int64()), "text": rows["text"], "true_sentiment": rows["sentiment"],
                             "true_topic": rows["topic"]}), OUT / "two_task_corpus" / "rows.parquet")
    ray.init(num_cpus=2, include_dashboard=False)
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for family in args.only or FAMILIES:
        results[family] = run_family(family, OUT / family)
        results[family].update(run_two_tasks(family, OUT / family))
        results_path.write_text(json.dumps(results, indent=2))
        print(family, results[family], flush=True)
    print("\n| family | pooling | validation accuracy | label job | evaluate job | int8 = fp32 label | pipeline() = job label "
          "| two tasks, int8: sentiment / topic |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for family, r in results.items():
        print(f"| {family} | {r['pooling']} | {r['validation_accuracy']:.4f} | {r['label_job_accuracy']:.4f} | "
              f"{r['evaluate_job_accuracy']:.4f} | {r['int8_same_label']:.2%} | {r['pipeline_same_label']:.2%} | "
              f"{r['two_task_sentiment_accuracy']:.4f} / {r['two_task_topic_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
