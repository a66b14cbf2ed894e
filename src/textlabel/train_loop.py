"""The per-worker Ray Train loop: DDP fine-tuning, gathered evaluation, checkpoints.

Runs inside each Ray Train worker. Everything it needs arrives in one plain
dict (``LoopSettings``) so that workers never import the driver's config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from textlabel import model as model_lib
from textlabel.metrics import classification_metrics

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
PREDICTIONS_FILE = "val_predictions.json"


@dataclass
class LoopSettings:
    """What every worker needs to know, decided once by the driver."""

    model: str | None
    labels: list[str]
    epochs: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    max_length: int
    seed: int
    use_gpu: bool
    steps_per_epoch: int


def _setup_worker_logging(rank: int) -> None:
    # Ray Train's worker logging already has a handler; only rank 0 speaks at INFO.
    logging.getLogger("textlabel").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _optimizer(net: torch.nn.Module, s: LoopSettings) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in net.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.learning_rate)


def _restore(s: LoopSettings) -> tuple[torch.nn.Module, Any, dict | None, dict]:
    """Model, tokenizer, optimizer/scheduler state and history: from the latest checkpoint if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        base = model_lib.local_model_dir(s.model)
        torch.manual_seed(s.seed)  # the new head starts the same on every worker
        return model_lib.load_for_training(base, s.labels), model_lib.load_tokenizer(base), None, {"epochs": [], "resumed_at_epochs": []}
    with checkpoint.as_directory() as directory:
        net = model_lib.load_classifier(directory).train()
        tokenizer = model_lib.load_tokenizer(directory)
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True, map_location="cpu")
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            history = json.load(f)
    history["resumed_at_epochs"].append(len(history["epochs"]))
    logger.info("resuming from the checkpoint after epoch %d", len(history["epochs"]))
    return net, tokenizer, state, history


def _tokenize(tokenizer, texts: np.ndarray, max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    # Dynamic padding: each batch pads to its own longest row, never to max_length.
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _train_epoch(net, tokenizer, optimizer, scheduler, s: LoopSettings, epoch: int, device) -> tuple[float, int]:
    net.train()
    shard = ray.train.get_dataset_shard("train")
    loss_sum, rows = 0.0, 0
    for batch in shard.iter_batches(
        batch_size=s.batch_size, batch_format="numpy",
        local_shuffle_buffer_size=max(4 * s.batch_size, 1000), local_shuffle_seed=s.seed + epoch,
    ):
        labels = torch.tensor(batch["label_id"], device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=s.use_gpu):
            loss = net(**_tokenize(tokenizer, batch["text"], s.max_length, device), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.item() * len(labels)
        rows += len(labels)
    return loss_sum, rows


def _gather(obj: Any) -> list[Any]:
    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def _predict_my_rows(net, tokenizer, s: LoopSettings, rank: int, world: int, device) -> dict[str, np.ndarray]:
    """Predictions for this worker's share (row_id % world == rank) of the whole validation set."""
    net.eval()
    ids, preds, golds, losses = [], [], [], []
    for batch in ray.train.get_dataset_shard("validation").iter_batches(batch_size=4 * s.batch_size, batch_format="numpy"):
        mine = batch["row_id"] % world == rank
        if not mine.any():
            continue
        gold = torch.tensor(batch["label_id"][mine], device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=s.use_gpu):
            logits = net(**_tokenize(tokenizer, batch["text"][mine], s.max_length, device)).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits, gold, reduction="none").cpu().numpy())
        preds.append(logits.argmax(-1).cpu().numpy())
        golds.append(gold.cpu().numpy())
        ids.append(batch["row_id"][mine])
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dtype=dt)  # noqa: E731
    return {"row_id": cat(ids, np.int64), "pred": cat(preds, np.int64), "gold": cat(golds, np.int64), "loss": cat(losses, np.float32)}


def _evaluate(net, tokenizer, s: LoopSettings, rank: int, world: int, device) -> tuple[dict[str, Any], dict] | None:
    """Metrics and predictions over the whole validation set, gathered from every worker (rank 0 gets them)."""
    parts = _gather(_predict_my_rows(net, tokenizer, s, rank, world, device))
    if rank != 0:
        return None
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert len(np.unique(joined["row_id"])) == len(joined["row_id"]), "validation rows double-counted"
    result = classification_metrics(joined["gold"], joined["pred"], s.labels)
    metrics = {"val_loss": float(joined["loss"].mean()), "val_rows": int(len(joined["row_id"])), **{f"val_{k}": v for k, v in result.items()}}
    return metrics, {"row_id": joined["row_id"].tolist(), "pred": joined["pred"].tolist()}


def _save_checkpoint(net, tokenizer, optimizer, scheduler, history: dict, predictions: dict, directory: str) -> None:
    model_lib.save(net.module if hasattr(net, "module") else net, tokenizer, directory)
    with open(os.path.join(directory, PREDICTIONS_FILE), "w") as f:
        json.dump(predictions, f)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, HISTORY_FILE), "w") as f:
        json.dump(history, f, indent=2)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: fine-tune, evaluate and checkpoint once per epoch."""
    s = LoopSettings(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_worker_logging(rank)
    device = ray.train.torch.get_device()
    net, tokenizer, state, history = _restore(s)
    net = ray.train.torch.prepare_model(net)
    optimizer = _optimizer(net, s)
    total_steps = s.steps_per_epoch * s.epochs
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(s.warmup_ratio * total_steps), total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    for epoch in range(len(history["epochs"]), s.epochs):
        start = time.perf_counter()
        loss_sum, rows = _train_epoch(net, tokenizer, optimizer, scheduler, s, epoch, device)
        seconds = time.perf_counter() - start
        per_worker = _gather((loss_sum, rows, seconds))
        evaluated = _evaluate(net, tokenizer, s, rank, world, device)
        if evaluated is None:
            ray.train.report({"epoch": epoch + 1})
            continue
        metrics, predictions = evaluated
        total_rows = sum(p[1] for p in per_worker)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sum(p[0] for p in per_worker) / max(total_rows, 1),
            "train_rows": total_rows,
            "train_seconds": max(p[2] for p in per_worker),
            "samples_per_second_per_worker": sum(p[1] / p[2] for p in per_worker) / len(per_worker),
            **metrics,
        }
        history["epochs"].append(metrics)
        logger.info(
            "epoch %d/%d: train_loss=%.4f val_loss=%.4f val_accuracy=%.4f val_macro_f1=%.4f (%.1f samples/s per worker)",
            epoch + 1, s.epochs, metrics["train_loss"], metrics["val_loss"], metrics["val_accuracy"],
            metrics["val_macro_f1"], metrics["samples_per_second_per_worker"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(net, tokenizer, optimizer, scheduler, history, predictions, tmp)
            ray.train.report(
                {k: v for k, v in metrics.items() if not isinstance(v, dict)},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )


def settings_dict(s: LoopSettings) -> dict:
    """The plain dict handed to workers."""
    return asdict(s)
