"""The worker loop's pure decisions, in-process (no Ray): which weights learn at which rate, when to stop."""

from __future__ import annotations

import pytest

from textlabel.train_loop import LoopSettings, _fresh, best_epoch, head_layers, param_groups, should_stop

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}
TASKS = [{"name": "sentiment", "labels": ["negative", "positive"], "weight": 1.0, "column": "label_id"},
         {"name": "size", "labels": ["short", "long", "huge"], "weight": 1.0, "column": "size_id"}]


@pytest.fixture(scope="module")
def no_pooler(tmp_path_factory) -> str:
    """A tiny BERT saved without a pooler or a classifier, as many base models are."""
    from transformers import BertModel

    from textlabel.scratch import config, tokenizer

    directory = tmp_path_factory.mktemp("no-pooler")
    tok = tokenizer("bert")
    BertModel(config("bert", tok), add_pooling_layer=False).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def _settings(model: str, tasks: list[dict], lora: dict | None) -> LoopSettings:
    return LoopSettings(model=model, tasks=tasks, multitask=len(tasks) > 1, epochs=3, batch_size=16, learning_rate=2e-5,
                        warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0, max_length=32, seed=0, use_gpu=False,
                        steps_per_epoch=1, label_counts=[], lora=lora, head_learning_rate=1e-3)


@pytest.mark.parametrize("tasks, lora, new", [
    (TASKS[:1], None, {"bert.pooler.dense", "classifier"}),
    (TASKS[:1], LORA, {"bert.pooler.dense", "classifier"}),
    (TASKS, None, {"encoder.pooler.dense", "heads.0", "heads.1"}),
    (TASKS, LORA, {"encoder.pooler.dense", "heads.0", "heads.1"}),
], ids=["full", "lora", "two-tasks", "two-tasks-lora"])
def test_the_layers_the_checkpoint_lacked_learn_at_the_head_rate_and_the_rest_at_the_encoder_s(no_pooler, tasks, lora, new):
    import torch

    s = _settings(no_pooler, tasks, lora)
    net, _ = _fresh(s)
    groups = param_groups(net, s, head_layers(net))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert len(rate) == len(trainable)  # every trainable weight is in exactly one group, nothing frozen is
    fast = {n.replace("base_model.model.", "").replace(".modules_to_save.default", "").rsplit(".", 1)[0]
            for n, p in trainable.items() if rate[id(p)] == 1e-3}
    assert fast == new
    slow = [n for n, p in trainable.items() if rate[id(p)] == 2e-5]
    assert len(slow) + sum(1 for p in trainable.values() if rate[id(p)] == 1e-3) == len(trainable)
    assert all("lora_" in n for n in slow) if lora else any(n.endswith("query.weight") for n in slow)
    # Biases and LayerNorms are not decayed, in either group; matrices are.
    for g in groups:
        assert g["weight_decay"] == (0.0 if all(p.ndim < 2 for p in g["params"]) else 0.01)
    torch.optim.AdamW(groups)  # the groups are a valid optimizer configuration


@pytest.mark.parametrize("f1s, patience, best, stop", [
    ([0.5], 2, 0, False),
    ([0.5, 0.6, 0.7], 2, 2, False),
    ([0.5, 0.7, 0.6], 2, 1, False),          # one epoch without gain: patience 2 waits
    ([0.5, 0.7, 0.6, 0.7], 2, 1, True),      # equal is not better: the earliest of equals is the best
    ([0.5, 0.7, 0.6], 1, 1, True),
    ([0.5, 0.4, 0.3, 0.2, 0.1], 0, 0, False),  # 0: never stop early
    ([], 2, None, False),
])
def test_early_stopping_on_validation_macro_f1(f1s, patience, best, stop):
    epochs = [{"epoch": i + 1, "val_macro_f1": f} for i, f in enumerate(f1s)]
    assert should_stop(epochs, patience) is stop
    if epochs:
        assert best_epoch(epochs) == best


def test_a_missing_label_trains_nothing_and_an_empty_task_keeps_its_gradient():
    import torch

    from textlabel.train_loop import _task_losses

    logits = [torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]], requires_grad=True),
              torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)]
    golds = [torch.tensor([0, 1, -1]), torch.tensor([-1, -1, -1])]
    first, second = _task_losses(logits, golds)
    expected = torch.nn.functional.cross_entropy(logits[0][:2], golds[0][:2])  # the masked row does not count
    assert torch.isclose(first, expected) and second.item() == 0.0
    (first + second).backward()
    assert logits[0].grad[2].abs().sum() == 0  # no gradient from the row without a label
    assert logits[1].grad is not None and logits[1].grad.abs().sum() == 0  # in the graph (DDP), contributing nothing
