"""A Ray Tune search of 8 trials against one run with the default settings, on the same rows.

    .venv/bin/python benchmarks/search.py
    .venv/bin/python benchmarks/search.py --rows 4000 --num-samples 16

Runs jobs/train.py with the default settings, then jobs/tune.py --num-samples 8 with the default search space
(packaged all-MiniLM-L6-v2, 2 CPU workers per run, so one trial at a time here, --max-length 64 for both), on the
first --rows rows of the shipped SST-2 sample, validated on the 872 dev sentences. Reports each one's dev
accuracy and macro-F1 (the exported model's), its wall time, and for the search every trial's settings, status
and epochs.

Writes benchmarks/out/search/results.json and prints the README's tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq

from lora import _tsv

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "search"


def _run(script: str, output: Path, extra: list[str]) -> float:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, str(ROOT / "jobs" / script), "--data", str(OUT / "train.parquet"), "--validation-data",
               str(OUT / "dev.parquet"), "--output", str(output), "--max-length", "64", *extra]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--num-samples", type=int, default=8)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    shipped = resources.files("textlabel") / "demo_data"
    pq.write_table(_tsv(shipped / "sst2_train.tsv").slice(0, args.rows), OUT / "train.parquet")
    pq.write_table(_tsv(shipped / "sst2_dev.tsv"), OUT / "dev.parquet")
    seconds = _run("train.py", OUT / "defaults", [])
    metrics = json.loads((OUT / "defaults" / "metrics.json").read_text())
    defaults = {"val_accuracy": round(metrics["validation"]["val_accuracy"], 4),
                "val_macro_f1": round(metrics["validation"]["val_macro_f1"], 4), "epochs_run": len(metrics["epochs"]),
                "best_epoch": metrics["best_epoch"], "job_seconds": seconds}
    seconds = _run("tune.py", OUT / "search", ["--num-samples", str(args.num_samples)])
    summary = json.loads((OUT / "search" / "search.json").read_text())
    trials = pq.read_table(OUT / "search" / "trials.parquet").to_pylist()
    best = json.loads((OUT / "search" / "best" / "metrics.json").read_text())["validation"]
    results = {"rows": args.rows, "defaults": defaults,
               "search": {"val_accuracy": round(best["val_accuracy"], 4), "val_macro_f1": round(best["val_macro_f1"], 4),
                          "job_seconds": seconds, "trials": len(trials), "completed": summary["completed"],
                          "stopped_early": summary["stopped_early"], "best": summary["best"],
                          "epochs_trained": sum(t["epochs_run"] for t in trials)},
               "trials": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.items()
                           if k not in ("output", "val_macro_f1_per_epoch")} for t in trials]}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| run | dev accuracy | dev macro-F1 | epochs trained | wall time |\n| --- | --- | --- | --- | --- |")
    print(f"| default settings | {defaults['val_accuracy']:.4f} | {defaults['val_macro_f1']:.4f} | {defaults['epochs_run']} "
          f"| {defaults['job_seconds']:.0f} s |")
    s = results["search"]
    print(f"| search, {s['trials']} trials ({s['stopped_early']} stopped by ASHA), best trial | {s['val_accuracy']:.4f} | "
          f"{s['val_macro_f1']:.4f} | {s['epochs_trained']} | {s['job_seconds']:.0f} s |")
    print("\n| trial | status | learning rate | head rate | batch | warmup | decay | epochs | dev macro-F1 | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in trials:
        print(f"| {t['trial_id']} | {t['status']} | {t['learning_rate']:.2e} | {t['head_learning_rate']:.2e} | "
              f"{t['batch_size']} | {t['warmup_ratio']} | {t['weight_decay']} | {t['epochs_run']} | "
              f"{t['val_macro_f1']:.4f} | {t['wall_seconds']} |")


if __name__ == "__main__":
    main()
