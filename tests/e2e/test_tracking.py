"""MLflow end to end: the session's trained run tracked in a real `mlflow server` and its model registered,
promoted and labelled through the registry."""

from __future__ import annotations

import numpy as np
import pytest

from support.corpus import easy_rows, put_parquet, read_output, resolve
from textlabel import storage

pytestmark = pytest.mark.xdist_group("trained")  # one worker: one trained model


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


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
    assert summary["model"].startswith("sha256:") and "[model.safetensors sha256:" in summary["model"]  # its content
    from textlabel.manifest import Manifest

    state = Manifest.load(resolve(out)).state  # each file's record names the model that labelled it, by content
    assert state["model"].to_pylist() == [summary["model"]]
