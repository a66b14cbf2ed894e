"""Night-over-night drift (drift.py, nights.py's choice of nights): pure, no Ray, no S3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from textlabel import drift, nights
from textlabel.records import FileRecord, Status, records_table


def _night(name: str, counts: list[int], score: float = 0.9) -> dict:
    stats = [{"counts": counts, "scores": [0] * 9 + [sum(counts)], "score_sum": score * sum(counts), "abstained": 0}]
    return drift.night_entry(name, [name], "2026-11-28T02:00:00+00:00", "m", [drift.Task("label", ["neg", "pos"])], stats)


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    even = np.array([0.5, 0.5])
    assert drift.psi(even, even) == 0.0
    small, large = drift.psi(even, np.array([0.55, 0.45])), drift.psi(even, np.array([0.9, 0.1]))
    assert 0 < small < 0.1 < 0.2 < large
    assert drift.psi(even, np.array([1.0, 0.0])) == pytest.approx(0.5 * np.log(1 / 0.5) + (1e-4 - 0.5) * np.log(1e-4 / 0.5))


def test_the_training_labels_are_the_primary_reference_and_a_one_class_night_is_flagged():
    task = drift.Task("label", ["neg", "pos"], training=[500, 500])
    calm = drift.compare(_night("r1", [480, 520]), [], [task], 0.2)
    assert calm["primary"] == "training" and not calm["flagged"] and calm["tasks"]["label"]["psi"]["training"] < 0.01
    moved = drift.compare(_night("r2", [0, 700]), [_night("r1", [480, 520])], [task], 0.2)
    assert moved["flagged"] and moved["tasks"]["label"]["psi"]["training"] > 2
    assert moved["tasks"]["label"]["psi"]["last_7_nights"] > 2 and moved["nights_in_reference"] == 1
    assert moved["tasks"]["label"]["shares"]["tonight"] == {"neg": 0.0, "pos": 1.0}
    assert moved["moved"] == ["label: PSI 4.604 against the training labels; neg 50.0% -> 0.0%, pos 50.0% -> 100.0%"]


def test_a_model_trained_elsewhere_is_compared_with_the_last_seven_nights_and_its_first_night_is_not_flagged():
    task = drift.Task("label", ["neg", "pos"])
    first = drift.compare(_night("r0", [0, 100]), [], [task], 0.2)
    assert first["primary"] is None and not first["flagged"] and first["tasks"]["label"]["psi"] == {}
    history = [_night(f"r{i}", [50, 50]) for i in range(10)] + [_night("r10", [0, 100])]
    tonight = drift.compare(_night("r11", [0, 100]), history, [task], 0.2)
    assert tonight["primary"] == "last_7_nights" and tonight["nights_in_reference"] == 7
    pooled = np.array([350 - 50, 350 + 50]) / 700  # six even nights and the one-class one
    assert tonight["tasks"]["label"]["psi"]["last_7_nights"] == pytest.approx(drift.psi(pooled, np.array([0.0, 1.0])), abs=1e-4)
    assert tonight["flagged"]


def test_figures_of_files_add_up():
    a = drift.task_stats(np.array([0, 1, 1]), np.array([0.55, 0.95, 1.0]), 3, np.array([True, False, False]))
    assert a == {"counts": [1, 2, 0], "scores": [0] * 5 + [1] + [0] * 3 + [2], "score_sum": pytest.approx(2.5), "abstained": 1}
    total = drift.add(drift.add(None, [a]), [a])
    assert total[0]["counts"] == [2, 4, 0] and total[0]["abstained"] == 2 and drift.add(None, None) is None


def _state(runs: dict[str, str]) -> pa.Table:
    return records_table([FileRecord(name, "v1", 1, Status(status), [name], run=run) for name, (run, status) in
                          ((n, r.split(":")) for n, r in runs.items())])


def test_the_runs_a_night_folds_in_are_those_after_the_last_recorded_night():
    state = _state({"a": "20261127T020000Z-aaaaaa:done", "b": "20261128T020000Z-bbbbbb:done",
                    "c": "20261128T090000Z-cccccc:done", "d": "20261128T090000Z-cccccc:failed",
                    "e": "20261129T020000Z-tonite:done"})
    history = [{"night": "20261127T020000Z-aaaaaa", "runs": ["20261127T020000Z-aaaaaa"]}]
    # Two runs died since the last recorded night: both are folded into tonight, tonight's own run is not.
    assert nights.interrupted_runs(state, history, "20261129T020000Z-tonite") == ["20261128T020000Z-bbbbbb",
                                                                                  "20261128T090000Z-cccccc"]
    history.append({"night": "20261128T020000Z-bbbbbb", "runs": ["20261128T020000Z-bbbbbb", "20261128T090000Z-cccccc"]})
    assert nights.interrupted_runs(state, history, "20261129T020000Z-tonite") == []
    assert nights.interrupted_runs(state, [], "20261129T020000Z-tonite") == ["20261128T090000Z-cccccc"]  # no history: the latest


def test_the_history_plot_draws_every_night(tmp_path):
    history = [_night(f"2026112{i}T020000Z-x", [50 + 10 * i, 50], 0.8 + 0.02 * i) for i in range(5)]
    png = drift.history_png(history)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
