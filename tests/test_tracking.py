"""MLflow: a training run tracked and its model registered (conftest's ``trained``, against a real `mlflow server`),
a model promoted and labelled through models:/NAME@ALIAS; the pure pieces in milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import easy_rows, put_parquet, read_output, resolve
from textlabel import storage, tracking
from textlabel.config import ConfigError


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


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


def test_a_tracked_run_logs_what_metrics_json_holds_and_registers_its_model(trained):
    """Teams compare runs in MLflow: what it shows must be what the run wrote."""
    client, out = _client(trained["mlflow"]), resolve(trained["output"])
    metrics = storage.read_json(out.join("metrics.json"))
    run = client.get_run(metrics["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "e2e"
    for name in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "samples_per_second_per_worker"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert logged == {e["epoch"]: pytest.approx(e[name]) for e in metrics["epochs"]}, name
    assert run.data.metrics["best_val_macro_f1"] == pytest.approx(metrics["validation"]["val_macro_f1"])
    assert run.data.metrics["best_epoch"] == metrics["best_epoch"]
    assert run.data.params["learning_rate"] == "0.003" and run.data.params["epochs"] == "6"
    files = {f.path for d in ("model", "report") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/label_map.json",
            "model/textlabel_calibration.json", "report/report.md", "report/confusion_matrix.png",
            "report/training_curves.png"} <= files
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "model", "report"}
    version = client.get_model_version("sentiment", "1")
    assert version.run_id == run.info.run_id and version.source.endswith("/artifacts/model")
    assert metrics["mlflow"]["registered"] == {"name": "sentiment", "version": "1"}


def test_a_promoted_model_labels_through_the_registry(trained, s3_prefix, capsys, caplog):
    """A team promotes a run's model to @champion; the nightly job labels with models:/NAME@champion."""
    from textlabel.cli import label_main, promote_main

    url = trained["mlflow"]
    assert promote_main(["--model", f"{trained['output']}/model", "--name", "sentiment", "--alias", "champion",
                         "--mlflow-tracking-uri", url]) == 0
    assert capsys.readouterr().out.strip() == "models:/sentiment/2"
    client = _client(url)
    run_id = storage.read_json(resolve(trained["output"]).join("metrics.json"))["mlflow"]["run_id"]
    assert client.get_model_version("sentiment", "2").run_id == run_id  # the tracked run's artifact, not a copy
    rows = easy_rows(300, seed=31)
    put_parquet(f"{s3_prefix}/in/a.parquet", rows.select(["text"]))
    out = f"{s3_prefix}/out"
    # A version that does not exist fails in seconds, before Ray or any model loads.
    assert label_main(["--model", "models:/sentiment/9", "--mlflow-tracking-uri", url, "--input", f"{s3_prefix}/in/",
                       "--output", out]) == 2
    assert "--model models:/sentiment/9:" in caplog.text
    assert label_main(["--model", "models:/sentiment@champion", "--mlflow-tracking-uri", url, "--input",
                       f"{s3_prefix}/in/", "--output", out, "--max-length", "32", "--num-actors", "1"]) == 0
    labelled = read_output(out)
    assert labelled.num_rows == rows.num_rows
    assert np.mean(np.array(labelled["label"].to_pylist()) == np.array(rows["label"].to_pylist())) > 0.9
    summary = storage.read_json(resolve(out).join("_summary.json"))
    registered = summary["registered_model"]
    assert (registered["name"], registered["version"], registered["alias"]) == ("sentiment", "2", "champion")
    assert summary["model"].startswith("models:/sentiment/2 [model.safetensors sha256:")
    from textlabel.manifest import Manifest

    state = Manifest.load(resolve(out)).state  # each file's record names the version that labelled it
    assert state["model"].to_pylist() == [summary["model"]]
