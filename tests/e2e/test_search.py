"""A search on Ray Tune, submitted as users run it: ASHA, the exported best trial, resume after a killed driver."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from support.corpus import easy_rows
from support.rayhead import processes, start, submit


def _learning(trial: Path) -> bool:
    """A trial with the rate that learns (ASHA never stops it), as its run_config.json records."""
    import json

    try:
        return json.loads((trial / "run_config.json").read_text())["config"]["learning_rate"] == 3e-3
    except (OSError, ValueError):
        return False


def _kill_driver(head: dict, output: str, trials: Path, timeout: float = 300) -> Path:
    """Wait for the event, the first checkpoint of a trial that learns recorded (Ray Train's snapshot under its
    output), then SIGKILL the search's driver: the head's one process running jobs/tune.py with this test's
    --output. Returns that trial's output."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s.parents[1] for s in trials.glob("*/checkpoints/checkpoint_manager_snapshot.json") if _learning(s.parents[1])]
        if found:
            break
        assert time.monotonic() < deadline, "no trial recorded a checkpoint"
        time.sleep(0.05)
    drivers = [p for p in processes(head, f"--output {output} ") if p.name().startswith("python")]
    assert len(drivers) == 1, drivers
    drivers[0].kill()
    return found[0]


def test_a_search_stops_bad_trials_exports_the_best_and_resumes_after_its_driver_is_killed(ray_head, repo_root, tiny_gpt2,
                                                                                          tmp_path):
    """Teams search settings on the cluster overnight: bad trials stop early, the best model is exported as a
    training run's, and a killed search resumes where it was instead of starting over."""
    from transformers import pipeline

    # Two trials, one at a time: a rate that learns, then one that cannot. ASHA compares the second's first epoch
    # with the first's and stops it; with epochs of a few seconds, and 4 at most, the stop lands while it trains.
    # The trial that learns stops on its own patience once its macro-F1 stops improving.
    rows = easy_rows(6000, seed=41)
    pq.write_table(rows.slice(0, 5000), tmp_path / "train.parquet")
    pq.write_table(rows.slice(5000), tmp_path / "val.parquet")
    space = tmp_path / "space.yaml"  # a rate that learns and one that cannot, in this order
    space.write_text("learning_rate: {grid: [3.0e-3, 1.0e-7]}\nhead_learning_rate: {grid: [3.0e-3]}\n")
    output = str(tmp_path / "search")
    args = ["jobs/tune.py", "--data", str(tmp_path / "train.parquet"), "--validation-data", str(tmp_path / "val.parquet"),
            "--output", output, "--model", tiny_gpt2, "--num-samples", "1", "--epochs", "4", "--search-space", str(space),
            "--num-workers", "1", "--max-concurrent-trials", "1", "--batch-size", "16", "--max-length", "32"]
    job = start(ray_head, repo_root, args)
    # The event: the first trial's first checkpoint is recorded. The search's driver dies there, mid-trial.
    first = _kill_driver(ray_head, output, tmp_path / "search" / "trials")
    assert "succeeded" not in job.wait()
    assert not (tmp_path / "search" / "trials.parquet").exists()
    submit(ray_head, repo_root, args)  # the same command: it resumes
    table = pq.read_table(tmp_path / "search" / "trials.parquet").to_pylist()
    assert [(r["learning_rate"], r["status"]) for r in table] == [(3e-3, "completed"), (1e-7, "stopped early (ASHA)")]
    killed = (first / "metrics.json")
    assert killed.exists(), "the interrupted trial did not finish"
    import json

    resumed = json.loads(killed.read_text())
    assert resumed["resumed_at_epochs"] == [1] and [e["epoch"] for e in resumed["epochs"]][:2] == [1, 2]
    # The best trial's model, exported like a training run's, scores what its trial reported.
    summary = json.loads((tmp_path / "search" / "search.json").read_text())
    best = next(r for r in table if r["trial_id"] == summary["best"]["trial_id"])
    assert best["val_macro_f1"] == max(r["val_macro_f1"] for r in table if r["status"] == "completed")
    model = tmp_path / "search" / "best" / "model"
    assert {"config.json", "model.safetensors", "textlabel_calibration.json"} <= {p.name for p in model.iterdir()}
    assert (tmp_path / "search" / "best" / "report" / "report.md").exists()
    val = rows.slice(5000)
    predicted = [p["label"] for p in pipeline("text-classification", model=str(model), device="cpu")(
        val["text"].to_pylist(), batch_size=64)]
    accuracy = float(np.mean(np.array(predicted) == np.array(val["label"].to_pylist())))
    assert accuracy == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert (tmp_path / "search" / "search.png").read_bytes().startswith(b"\x89PNG")
