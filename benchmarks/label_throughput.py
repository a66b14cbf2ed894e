"""Labelling throughput: jobs/label.py against a plain transformers.pipeline loop, alternated, in one run.

    .venv/bin/python benchmarks/label_throughput.py                       # shipped SST-2 sample, 40k rows
    .venv/bin/python benchmarks/label_throughput.py --rows 67349 --data ../shared/data/sst2/train.tsv
    .venv/bin/python benchmarks/label_throughput.py --rounds 0 --long-documents 2000   # the long-document row alone
    .venv/bin/python benchmarks/label_throughput.py --layout --rounds 2 --long-documents 0   # few big files or many small

Both label the same rows (Parquet in, Parquet out) with the same fine-tuned model. Each round
runs the pipeline script, then every job configuration (with the job's defaults otherwise: the
pool sized to the machine); --rounds rounds. A job's figures come from its _summary.json, with a
profile of where its wall time went (per actor: starting, reading, tokenizing, model, writing,
waiting for input; the rest is Ray and the driver). The long-document row labels
--long-documents documents of 9-25 SST-2 sentences (benchmarks/long_documents.py's "reviews", about
4 windows of 128 tokens each) with --long-texts truncate and with chunk: rows/s and windows/s. Without --model, a model is fine-tuned once
from the packaged all-MiniLM-L6-v2 on the shipped SST-2 sample and kept under benchmarks/out/.

--layout instead labels the same --rows rows laid out as 2 files, 8 files and 2,000 files (LAYOUTS),
alternated --rounds times, with the job's defaults: rows/s, units, and per actor (from the summary's
``pool``) when it was ready, when it got its first unit and its busy share of the night. Every
figure names the host's CPU and instruction set.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
# The job's defaults (ONNX Runtime on CPU), int8, and both on the torch runtime side by side.
JOB_CONFIGS = ["", "--quantize", "--runtime torch", "--quantize --runtime torch"]
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


def write_corpus(texts: list[str], rows: int, directory: Path, rows_per_file: int = 5_000) -> None:
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
                    "--epochs", "1", "--learning-rate", "1e-4", "--head-learning-rate", "1e-4", "--max-length", "64"], check=True)
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
    # --max-drift 1e9: a throughput figure, not a drift verdict
    subprocess.run([sys.executable, str(ROOT / "jobs/label.py"), "--model", model, "--input", str(corpus),
                    "--output", str(output), *extra, "--max-drift", "1e9"], check=True, env=local_ray_env())
    wall = time.perf_counter() - start
    summary = json.loads((output / "_summary.json").read_text())
    return wall, summary, pads.dataset(str(output), format="parquet").to_table().sort_by("id")


def profile(summary: dict) -> dict[str, float]:
    """Where the job's wall time went, in seconds per actor (reading and tokenizing run beside the model)."""
    inf, actors = summary["inference"], summary["pool"]["max_actors"]
    per = {k.removesuffix("_seconds"): round(inf.get(k, 0.0) / actors, 1)
           for k in ("init_seconds", "read_seconds", "tokenize_seconds", "model_seconds", "write_seconds", "input_wait_seconds")}
    busy = per["init"] + per["model"] + per["input_wait"]
    return {"wall": summary["seconds"], **per, "ray_and_driver": round(summary["seconds"] - busy, 1)}


def long_documents(model: str, docs: int) -> list[dict]:
    """The job's defaults on long documents, with --long-texts truncate and chunk: rows/s and windows/s."""
    import random

    from long_documents import DEMO, _sst2, reviews

    texts, _ = reviews(_sst2(DEMO / "sst2_dev.tsv"), docs, random.Random(0))
    corpus = OUT / "corpus-long"
    write_corpus(texts, docs, corpus, rows_per_file=250)
    rows = []
    for mode in ("truncate", "chunk"):
        _, summary, job = run_job(model, corpus, OUT / "job-labels-long", ["--long-texts", mode])
        assert job.num_rows == docs and job["id"].to_pylist() == list(range(docs))
        inf = summary["inference"]
        rows.append({"long_texts": mode, "rows": docs, "rows_per_s": summary["rows_per_second"],
                     "windows_per_s": round(inf["windows"] / summary["seconds"], 1), "windows": inf["windows"],
                     "rows_truncated": summary["rows_truncated"], "rows_chunked": summary["rows_chunked"],
                     "real_tokens_per_model_second": inf["real_tokens_per_model_second"], "profile_seconds": profile(summary)})
        print(f"long documents, --long-texts {mode}: {json.dumps(rows[-1])}", flush=True)
    return rows


LAYOUTS = (2, 8, 2000)  # files the --rows rows are laid out in


def host() -> str:
    """This machine, as the README's figures name it: CPU model, instruction set, cores."""
    from textlabel import runtime

    model, flags = runtime.cpu_flags()
    return f"{model or 'unknown CPU'}, {' '.join(runtime.isa_of(flags)) or 'no AVX2'}, {os.cpu_count()} cores"


