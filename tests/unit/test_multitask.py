"""Multi-task losses (multitask.py): a missing label trains nothing; pure, no Ray."""

from __future__ import annotations





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
