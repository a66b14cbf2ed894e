"""Model runtimes behind predict.Predictor: an engine is a callable (token ids, attention mask), both
int64 numpy arrays of rows x width, returning the logits of each task as float32 numpy arrays.

- ``torch``: the model as loaded: fp32 on CPU (dynamic int8 Linear layers with ``quantize``); on
  a GPU, bf16 weights cast once, SDPA attention, inputs through pinned memory with non-blocking
  copies, and ``torch.compile`` (dynamic shapes) when asked.
- ``onnx``: the same model exported to ONNX and run by ONNX Runtime's CPU provider; with
  ``quantize``, its per-channel dynamic int8. The export (and the int8 model) is cached on
  the node beside the model cache (``onnx_cached``), keyed by the model's content identity, so
  only the first night on a node pays for it; an entry whose files do not match the hashes it
  recorded (a crash mid-write, a disk fault) is rebuilt. From the cache no torch model is
  loaded at all (an actor is ready about 3 s sooner). Side by side on this project's 2-core
  machine, one thread each (benchmarks/predictor_variants.py): fp32 1.18x torch's speed with the same labels, int8 1.04x
  torch's int8 moving 2.4x fewer labels before the fp32 recheck; in the labelling job 1.14x and
  1.06x end to end (README, "Measured figures"). The default on CPU; GPUs run torch.

``choose`` picks the runtime; ``onnx_engines`` and ``torch_engines`` build the full-precision
engine and the fast one (the same object unless quantized). ``host_facts`` says what an actor runs on (the CPU's
instruction set: AVX2, AVX-512, VNNI, BF16, AMX; the GPU), for the run's summary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from textlabel import storage

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
ONNX_MAX_BYTES = 1_500_000_000  # one ONNX protobuf holds at most 2 GB: bigger models run on torch
Engine = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]
EXPORT_FORMAT = 1  # bump when export_onnx changes what it writes: cached exports of older formats are not used
# CPU flags (/proc/cpuinfo) that decide how fast a model runs, by the names people know them by.
ISA_FLAGS = {"AVX2": ("avx2",), "AVX-512": ("avx512f",), "VNNI": ("avx512_vnni", "avx_vnni"),
             "BF16": ("avx512_bf16", "amx_bf16"), "AMX": ("amx_tile",)}


def isa_of(flags: set[str]) -> list[str]:
    """The instruction-set extensions in a CPU's flags that matter to inference, e.g. ["AVX2", "AVX-512", "VNNI"]."""
    return [name for name, names in ISA_FLAGS.items() if flags & set(names)]


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, flags) of this machine's first CPU; ("", set()) where /proc is not Linux's."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return platform.processor(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def host_facts() -> dict[str, Any]:
    """What this process runs on: node, CPU model and instruction set, what torch dispatches to, the GPU."""
    import torch

    model, flags = cpu_flags()
    facts: dict[str, Any] = {"node": socket.gethostname(), "pid": os.getpid(), "cpu": model,
                             "isa": " ".join(isa_of(flags)) or platform.machine(),
                             "torch_cpu": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def onnx_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


# --quantize's int8 variant per runtime, as the summary names it. On CPU, auto picks the fastest variant whose
# labels agree with fp32's on at least 99% of rows before the recheck (benchmarks/predictor_variants.py, README
# "int8 by instruction set"): ONNX Runtime's dynamic per-channel int8 on every host measured. Torch's dynamic int8
# agreed on 98.1% (it moves twice the labels); ONNX Runtime's static QDQ int8 was slower at lower agreement.
INT8_VARIANTS = {"onnx": "onnxruntime dynamic int8, per-channel", "torch": "torch dynamic int8, per-channel"}


def choose(runtime: str, use_gpu: bool, precision: str) -> str:
    """The runtime a predictor uses: --runtime, where auto is onnx on CPU in full precision or int8 (INT8_VARIANTS),
    torch otherwise."""
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


def fits_onnx(model_dir: str) -> bool:
    """Whether a model's weights fit one ONNX file (a protobuf holds at most 2 GB): from its *.safetensors sizes; a
    hub id (no directory yet) is taken to fit (an export too big fails, naming the size)."""
    if not os.path.isdir(model_dir):
        return True
    size = sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    try:
        with open(os.path.join(model_dir, "config.json")) as fh:
            config = json.load(fh)
        saved = config.get("dtype") or config.get("torch_dtype")
    except (OSError, ValueError):
        saved = None
    return size * (2 if saved in ("bfloat16", "float16") else 1) <= ONNX_MAX_BYTES  # exported in fp32


def torch_engines(net, device, quantize: bool) -> tuple[Engine, Engine]:
    """(full precision, fast) engines for a loaded torch module: the same one, or its dynamic int8 copy."""
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


def onnx_cached(key: list[Any] | None, build: Callable[[str], None], name: str = "model.onnx") -> tuple[Path, str]:
    """The ONNX file ``build(path)`` writes, from the node's cache when ``key`` (what the file is made from: the
    model's content identity, the variant, the exporter's versions) has a sound entry there: (its directory, "hit",
    "miss" or "rebuilt"). An entry is a directory written whole beside its final name and renamed into place, with
    a marker of its files' sha256 written last; one whose files do not hash to the marker, or have no marker, is
    rebuilt. Without a key (a hub id, no content identity), built in a temporary directory every time."""
    if key is None:
        work = Path(tempfile.mkdtemp(prefix="textlabel-onnx-"))
        build(str(work / name))
        return work, "uncached"
    target = storage.cache_root() / "onnx" / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    marker = target / ".complete"
    how = "miss"
    if target.exists():
        try:
            files = json.loads(marker.read_text())["files"]
            if files and all(storage.file_sha256(target / n) == h for n, h in files.items()):
                return target, "hit"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        how = "rebuilt"
        logger.warning("the cached ONNX export %s is incomplete or corrupt: rebuilding it", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    build(str(tmp / name))
    files = {p.name: storage.file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / ".complete").write_text(json.dumps({"key": key, "files": files}))
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        try:
            target.rename(old)
        except OSError:  # another actor on this node moved it first
            pass
    try:
        tmp.rename(target)
    except OSError:  # another actor on this node put its (equally good) build in place first
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return target, how


def _export_key(identity: str | None, outputs: int, variant: str) -> list[Any] | None:
    """What a cached ONNX file is made from; None (not cached) without a content identity."""
    if not identity:
        return None
    import onnx
    import onnxruntime
    import torch

    return [identity, outputs, variant, EXPORT_FORMAT, torch.__version__, onnx.__version__, onnxruntime.__version__]


def onnx_engines(load: Callable[[], Any], outputs: int, threads: int, quantize: bool, identity: str | None = None
                 ) -> tuple[Engine, Engine, dict[str, str]]:
    """(full precision, fast) ONNX Runtime engines, and how each file came (onnx_cached: hit, miss, rebuilt,
    uncached). ``load()`` gives the torch module to export; it is called only when a file must be built."""
    made: list[Path] = []
    net: list[Any] = []
    came: dict[str, str] = {}

    def module():
        if not net:
            net.append(load())
        return net[0]

    def cached(variant: str, build: Callable[[str], None]) -> Path:
        where, how = onnx_cached(_export_key(identity, outputs, variant), build)
        came[variant] = how
        if how == "uncached":
            made.append(where)
        return where / "model.onnx"

    try:
        fp32 = cached("fp32", lambda path: export_onnx(module(), path, outputs))
        full = OnnxEngine(str(fp32), threads)
        if not quantize:
            return full, full, came
        int8 = cached("int8-dynamic-per-channel", lambda path: _quantize_dynamic(str(fp32), path))
        return full, OnnxEngine(str(int8), threads), came
    finally:
        for work in made:  # sessions hold the model: uncached files go at once
            shutil.rmtree(work, ignore_errors=True)


def _quantize_dynamic(fp32: str, int8: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its advice to pre-process first is for static quantization
    try:
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        quiet.setLevel(level)
