"""Model runtimes side by side, in one process on one thread: the same token-budget batches of SST-2 rows
through each variant, alternated --rounds times, labels compared with torch fp32.

    .venv/bin/python benchmarks/predictor_variants.py            # the model benchmarks/label_throughput.py trains
    .venv/bin/python benchmarks/predictor_variants.py --model DIR --rows 6000 --compile
    .venv/bin/python benchmarks/predictor_variants.py --isa avx2    # torch held to AVX2 on an AVX-512 host

Variants: torch fp32 with SDPA attention and with eager attention, torch bf16 weights, torch dynamic
int8 (per-channel), ONNX Runtime fp32, dynamic int8 (per-channel) and static int8 (QDQ, per-channel
weights, activations calibrated on 256 SST-2 dev rows that are not measured), and with --compile
torch.compile(dynamic=True) (its first pass, compile included, then a second). This is the measurement
behind the predictor's runtime choice and --quantize's int8 variant (src/textlabel/runtime.py): the
model alone, no reading, tokenizing or writing. Every figure names the host's CPU and instruction set.

--isa avx2 holds torch to AVX2 on a host with AVX-512 (ATEN_CPU_CAPABILITY=avx2 for its kernels,
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 for its int8 ones, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2
for its fp32 matrix multiplies); ONNX Runtime picks its
kernels from the CPU alone (no switch), so its variants are left out: their AVX2 figures need an
AVX2-only host.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ["RAYON_NUM_THREADS"] = "1"  # the fast tokenizer on one core too: figures per core
if "--isa" in sys.argv and sys.argv[sys.argv.index("--isa") + 1:][:1] == ["avx2"]:  # before torch is imported
    os.environ |= {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_throughput import OUT, read_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(OUT / "sst2-model" / "model"))
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (about a minute more)")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: torch held to AVX2 (ONNX Runtime variants left out: it has no such switch)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", help="measure only the variants whose name contains this (and torch fp32, the reference)")
    args = parser.parse_args()

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from textlabel import model as model_lib
    from textlabel import runtime
    from textlabel.predict import token_batches

    import pyarrow as pa

    from textlabel import predict

    torch.set_num_threads(1)
    texts = (read_texts(None) * (args.rows // 10_000 + 1))[: args.rows]
    predict.prepare(args.model, pa.array(texts[:100]), 128)  # the tokenizer loaded
    start = time.perf_counter()
    predict.prepare(args.model, pa.array(texts), 128)
    tokenize_rate = len(texts) / (time.perf_counter() - start)
    print(f"tokenizing (predict.prepare, one core): {tokenize_rate:.0f} rows/s", flush=True)
    ids = AutoTokenizer.from_pretrained(args.model)(texts, truncation=True, max_length=128)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    batches = []
    for idx in token_batches(lengths, args.max_tokens, 1024):
        a = np.zeros((len(idx), lengths[idx].max()), np.int64)
        m = np.zeros_like(a)
        for k, r in enumerate(idx):
            a[k, : lengths[r]], m[k, : lengths[r]] = ids[r], 1
        batches.append((idx, a, m))

    def load(attn: str):
        return AutoModelForSequenceClassification.from_pretrained(args.model, attn_implementation=attn).eval()

    def torch_engine(net):
        def run(a, m):
            with torch.inference_mode():
                return net(input_ids=torch.from_numpy(a), attention_mask=torch.from_numpy(m)).logits.float().numpy()
        return run

    sdpa = load("sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(sdpa), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                                      dtype=torch.qint8)
    variants = {
        "torch fp32 (sdpa)": torch_engine(sdpa),
        "torch fp32 (eager attention)": torch_engine(load("eager")),
        "torch bf16 weights": torch_engine(copy.deepcopy(sdpa).to(torch.bfloat16)),
        "torch int8 (dynamic, per-channel)": torch_engine(int8),
    }
    if args.isa == "native":
        onnx_full, onnx_int8, _ = runtime.onnx_engines(lambda: model_lib._logits_list()(sdpa).eval(), 1, 1, quantize=True)
        calibration = AutoTokenizer.from_pretrained(args.model)(
            read_texts(str(Path(__file__).resolve().parents[1] / "src/textlabel/demo_data/sst2_dev.tsv"))[:256],
            truncation=True, max_length=128)["input_ids"]
        onnx_static = runtime.OnnxEngine(static_qdq(model_lib._logits_list()(sdpa).eval(), calibration), 1)
        variants |= {"onnxruntime fp32": lambda a, m: onnx_full(a, m)[0],
                     "onnxruntime int8 (dynamic, per-channel)": lambda a, m: onnx_int8(a, m)[0],
                     "onnxruntime int8 (static QDQ, per-channel)": lambda a, m: onnx_static(a, m)[0]}
    if args.only:
        variants = {n: v for n, v in variants.items() if args.only in n or n == "torch fp32 (sdpa)"}
    compile_seconds = None
    if args.compile:  # its first pass compiles (timed apart); the rounds measure the compiled model
        compiled = torch_engine(torch.compile(copy.deepcopy(sdpa), dynamic=True))
        start = time.perf_counter()
        for _, a, m in batches:
            compiled(a, m)
        compile_seconds = round(time.perf_counter() - start, 1)
        variants["torch.compile fp32 (dynamic, compiled)"] = compiled

    reference = None
    rates: dict[str, list[float]] = {name: [] for name in variants}
    agree: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, engine in variants.items():
            out = np.zeros((len(ids), 2), np.float32)
            start = time.perf_counter()
            for idx, a, m in batches:
                out[idx] = engine(a, m)
            rates[name].append(len(ids) / (time.perf_counter() - start))
            if reference is None:
                reference = out.argmax(1)
            agree[name] = float(np.mean(out.argmax(1) == reference))
            print(f"{name}: {rates[name][-1]:.0f} rows/s, labels agreeing with torch fp32 {agree[name]:.4f}", flush=True)
    base = np.mean(rates["torch fp32 (sdpa)"])
    from label_throughput import host

    result = {"host": host(), "isa_asked": args.isa, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "rows": len(ids), "threads": 1, "max_tokens": args.max_tokens,
                      "tokenize_rows_per_s_one_core": round(tokenize_rate),
                      "compile_first_pass_seconds": compile_seconds, "variants": [
        {"variant": n, "rows_per_s": round(float(np.mean(r)), 1), "vs_torch_fp32": round(float(np.mean(r)) / base, 2),
         "labels_agreeing": round(agree[n], 4)} for n, r in rates.items()]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def static_qdq(net, calibration: list[list[int]]) -> str:
    """ONNX Runtime's static int8 (QDQ: per-channel weights, activations scaled from ``calibration`` rows)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from textlabel import runtime

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[k:k + 32] for k in range(0, len(calibration), 32)])

        def get_next(self):
            rows = next(self.batches, None)
            if rows is None:
                return None
            width = max(map(len, rows))
            ids = np.zeros((len(rows), width), np.int64)
            mask = np.zeros_like(ids)
            for k, r in enumerate(rows):
                ids[k, :len(r)], mask[k, :len(r)] = r, 1
            return {"input_ids": ids, "attention_mask": mask}

    work = tempfile.mkdtemp(prefix="textlabel-qdq-")
    fp32, int8 = f"{work}/model.onnx", f"{work}/static.onnx"
    runtime.export_onnx(net, fp32, 1)
    # The matrix multiplies only, as the dynamic variant: quantizing every op (softmax, LayerNorm, the mask's add)
    # as well moved 45% of labels here.
    quantize_static(fp32, int8, Rows(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return int8


if __name__ == "__main__":
    main()
