"""The per-worker Ray Train loop: DDP fine-tuning, gathered evaluation, checkpoints.

Runs inside each Ray Train worker. Everything it needs arrives in one plain
dict (``LoopSettings``) so that workers never import the driver's config.

Rows arrive as text, or (``--long-texts chunk``) as the token windows the labelling job
would score, cut on the driver: one window per row of the dataset, each carrying its
document's labels and, in validation, its document's ``row_id``. Validation always scores
documents: a document's windows' probabilities are combined as the labelling job combines
them (chunking.combine), so the accuracy reported is the one labelling delivers.
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

from textlabel import calibration, chunking, lora, multitask, progress
from textlabel import model as model_lib
from textlabel.metrics import classification_metrics

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
PREDICTIONS_FILE = "val_predictions.json"
IMPROVED = "improved_epoch"  # reported metric: the epoch's number when it is the best so far, else 0


@dataclass
class LoopSettings:
    """What every worker needs to know, decided once by the driver."""

    model: str | None
    tasks: list[dict]  # name, labels (in id order), weight, column (of label ids; -1 = no label)
    multitask: bool  # several tasks: shared encoder + one head each; one task: a plain HF classifier
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
    label_counts: list[list[int]]  # per task: training rows of each class (saved with the model: drift's reference)
    lora: dict | None = None  # lora.LoraSettings as a dict: adapters instead of full fine-tuning
    head_learning_rate: float | None = None  # the new layers' peak rate (None: learning_rate)
    early_stopping_patience: int = 0  # epochs without a better validation macro-F1 before stopping (0: never)
    mlflow: dict | None = None  # tracking_uri and run_id: rank 0 logs each epoch's metrics there
    progress_seconds: float = 30.0  # a progress line within an epoch every this many seconds (0: none)


def _setup_worker_logging(rank: int) -> None:
    # Ray Train's worker logging already has a handler; only rank 0 speaks at INFO.
    logging.getLogger("textlabel").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def head_layers(net: torch.nn.Module) -> list[str]:
    """Module paths of the layers the base checkpoint did not have (a classifier, a multi-task model's heads,
    a missing pooler), as named in the model without LoRA's or DDP's wrappers."""
    if hasattr(net, "heads"):
        return ["heads"] + [f"encoder.{name}" for name in lora.new_layers(net.encoder)]
    return lora.new_layers(net)


def is_head(parameter_name: str, heads: list[str]) -> bool:
    """Whether a parameter belongs to one of ``heads`` (under DDP's ``module.`` and PEFT's ``base_model.model.``;
    a LoRA run's trained copy of a head is ``<head>.modules_to_save.default.*``)."""
    name = parameter_name.removeprefix("module.").replace("base_model.model.", "")
    return any(name == h or name.startswith(h + ".") for h in heads)


def param_groups(net: torch.nn.Module, s: LoopSettings, heads: list[str]) -> list[dict]:
    """AdamW's parameter groups: the pretrained weights at --learning-rate, the new layers at
    --head-learning-rate; no weight decay on biases and LayerNorms. Frozen (LoRA) weights are left out."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:  # frozen under LoRA: no gradient, no optimizer state
            continue
        key = (is_head(name, heads), not (param.ndim < 2 or "LayerNorm" in name))
        groups.setdefault(key, []).append(param)
    head_lr = s.learning_rate if s.head_learning_rate is None else s.head_learning_rate
    return [{"params": groups[key], "lr": head_lr if key[0] else s.learning_rate,
             "weight_decay": s.weight_decay if key[1] else 0.0}
            for key in sorted(groups)]  # the same order on every worker and after a resume


def _optimizer(net: torch.nn.Module, s: LoopSettings, heads: list[str]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(net, s, heads), lr=s.learning_rate)


def best_epoch(epochs: list[dict]) -> int:
    """Index of the epoch with the best validation macro-F1 (the earliest of equals)."""
    return int(np.argmax([e["val_macro_f1"] for e in epochs]))


def should_stop(epochs: list[dict], patience: int) -> bool:
    """Early stopping: ``patience`` epochs have passed without a better validation macro-F1."""
    return patience > 0 and bool(epochs) and len(epochs) - 1 - best_epoch(epochs) >= patience


def _restore(s: LoopSettings) -> tuple[torch.nn.Module, Any, dict | None, dict]:
    """Model, tokenizer, optimizer/scheduler state and history: from the latest checkpoint if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        net, tokenizer = _fresh(s)
        return net, tokenizer, None, {"epochs": [], "resumed_at_epochs": [], "head_layers": head_layers(net)}
    with checkpoint.as_directory() as directory:
        net, tokenizer = _from_checkpoint(s, directory)
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True, map_location="cpu")
        with open(os.path.join(directory, HISTORY_FILE)) as f:
            history = json.load(f)
    history["resumed_at_epochs"].append(len(history["epochs"]))
    history.setdefault("head_layers", head_layers(net))  # a loaded classifier's layers are no longer new
    logger.info("resuming from the checkpoint after epoch %d", len(history["epochs"]))
    return net, tokenizer, state, history


