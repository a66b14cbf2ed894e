"""`ray job submit` end to end against a real `ray start --head` (token auth on), S3 on loopback."""

from __future__ import annotations

import json


from support.corpus import corpus, read_output, resolve
from support.rayhead import processes, start, submit
from textlabel import storage


def _label_args(model: str, prefix: str, *extra: str) -> list[str]:
    return ["jobs/label.py", "--model", model, "--input", f"{prefix}/in/", "--output", f"{prefix}/out",
            "--label-prefix", "pred_", "--max-length", "64", "--batch-size", "32", *extra]


def _assert_exactly_once(prefix: str, ids: list[int]) -> None:
    got = read_output(f"{prefix}/out")["id"].to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(ids)


def test_a_killed_predictor_actor_is_replaced_and_the_run_completes_exactly_once(ray_head, repo_root, tiny_model,
                                                                                 s3_endpoint, s3_prefix):
    """Promise: a predictor actor that dies (out of memory, a lost node) is replaced and the night completes, every
    row once; and the job's log, read through a pipe, is one progress line every so often, not redrawn bars."""
    rows = corpus(f"{s3_prefix}/in", [50] * 10)
    held = s3_endpoint.hold("PUT", f"{s3_prefix[5:]}/out/part-")  # the actor, writing its first output
    job = start(ray_head, repo_root, _label_args(tiny_model, s3_prefix, "--num-actors", "1", "--progress-seconds", "0.5"))
    held.wait()
    victims = processes(ray_head, "PartLabeller")
    assert len(victims) == 1  # the pool's one actor, killed with a write on the wire
    victims[0].kill()
    held.release()
    job.succeeded()
    summary = storage.read_json(resolve(f"{s3_prefix}/out/_summary.json"))
    assert (summary["files_labelled"], summary["files_failed"], summary["rows_out"]) == (10, 0, 500)
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
    log = job.log()
    progress = [line for line in log.splitlines() if "textlabel.progress: labelled " in line]
    assert len(progress) >= 2 and "labelled 10/10 files (100% of the bytes): 500 rows" in progress[-1], log[-3000:]
    assert "\r" not in log and "%|" not in log, log[-3000:]  # no bar, redrawn or not


def test_gpu_check_runs_reduced_on_cpu(ray_head, repo_root, tmp_path):
    # Submitted to the head, as it runs on a GPU cluster's head: no GPU here, so its steps run reduced on CPU.
    submit(ray_head, repo_root, ["benchmarks/gpu_check.py", "--json-out", str(tmp_path / "r.json"), "--train-rows", "64",
                                  "--label-rows", "400", "--bert-base-rows", "100"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gpus"] == 0 and report["train"]["workers"] == 2 and report["train"]["samples_per_s"] > 0
    tuned, base = report["label"].values()
    assert (tuned["rows"], base["rows"]) == (400, 100)
    for figures in (tuned, base):
        assert figures["actors"] == 2  # the machine's pool: 2 CPUs, one actor each
        assert 0 < figures["rows_per_s_per_gpu"]["wall"] < figures["rows_per_s_per_gpu"]["steady"]
        assert figures["real_tokens_per_s_per_gpu"]["steady"] > figures["rows_per_s_per_gpu"]["steady"] * 8  # 8-46 words a row
        assert 0 <= figures["padding_share"] < 0.5 and 0 <= figures["input_wait_share"] < 1
        assert figures["peak_gpu_memory_gib"] is None and "mfu_real_tokens" not in figures  # no GPU, no bf16 peak
    # BERT-base costs about 8x all-MiniLM-L6-v2 per token (PERF.md: 0.17 against 0.021 GFLOP at ~20 tokens)
    assert 7 < base["gflop_per_real_token"] / tuned["gflop_per_real_token"] < 9


