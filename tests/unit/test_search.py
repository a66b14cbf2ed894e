"""The search (search.py): the search space, its checks and trial settings, in milliseconds; no Ray."""

from __future__ import annotations


import numpy as np
import pytest

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