def layouts(model: str, texts: list[str], rows: int, rounds: int) -> dict:
    """The same rows as few big files and many small ones, alternated: the pool kept busy in each?"""
    runs: dict[int, list[dict]] = {n: [] for n in LAYOUTS}
    for files in LAYOUTS:
        write_corpus(texts, rows, OUT / f"corpus-{files}", rows_per_file=-(-rows // files))
    for round_ in range(rounds):
        for files in LAYOUTS:
            _, summary, job = run_job(model, OUT / f"corpus-{files}", OUT / "job-labels-layout", [])
            assert job.num_rows == rows and job["id"].to_pylist() == list(range(rows))
            pool = summary["pool"]
            run = {"files": files, "rows_per_file": -(-rows // files), "rows_per_s": summary["rows_per_second"],
                   "units": summary["units"], "actors": len(pool.get("actors", [])),
                   "busy_share": [a["busy_share"] for a in pool.get("actors", [])],
                   "ready_s": [a["ready_s"] for a in pool.get("actors", [])],
                   "first_unit_s": [a["first_unit_s"] for a in pool.get("actors", [])],
                   "units_per_actor": [a["units"] for a in pool.get("actors", [])],
                   "labelling_s": pool.get("labelling_s"), "seconds": summary["seconds"],
                   "isa": sorted({a.get("isa", "") for a in pool.get("actors", [])})}
            runs[files].append(run)
            print(f"round {round_ + 1} layout {files} files: {json.dumps(run)}", flush=True)
    table = [{"files": n, "rows_per_file": rs[0]["rows_per_file"],
              "rows_per_s": round(float(np.mean([r["rows_per_s"] for r in rs])), 1),
              "units": rs[0]["units"], "busy_share_min": min(min(r["busy_share"] or [0.0]) for r in rs),
              "busy_share_per_round": [r["busy_share"] for r in rs]} for n, rs in runs.items() if rs]
    best = max((t["rows_per_s"] for t in table), default=0.0)
    for t in table:
        t["vs_best"] = round(t["rows_per_s"] / best, 3) if best else 0.0
    return {"host": host(), "rows": rows, "rounds": rounds, "layouts": table, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", help="a TSV of texts (default: the shipped SST-2 sample, repeated)")
    parser.add_argument("--model", help="a fine-tuned model directory (default: fine-tune one once)")
    parser.add_argument("--job-args", action="append",
                        help="jobs/label.py options of one measured configuration; repeatable "
                             f"(default: {' and '.join(repr(c) for c in JOB_CONFIGS)})")
    parser.add_argument("--long-documents", type=int, default=2000, help="documents in the long-document row (0: none)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--layout", action="store_true",
                        help=f"compare the same rows as {', '.join(map(str, LAYOUTS))} files instead (the job's defaults)")
    args = parser.parse_args()

    model = ensure_model(args.model)
    if args.layout:
        result = layouts(model, read_texts(args.data), args.rows, args.rounds)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    corpus = OUT / "corpus"
    write_corpus(read_texts(args.data), args.rows, corpus)
    configs = args.job_args or JOB_CONFIGS
    pipe_rates, runs = [], {c: [] for c in configs}
    for round_ in range(args.rounds):
        pipe_s, pipe_labels = run_pipeline(model, corpus, OUT / "pipeline-labels")
        pipe_rates.append(args.rows / pipe_s)
        print(f"round {round_ + 1} pipeline: {pipe_rates[-1]:.1f} rows/s", flush=True)
        for job_args in configs:
            job_wall, summary, job = run_job(model, corpus, OUT / "job-labels", job_args.split())
            assert job.num_rows == args.rows and job["id"].to_pylist() == list(range(args.rows))
            agree = float(np.mean(np.array(job["label"].to_pylist()) == np.array(pipe_labels)))
            run = {"rows_per_s": summary["rows_per_second"], "rows_per_s_incl_process_start": round(args.rows / job_wall, 1),
                   "speedup_vs_this_rounds_pipeline": round(summary["rows_per_second"] / pipe_rates[-1], 2),
                   "label_agreement_with_pipeline": round(agree, 4), "rechecked": summary["inference"].get("rechecked", 0),
                   "pool": summary["pool"]["why"], "padding_share": summary["inference"]["padding_share"],
                   "profile_seconds": profile(summary)}
            runs[job_args].append(run)
            print(f"round {round_ + 1} job {job_args or '(defaults)'}: {json.dumps(run)}", flush=True)
    long_rows = long_documents(model, args.long_documents) if args.long_documents else []
    pipe_rate = float(np.mean(pipe_rates)) if pipe_rates else float("nan")
    jobs = [{"job_args": c or "(defaults)", "rows_per_s": round(float(np.mean([r["rows_per_s"] for r in rs])), 1),
             "speedup": round(float(np.mean([r["rows_per_s"] for r in rs])) / pipe_rate, 2),
             "speedup_per_round": [r["speedup_vs_this_rounds_pipeline"] for r in rs],
             "label_agreement_with_pipeline": min(r["label_agreement_with_pipeline"] for r in rs),
             "profile_seconds": rs[-1]["profile_seconds"]} for c, rs in runs.items() if rs]
    result = {"host": host(), "rows": args.rows, "files": len(list(corpus.glob("*.parquet"))), "rounds": args.rounds,
              "pipeline_rows_per_s": round(pipe_rate, 1), "pipeline_rows_per_s_per_round": [round(r, 1) for r in pipe_rates],
              "jobs": jobs, "runs": runs, "long_documents": long_rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
