"""LoRA fine-tuning (``--lora``) with PEFT: for a model too large to fine-tune whole on each worker.

The pretrained weights are frozen; each adapted layer (the attention's query and value projections by
default, family.lora_targets) learns a rank-r update B.A scaled by alpha/r, and the freshly initialised
classification layers (everything outside the pretrained backbone: the classifier, a pre-classifier,
a multi-task model's heads) train in full. Gradients and AdamW's two moments exist only for those, which
is where the memory goes in full fine-tuning (three copies of every weight besides the weight itself).

What is saved: the adapter merged into the weights, as a plain Hugging Face model (labelling and
``pipeline()`` need no PEFT; merged_weights adds each adapted layer's update to a new tensor, so the
model is not copied), and beside it the adapter alone (``adapter/``, PEFT's format: a few MB to apply
to the same base model with ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from textlabel import family

ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraSettings:
    """The --lora options."""

    rank: int
    alpha: float
    dropout: float
    target_modules: list[str] | None  # None: the family's default


def _config(backbone, s: LoraSettings, modules_to_save: list[str] | None):
    from peft import LoraConfig

    return LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, bias="none",
                      target_modules=s.target_modules or family.lora_targets(backbone.config), modules_to_save=modules_to_save)


def problems(config, s: LoraSettings, multitask: bool) -> list[str]:
    """Why LoRA cannot adapt this model as asked (target modules it does not have), checked on the model's
    architecture built on the meta device: no weights are loaded."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    try:
        targets = s.target_modules or family.lora_targets(config)
    except family.FamilyError as exc:
        return [str(exc)]
    with torch.device("meta"):
        net = (AutoModel if multitask else AutoModelForSequenceClassification).from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, _ in net.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)
                         or type(m).__name__ == "Conv1D"})
        return [f"--lora-target-modules {' '.join(missing)}: no such module in this {config.model_type} model; its "
                f"linear layers are named {', '.join(linear)}"]
    return []


def wrap(net, s: LoraSettings):
    """``net`` (a Hugging Face classifier or a multi-task model) with LoRA adapters; only they and the new
    classification layers train."""
    from peft import get_peft_model

    if hasattr(net, "heads"):  # a multi-task model: adapt its encoder; the heads, outside it, train in full
        net.encoder = get_peft_model(net.encoder, _config(net.encoder, s, new_layers(net.encoder) or None))
        return net
    added = [name for name, child in net.named_children()
             if name != net.base_model_prefix and any(True for _ in child.parameters())]
    return get_peft_model(net, _config(net, s, _outermost(added + new_layers(net))))


def _outermost(names: list[str]) -> list[str]:
    """Module names less those inside another one listed (PEFT would wrap a wrapped module again)."""
    return sorted({n for n in names if not any(n.startswith(other + ".") for other in names)})


def new_layers(net) -> list[str]:
    """Modules the checkpoint did not have (model.load_for_training notes them): not pretrained, so not frozen."""
    return [name for name in getattr(net, "textlabel_new_layers", []) if name]


def _peft_part(net):
    """The PEFT model inside ``net``: the net itself, or a multi-task model's encoder."""
    return net.encoder if hasattr(net, "heads") else net


def is_wrapped(net) -> bool:
    return hasattr(_peft_part(net), "peft_config")


def merged_weights(peft_model) -> tuple[object, dict]:
    """The Hugging Face model under ``peft_model`` and its weights with the adapters folded in, named as a plain
    model's. Nothing is copied but one new weight per adapted layer: a big model is not duplicated at every
    checkpoint, and training goes on with the adapters as they were."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    state: dict = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                state[f"{name}.weight"] = layer.weight + module.get_delta_weight("default").to(layer.weight.dtype)
    for key, value in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue
        state.setdefault(key.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), value)
    return base, state


def save_adapter(net, directory: str) -> None:
    """The adapter alone (with the trained classification layers), in PEFT's format, under directory/adapter."""
    _peft_part(net).save_pretrained(os.path.join(directory, ADAPTER_DIR), safe_serialization=True)


def load_adapter(net, directory: str) -> None:
    """Restore the adapter weights saved by save_adapter into a freshly wrapped ``net`` (resuming a run)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(_peft_part(net), load_file(os.path.join(directory, ADAPTER_DIR, "adapter_model.safetensors")))


def parameter_counts(net) -> dict[str, int]:
    """Trainable and total parameters."""
    params = list(net.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
