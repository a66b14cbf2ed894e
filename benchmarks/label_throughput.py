"""Labelling throughput: jobs/label.py against a plain transformers.pipeline loop, in one run.

    .venv/bin/python benchmarks/label_throughput.py                       # shipped SST-2 sample, 40k rows
    .venv/bin/python benchmarks/label_throughput.py --rows 67349 --data ../shared/data/sst2/train.tsv

Both label the same rows (Parquet in, Parquet out) with the same fine-tuned model.
Without --model, a model is fine-tuned once from the packaged all-MiniLM-L6-v2 on
the shipped SST-2 sample and kept under benchmarks/out/ for later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# One predictor actor with 2 torch threads; it reads and tokenizes the next batch in a thread beside them.
JOB_CONFIGS = ["--batch-size 64 --threads-per-actor 2", "--batch-size 64 --threads-per-actor 2 --quantize"]
OUT = ROOT / "benchmarks" / "out"
SAMPLE = ROOT / "src" / "textlabel" / "demo_data"


def read_texts(path: str | None) -> list[str]:
    """Texts from a TSV with a text column (SST-2's train.tsv calls it `sentence`)."""
    paths = [path] if path else [str(SAMPLE / "sst2_train.tsv"), str(SAMPLE / "sst2_dev.tsv")]
    texts: list[str] = []
    for p in paths:
        t = pacsv.read_csv(p, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))
        texts += t["text" if "text" in t.column_names else "sentence"].to_pylist()
    return texts


def write_corpus(texts: list[str], rows: int, directory: Path, rows_per_file: int = 10_000) -> None:
    """`rows` rows (the texts repeated as needed) as Parquet files with an id column."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    repeated = (texts * (rows // len(texts) + 1))[:rows]
    for i, start in enumerate(range(0, rows, rows_per_file)):
        chunk = repeated[start : start + rows_per_file]
        pq.write_table(pa.table({"id": np.arange(start, start + len(chunk)), "text": chunk}), directory / f"part-{i:04d}.parquet")


def ensure_model(model: str | None) -> str:
    if model:
        return model
    target = OUT / "sst2-model"
    if (target / "model" / "model.safetensors").is_file():
        return str(target / "model")
    # The demo's model: one epoch over the shipped 12,000-row sample (about 7 minutes on 2 cores).
    subprocess.run([sys.executable, str(ROOT / "jobs/train.py"), "--data", str(SAMPLE / "sst2_train.tsv"),
                    "--validation-data", str(SAMPLE / "sst2_dev.tsv"), "--output", str(target),
                    "--epochs", "1", "--learning-rate", "1e-4", "--max-length", "64"], check=True)
    return str(target / "model")


def run_pipeline(model: str, corpus: Path, output: Path) -> tuple[float, list[str]]:
    """The baseline: transformers.pipeline(batch_size=32) over the same rows, Parquet to Parquet."""
    from transformers import pipeline

    start = time.perf_counter()
    table = pads.dataset(str(corpus), format="parquet").to_table()
    classify = pipeline("text-classification", model=model, device="cpu", batch_size=32)
    labels = [p["label"] for p in classify(table["text"].to_pylist(), truncation=True, max_length=128)]
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.append_column("label", pa.array(labels)), output / "labels.parquet")
    return time.perf_counter() - start, labels


def local_ray_env() -> dict[str, str]:
    """The environment for a job that starts its own local Ray (as a user's laptop run does)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run_job(model: str, corpus: Path, output: Path, extra: list[str]) -> tuple[float, dict, pa.Table]:
    """jobs/label.py as a user runs it (its own local Ray), timed from launch to exit."""
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "jobs/label.py"), "--model", model, "--input", str(corpus),
                    "--output", str(output), *extra], check=True, env=local_ray_env())
    wall = time.perf_counter() - start
    summary = json.loads((output / "_summary.json").read_text())
    return wall, summary, pads.dataset(str(output), format="parquet").to_table().sort_by("id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--data", help="a TSV of texts (default: the shipped SST-2 sample, repeated)")
    parser.add_argument("--model", help="a fine-tuned model directory (default: fine-tune one once)")
    parser.add_argument("--job-args", action="append",
                        help="jobs/label.py options of one measured configuration; repeatable "
                             f"(default: {' and '.join(repr(c) for c in JOB_CONFIGS)})")
    args = parser.parse_args()

    model = ensure_model(args.model)
    corpus = OUT / "corpus"
    write_corpus(read_texts(args.data), args.rows, corpus)
    pipe_s, pipe_labels = run_pipeline(model, corpus, OUT / "pipeline-labels")
    print(f"pipeline: {args.rows / pipe_s:.1f} rows/s", flush=True)
    pipe_rate = args.rows / pipe_s
    results = []
    for job_args in args.job_args or JOB_CONFIGS:
        job_wall, summary, job = run_job(model, corpus, OUT / "job-labels", job_args.split())
        assert job.num_rows == args.rows and job["id"].to_pylist() == list(range(args.rows))
        agree = float(np.mean(np.array(job["label"].to_pylist()) == np.array(pipe_labels)))
        results.append({
            "job_args": job_args,
            "job_rows_per_s": summary["rows_per_second"],
            "job_rows_per_s_incl_ray_start": round(args.rows / job_wall, 1),
            "speedup": round(summary["rows_per_second"] / pipe_rate, 2),
            "speedup_incl_ray_start": round(pipe_s / job_wall, 2),
            "label_agreement_with_pipeline": round(agree, 4),
        })
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"rows": args.rows, "pipeline_rows_per_s": round(pipe_rate, 1), "jobs": results}, indent=2))


if __name__ == "__main__":
    main()
