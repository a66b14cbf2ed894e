"""Promise: a training run whose worker dies resumes from its last checkpoint and ends as if it had not stopped,
here under LoRA on a Llama (a decoder whose tokenizer has no pad token and pads on the left); the merged model
and the adapter on its base label as the labelling job does."""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest

from support.corpus import easy_rows
from textlabel.cli import train_main


def _train(args: list) -> int:
    return train_main([str(a) for a in args])


def _metrics(output: str) -> dict:
    with open(os.path.join(output, "metrics.json")) as f:
        return json.load(f)


def _registered_checkpoints(output_dir: str) -> int:
    snapshot = os.path.join(output_dir, "checkpoints", "checkpoint_manager_snapshot.json")
    try:
        with open(snapshot) as f:
            return len(json.load(f)["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_a_worker_after_first_checkpoint(output_dir: str, killed: list[int]) -> None:
    """The event: Ray Train has registered a checkpoint (not merely begun writing one). Then SIGKILL one training
    worker of this session's Ray (whose processes descend from this test process): nothing else on the machine."""
    deadline = time.time() + 240
    while time.time() < deadline and _registered_checkpoints(output_dir) == 0:
        time.sleep(0.1)
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                proc.kill()
                killed.append(proc.pid)
                return
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    from textlabel.scratch import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def test_killed_worker_restarts_a_lora_run_from_its_adapter_and_the_merged_model_labels_as_the_adapter(
        ray_session, tiny_llama, tmp_path):
    """The worker SIGKILLed after the first checkpoint: the restarted group rebuilds the frozen base and reloads the
    adapter (train_loop._from_checkpoint), and the run ends as if it had not stopped. The model is a Llama (a
    decoder whose tokenizer has no pad token and pads on the left) fine-tuned with --lora."""
    data = tmp_path / "data.parquet"
    import pyarrow.parquet as pq
    pq.write_table(easy_rows(1500, seed=2), data)  # 5 epochs of a few seconds: the kill lands after the first
    output = str(tmp_path / "run")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(output, killed))
    killer.start()
    code = _train(["--data", data, "--output", output, "--model", tiny_llama, "--lora", "--epochs", 5, "--num-workers", 1,
                   "--learning-rate", 3e-3, "--head-learning-rate", 3e-3, "--early-stopping-patience", 0, "--batch-size", 16,
                   "--max-length", 32])
    killer.join()
    assert killed, "no training worker was found to kill"
    assert code == 0
    metrics = _metrics(output)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5]
    assert len(metrics["resumed_at_epochs"]) == 1 and 1 <= metrics["resumed_at_epochs"][0] < 5
    assert metrics["epochs"][-1]["val_accuracy"] > 0.9
    assert metrics["lora"]["rank"] == 8 and metrics["parameters"]["trainable"] < 0.1 * metrics["parameters"]["total"]
    assert len(metrics["epochs"][-1]["peak_rss_mb_per_worker"]) == 1
    _the_lora_artifact_labels_as_the_job_does(tiny_llama, output, tmp_path)


def _the_lora_artifact_labels_as_the_job_does(base: str, output: str, tmp_path) -> None:
    """OUTPUT/model is a plain model (no PEFT) that the labelling job and pipeline() agree on, and OUTPUT/adapter on
    the base model is the same model."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, pipeline

    from support.corpus import read_output
    from textlabel.cli import label_main
    from textlabel.model import load_for_training, load_tokenizer

    model = f"{output}/model"
    assert not any("lora" in n for n, _ in AutoModelForSequenceClassification.from_pretrained(model).named_parameters())
    rows = easy_rows(200, seed=6)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(200)), "text": rows["text"], "truth": rows["label"]}), tmp_path / "in" / "a.parquet")
    assert label_main(["--model", model, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--max-length", "32", "--num-actors", "1"]) == 0
    out = read_output(str(tmp_path / "out")).sort_by("id")
    labels = np.array(out["label"].to_pylist())
    assert np.mean(labels == np.array(out["truth"].to_pylist())) > 0.9
    texts = out["text"].to_pylist()
    found = pipeline("text-classification", model=model, batch_size=32)(texts, truncation=True, max_length=32)
    clear = np.array([r["score"] for r in found]) > 0.5 + 1e-3  # a near-tie may go either way in another summation order
    assert clear.sum() > 150 and (np.array([r["label"] for r in found])[clear] == labels[clear]).all()
    tokenizer = load_tokenizer(model)
    adapted = PeftModel.from_pretrained(load_for_training(base, ["negative", "positive"], tokenizer.pad_token_id),
                                        f"{output}/adapter").eval()
    with torch.no_grad():
        logits = adapted(**tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    assert (np.array(["negative", "positive"])[logits.argmax(-1).numpy()][clear] == labels[clear]).all()
