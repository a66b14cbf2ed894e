"""The training defaults before and after issue 16 (a head learning rate, early stopping on macro-F1, the best
epoch exported), on TREC (6 coarse and 50 fine classes) and on SST-2, beside a TF-IDF baseline.

    .venv/bin/python benchmarks/training_defaults.py --trec ../shared/data/trec/train_5500.label
    .venv/bin/python benchmarks/training_defaults.py            # the shipped 1,000-question TREC sample

Runs jobs/train.py (packaged all-MiniLM-L6-v2, 2 CPU workers, otherwise default settings) twice on each data set:
*before*, the old defaults (3 epochs, learning rate 5e-5 for the encoder and the new heads alike, no early
stopping: ``--learning-rate 5e-5 --head-learning-rate 5e-5 --early-stopping-patience 0 --epochs 3``), and
*after*, today's defaults (no options: at most 5 epochs, 1e-4, heads at 1e-3, patience 1).
TREC: a two-task model (``--label-column coarse --label-column fine``) on a seeded, coarse-stratified 80%,
scored on the other 20%. SST-2: the first --sst2-rows rows of the shipped sample, scored on the 872 dev sentences.
The TF-IDF + logistic regression baseline is the one each run's report computes on the same split.

Writes benchmarks/out/training_defaults/results.json and prints the README's tables.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq

from lora import _tsv
from multitask_trec import read_trec, run_train, split

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "training_defaults"
SETTINGS = {"before": ["--learning-rate", "5e-5", "--head-learning-rate", "5e-5", "--early-stopping-patience", "0",
                       "--epochs", "3"], "after": []}


def train(name: str, data: Path, validation: Path, columns: list[str], extra: list[str]) -> dict:
    run = run_train(OUT / name, data, validation, columns, extra)
    metrics = run["metrics"]
    return {
        "settings": extra or "defaults", "tasks": run["tasks"], "tfidf": run["tfidf"],
        "epochs_run": len(metrics["epochs"]), "best_epoch": metrics["best_epoch"],
        "per_epoch_macro_f1": {t: [round(e["val_tasks"][t]["macro_f1"] if "val_tasks" in e else e["val_macro_f1"], 4)
                                   for e in metrics["epochs"]] for t in run["tasks"]},
        "job_seconds": run["job_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trec", help="TREC's train_5500.label (default: the shipped 1,000-question sample)")
    parser.add_argument("--sst2-rows", type=int, default=2000)
    parser.add_argument("--only", nargs="*", help="run only these (trec-before, trec-after, sst2-before, sst2-after)")
    parser.add_argument("--after", nargs=argparse.REMAINDER, default=[], help="options added to the after runs (exploring)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = split(read_trec(args.trec))
    pq.write_table(train_rows, OUT / "trec_train.parquet")
    pq.write_table(val_rows, OUT / "trec_val.parquet")
    shipped = resources.files("textlabel") / "demo_data"
    pq.write_table(_tsv(shipped / "sst2_train.tsv").slice(0, args.sst2_rows), OUT / "sst2_train.parquet")
    pq.write_table(_tsv(shipped / "sst2_dev.tsv"), OUT / "sst2_dev.parquet")
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for data in ("trec", "sst2"):
        for when, extra in SETTINGS.items():
            name = f"{data}-{when}"
            if args.only and name not in args.only:
                continue
            columns = ["coarse", "fine"] if data == "trec" else ["label"]
            validation = OUT / ("trec_val.parquet" if data == "trec" else "sst2_dev.parquet")
            results[name] = train(name, OUT / f"{data}_train.parquet", validation, columns,
                                  extra + (args.after if when == "after" else []))
            results_path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| data | settings | task | accuracy | macro-F1 | TF-IDF accuracy | TF-IDF macro-F1 | epochs run (best) | job time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        for task, m in r["tasks"].items():
            b = r["tfidf"][task]
            print(f"| {name.split('-')[0]} | {name.split('-')[1]} | {task} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | "
                  f"{b['accuracy']:.4f} | {b['macro_f1']:.4f} | {r['epochs_run']} ({r['best_epoch']}) | {r['job_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
