"""MLflow tracking (tracking.py) without a server: metric names, registry URIs, no import when off, and an
unreachable server refused before Ray."""

from __future__ import annotations

import pytest

from support.corpus import easy_rows
from textlabel import tracking
from textlabel.config import ConfigError


def test_without_a_tracking_uri_mlflow_is_not_imported(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from textlabel import cli, label, search, train, tracking; "
            "from textlabel.config import TrainConfig, LabelConfig; "
            "cfg = TrainConfig(data='d', output='o'); cfg.validate(); "
            "print(tracking.tracking_uri(cfg.mlflow_tracking_uri), tracking.is_registered('s3://b/model'), "
            "'mlflow' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["None", "False", "False"]


def test_an_unreachable_tracking_server_fails_before_ray_starts(tiny_gpt2, tmp_path, caplog):
    from textlabel.cli import train_main
    from textlabel.train import run_training

    import pyarrow.parquet as pq

    pq.write_table(easy_rows(40, seed=5), tmp_path / "d.parquet")
    args = ["--data", str(tmp_path / "d.parquet"), "--output", str(tmp_path / "o"), "--model", tiny_gpt2,
            "--mlflow-tracking-uri", "http://127.0.0.1:9"]  # the discard port: nothing listens
    assert train_main(args) == 2
    assert "--mlflow-tracking-uri http://127.0.0.1:9: the tracking server does not answer" in caplog.text
    from textlabel.config import TrainConfig, parse_config

    started: list[bool] = []
    with pytest.raises(ConfigError):
        run_training(parse_config(TrainConfig, args, "t", "t"), start_ray=lambda: started.append(True))
    assert not started and not (tmp_path / "o" / "model").exists()


def test_epoch_metrics_flatten_every_number_and_each_task_s_figures():
    epoch = {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.9, "val_rows": 10, "peak_rss_mb_per_worker": [1.0, 2.0],
             "val_per_class": {"a": {"f1": 1.0}}, "stopped": True,
             "val_tasks": {"fine": {"loss": 1.5, "accuracy": 0.6, "macro_f1": 0.3, "rows": 10}},
             "train_task_loss": {"fine": 1.2}}
    assert tracking.epoch_metrics(epoch) == {"train_loss": 0.5, "val_accuracy": 0.9, "val_rows": 10.0, "val_fine_loss": 1.5,
                                             "val_fine_accuracy": 0.6, "val_fine_macro_f1": 0.3, "train_fine_loss": 1.2}


@pytest.mark.parametrize("model, expected", [
    ("models:/sentiment/3", ("sentiment", "3", None)),
    ("models:/sentiment@champion", ("sentiment", None, "champion")),
    ("models:/sentiment", None), ("models:/sentiment/latest", None), ("models:/@x", None), ("models:/a/1/2", None),
])
def test_registered_model_names_are_parsed_or_refused(model, expected):
    if expected is None:
        with pytest.raises(ConfigError, match="expected models:/NAME/VERSION or models:/NAME@ALIAS"):
            tracking.parse_registered(model)
    else:
        assert tracking.parse_registered(model) == expected