def _fresh(s: LoopSettings) -> tuple[torch.nn.Module, Any]:
    """The base model with new heads (and LoRA adapters with --lora), and its tokenizer."""
    base = model_lib.local_model_dir(s.model)
    tokenizer = model_lib.load_tokenizer(base)
    torch.manual_seed(s.seed)  # the new heads start the same on every worker
    net = (multitask.load_multitask_for_training(base, _public(s.tasks), tokenizer.pad_token_id) if s.multitask
           else model_lib.load_for_training(base, s.tasks[0]["labels"], tokenizer.pad_token_id))
    if s.lora:
        net = lora.wrap(net, lora.LoraSettings(**s.lora))
    return net, tokenizer


def _from_checkpoint(s: LoopSettings, directory: str) -> tuple[torch.nn.Module, Any]:
    """The model a checkpoint holds, ready to train on, and its tokenizer."""
    if s.lora:  # the frozen base rebuilt, then the adapter (and a multi-task model's heads) loaded into it
        net, tokenizer = _fresh(s)
        lora.load_adapter(net, directory)
        if s.multitask:
            multitask.load_heads(net, directory)
        return net, tokenizer
    net = multitask.load_multitask(directory) if s.multitask else model_lib.load_classifier(directory)
    return net.train(), model_lib.load_tokenizer(directory)


def _save_model(net, tokenizer, directory: str) -> None:
    """The model as it will be exported (merged under LoRA, its adapter in directory/adapter)."""
    bare = net.module if hasattr(net, "module") else net
    if not lora.is_wrapped(bare):
        (multitask.save_multitask if hasattr(bare, "heads") else model_lib.save)(bare, tokenizer, directory)
        return
    lora.save_adapter(bare, directory)
    # The artifact is a plain model, the adapters merged in: labelling and pipeline() need no PEFT.
    if hasattr(bare, "heads"):
        encoder, state = lora.merged_weights(bare.encoder)
        multitask.save_multitask(bare, tokenizer, directory, encoder, state)
    else:
        base, state = lora.merged_weights(bare)
        model_lib.save(base, tokenizer, directory, state)


def _public(tasks: list[dict]) -> list[dict]:
    """What a saved multi-task model records of each task."""
    return [{"name": t["name"], "labels": t["labels"], "weight": t["weight"]} for t in tasks]


