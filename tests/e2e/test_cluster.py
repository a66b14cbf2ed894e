"""Promise: the GPU check (benchmarks/gpu_check.py) runs as a job submitted to a cluster's head (a real `ray start
--head`, token auth on). No GPU here: its steps run reduced on CPU."""

from __future__ import annotations

import json

import pytest

from support.rayhead import submit

pytestmark = pytest.mark.xdist_group("head")  # one worker: one `ray start --head`


def test_gpu_check_runs_reduced_on_cpu(ray_head, repo_root, tmp_path):
    """Promise: the GPU check runs as a submitted job and reports every figure the README's GPU section uses."""
    submit(ray_head, repo_root, ["benchmarks/gpu_check.py", "--json-out", str(tmp_path / "r.json"), "--train-rows", "32",
                                 "--label-rows", "200", "--bert-base-rows", "40"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gpus"] == 0 and report["train"]["workers"] == 2 and report["train"]["samples_per_s"] > 0
    tuned, base = report["label"].values()
    assert (tuned["rows"], base["rows"]) == (200, 40)
    for figures in (tuned, base):
        assert figures["actors"] == 2  # the machine's pool: 2 CPUs, one actor each
        assert 0 < figures["rows_per_s_per_gpu"]["wall"] < figures["rows_per_s_per_gpu"]["steady"]
        assert figures["real_tokens_per_s_per_gpu"]["steady"] > figures["rows_per_s_per_gpu"]["steady"] * 8  # 8-46 words a row
        assert 0 <= figures["padding_share"] < 0.5 and 0 <= figures["input_wait_share"] < 1
        assert figures["peak_gpu_memory_gib"] is None and "mfu_real_tokens" not in figures  # no GPU, no bf16 peak
    # BERT-base costs about 8x all-MiniLM-L6-v2 per token (PERF.md: 0.17 against 0.021 GFLOP at ~20 tokens)
    assert 7 < base["gflop_per_real_token"] / tuned["gflop_per_real_token"] < 9


