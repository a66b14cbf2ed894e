"""textlabel.train's rerun rule, on a local output (no Ray): a rerun of a finished run has nothing to do unless it
asks for tracking or a registration the run did not get."""

from __future__ import annotations

import pytest

from textlabel import storage
from textlabel.config import TrainConfig
from textlabel.train import _finished

MLFLOW = {"tracking_uri": "http://mlflow:5000", "experiment": "e", "run_id": "r1", "model_uri": "runs:/r1/model"}


@pytest.mark.parametrize("recorded, asked, nothing_left", [
    (None, {}, False),  # no metrics.json: training never ended
    ({}, {}, True),
    ({"mlflow": MLFLOW}, {"mlflow_tracking_uri": MLFLOW["tracking_uri"]}, True),
    ({}, {"mlflow_tracking_uri": MLFLOW["tracking_uri"]}, False),  # ended while the server was gone: finish the run
    ({"mlflow": MLFLOW}, {"mlflow_tracking_uri": "http://elsewhere:5000"}, False),
    ({"mlflow": MLFLOW}, {"mlflow_tracking_uri": MLFLOW["tracking_uri"], "mlflow_register": "sentiment"}, False),
    ({"mlflow": {**MLFLOW, "registered": {"name": "sentiment", "version": "1"}}},
     {"mlflow_tracking_uri": MLFLOW["tracking_uri"], "mlflow_register": "sentiment"}, True),
])
def test_a_finished_run_is_rerun_only_for_what_it_lacks(tmp_path, monkeypatch, recorded, asked, nothing_left):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = storage.resolve(str(tmp_path))
    if recorded is not None:
        storage.write_json(out.join("metrics.json"), {"best_epoch": 2, **recorded})
    found = _finished(out, TrainConfig(data="d", output=str(tmp_path), **asked))
    assert (found is not None) == nothing_left
    if nothing_left:
        assert found == {"best_epoch": 2, **recorded}
