"""What an actor runs on (the CPU's instruction set) and the node's cache of ONNX exports: no Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from textlabel import predict, runtime
from textlabel.scratch import easy_rows

AVX2_HOST = {"fpu", "sse4_2", "avx", "avx2", "fma", "bmi2"}  # a Zen 2 or Haswell..Comet Lake core
AVX512_HOST = AVX2_HOST | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}  # Zen 4, Cooper Lake
AMX_HOST = AVX512_HOST | {"amx_tile", "amx_int8", "amx_bf16"}  # Sapphire Rapids


@pytest.mark.parametrize("flags, expected", [
    (AVX2_HOST, ["AVX2"]),
    (AVX2_HOST | {"avx_vnni"}, ["AVX2", "VNNI"]),  # Alder Lake: VNNI on 256-bit registers, no AVX-512
    (AVX512_HOST, ["AVX2", "AVX-512", "VNNI", "BF16"]),
    (AMX_HOST, ["AVX2", "AVX-512", "VNNI", "BF16", "AMX"]),
    (set(), []),
])
def test_the_instruction_set_is_named_from_the_cpu_flags(flags, expected):
    assert runtime.isa_of(flags) == expected


def test_cpu_flags_are_read_from_the_first_cpu_of_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9454\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert runtime.cpu_flags(str(info)) == ("AMD EPYC 9454", {"fpu", "avx2", "avx512f", "avx512_vnni"})
    assert runtime.cpu_flags(str(tmp_path / "absent"))[1] == set()  # not Linux: nothing known, nothing made up


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTLABEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _builder(calls: list[str], content: bytes = b"onnx bytes"):
    def build(path: str) -> None:
        calls.append(path)
        with open(path, "wb") as fh:
            fh.write(content)
    return build


def test_an_onnx_export_is_built_once_per_key_and_a_corrupt_or_partial_entry_is_rebuilt(cache):
    calls: list[str] = []
    key = ["sha256:abc (config 1, tokenizer 2, uncalibrated) []", 1, "fp32"]
    where, how = runtime.onnx_cached(key, _builder(calls))
    assert how == "miss" and len(calls) == 1 and (where / "model.onnx").read_bytes() == b"onnx bytes"
    assert runtime.onnx_cached(key, _builder(calls)) == (where, "hit") and len(calls) == 1  # the next night: no export
    assert runtime.onnx_cached([*key[:2], "int8"], _builder(calls))[1] == "miss"  # another variant, its own entry
    (where / "model.onnx").write_bytes(b"onnx by")  # cut short (a full disk, a crash mid-copy)
    assert runtime.onnx_cached(key, _builder(calls)) == (where, "rebuilt") and len(calls) == 3
    assert (where / "model.onnx").read_bytes() == b"onnx bytes"
    (where / ".complete").unlink()  # a directory without its marker: never finished
    assert runtime.onnx_cached(key, _builder(calls))[1] == "rebuilt"
    (where / ".complete").write_text("{not json")
    assert runtime.onnx_cached(key, _builder(calls))[1] == "rebuilt"
    assert json.loads((where / ".complete").read_text())["key"] == key
    assert not [p for p in where.parent.iterdir() if p.name.startswith(".partial-") or ".old-" in p.name]


def test_a_model_without_a_content_identity_is_exported_every_time(cache):
    calls: list[str] = []
    where, how = runtime.onnx_cached(None, _builder(calls))
    assert how == "uncached" and not cache.exists()
    where2, _ = runtime.onnx_cached(None, _builder(calls))
    assert where2 != where and len(calls) == 2


def test_a_predictor_takes_its_onnx_model_from_the_nodes_cache_and_labels_the_same(tiny_model, cache):
    prepared = predict.prepare(tiny_model, pa.array(easy_rows(40, seed=5)["text"].to_pylist()), 64)
    first = predict.Predictor(tiny_model, identity="sha256:tiny", quantize=True)
    again = predict.Predictor(tiny_model, identity="sha256:tiny", quantize=True)
    assert first.onnx_cache == {"fp32": "miss", "int8-dynamic-per-channel": "miss"}
    assert again.onnx_cache == {"fp32": "hit", "int8-dynamic-per-channel": "hit"}
    a, b = first.label(prepared), again.label(prepared)
    assert a["label"].to_pylist() == b["label"].to_pylist()
    np.testing.assert_array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    facts = again.facts()
    assert facts["runtime"] == "onnx" and facts["int8"] == "onnxruntime dynamic int8, per-channel" and facts["isa"] and facts["onnx_cache"]["fp32"] == "hit"
