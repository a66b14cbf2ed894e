"""GPU check, in one go (under 8 minutes on one GPU): a short fine-tune on every visible GPU, then the
labelling job with its defaults (--use-gpu, one actor per GPU) on two models: the fine-tuned
all-MiniLM-L6-v2 and BERT-base built from its config (random weights: speed does not depend on them).

    python benchmarks/gpu_check.py --json-out gpu.json     # on a GPU node (or a GPU Ray cluster's head)
    .venv/bin/python benchmarks/gpu_check.py               # no GPU: the same steps, reduced, on CPU

Per model and per GPU it reports rows/s, real (unpadded) tokens/s, the padding share, the share of
the predictor's time it waited for input (reading and tokenizing running behind), peak GPU memory,
and MFU on real tokens: real tokens/s x FLOPs per token (../shared/PERF.md: 2 x L x (4d^2 + 2 d ff)
+ 4 x L x s x d, s the mean real row length) over the bf16 peak of the detected GPU. "steady" figures
count the predictors' labelling loop (model + waiting for input); "wall" ones the whole job, with
Ray and actor start-up. Each model's corpus is a night of few big files (--files, 2 by default), as a
handful of daily exports is: per actor it reports when the actor was ready, when it got its first unit,
its units and its busy share of the night (the summary's ``pool``), and what it ran on (GPU, the host
CPU's instruction set). Data is generated: sentences of random words, labelled by which list dominates.
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
# Dense bf16 peak TFLOP/s by device name (PERF.md; vendor data sheets), matched in order.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


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
    """Forward FLOPs per token (PERF.md): the matrix multiplies plus attention over rows of mean_len tokens."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    layers, d, ff = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    return 2 * layers * (4 * d * d + 2 * d * ff) + 4 * layers * mean_len * d


def bert_base(directory: Path, tokenizer_dir: str) -> str:
    """BERT-base (L12, d768, ff3072) with random weights and a 2-class head, saved as a Hugging Face model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return str(directory)


class GpuMemory(threading.Thread):
    """Peak device memory in use (all processes, above what was in use at the start), sampled every 0.2 s."""

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


def label_figures(summary: dict, model_dir: str, gpus: int, peak_tflops: float | None, memory: GpuMemory | None) -> dict:
    """The labelling run's figures per GPU (per CPU node without GPUs)."""
    inf, pool = summary["inference"], summary["pool"]
    actors, per = pool["max_actors"], max(gpus, 1)
    real, rows = inf["real_tokens"], inf["rows"]
    steady = (inf["model_seconds"] + inf["input_wait_seconds"]) / actors  # one actor's labelling loop
    per_token = flops_per_token(model_dir, real / max(rows, 1))
    out = {"rows": summary["rows_out"], "actors": actors, "seconds": summary["seconds"],
           "rows_per_s_per_gpu": {"wall": round(summary["rows_per_second"] / per, 1), "steady": round(rows / steady / per, 1)},
           "real_tokens_per_s_per_gpu": {"wall": round(real / summary["seconds"] / per), "steady": round(real / steady / per)},
           "mean_real_tokens_per_row": round(real / max(rows, 1), 1), "padding_share": inf["padding_share"],
           "input_wait_share": inf["input_wait_share"], "oom_splits": inf.get("oom_splits", 0),
           "actor_start_seconds": round(inf.get("init_seconds", 0.0) / actors, 1),
           "gflop_per_real_token": round(per_token / 1e9, 4),
           "peak_gpu_memory_gib": round(memory.peak / 2**30, 2) if memory else None,
           "units": summary.get("units"), "labelling_s": pool.get("labelling_s"),
           "actors_busy": [{k: a.get(k) for k in ("actor", "gpu", "isa", "ready_s", "first_unit_s", "units", "busy_share")}
                           for a in pool.get("actors", [])]}
    if peak_tflops:
        out["mfu_real_tokens"] = {k: round(v * per_token / (peak_tflops * 1e12), 4) for k, v in out["real_tokens_per_s_per_gpu"].items()}
    return out


def main() -> None:
    import torch

    from textlabel.cli import init_ray, setup_logging
    from textlabel.config import LabelConfig, TrainConfig
    from textlabel.label import run_labelling
    from textlabel.model import local_model_dir
    from textlabel.train import run_training

    gpus = torch.cuda.device_count()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model to fine-tune (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--train-rows", type=int, default=20_000 if gpus else 200)
    parser.add_argument("--label-rows", type=int, default=500_000 if gpus else 1_000, help="rows labelled by each model")
    parser.add_argument("--bert-base-rows", type=int, help="rows labelled by BERT-base (default: --label-rows; 200 on CPU)")
    parser.add_argument("--batch-size", type=int, default=64 if gpus else 16, help="training batch per worker")
    parser.add_argument("--files", type=int, default=2, help="files each model's corpus is laid out in (few and big)")
    parser.add_argument("--json-out", help="also write the figures to this file")
    args = parser.parse_args()
    setup_logging()
    init_ray()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="textlabel-gpu-check-"))
    pq.write_table(make_rows(args.train_rows, 0).drop_columns(["id"]), work / "train.parquet")
    name = torch.cuda.get_device_name(0) if gpus else "CPU"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    memory = GpuMemory() if gpus else None
    if memory:
        memory.start()

    train = run_training(TrainConfig(data=str(work / "train.parquet"), output=str(work / "run"), model=args.model,
                                     num_workers=max(gpus, 1) if gpus else 2, use_gpu=bool(gpus), epochs=1,
                                     batch_size=args.batch_size, learning_rate=1e-4))
    epoch = train["epochs"][-1]
    tuned = str(work / "run" / "model")
    report = {"device": name, "gpus": gpus, "bf16_peak_tflops_per_gpu": peak, "base_model": train["model"],
              "train": {"workers": train["num_workers"], "samples_per_s": round(epoch["train_rows"] / epoch["train_seconds"], 1),
                        "samples_per_s_per_worker": round(epoch["samples_per_second_per_worker"], 1),
                        "val_accuracy": round(epoch["val_accuracy"], 4),
                        "peak_gpu_memory_gib": round(memory.peak / 2**30, 2) if memory else None},
              "label": {}}
    models = {"fine-tuned " + Path(local_model_dir(args.model)).name: (tuned, args.label_rows),
              "bert-base (random weights)": (bert_base(work / "bert-base", tuned),
                                             args.bert_base_rows or (args.label_rows if gpus else 200))}
    for i, (label, (model_dir, rows)) in enumerate(models.items()):
        corpus = make_rows(rows, 1 + i).drop_columns(["label"])
        (work / f"corpus-{i}").mkdir()
        step = -(-rows // args.files)  # few big files: the job cuts them into units for every actor
        for k, start in enumerate(range(0, rows, step)):
            pq.write_table(corpus.slice(start, step), work / f"corpus-{i}" / f"part-{k:02d}.parquet")
        if memory:
            memory.peak = 0
        # runtime torch: what GPUs run, also in the reduced CPU run (which then exports no ONNX model)
        summary = run_labelling(LabelConfig(model=model_dir, input=str(work / f"corpus-{i}"), output=str(work / f"labels-{i}"),
                                            use_gpu=bool(gpus), runtime="torch",
                                            max_drift=1e9))  # a throughput check: no drift verdict wanted
        report["label"][label] = label_figures(summary, model_dir, gpus, peak, memory)
    if memory:
        memory.running = False
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
