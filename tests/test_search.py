"""Hyperparameter search on Ray Tune: the search space and trial settings in milliseconds; one tiny search end to
end as `ray job submit -- python jobs/tune.py`, its driver killed mid-search and the search resumed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from conftest import easy_rows
from rayhead import submit
from textlabel import search
from textlabel.config import ConfigError, SearchConfig, TrainConfig, parse_config


@pytest.mark.parametrize("space, problem", [
    ({"learning_rate": {"loguniform": [1e-5, 1e-4]}, "batch_size": {"choice": [16, 32]}}, None),
    ({"tasks": {"choice": [["coarse=1", "fine=1"], ["coarse=1", "fine=2"]]}, "epochs": {"randint": [2, 4]}}, None),
    ({"learning_rate": {"grid": [1e-5, 1e-4]}}, None),
    ({"model": {"choice": ["a", "b"]}}, "'model' cannot be searched"),
    ({"learning_rate": {"normal": [0, 1]}}, "expected one of loguniform"),
    ({"learning_rate": {"loguniform": [0, 1e-4]}}, "0 < low < high"),
    ({"warmup_ratio": {"uniform": [0.2, 0.1]}}, "0 <= low < high"),
    ({"batch_size": {"choice": []}}, "needs a list"),
    ([], "expected a mapping"),
])
def test_a_search_space_is_checked_before_anything_runs(space, problem):
    found = search.space_problems(space)
    assert (found == []) if problem is None else any(problem in p for p in found), found


def test_the_default_space_is_valid_and_every_draw_is_a_valid_training_config():
    from ray.tune.search.sample import Domain

    assert search.space_problems(search.DEFAULT_SPACE) == []
    made = search.param_space(search.DEFAULT_SPACE)
    rng = np.random.default_rng(0)
    base = TrainConfig(data="d.parquet", output="s3://b/search")
    for _ in range(20):
        drawn = {k: v.sample(random_state=rng) if isinstance(v, Domain) else v for k, v in made.items()}
        cfg = search.trial_config(base, drawn, "s3://b/search/trials/t1")
        assert 2e-5 <= cfg.learning_rate <= 2e-4 and 2e-4 <= cfg.head_learning_rate <= 5e-3
        assert cfg.batch_size in (16, 32) and cfg.output == "s3://b/search/trials/t1" and cfg.mlflow_register is None


def test_a_trial_that_draws_a_bad_setting_is_refused_and_concurrency_fits_the_cluster():
    base = TrainConfig(data="d.parquet", output="o", num_workers=2)
    with pytest.raises(ConfigError, match="--batch-size must be > 0"):
        search.trial_config(base, {"batch_size": 0}, "o/trials/t")
    assert search.concurrency(base, {"CPU": 8.0}) == 4 and search.concurrency(base, {"CPU": 1.0}) == 1
    gpu = TrainConfig(data="d.parquet", output="o", num_workers=2, use_gpu=True)
    assert search.concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4


def test_search_options_are_checked_with_the_training_ones(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("model: {choice: [a, b]}\n")
    with pytest.raises(ConfigError) as err:
        parse_config(SearchConfig, ["--data", "d", "--output", "o", "--num-samples", "0", "--reduction-factor", "1",
                                    "--batch-size", "0", "--search-space", str(bad)], "textlabel tune", "")
    text = str(err.value)
    assert "--num-samples must be > 0" in text and "--reduction-factor must be > 1" in text
    assert "--batch-size must be > 0" in text and "'model' cannot be searched" in text


def _learning(trial: Path) -> bool:
    """A trial with the rate that learns (ASHA never stops it), as its run_config.json records."""
    import json

    try:
        return json.loads((trial / "run_config.json").read_text())["config"]["learning_rate"] == 3e-3
    except (OSError, ValueError):
        return False


def _kill_driver(output: str, trials: Path, timeout: float = 300) -> Path:
    """Wait for the event, the first checkpoint of a trial that learns recorded (Ray Train's snapshot under its
    output), then SIGKILL the search's driver: the one process whose command line is jobs/tune.py with this test's
    --output. Returns that trial's output."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s.parents[1] for s in trials.glob("*/checkpoints/checkpoint_manager_snapshot.json") if _learning(s.parents[1])]
        if found:
            break
        assert time.monotonic() < deadline, "no trial recorded a checkpoint"
        time.sleep(0.05)
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(a.endswith("jobs/tune.py") for a in cmd) and output in cmd:
            os.kill(p.pid, signal.SIGKILL)
            return found[0]
    raise AssertionError("the search's driver was not found")


def test_a_search_stops_bad_trials_exports_the_best_and_resumes_after_its_driver_is_killed(ray_head, repo_root, tiny_gpt2,
                                                                                          tmp_path):
    """Teams search settings on the cluster overnight: bad trials stop early, the best model is exported as a
    training run's, and a killed search resumes where it was instead of starting over."""
    from transformers import pipeline

    # Epochs of a few seconds, and 4 of them at most: ASHA's stop of a bad trial after its first epoch lands while it
    # trains the next three (and there is a second rung, at epoch 2). The trials that learn stop on their own
    # patience once their macro-F1 stops improving.
    rows = easy_rows(6000, seed=41)
    pq.write_table(rows.slice(0, 5000), tmp_path / "train.parquet")
    pq.write_table(rows.slice(5000), tmp_path / "val.parquet")
    space = tmp_path / "space.yaml"  # a rate that learns and one that cannot, twice each, in this order
    space.write_text("learning_rate: {grid: [3.0e-3, 1.0e-7]}\nhead_learning_rate: {grid: [3.0e-3]}\n")
    output = str(tmp_path / "search")
    args = ["jobs/tune.py", "--data", str(tmp_path / "train.parquet"), "--validation-data", str(tmp_path / "val.parquet"),
            "--output", output, "--model", tiny_gpt2, "--num-samples", "2", "--epochs", "4", "--search-space", str(space),
            "--num-workers", "1", "--max-concurrent-trials", "2", "--batch-size", "16", "--max-length", "32"]
    submit(ray_head, repo_root, args, wait=False)
    # The event: the first trial's first checkpoint is recorded. The search's driver dies there, mid-trial.
    first = _kill_driver(output, tmp_path / "search" / "trials")
    assert not (tmp_path / "search" / "trials.parquet").exists()
    submit(ray_head, repo_root, args)  # the same command: it resumes
    table = pq.read_table(tmp_path / "search" / "trials.parquet").to_pylist()
    assert len(table) == 4
    status = {r["trial_id"]: r["status"] for r in table}
    assert "stopped early (ASHA)" in status.values(), status
    for r in table:  # only the rate that cannot learn is stopped (two trials run at once: which of them, varies)
        assert r["status"] == "completed" if r["learning_rate"] == 3e-3 else r["status"] != "errored", r
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