def _logits(net, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """One logits tensor per task, from a multi-task model or a plain HF classifier."""
    out = net(**inputs)
    return out if isinstance(out, list) else [out.logits]


def _task_losses(logits: list[torch.Tensor], golds: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean cross-entropy per task over the rows that have its label (-1 = none: masked out).

    A task with no labelled row in the batch contributes 0 but stays in the graph, so DDP
    sees a gradient for every head."""
    losses = []
    for lg, y in zip(logits, golds):
        valid = y >= 0
        ce = torch.nn.functional.cross_entropy(lg.float(), y.clamp(min=0), reduction="none")
        losses.append((ce * valid).sum() / valid.sum().clamp(min=1))
    return losses


def _inputs(tokenizer, batch: dict[str, np.ndarray], rows: np.ndarray | slice, max_length: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for ``rows`` of a batch: its text tokenized, or its token windows padded. Dynamic padding:
    each batch pads to its own longest row, never to max_length."""
    if "input_ids" not in batch:
        enc = tokenizer(list(batch["text"][rows]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        # Token type ids are all 0 for one text, which every model assumes without them (labelling never sends them;
        # DistilBERT and ModernBERT take none).
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    windows = [np.asarray(w) for w in batch["input_ids"][rows]]
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)], mask[i, :len(w)] = torch.as_tensor(w, dtype=torch.long), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _train_epoch(net, tokenizer, optimizer, scheduler, s: LoopSettings, epoch: int, device) -> tuple[float, int, list]:
    net.train()
    shard = ray.train.get_dataset_shard("train")
    loss_sum, rows = 0.0, 0
    task_sums = [[0.0, 0] for _ in s.tasks]  # per task: loss x labelled rows, labelled rows
    tick, started = progress.Every(s.progress_seconds), time.perf_counter()
    for step, batch in enumerate(shard.iter_batches(
        batch_size=s.batch_size, batch_format="numpy",
        local_shuffle_buffer_size=max(4 * s.batch_size, 1000), local_shuffle_seed=s.seed + epoch,
    ), start=1):
        golds = [torch.tensor(batch[t["column"]], device=device) for t in s.tasks]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=s.use_gpu):
            logits = _logits(net, _inputs(tokenizer, batch, slice(None), s.max_length, device))
        # L = sum_i lambda_i * L_i (one task: plain cross-entropy, as Hugging Face computes it)
        task_losses = _task_losses(logits, golds)
        loss = sum(t["weight"] * task_loss for t, task_loss in zip(s.tasks, task_losses))
        loss.backward()
        for acc, task_loss, y in zip(task_sums, task_losses, golds):
            n = int((y >= 0).sum())
            acc[0] += task_loss.item() * n
            acc[1] += n
        torch.nn.utils.clip_grad_norm_(net.parameters(), s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.item() * len(golds[0])
        rows += len(golds[0])
        if tick.due():  # rank 0's shard stands for every worker's: they step together
            logger.info("epoch %d/%d: step %d/%d, train_loss=%.4f, %.1f samples/s per worker", epoch + 1, s.epochs, step,
                        s.steps_per_epoch, loss_sum / rows, rows / (time.perf_counter() - started))
    return loss_sum, rows, task_sums


def _gather(obj: Any) -> list[Any]:
    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def _predict_my_rows(net, tokenizer, s: LoopSettings, rank: int, world: int, device) -> dict[str, np.ndarray]:
    """This worker's share (row_id % world == rank) of the validation windows: each window's row_id and, per
    task, its probabilities and its row's gold label (rank 0 combines a document's windows)."""
    net.eval()
    found: dict[str, list[np.ndarray]] = {"row_id": []}
    for batch in ray.train.get_dataset_shard("validation").iter_batches(batch_size=4 * s.batch_size, batch_format="numpy"):
        mine = batch["row_id"] % world == rank
        if not mine.any():
            continue
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=s.use_gpu):
            logits = _logits(net, _inputs(tokenizer, batch, mine, s.max_length, device))
        for i, (t, lg) in enumerate(zip(s.tasks, logits)):
            found.setdefault(f"probs{i}", []).append(torch.softmax(lg.float(), -1).cpu().numpy())
            found.setdefault(f"gold{i}", []).append(batch[t["column"]][mine].astype(np.int64))
        found["row_id"].append(batch["row_id"][mine].astype(np.int64))
    if not found["row_id"]:
        return {"row_id": np.empty(0, np.int64), **{f"probs{i}": np.empty((0, len(t["labels"])), np.float32)
                                                    for i, t in enumerate(s.tasks)},
                **{f"gold{i}": np.empty(0, np.int64) for i in range(len(s.tasks))}}
    return {k: np.concatenate(v) for k, v in found.items()}


def _task_figures(t: dict, probs: np.ndarray, owner: np.ndarray, gold: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """One task on the validation documents (``gold``: per document, -1 = no label for this task): metrics with
    the temperature fitted on its labelled documents, and per document the predictions before and after it."""
    rows = len(gold)
    valid = gold >= 0
    keep = valid[owner]
    sub_owner = np.unique(owner[keep], return_inverse=True)[1]

    def joined(p: np.ndarray) -> np.ndarray:  # a labelled document's windows, combined as labelling does
        return chunking.combine(p, sub_owner, int(valid.sum()))

    temperature = calibration.fit_temperature(probs[keep], gold[valid], joined)
    before = chunking.combine(probs, owner, rows)
    after = chunking.combine(calibration.scaled(probs, temperature), owner, rows)
    result = classification_metrics(gold[valid], after[valid].argmax(1), t["labels"])
    loss = float(-np.log(np.clip(before[valid, gold[valid]], 1e-12, 1.0)).mean()) if valid.any() else float("nan")
    figures = {"loss": loss, "rows": int(valid.sum()), **result,
               "calibration": calibration.summary(probs[keep], gold[valid], temperature, joined)}
    predicted = {"pred": after.argmax(1), "score": after.max(1), "pred_before": before.argmax(1), "score_before": before.max(1)}
    return figures, predicted


def _evaluate(net, tokenizer, s: LoopSettings, rank: int, world: int, device) -> tuple[dict[str, Any], dict] | None:
    """Metrics and predictions over the whole validation set, gathered from every worker (rank 0 gets them).
    Each task's temperature is fitted here, on the validation documents, and its predictions are calibrated."""
    parts = _gather(_predict_my_rows(net, tokenizer, s, rank, world, device))
    if rank != 0:
        return None
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    mine = [np.unique(p["row_id"]) for p in parts]  # a document's windows all come from the one worker that owns it
    assert sum(map(len, mine)) == len(np.unique(joined["row_id"])), "validation rows double-counted"
    rows, owner = np.unique(joined["row_id"], return_inverse=True)  # a document's windows: one row
    first = np.unique(owner, return_index=True)[1]
    per_task, by_task = {}, {}
    for i, t in enumerate(s.tasks):
        per_task[t["name"]], by_task[t["name"]] = _task_figures(t, joined[f"probs{i}"], owner, joined[f"gold{i}"][first])
    predictions: dict[str, Any] = {"row_id": rows.astype(np.int64).tolist()}
    for key in ("pred", "score", "pred_before", "score_before"):
        values = {n: p[key].tolist() for n, p in by_task.items()}
        predictions[key] = values if s.multitask else values[s.tasks[0]["name"]]
    if not s.multitask:
        only = per_task[s.tasks[0]["name"]]
        metrics = {"val_loss": only["loss"], "val_rows": int(len(rows)),
                   **{f"val_{k}": v for k, v in only.items() if k not in ("loss", "rows")}}
        return metrics, predictions
    metrics = {
        # Averages over the tasks (macro): the headline figures; each task's are in val_tasks.
        "val_loss": float(np.mean([m["loss"] for m in per_task.values()])), "val_rows": int(len(rows)),
        "val_accuracy": float(np.mean([m["accuracy"] for m in per_task.values()])),
        "val_macro_f1": float(np.mean([m["macro_f1"] for m in per_task.values()])),
        "val_tasks": per_task,
    }
    return metrics, predictions


def _calibration_record(s: LoopSettings, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the saved model records of its scores: each task's temperature and how it was fitted."""
    figures = ([metrics["val_tasks"][t["name"]]["calibration"] for t in s.tasks] if s.multitask
               else [metrics["val_calibration"]])
    return {"format": 1, "method": "temperature", "fitted_on": "validation rows, after the epoch",
            "tasks": [{"name": t["name"], **f} for t, f in zip(s.tasks, figures)]}


def _save_checkpoint(net, tokenizer, optimizer, scheduler, history: dict, predictions: dict, directory: str,
                     s: LoopSettings) -> None:
    _save_model(net, tokenizer, directory)
    model_lib.write_extras(directory, _calibration_record(s, history["epochs"][-1]),
                           [{"name": t["name"], "labels": t["labels"], "counts": c} for t, c in zip(s.tasks, s.label_counts)])
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
    history["parameters"] = lora.parameter_counts(net)
    logger.info("training %d of the model's %d parameters%s; new layers %s at learning rate %g, the rest at %g",
                history["parameters"]["trainable"], history["parameters"]["total"], " (LoRA)" if s.lora else "",
                history["head_layers"], s.head_learning_rate or s.learning_rate, s.learning_rate)
    net = ray.train.torch.prepare_model(net)
    optimizer = _optimizer(net, s, history["head_layers"])
    total_steps = s.steps_per_epoch * s.epochs
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(s.warmup_ratio * total_steps), total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    # Every worker holds the same history here (fresh, or the checkpoint's): they agree without talking.
    stop = should_stop(history["epochs"], s.early_stopping_patience)
    for epoch in range(len(history["epochs"]), s.epochs):
        if stop:
            break
        start = time.perf_counter()
        loss_sum, rows, task_sums = _train_epoch(net, tokenizer, optimizer, scheduler, s, epoch, device)
        seconds = time.perf_counter() - start
        per_worker = _gather((loss_sum, rows, seconds, task_sums, _peak_rss_mb()))
        evaluated = _evaluate(net, tokenizer, s, rank, world, device)
        if evaluated is None:
            ray.train.report({"epoch": epoch + 1})
            stop = _gather(None)[0]  # rank 0's decision
            continue
        metrics, predictions = evaluated
        total_rows = sum(p[1] for p in per_worker)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sum(p[0] for p in per_worker) / max(total_rows, 1),
            "train_rows": total_rows,
            "train_seconds": max(p[2] for p in per_worker),
            "samples_per_second_per_worker": sum(p[1] / p[2] for p in per_worker) / len(per_worker),
            "peak_rss_mb_per_worker": [p[4] for p in per_worker],
            **metrics,
        }
        if s.multitask:  # each task's own training loss (train_loss is their weighted sum)
            metrics["train_task_loss"] = {
                t["name"]: sum(p[3][i][0] for p in per_worker) / max(sum(p[3][i][1] for p in per_worker), 1)
                for i, t in enumerate(s.tasks)}
        history["epochs"].append(metrics)
        if s.mlflow:
            from textlabel import tracking

            tracking.log_epoch(s.mlflow, metrics)
        logger.info(
            "epoch %d/%d: train_loss=%.4f val_loss=%.4f val_accuracy=%.4f val_macro_f1=%.4f (%.1f samples/s per worker)%s",
            epoch + 1, s.epochs, metrics["train_loss"], metrics["val_loss"], metrics["val_accuracy"],
            metrics["val_macro_f1"], metrics["samples_per_second_per_worker"],
            "".join(f"; {n}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f}"
                    for n, m in metrics.get("val_tasks", {}).items()),
        )
        for t in _calibration_record(s, metrics)["tasks"]:
            logger.info("calibration%s: temperature %.3f; on %d validation rows, ECE %.4f -> %.4f, NLL %.4f -> %.4f",
                        f" ({t['name']})" if s.multitask else "", t["temperature"], t["rows"], t["ece_before"],
                        t["ece_after"], t["nll_before"], t["nll_after"])
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(net, tokenizer, optimizer, scheduler, history, predictions, tmp, s)
            # The checkpoint kept as the best (CheckpointConfig scores by it): an epoch that improved on every
            # earlier one scores its number, the others 0; so the best is the earliest of equal macro-F1s.
            improved = best_epoch(history["epochs"]) == len(history["epochs"]) - 1
            ray.train.report(
                {**{k: v for k, v in metrics.items() if not isinstance(v, dict)}, IMPROVED: epoch + 1 if improved else 0},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )
        stop = _gather(should_stop(history["epochs"], s.early_stopping_patience))[0]
        if stop:
            best = best_epoch(history["epochs"])
            logger.info("stopping early after epoch %d: validation macro-F1 has not improved on epoch %d's %.4f for %d "
                        "epochs (--early-stopping-patience)", epoch + 1, best + 1,
                        history["epochs"][best]["val_macro_f1"], epoch - best)


def _peak_rss_mb() -> float:
    """This worker process's peak resident memory so far (model, gradients, optimizer state, activations)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def settings_dict(s: LoopSettings) -> dict:
    """The plain dict handed to workers."""
    return asdict(s)
