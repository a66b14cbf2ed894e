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


SECRET_URI = "http://user:secret@mlflow:5000"


@pytest.mark.parametrize("uri", ["http://mlflow:", "http://user:secret@mlflow:notaport", "http://user:secret@:5000",
                                 "https://mlflow:99999", "http://user:secret/x@mlflow:5000"])
def test_a_malformed_tracking_uri_is_a_config_error_that_shows_no_password(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="^invalid configuration:\n  - --mlflow-tracking-uri .*give it as http") as found:
        tracking.tracking_uri(uri)
    assert "secret" not in str(found.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI") as found:
        tracking.tracking_uri(None)
    assert "secret" not in str(found.value)


@pytest.mark.parametrize("uri", [SECRET_URI, "http://user:secret@mlflow", "https://mlflow", "http://[::1]:5000",
                                 "http://127.0.0.1:5000/prefix/", "file:///tmp/mlruns", "sqlite:///mlflow.db", "databricks"])
def test_a_well_formed_tracking_uri_is_used_as_given(uri):
    assert tracking.tracking_uri(uri) == uri


def test_a_malformed_tracking_uri_stops_the_job_with_exit_2_before_the_data_is_read(tmp_path, caplog, monkeypatch):
    from textlabel.cli import train_main

    monkeypatch.setattr(__import__("sys"), "excepthook", __import__("sys").excepthook)  # restored after the test
    args = ["--data", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o"),
            "--mlflow-tracking-uri", "http://user:secret@mlflow:notaport"]
    assert train_main(args) == 2
    assert "--mlflow-tracking-uri http://***@mlflow:notaport: its port is not a number" in caplog.text
    assert "secret" not in caplog.text and "missing.parquet" not in caplog.text and "Traceback" not in caplog.text


def test_the_health_probe_sends_the_userinfo_as_basic_auth_not_as_the_host():
    import base64

    request = tracking.health_request("http://user:p%40ss@mlflow:5000/")
    assert request.full_url == "http://mlflow:5000/health"
    assert base64.b64decode(request.get_header("Authorization").split()[1]) == b"user:p@ss"
    assert not tracking.health_request("https://[::1]:5000").has_header("Authorization")


def test_an_unreachable_server_with_a_password_is_named_without_it():
    with pytest.raises(ConfigError, match="does not answer") as found:
        tracking._reachable(None, "http://user:secret@127.0.0.1:9")  # the discard port: nothing listens
    assert "http://***@127.0.0.1:9" in str(found.value) and "secret" not in str(found.value)


class FakeClient:
    """What start_run and finish_run send MLflow, kept."""

    def __init__(self):
        self.sent: list = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.sent.append((name, args, kwargs))
            if name == "create_run":
                return type("R", (), {"info": type("I", (), {"run_id": "r1"})})()
            return None
        return call


@pytest.fixture
def fake_mlflow(monkeypatch):
    import sys
    import types

    entities = types.ModuleType("mlflow.entities")  # what start_run/finish_run import, without MLflow's import time
    entities.Param = lambda key, value: (key, value)
    entities.Metric = lambda *args: args
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    client = FakeClient()
    monkeypatch.setattr(tracking, "_client", lambda uri: client)
    monkeypatch.setattr(tracking, "_reachable", lambda client, uri: None)
    return client


def test_a_tracked_run_writes_and_sends_its_tracking_uri_without_the_password(tmp_path, fake_mlflow):
    from textlabel import storage

    out = storage.resolve(str(tmp_path / "out"))
    for part in ("model", "report"):
        (tmp_path / "out" / part).mkdir(parents=True)
        (tmp_path / "out" / part / "f.json").write_text("{}")
    config = {"data": "s3://bucket/train/", "mlflow_tracking_uri": SECRET_URI, "epochs": 3}
    run = tracking.start_run(SECRET_URI, "e", out, config)
    assert run.tracking_uri == SECRET_URI  # the connection keeps its credentials
    metrics = {"labels": ["neg", "pos"], "best_epoch": 1, "validation": {"epoch": 1, "val_macro_f1": 0.9},
               "mlflow": {"tracking_uri": SECRET_URI}}
    record = tracking.finish_run(run, out, metrics, None)
    written = (tmp_path / "out" / tracking.RUN_FILE).read_text()
    assert "secret" not in written + repr(record) + repr(fake_mlflow.sent)
    assert record["tracking_uri"] == "http://***@mlflow:5000"
    assert ("mlflow_tracking_uri", "http://***@mlflow:5000") in next(
        kw["params"] for name, _, kw in fake_mlflow.sent if name == "log_batch" and "params" in kw)
    # A rerun with the password rotated continues the same MLflow run (mlflow_run.json holds the redacted URI).
    fake_mlflow.sent.clear()
    again = tracking.start_run("http://user:rotated@mlflow:5000", "e", out, config)
    assert again.run_id == "r1" and [name for name, _, _ in fake_mlflow.sent] == ["update_run"]


def test_a_finished_run_recorded_with_a_redacted_uri_is_not_tracked_again(tmp_path, monkeypatch):
    from textlabel import storage
    from textlabel.config import TrainConfig
    from textlabel.train import _finished

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = storage.resolve(str(tmp_path))
    storage.write_json(out.join("metrics.json"), {"best_epoch": 1, "mlflow": {"tracking_uri": "http://***@mlflow:5000"}})
    assert _finished(out, TrainConfig(data="d", output=str(tmp_path), mlflow_tracking_uri=SECRET_URI)) is not None
    assert _finished(out, TrainConfig(data="d", output=str(tmp_path), mlflow_tracking_uri="http://elsewhere:5000")) is None


def test_a_served_registered_model_s_record_has_no_password():
    found = tracking.Registered("sentiment", "3", "champion",
                                f"{SECRET_URI}/api/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/model")
    assert found.record()["source"] == "http://***@mlflow:5000/api/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/model"
