"""benchmarks/gpu_check.py's arithmetic (the script itself runs on a GPU node; its labelling and training steps
are the jobs' own, tested end to end in tests/e2e): FLOPs per token and the figures per GPU."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="module")
def gpu_check(repo_root):
    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bert_base_costs_about_eight_times_minilm_per_token(gpu_check, tmp_path):
    from transformers import BertConfig

    from textlabel.model import packaged_model_dir

    BertConfig().save_pretrained(tmp_path)  # BERT-base: L12, d768, ff3072
    base, mini = (gpu_check.flops_per_token(d, 20.0) for d in (str(tmp_path), packaged_model_dir()))
    # PERF.md: 0.17 against 0.021 GFLOP a token at ~20 real tokens a row
    assert base / 1e9 == pytest.approx(0.17, abs=0.005) and mini / 1e9 == pytest.approx(0.021, abs=0.001)


def test_figures_per_gpu_split_wall_from_the_actors_steady_loop_and_give_mfu_on_a_known_gpu(gpu_check, tmp_path):
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path)
    summary = {"rows_out": 8000, "seconds": 10.0, "rows_per_second": 800.0, "pool": {"max_actors": 4},
               "inference": {"real_tokens": 160_000, "rows": 8000, "model_seconds": 12.0, "input_wait_seconds": 4.0,
                             "padding_share": 0.1, "input_wait_share": 0.25, "init_seconds": 20.0}}
    figures = gpu_check.label_figures(summary, str(tmp_path), gpus=4, peak_tflops=989.0, memory=None)
    # each of 4 actors (one a GPU) looped 4 s for 2,000 rows; the wall clock saw 800 rows/s over 4 GPUs
    assert figures["rows_per_s_per_gpu"] == {"wall": 200.0, "steady": 500.0}
    assert figures["real_tokens_per_s_per_gpu"] == {"wall": 4000, "steady": 10000}
    assert figures["mean_real_tokens_per_row"] == 20.0 and figures["actor_start_seconds"] == 5.0
    per_token = gpu_check.flops_per_token(str(tmp_path), 20.0)
    assert figures["mfu_real_tokens"]["steady"] == round(10000 * per_token / 989e12, 4)
    assert "mfu_real_tokens" not in gpu_check.label_figures(summary, str(tmp_path), gpus=0, peak_tflops=None, memory=None)
    summary["pool"] |= {"labelling_s": 10.0, "actors": [{"actor": "a1", "gpu": "NVIDIA H200", "isa": "AVX2 AVX-512",
                                                          "ready_s": 2.0, "first_unit_s": 2.1, "units": 4,
                                                          "busy_share": 0.93, "pid": 7}]}
    busy = gpu_check.label_figures(summary, str(tmp_path), gpus=1, peak_tflops=None, memory=None)["actors_busy"]
    assert busy == [{"actor": "a1", "gpu": "NVIDIA H200", "isa": "AVX2 AVX-512", "ready_s": 2.0, "first_unit_s": 2.1,
                     "units": 4, "busy_share": 0.93}]  # each GPU actor's share of the night
