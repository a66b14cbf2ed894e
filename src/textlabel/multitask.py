"""Multi-task models: one shared encoder, one linear head per task.

Saved as a Hugging Face encoder directory (config.json, model.safetensors, tokenizer) plus
heads.safetensors (tensors "<task>.weight", "<task>.bias") and textlabel_tasks.json (each task's
name, label names in id order, and loss weight). model.inference_model tells them from plain
classifiers.
"""

from __future__ import annotations

import os

from textlabel import family as family_lib

TASKS_FILE = "textlabel_tasks.json"
HEADS_FILE = "heads.safetensors"


def is_multitask(model_dir: str) -> bool:
    """True for a directory saved by save_multitask."""
    return os.path.isfile(os.path.join(model_dir, TASKS_FILE))


def _multitask_class():
    import torch

    class MultiTaskClassifier(torch.nn.Module):
        """Encoder -> pooled [CLS] (the encoder's pooler when it has one; a decoder's last real token) -> dropout
        -> one head per task."""

        def __init__(self, encoder, tasks: list[dict]):
            super().__init__()
            self.encoder = encoder
            self.tasks = tasks
            self.last_token = family_lib.of(encoder.config).decoder
            hidden = encoder.config.hidden_size
            self.dropout = torch.nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
            self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(t["labels"])) for t in tasks)

        def forward(self, input_ids, attention_mask, **_):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            pooled = getattr(out, "pooler_output", None)
            if self.last_token:  # the rightmost position the mask keeps, whichever side the padding is on
                where = torch.arange(attention_mask.shape[1], device=attention_mask.device)
                last = (where * attention_mask).argmax(-1)  # gather, not indexing: the batch size stays dynamic in ONNX
                hidden = out.last_hidden_state
                pooled = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
            elif pooled is None:
                pooled = out.last_hidden_state[:, 0]
            pooled = self.dropout(pooled)
            return [head(pooled) for head in self.heads]

    return MultiTaskClassifier


def load_multitask_for_training(model_dir: str, tasks: list[dict], pad_token_id: int | None = None):
    """A pretrained encoder (a base model, or a single-task classifier's) with fresh heads for ``tasks``."""
    from transformers import AutoModel

    from textlabel.model import no_bars, note_new_layers

    no_bars()
    encoder, info = AutoModel.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False,
                                              output_loading_info=True)
    if encoder.config.pad_token_id is None:
        encoder.config.pad_token_id = pad_token_id
    note_new_layers(encoder, info)
    return _multitask_class()(encoder, tasks)


def load_multitask(model_dir: str):
    """A saved multi-task model (see save_multitask), ready for inference."""
    import json

    from transformers import AutoModel

    with open(os.path.join(model_dir, TASKS_FILE)) as f:
        tasks = json.load(f)["tasks"]
    from textlabel.model import for_inference

    encoder = for_inference(AutoModel, model_dir)
    net = _multitask_class()(encoder, tasks)
    load_heads(net, model_dir)
    return net.eval()


def load_heads(net, model_dir: str) -> None:
    """Copy a saved multi-task model's heads into ``net`` (whose tasks are the same)."""
    from safetensors.torch import load_file

    heads = load_file(os.path.join(model_dir, HEADS_FILE))
    for t, head in zip(net.tasks, net.heads):
        head.weight.data.copy_(heads[f"{t['name']}.weight"])
        head.bias.data.copy_(heads[f"{t['name']}.bias"])


def save_multitask(net, tokenizer, directory: str, encoder=None, state_dict: dict | None = None) -> None:
    """Encoder in Hugging Face format, heads and the task list beside it. ``encoder`` and ``state_dict``: save
    that model with those weights as the encoder (a LoRA run's, merged)."""
    import json

    from safetensors.torch import save_file

    from textlabel.model import no_bars

    no_bars()
    (encoder or net.encoder).save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    save_file({f"{t['name']}.{k}": v.detach().cpu().contiguous() for t, head in zip(net.tasks, net.heads)
               for k, v in head.state_dict().items()}, os.path.join(directory, HEADS_FILE))
    with open(os.path.join(directory, TASKS_FILE), "w") as f:
        json.dump({"format": 1, "tasks": net.tasks}, f, indent=2)
