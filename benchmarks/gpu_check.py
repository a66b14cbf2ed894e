"""GPU check: a short fine-tune on every visible GPU and a --use-gpu label run, with figures.

    python benchmarks/gpu_check.py                      # on a GPU node (or a GPU Ray cluster's head)
    python benchmarks/gpu_check.py --model bert-base-uncased --label-rows 500000
    .venv/bin/python benchmarks/gpu_check.py            # no GPU: the same steps, reduced, on CPU

Prints samples/s (training), rows/s (labelling), peak GPU memory, real tokens/s and the
effective TFLOP/s (FLOPs from ../shared/PERF.md's formula: 2 x non-embedding parameters
per token plus 4 x layers x length x hidden for attention; training is 3x forward).
Data is generated: sentences of random words, labelled by which word list dominates.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

GOOD = "great superb moving brilliant charming excellent delightful fresh".split()
BAD = "dull tedious awful clumsy lifeless painful boring stale".split()
FILLER = "the film plot cast story scene music pace ending script camera audience director".split()
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0}


def make_rows(n: int, seed: int) -> pa.Table:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        words = rng.choices(FILLER, k=rng.randint(8, 40)) + rng.choices(GOOD, k=good) + rng.choices(BAD, k=bad)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append("positive" if good >= bad else "negative")
    return pa.table({"id": list(range(n)), "text": texts, "label": labels})


def flops_per_token(model_dir: str, mean_len: float) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    layers, d, ff = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    return 2 * layers * (4 * d * d + 2 * d * ff) + 4 * layers * mean_len * d


class GpuMemory(threading.Thread):
    """Peak device memory in use (all processes), sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import torch

        self.torch, self.peak, self.running = torch, 0, True
        self.base = [self._used(i) for i in range(torch.cuda.device_count())]

    def _used(self, i: int) -> int:
        free, total = self.torch.cuda.mem_get_info(i)
        return total - free

    def run(self) -> None:
        while self.running:
            used = [self._used(i) - b for i, b in enumerate(self.base)]
            self.peak = max(self.peak, max(used, default=0))
            time.sleep(0.2)


def main() -> None:
    import torch

    from textlabel.cli import init_ray, setup_logging
    from textlabel.config import LabelConfig, TrainConfig
    from textlabel.label import run_labelling
    from textlabel.model import load_tokenizer, local_model_dir
    from textlabel.train import run_training

    gpus = torch.cuda.device_count()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--train-rows", type=int, default=40_000 if gpus else 400)
    parser.add_argument("--label-rows", type=int, default=200_000 if gpus else 2_000)
    parser.add_argument("--batch-size", type=int, default=64 if gpus else 16, help="per worker")
    parser.add_argument("--json-out", help="also write the figures to this file")
    args = parser.parse_args()
    setup_logging()
    init_ray()
    work = Path(tempfile.mkdtemp(prefix="textlabel-gpu-check-"))
    (work / "corpus").mkdir()
    pq.write_table(make_rows(args.train_rows, 0).drop_columns(["id"]), work / "train.parquet")
    corpus = make_rows(args.label_rows, 1)
    # Several files: the labelling job's unit of parallel work is a file (or a run of its row groups).
    for i, start in enumerate(range(0, corpus.num_rows, -(-corpus.num_rows // 8))):
        pq.write_table(corpus.drop_columns(["label"]).slice(start, -(-corpus.num_rows // 8)), work / "corpus" / f"part-{i}.parquet")
    model_dir = local_model_dir(args.model)
    lengths = [len(ids) for ids in load_tokenizer(model_dir)(corpus["text"].to_pylist(), truncation=True, max_length=128)["input_ids"]]
    tokens_per_row = sum(lengths) / len(lengths)
    per_token = flops_per_token(model_dir, tokens_per_row)
    memory = GpuMemory() if gpus else None
    if memory:
        memory.start()

    train = run_training(TrainConfig(data=str(work / "train.parquet"), output=str(work / "run"), model=args.model,
                                     num_workers=max(gpus, 1) if gpus else 2, use_gpu=bool(gpus), epochs=1,
                                     batch_size=args.batch_size, learning_rate=1e-4))
    epoch = train["epochs"][-1]
    train_tokens = epoch["train_rows"] * tokens_per_row
    label = run_labelling(LabelConfig(model=str(work / "run" / "model"), input=str(work / "corpus"),
                                      output=str(work / "labels"), use_gpu=bool(gpus), num_actors=str(max(gpus, 1)),
                                      batch_size=256 if gpus else 64))
    if memory:
        memory.running = False
    name = torch.cuda.get_device_name(0) if gpus else "CPU"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    train_tflops = 3 * per_token * train_tokens / epoch["train_seconds"] / 1e12
    label_tflops = per_token * label["rows_out"] * tokens_per_row / label["seconds"] / 1e12
    report = {
        "device": name, "gpus": gpus, "model": train["model"], "tokens_per_row": round(tokens_per_row, 1),
        "train": {"workers": train["num_workers"], "samples_per_s_per_worker": round(epoch["samples_per_second_per_worker"], 1),
                  "samples_per_s": round(epoch["train_rows"] / epoch["train_seconds"], 1),
                  "real_tokens_per_s": round(train_tokens / epoch["train_seconds"]), "effective_tflops": round(train_tflops, 2),
                  "val_accuracy": round(epoch["val_accuracy"], 4)},
        "label": {"rows": label["rows_out"], "rows_per_s": label["rows_per_second"],
                  "real_tokens_per_s": round(label["rows_out"] * tokens_per_row / label["seconds"]),
                  "effective_tflops": round(label_tflops, 2)},
        "peak_gpu_memory_gib": round(memory.peak / 2**30, 2) if memory else None,
        "share_of_bf16_peak": {"train": round(train_tflops / (peak * max(gpus, 1)), 4), "label": round(label_tflops / (peak * max(gpus, 1)), 4)} if peak else None,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
