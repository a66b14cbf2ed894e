"""LoRA against full fine-tuning on the same rows: trainable parameters, memory per worker, speed, accuracy.

    .venv/bin/python benchmarks/lora.py
    .venv/bin/python benchmarks/lora.py --sst2 ../shared/data/sst2 --rows 4000

Runs jobs/train.py (packaged all-MiniLM-L6-v2, 2 CPU workers, 3 epochs, --max-length 64) on the
first --rows rows of the shipped SST-2 sample (or of --sst2's train.tsv), validated on the shipped
872-row SST-2 dev set, three times: full fine-tuning at the default learning rate (5e-5), and
--lora (rank 8, alpha 16, query and value projections) at 5e-4 and 2e-3 (LoRA's updates start
at zero and want a larger rate). Peak memory is each worker process's peak resident set
(metrics.json, peak_rss_mb_per_worker): the model, its gradients, AdamW's two moments and the
activations, plus the Python, torch and Ray runtime every worker carries.

Writes benchmarks/out/lora/results.json and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "lora"
RUNS = {
    # Every layer at one rate and a fixed 3 epochs, as when the README's figures were measured.
    "full fine-tuning, lr 5e-5": ["--learning-rate", "5e-5", "--head-learning-rate", "5e-5"],
    "LoRA r=8, lr 5e-4": ["--lora", "--learning-rate", "5e-4", "--head-learning-rate", "5e-4"],
    "LoRA r=8, lr 2e-3": ["--lora", "--learning-rate", "2e-3", "--head-learning-rate", "2e-3"],
}


def _tsv(path) -> pa.Table:
    table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))
    labels = [str(v) for v in table["label"].to_pylist()]
    labels = [{"0": "negative", "1": "positive"}.get(v, v) for v in labels]
    return pa.table({"text": table["text" if "text" in table.column_names else "sentence"], "label": labels})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sst2", type=Path, help="SST-2 directory with train.tsv (default: the shipped 12,000-row sample)")
    parser.add_argument("--rows", type=int, default=2000, help="training rows (default 2000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", choices=sorted(RUNS), help="one run")
    args = parser.parse_args()
    shipped = resources.files("textlabel") / "demo_data"
    OUT.mkdir(parents=True, exist_ok=True)
    train = _tsv(args.sst2 / "train.tsv" if args.sst2 else shipped / "sst2_train.tsv").slice(0, args.rows)
    pq.write_table(train, OUT / "train.parquet")
    pq.write_table(_tsv(shipped / "sst2_dev.tsv"), OUT / "dev.parquet")
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, extra in RUNS.items():
        if args.only and name != args.only:
            continue
        output = OUT / name.replace(" ", "_").replace(",", "").replace("=", "")
        shutil.rmtree(output, ignore_errors=True)
        command = [sys.executable, str(ROOT / "jobs/train.py"), "--data", str(OUT / "train.parquet"), "--validation-data",
                   str(OUT / "dev.parquet"), "--output", str(output), "--epochs", str(args.epochs), "--max-length", "64",
                   "--early-stopping-patience", "0", *extra]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        metrics = json.loads((output / "metrics.json").read_text())
        final = metrics["epochs"][-1]
        results[name] = {
            "train_rows": metrics["train_rows"], "validation_rows": metrics["validation_rows"],
            "trainable_parameters": metrics["parameters"]["trainable"], "total_parameters": metrics["parameters"]["total"],
            "peak_rss_mb_per_worker": max(max(e["peak_rss_mb_per_worker"]) for e in metrics["epochs"]),
            "samples_per_second_per_worker": round(sum(e["samples_per_second_per_worker"] for e in metrics["epochs"][1:] or
                                                       metrics["epochs"]) / max(len(metrics["epochs"]) - 1, 1), 1),
            "val_accuracy": round(final["val_accuracy"], 4), "val_macro_f1": round(final["val_macro_f1"], 4),
            "wall_seconds": metrics["wall_seconds"],
            "adapter_bytes": sum(f.stat().st_size for f in (output / "adapter").glob("*")) if (output / "adapter").is_dir() else None,
        }
        results_path.write_text(json.dumps(results, indent=2))
    print("\n| run | trainable parameters | peak memory per worker | samples/s per worker | dev accuracy | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['trainable_parameters']:,} of {r['total_parameters']:,} | {r['peak_rss_mb_per_worker']:,.0f} MB | "
              f"{r['samples_per_second_per_worker']} | {r['val_accuracy']:.4f} | {r['wall_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
