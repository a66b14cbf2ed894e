"""Model runtimes behind predict.Predictor: an engine is a callable (token ids, attention mask), both
int64 numpy arrays of rows x width, returning the logits of each task as float32 numpy arrays.

- ``torch``: the model as loaded: fp32 on CPU (dynamic int8 Linear layers with ``quantize``); on
  a GPU, bf16 weights cast once, SDPA attention, inputs through pinned memory with non-blocking
  copies, and ``torch.compile`` (dynamic shapes) when asked.
- ``onnx``: the same model exported to ONNX in the actor when it starts (about a second for a
  6-layer model) and run by ONNX Runtime's CPU provider; with ``quantize``, its per-channel
  dynamic int8. Side by side on this project's 2-core machine, one thread each
  (benchmarks/predictor_variants.py): fp32 1.18x torch's speed with the same labels, int8 1.04x
  torch's int8 moving 2.4x fewer labels before the fp32 recheck; in the labelling job 1.14x and
  1.06x end to end (README, "Measured figures"). The default on CPU; GPUs run torch.

``choose`` picks the runtime; ``engines`` builds the full-precision engine and the fast one
(the same object unless quantized).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import warnings
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
ONNX_MAX_BYTES = 1_500_000_000  # one ONNX protobuf holds at most 2 GB: bigger models run on torch
Engine = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]


def onnx_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def choose(runtime: str, use_gpu: bool, precision: str) -> str:
    """The runtime a predictor uses: --runtime, where auto is onnx on CPU in full precision or int8, torch otherwise."""
    if runtime == "auto":
        return "onnx" if not use_gpu and precision == "fp32" and onnx_installed() else "torch"
    return runtime


class TorchEngine:
    """A torch module returning a list of logits tensors."""

    def __init__(self, net, device):
        import torch

        self.torch, self.net, self.device = torch, net, device

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.device.type == "cuda":  # pinned host memory: the copies overlap the previous batch's compute
            ids_t = ids_t.pin_memory().to(self.device, non_blocking=True)
            mask_t = mask_t.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            return [lg.float().cpu().numpy() for lg in self.net(input_ids=ids_t, attention_mask=mask_t)]


class OnnxEngine:
    """An ONNX Runtime CPU session of an exported model (inputs input_ids, attention_mask; one logits output per task)."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the core
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.float32) for x in self.session.run(None, {"input_ids": ids, "attention_mask": mask})]


def export_onnx(net, path: str, outputs: int) -> None:
    """The module (input_ids, attention_mask) -> list of logits, as ONNX with dynamic batch and width."""
    import torch

    example = torch.ones((2, 8), dtype=torch.long)
    names = [f"logits_{i}" for i in range(outputs)]
    axes = {"input_ids": {0: "rows", 1: "width"}, "attention_mask": {0: "rows", 1: "width"}} | {n: {0: "rows"} for n in names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings are about shapes made dynamic right here
        torch.onnx.export(net, (example, example), path, input_names=["input_ids", "attention_mask"], output_names=names,
                          dynamic_axes=axes, opset_version=17, dynamo=False)


def engines(net, outputs: int, device, threads: int, quantize: bool, runtime: str) -> tuple[Engine, Engine]:
    """(full precision, fast) engines for a loaded module on ``runtime`` (torch or onnx)."""
    if runtime == "onnx":
        size = sum(p.numel() * p.element_size() for p in net.parameters())
        if size > ONNX_MAX_BYTES:
            logger.warning("the model has %.1f GB of weights, over what one ONNX file holds: running it on torch", size / 1e9)
        else:
            return _onnx_engines(net, outputs, threads, quantize)
    full = TorchEngine(net, device)
    if not quantize:
        return full, full
    import copy

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that quantization moves to torchao
        # Per-channel weight scales: per-tensor ones flipped ~1.5 points more labels (README).
        fast = torch.ao.quantization.quantize_dynamic(as_linear(copy.deepcopy(net)), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                                      dtype=torch.qint8)
    return full, TorchEngine(fast, device)


def as_linear(net):
    """``net`` with GPT-2's Conv1D layers (a Linear with its weight transposed) made torch Linear layers, which
    dynamic quantization knows; other models are returned as they are."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, child in net.named_children():
        if isinstance(child, Conv1D):
            linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1], device=child.weight.device,
                                     dtype=child.weight.dtype)
            linear.weight.data.copy_(child.weight.data.T)
            linear.bias.data.copy_(child.bias.data)
            setattr(net, name, linear)
        else:
            as_linear(child)
    return net


def _onnx_engines(net, outputs: int, threads: int, quantize: bool) -> tuple[Engine, Engine]:
    with tempfile.TemporaryDirectory(prefix="textlabel-onnx-") as work:  # sessions hold the model: files go at once
        fp32 = os.path.join(work, "model.onnx")
        export_onnx(net, fp32, outputs)
        full = OnnxEngine(fp32, threads)
        if not quantize:
            return full, full
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8 = os.path.join(work, "int8.onnx")
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its advice to pre-process first is for static quantization
        try:
            quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            quiet.setLevel(level)
        return full, OnnxEngine(int8, threads)
