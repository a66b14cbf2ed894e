"""Multi-task on TREC: one two-task model (coarse + fine question type) against two single-task models.

    .venv/bin/python benchmarks/multitask_trec.py --data ../shared/data/trec/train_5500.label
    .venv/bin/python benchmarks/multitask_trec.py        # the shipped 1,000-question sample

Holds out a seeded, coarse-stratified 20% of the questions, then runs jobs/train.py three
times with the same settings (packaged all-MiniLM-L6-v2, 2 workers): --label-column coarse
--label-column fine, --label-column coarse, --label-column fine. Reports each task's
held-out accuracy and macro-F1 for both, the TF-IDF + logistic regression baseline on the
same split (from the runs' reports) and each run's training time. Then labels every
question 4 times over (Parquet in and out) with the two-task model, and with the two
single-task models one after the other, and reports rows/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "trec"
SAMPLE = ROOT / "src" / "textlabel" / "demo_data" / "trec_sample.tsv"


def read_trec(path: str | None) -> pa.Table:
    """TREC's `COARSE:fine question` lines (Latin-1), or the shipped TSV sample."""
    if not path:
        return pacsv.read_csv(SAMPLE, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))
    texts, coarse, fine = [], [], []
    for line in Path(path).read_text(encoding="latin-1").splitlines():
        label, text = line.split(" ", 1)
        texts.append(text)
        coarse.append(label.split(":", 1)[0])
        fine.append(label)
    return pa.table({"text": texts, "coarse": coarse, "fine": fine})


def split(table: pa.Table, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(list(range(table.num_rows)), test_size=0.2, random_state=seed,
                                          stratify=table["coarse"].to_pylist())
    return table.take(sorted(train_idx)), table.take(sorted(val_idx))


def run_train(output: Path, data: Path, validation: Path, columns: list[str], extra: list[str]) -> dict:
    """jobs/train.py on 2 workers, one --label-column per task; its metrics.json with, for the exported model, each
    task's accuracy and macro-F1 and the TF-IDF baseline's (rounded), and the job's wall time."""
    shutil.rmtree(output, ignore_errors=True)
    args = [sys.executable, str(ROOT / "jobs/train.py"), "--data", str(data), "--validation-data", str(validation),
            "--output", str(output), "--num-workers", "2", *extra]
    for c in columns:
        args += ["--label-column", c]
    start = time.perf_counter()
    subprocess.run(args, check=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((output / "metrics.json").read_text())
    best = metrics["validation"]
    tasks = best.get("val_tasks") or {columns[0]: {"accuracy": best["val_accuracy"], "macro_f1": best["val_macro_f1"]}}
    baseline = metrics["baseline_tfidf_logreg"]
    baseline = baseline if len(columns) > 1 else {columns[0]: baseline}
    return {"metrics": metrics, "job_seconds": round(seconds, 1),
            "tasks": {t: {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)} for t, m in tasks.items()},
            "tfidf": {t: {"accuracy": round(b["accuracy"], 4), "macro_f1": round(b["macro_f1"], 4)} for t, b in baseline.items()}}


def train(name: str, columns: list[str], epochs: int, lr: float) -> dict:
    output = OUT / name
    run = run_train(output, OUT / "train.parquet", OUT / "val.parquet", columns,
                    ["--epochs", str(epochs), "--learning-rate", str(lr), "--head-learning-rate", str(lr),
                     "--early-stopping-patience", "0", "--max-length", "64"])
    metrics = run["metrics"]
    return {
        "tasks": run["tasks"], "tfidf": run["tfidf"],
        "train_seconds": round(sum(e["train_seconds"] for e in metrics["epochs"]), 1),
        "job_seconds": run["job_seconds"],
        "samples_per_second_per_worker": round(metrics["validation"]["samples_per_second_per_worker"], 1),
        "model": str(output / "model"),
    }


def label(models: list[str], rows: int) -> dict:
    """Label the corpus with each model in turn (a fresh job each, as a night would); rows/s overall."""
    seconds = 0.0
    for i, model in enumerate(models):
        output = OUT / f"labels-{i}"
        shutil.rmtree(output, ignore_errors=True)
        subprocess.run([sys.executable, str(ROOT / "jobs/label.py"), "--model", model, "--input", str(OUT / "corpus"),
                        "--output", str(output), "--max-length", "64", "--threads-per-actor", "2"], check=True)
        seconds += json.loads((output / "_summary.json").read_text())["seconds"]
    return {"models": len(models), "rows": rows, "seconds": round(seconds, 1), "rows_per_second": round(rows / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="TREC's train_5500.label (default: the shipped 1,000-question sample)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1.5e-4)
    parser.add_argument("--json-out", help="also write the figures to this file")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    table = read_trec(args.data)
    train_rows, val_rows = split(table)
    pq.write_table(train_rows, OUT / "train.parquet")
    pq.write_table(val_rows, OUT / "val.parquet")
    runs = {name: train(name, cols, args.epochs, args.learning_rate)
            for name, cols in [("two_task", ["coarse", "fine"]), ("coarse_only", ["coarse"]), ("fine_only", ["fine"])]}
    corpus = OUT / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir()
    texts = pa.table({"text": table["text"]})
    for i in range(4):
        pq.write_table(texts, corpus / f"part-{i}.parquet")
    labelling = {"two_task": label([runs["two_task"]["model"]], 4 * table.num_rows),
                 "two_single_task": label([runs["coarse_only"]["model"], runs["fine_only"]["model"]], 4 * table.num_rows)}
    labelling["speedup"] = round(labelling["two_task"]["rows_per_second"] / labelling["two_single_task"]["rows_per_second"], 2)
    figures = {"train_rows": train_rows.num_rows, "validation_rows": val_rows.num_rows, "epochs": args.epochs,
               "learning_rate": args.learning_rate, "runs": runs, "labelling": labelling}
    print(json.dumps(figures, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
