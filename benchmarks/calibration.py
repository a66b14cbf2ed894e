"""Calibration: expected calibration error before and after the fitted temperature, and what --min-score buys.

    .venv/bin/python benchmarks/calibration.py --sst2 ../shared/data/sst2 --trec ../shared/data/trec/train_5500.label

For each set it runs jobs/train.py with the default settings (packaged all-MiniLM-L6-v2, 2
workers, 3 epochs; the temperature is fitted on its 20% validation split), then
jobs/evaluate.py twice on rows the training never saw: with the model as trained
(calibrated scores) and with a copy of it without textlabel_calibration.json (the raw
softmax). It reports ECE (15 bins) of both, and from the calibrated evaluation the share
of rows a --min-score would abstain on and the accuracy of the rest.

- SST-2: --sst2-rows rows of train.tsv (default 4,000) to train on; the 872-row dev set to evaluate.
- SST-2, validated on sentences: the same training rows, but --validation-data (where the
  temperature is fitted) is a seeded half of the dev set, and the other half is evaluated. SST-2's
  training rows are phrases, its dev rows whole sentences: a temperature fitted on rows like the
  corpus is what calibration needs.
- TREC coarse (6 classes): a seeded, stratified 20% of the 5,452 questions held out to evaluate;
  --trec-rows of the rest (default 3,000) to train on.

Writes benchmarks/out/calibration/results.json and prints the README's tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "calibration"
THRESHOLDS = (0.8, 0.9)


def read_sst2(path: Path, rows: int | None = None) -> pa.Table:
    table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))
    text = table.column(1)
    labels = ["positive" if v == 1 else "negative" for v in table["label"].to_pylist()]
    out = pa.table({"text": text, "label": labels})
    return out.slice(0, rows) if rows else out


def read_trec_coarse(path: Path, rows: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    from sklearn.model_selection import train_test_split

    texts, labels = [], []
    for line in path.read_text(encoding="latin-1").splitlines():
        label, text = line.split(" ", 1)
        texts.append(text)
        labels.append(label.split(":", 1)[0])
    table = pa.table({"text": texts, "label": labels})
    train_idx, test_idx = train_test_split(list(range(table.num_rows)), test_size=0.2, random_state=seed, stratify=labels)
    return table.take(sorted(train_idx)[:rows]), table.take(sorted(test_idx))


def run(args: list[str]) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def evaluate(model: Path, data: Path, output: Path) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    run(["jobs/evaluate.py", "--model", str(model), "--data", str(data), "--output", str(output), "--max-length", "128"])
    return json.loads((output / "metrics.json").read_text())


def measure(name: str, train: pa.Table, test: pa.Table, validation: pa.Table | None = None) -> dict:
    base = OUT / name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    pq.write_table(train, base / "train.parquet")
    pq.write_table(test, base / "test.parquet")
    extra = []
    if validation is not None:  # the temperature is fitted on these rows
        pq.write_table(validation, base / "validation.parquet")
        extra = ["--validation-data", str(base / "validation.parquet")]
    # The defaults of when the README's figures were measured (before the head learning rate and early stopping).
    extra += ["--epochs", "3", "--learning-rate", "5e-5", "--head-learning-rate", "5e-5", "--early-stopping-patience", "0"]
    run(["jobs/train.py", "--data", str(base / "train.parquet"), "--output", str(base / "run"), *extra])
    model = base / "run" / "model"
    raw = base / "raw-model"
    shutil.copytree(model, raw)
    (raw / "textlabel_calibration.json").unlink()
    fitted = json.loads((model / "textlabel_calibration.json").read_text())["tasks"][0]
    calibrated = evaluate(model, base / "test.parquet", base / "eval-calibrated")
    uncalibrated = evaluate(raw, base / "test.parquet", base / "eval-raw")
    return {"set": name, "train_rows": train.num_rows, "test_rows": test.num_rows, "temperature": fitted["temperature"],
            "validation": fitted, "accuracy": calibrated["accuracy"],
            "ece_before": list(uncalibrated["scores"]["ece"].values())[0],
            "ece_after": list(calibrated["scores"]["ece"].values())[0],
            "min_score": [r for r in calibrated["scores"]["min_score"] if r["min_score"] in THRESHOLDS],
            "min_score_uncalibrated": [r for r in uncalibrated["scores"]["min_score"] if r["min_score"] in THRESHOLDS]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sst2", type=Path, required=True, help="folder with SST-2's train.tsv and dev.tsv")
    parser.add_argument("--trec", type=Path, required=True, help="TREC's train_5500.label")
    parser.add_argument("--sst2-rows", type=int, default=4000)
    parser.add_argument("--trec-rows", type=int, default=3000)
    parser.add_argument("--only", nargs="*", help="run only these sets (the others' results are kept)")
    args = parser.parse_args()
    train, dev = read_sst2(args.sst2 / "train.tsv", args.sst2_rows), read_sst2(args.sst2 / "dev.tsv")
    halves = dev.take(np.random.default_rng(0).permutation(dev.num_rows))
    sets = {"sst2": lambda: measure("sst2", train, dev),
            "sst2-sentence-validation": lambda: measure("sst2-sentence-validation", train, halves.slice(436),
                                                        validation=halves.slice(0, 436)),
            "trec-coarse": lambda: measure("trec-coarse", *read_trec_coarse(args.trec, args.trec_rows))}
    found = OUT / "results.json"
    kept = {r["set"]: r for r in json.loads(found.read_text())} if args.only and found.exists() else {}
    for name in args.only or sets:
        kept[name] = sets[name]()
    results = [kept[name] for name in sets if name in kept]
    OUT.mkdir(parents=True, exist_ok=True)
    found.write_text(json.dumps(results, indent=2))
    print("| set | rows evaluated | accuracy | temperature | ECE before | ECE after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['set']} | {r['test_rows']} | {r['accuracy']:.4f} | {r['temperature']:.3f} | {r['ece_before']:.4f} | "
              f"{r['ece_after']:.4f} |")
    print("\n| set | --min-score | rows abstained | accuracy of the rest | (uncalibrated: abstained, accuracy) |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        for cal, raw in zip(r["min_score"], r["min_score_uncalibrated"]):
            print(f"| {r['set']} | {cal['min_score']} | {cal['abstained']:.1%} | {_acc(cal)} | "
                  f"{raw['abstained']:.1%}, {_acc(raw)} |")


def _acc(row: dict) -> str:
    return "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"


if __name__ == "__main__":
    main()
