"""Long documents: accuracy of --long-texts truncate against chunk (and of each way to combine windows), and the
cost in rows/s, on two long-document sets built from real sentences (no hub):

- reviews: 9-25 SST-2 sentences in a row (at least 6 words each), most of them of the document's label
  (a majority of 55-100%), in random order: the label is spread through the text, as in a long review;
- buried: 30-60 TREC questions (sentiment-neutral filler) with 2 SST-2 sentences of the document's label
  placed after the first 150 filler tokens: the label-bearing part sits past the first window, as in a
  ticket whose boilerplate comes first.

    .venv/bin/python benchmarks/long_documents.py                       # shipped samples (SST-2 dev, TREC)
    .venv/bin/python benchmarks/long_documents.py --sst2 ../shared/data/sst2/train.tsv \\
        --trec ../shared/data/trec/train_5500.label --docs 400

The model is a fine-tuned SST-2 classifier (benchmarks/label_throughput.py trains one into
benchmarks/out/sst2-model); sentences it was trained on (the shipped training sample) are left out.
In one process, --threads model threads, through the labelling job's predictor (predict.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "textlabel" / "demo_data"


def _sst2(path: Path) -> dict[str, list[str]]:
    seen = {line.split("\t")[0] for line in (DEMO / "sst2_train.tsv").read_text().splitlines()[1:]}
    by_label: dict[str, list[str]] = {"negative": [], "positive": []}
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")  # the shipped sample: text, label; the shared set: label, sentence
    t, y = header.index("text" if "text" in header else "sentence"), header.index("label")
    for line in lines[1:]:
        cells = line.split("\t")
        text, label = cells[t], cells[y]
        label = {"0": "negative", "1": "positive"}.get(label, label)
        if text not in seen and len(text.split()) >= 6:
            by_label[label].append(text.strip())
    return by_label


def _trec(path: Path) -> list[str]:
    if path.suffix == ".tsv":
        return [line.split("\t")[0] for line in path.read_text().splitlines()[1:]]
    return [line.split(" ", 1)[1] for line in path.read_text(encoding="latin-1").splitlines()]


def reviews(sst2: dict[str, list[str]], n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for _ in range(n):
        label, other = rng.sample(sorted(sst2), 2)
        size = rng.choice(range(9, 26, 2))
        agree = rng.randint(size // 2 + 1, size)
        parts = rng.sample(sst2[label], agree) + rng.sample(sst2[other], size - agree)
        rng.shuffle(parts)
        texts.append(" ".join(parts))
        labels.append(label)
    return texts, labels


def buried(sst2: dict[str, list[str]], filler: list[str], n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for _ in range(n):
        label = rng.choice(sorted(sst2))
        parts = rng.sample(filler, rng.randint(30, 60))
        tokens, at = 0, 0
        while tokens < 150:  # about 150 tokens of filler first: past a 128-token window
            tokens += len(parts[at].split()) + 1
            at += 1
        at = rng.randint(at, len(parts))
        parts[at:at] = rng.sample(sst2[label], 2)
        texts.append(" ".join(parts))
        labels.append(label)
    return texts, labels


def measure(model: str, texts: list[str], labels: list[str], max_length: int, threads: int) -> dict:
    from textlabel import chunking, predict
    from textlabel.chunking import LongTexts

    column = pa.array(texts)
    out: dict = {"docs": len(texts)}
    for mode in ("truncate", "chunk"):
        predictor = predict.Predictor(model, threads=threads)
        names = [t.labels for t in predictor.tasks][0]
        start = time.perf_counter()
        prepared = predict.prepare(model, column, max_length, LongTexts(mode))
        result = predictor.label(prepared)
        seconds = time.perf_counter() - start
        predicted = result["label"].to_pylist()
        row = {"accuracy": float(np.mean([p == t for p, t in zip(predicted, labels)])), "rows_per_second": len(texts) / seconds,
               "windows_per_second": len(prepared.windows) / seconds, "windows_per_row": len(prepared.windows) / len(texts),
               "rows_truncated": int(prepared.truncated.sum())}
        if mode == "chunk":  # every way to combine the same windows' probabilities
            probs = predictor.probabilities(prepared.windows)[0]
            sizes = np.array([len(w) for w in prepared.windows])
            gold = np.array([names.index(t) for t in labels])
            row["combine"] = {m: float(np.mean(chunking.combine(probs, prepared.owner, len(texts), m, sizes).argmax(1) == gold))
                              for m in chunking.METHODS}
        out[mode] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "out" / "sst2-model" / "model"))
    parser.add_argument("--sst2", type=Path, default=DEMO / "sst2_dev.tsv", help="SST-2 rows (text<TAB>label)")
    parser.add_argument("--trec", type=Path, default=DEMO / "trec_sample.tsv", help="TREC questions (the shared .label file or the shipped sample)")
    parser.add_argument("--docs", type=int, default=300, help="documents per set")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        sys.exit(f"--model {args.model}: not a directory; run benchmarks/label_throughput.py first (it trains one)")
    rng = random.Random(args.seed)
    sst2, filler = _sst2(args.sst2), _trec(args.trec)
    sets = {"reviews": reviews(sst2, args.docs, rng), "buried": buried(sst2, filler, args.docs, rng)}
    results = {}
    for name, (texts, labels) in sets.items():
        results[name] = measure(args.model, texts, labels, args.max_length, args.threads)
        r = results[name]
        print(f"{name}: {r['docs']} docs, {r['chunk']['windows_per_row']:.1f} windows a doc; "
              f"truncate {r['truncate']['accuracy']:.4f} at {r['truncate']['rows_per_second']:.1f} rows/s; "
              f"chunk {r['chunk']['accuracy']:.4f} at {r['chunk']['rows_per_second']:.1f} rows/s "
              f"({r['chunk']['windows_per_second']:.1f} windows/s); combinations {r['chunk']['combine']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))


if __name__ == "__main__":
    main()
