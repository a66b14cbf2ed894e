"""End-to-end fine-tuning through the real entry point, against S3 on loopback."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.compute as pc
import pytest

from support.corpus import easy_rows, put_parquet, resolve
from textlabel import storage
from textlabel.cli import train_main

pytestmark = pytest.mark.xdist_group("trained")  # one worker: one trained model


def _train(args: list[str]) -> int:
    return train_main([str(a) for a in args])


def _metrics(output: str) -> dict:
    return storage.read_json(resolve(output).join("metrics.json"))


def test_training_learns_records_every_epoch_stops_early_and_exports_the_best(trained):
    """Promise: train.py learns data-parallel from S3, records every epoch, stops early and exports the best."""
    metrics = _metrics(trained["output"])
    f1 = [e["val_macro_f1"] for e in metrics["epochs"]]
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, len(f1) + 1))
    # --epochs 6 --early-stopping-patience 1: it stops after the first epoch that does not beat the best so far.
    assert metrics["stopped_early"] and len(f1) < 6
    assert f1[-1] <= max(f1[:-1]) and all(f1[i] > max(f1[:i]) for i in range(1, len(f1) - 1))
    assert metrics["best_epoch"] == f1.index(max(f1)) + 1
    assert metrics["validation"] == metrics["epochs"][metrics["best_epoch"] - 1]
    assert metrics["labels"] == ["negative", "positive"]
    assert metrics["train_rows"] + metrics["validation_rows"] == trained["rows"]
    # The whole held-out set is evaluated (gathered from both workers), not one worker's shard.
    assert all(e["val_rows"] == metrics["validation_rows"] == 240 for e in metrics["epochs"])
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert metrics["validation"]["val_accuracy"] > 0.9
    per_class = metrics["validation"]["val_per_class"]
    assert set(per_class) == {"negative", "positive"}
    assert sum(c["support"] for c in per_class.values()) == 240


def test_the_model_carries_its_temperature_and_training_labels_and_the_report_its_calibration(trained):
    """Promise: the exported model carries its calibration and training label counts."""
    model = resolve(trained["output"]).join("model")
    fitted = storage.read_json(model.join("textlabel_calibration.json"))["tasks"][0]
    metrics = _metrics(trained["output"])
    # The exported model is the best epoch's: its temperature is the one fitted after that epoch.
    assert fitted == metrics["calibration"][0] == {"name": "label", **metrics["validation"]["val_calibration"]}
    assert fitted["temperature"] > 0 and fitted["rows"] == 240
    assert fitted["nll_after"] <= fitted["nll_before"]  # the temperature minimises NLL on these rows (1.0 is a candidate)
    counts = storage.read_json(model.join("textlabel_training_labels.json"))["tasks"][0]
    assert counts["labels"] == ["negative", "positive"] and sum(counts["counts"]) == metrics["train_rows"]
    report = storage.read_bytes(resolve(trained["output"]).join("report", "report.md")).decode()
    assert "## Scores" in report and f"Temperature {fitted['temperature']:.3f}" in report
    assert storage.read_bytes(resolve(trained["output"]).join("report", "reliability.png")).startswith(b"\x89PNG")


def test_saved_model_loads_in_a_plain_transformers_pipeline(trained, tmp_path):
    """Promise: the exported model loads in a plain transformers pipeline() and labels as trained."""
    from transformers import pipeline

    model_loc = resolve(trained["output"]).join("model")
    local = storage.Location(str(tmp_path), resolve(str(tmp_path)).fs, str(tmp_path))
    names = storage.copy_dir(model_loc, local)
    assert {"config.json", "model.safetensors", "tokenizer.json", "textlabel_calibration.json"} <= set(names)
    classify = pipeline("text-classification", model=str(tmp_path), device="cpu")
    texts = ["the film was superb and moving", "a dull , tedious plot", "really excellent acting", "painful and boring"]
    predicted = [p["label"] for p in classify(texts)]
    assert predicted == ["positive", "negative", "positive", "negative"]


def test_rerun_of_a_finished_run_has_nothing_to_do(trained, caplog):
    """Promise: rerunning the same command after the run finished trains and rewrites nothing (a killed run resumes
    from its checkpoints: test_search.py kills a trial's driver, test_lora.py a worker)."""
    before = _metrics(trained["output"])
    model = resolve(trained["output"]).join("model")
    weights = {f["path"]: f["fingerprint"] for f in storage.list_versions(model, ".safetensors")}
    assert weights and before["mlflow"]["registered"] == {"name": "sentiment", "version": "1"}
    assert _train(trained["args"]) == 0
    assert "the run finished already (its metrics.json): nothing left to train" in caplog.text
    assert not [m for m in caplog.messages if m.startswith("training ")]  # no Ray Train run started
    assert _metrics(trained["output"]) == before
    assert {f["path"]: f["fingerprint"] for f in storage.list_versions(model, ".safetensors")} == weights
    # Its MLflow run is still the only one of this output, and finished.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.run_id for r in runs] == [before["mlflow"]["run_id"]] and runs[0].info.status == "FINISHED"


def test_rerun_with_other_settings_is_refused(trained, caplog):
    """Promise: rerunning on the same output with other settings is refused, naming the setting."""
    args = list(trained["args"])
    args[args.index("--learning-rate") + 1] = "1e-4"
    assert _train(args) == 2
    assert "already holds a run with different learning_rate" in caplog.text


@pytest.mark.parametrize("case, expected", [
    ("missing_column", "no column 'label'; the columns are: text, sentiment"),
    ("one_class", "only one class"),
    ("all_null", "no usable rows"),
    ("unknown_type", "unknown file type"),
    ("missing_bucket", "not found"),
])
def test_bad_input_fails_before_training(ray_session, s3_prefix, tiny_model, caplog, case, expected):
    """Promise: bad training data fails before Ray starts, with exit 2 and one line naming the fix."""
    data = f"{s3_prefix}/data.parquet"
    if case == "missing_column":
        put_parquet(data, easy_rows(20).rename_columns(["text", "sentiment"]))
    elif case == "one_class":
        rows = easy_rows(20)
        put_parquet(data, rows.filter(pc.equal(rows["label"], "positive")))
    elif case == "all_null":
        import pyarrow as pa
        put_parquet(data, pa.table({"text": ["a", "b"], "label": pa.array([None, None], pa.string())}))
    elif case == "unknown_type":
        data = f"{s3_prefix}/data.jsonl"
        storage.write_bytes(resolve(data), b"{}")
    else:
        data = "s3://no-such-bucket/data/"
    assert _train(["--data", data, "--output", f"{s3_prefix}/out", "--model", tiny_model]) == 2
    assert expected in caplog.text
    assert not storage.exists(resolve(f"{s3_prefix}/out"))


def test_bad_input_exit_code_from_the_script(repo_root, tmp_path):
    """Promise: the job script itself exits 2 on bad input, without a traceback, before Ray starts."""
    (tmp_path / "d.csv").write_text("sentence,label\nhello,1\n")
    proc = subprocess.run(
        [sys.executable, str(repo_root / "jobs/train.py"), "--data", str(tmp_path / "d.csv"), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no column 'text'; the columns are: sentence, label" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr  # failed before Ray
