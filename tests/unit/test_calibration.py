"""Calibrated scores and abstaining (calibration.py, the Predictor's use of a temperature): no Ray, no S3."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from support.corpus import easy_rows
from textlabel import calibration, chunking, predict
from textlabel import model as model_lib


def _overconfident_model(tiny_model: str, directory) -> tuple[str, np.ndarray, np.ndarray]:
    """A tiny BERT trained many epochs on 48 rows whose labels are 30% noise: it learns them by heart, so it is
    sure of every answer and wrong on a third of new rows. Returns it and its probabilities on 300 new rows."""
    import torch

    rng = np.random.default_rng(0)

    def noisy(n: int, seed: int) -> tuple[list[str], np.ndarray]:
        rows = easy_rows(n, seed)
        y = (np.array(rows["label"].to_pylist()) == "positive").astype(np.int64)
        flip = rng.random(n) < 0.3
        return rows["text"].to_pylist(), np.where(flip, 1 - y, y)

    texts, y = noisy(48, 1)
    net = model_lib.load_for_training(tiny_model, ["negative", "positive"])
    tok = model_lib.load_tokenizer(tiny_model)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    enc = tok(texts, padding=True, return_tensors="pt")
    net.train()
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(net(**enc).logits, torch.as_tensor(y))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2  # memorised, noise and all (under dropout)
    net.eval()
    val_texts, val_y = noisy(300, 2)
    with torch.no_grad():
        probs = torch.softmax(net(**tok(val_texts, padding=True, return_tensors="pt")).logits, -1).numpy()
    model_lib.save(net, tok, str(directory))
    return str(directory), probs, val_y


@pytest.fixture(scope="module")
def overconfident(tiny_model, tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    return _overconfident_model(tiny_model, tmp_path_factory.mktemp("overconfident"))


def test_the_fitted_temperature_lowers_nll_of_an_overconfident_model(overconfident):
    _, probs, gold = overconfident
    temperature = calibration.fit_temperature(probs, gold)
    figures = calibration.summary(probs, gold, temperature)
    assert temperature > 1.5  # overconfident: scores are softened
    assert figures["nll_after"] < 0.8 * figures["nll_before"]
    assert figures["ece_after"] < figures["ece_before"]
    grid = [calibration.nll(calibration.scaled(probs, t), gold) for t in np.linspace(0.5, 20, 400)]
    assert figures["nll_after"] <= min(grid) + 1e-3  # the minimum, not just better
    after = calibration.scaled(probs, temperature)
    assert (after.argmax(1) == probs.argmax(1)).all()  # labels never change, only scores


def test_the_predictor_scores_with_the_saved_temperature(overconfident, tmp_path):
    source, probs, gold = overconfident
    model_dir = str(tmp_path / "m")
    shutil.copytree(source, model_dir)
    texts = pa.array(easy_rows(40, 5)["text"].to_pylist())
    raw = predict.Predictor(model_dir).label(predict.prepare(model_dir, texts, 64))
    temperature = calibration.fit_temperature(probs, gold)
    model_lib.write_extras(model_dir, {"tasks": [{"name": "label", "temperature": temperature}]}, [])
    calibrated = predict.Predictor(model_dir).label(predict.prepare(model_dir, texts, 64))
    assert calibrated["label"].to_pylist() == raw["label"].to_pylist()
    expected = 1 / (1 + (1 / np.asarray(raw["score"]) - 1) ** (1 / temperature))  # two classes: p^(1/T) renormalised
    assert np.allclose(np.asarray(calibrated["score"]), expected, atol=1e-4)
    assert np.asarray(calibrated["score"]).mean() < np.asarray(raw["score"]).mean()


def test_a_model_without_a_temperature_labels_as_before(tiny_model, tmp_path):
    plain = str(tmp_path / "plain")
    shutil.copytree(tiny_model, plain)
    assert not os.path.exists(os.path.join(plain, model_lib.CALIBRATION_FILE))
    assert model_lib.temperatures(plain, 1) == [1.0]
    with open(os.path.join(plain, model_lib.CALIBRATION_FILE), "w") as f:
        json.dump({"tasks": [{"temperature": 0.0}]}, f)
    with pytest.raises(model_lib.ModelError, match="positive temperature"):
        model_lib.temperatures(plain, 1)


def test_ece_bins_as_scikit_learns_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    confidence = np.r_[rng.uniform(0.5, 1.0, 997), [0.6, 2 / 15, 1.0]]  # values on bin edges too
    correct = rng.random(1000) < confidence ** 2
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    b = calibration.bins(confidence, correct)
    used = b["count"] > 0
    assert np.allclose(b["accuracy"][used], prob_true) and np.allclose(b["confidence"][used], prob_pred)
    expected = np.sum(b["count"][used] / 1000 * np.abs(prob_true - prob_pred))
    assert calibration.ece(confidence, correct) == pytest.approx(expected)
    assert calibration.ece(np.full(10, 0.7), np.arange(10) < 7) == pytest.approx(0.0)  # right 70% of the time at 0.7


def test_a_chunked_documents_temperature_scales_windows_before_they_combine():
    rng = np.random.default_rng(1)
    owner = np.repeat(np.arange(50), 3)
    gold = rng.integers(0, 3, 50)
    logits = rng.normal(size=(150, 3)) * 4 + 3 * np.eye(3)[gold[owner]]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def combine(p):
        return chunking.combine(p, owner, 50)

    t = calibration.fit_temperature(probs, gold, combine)
    assert calibration.nll(combine(calibration.scaled(probs, t)), gold) < calibration.nll(combine(probs), gold)


def test_min_score_abstains_per_class_and_keeps_the_score():
    ids, scores = np.array([0, 1, 1, 0, 2]), np.array([0.55, 0.95, 0.85, 0.99, 0.4])
    assert calibration.abstains(ids, scores, None).tolist() == [False] * 5
    assert calibration.abstains(ids, scores, np.array([0.6, 0.6, 0.6])).tolist() == [True, False, False, False, True]
    assert calibration.abstains(ids, scores, np.array([0.0, 0.9, 0.0])).tolist() == [False, False, True, False, False]
    rows = calibration.coverage(scores, np.array([True, True, False, True, False]), (0.5, 0.9))
    assert rows == [{"min_score": 0.5, "abstained": 0.2, "accuracy": 0.75}, {"min_score": 0.9, "abstained": 0.6, "accuracy": 1.0}]


def test_labelled_rows_under_min_score_get_a_reason_not_a_label(tiny_model):
    predictor = predict.Predictor(tiny_model)
    texts = pa.array(easy_rows(60, 9)["text"].to_pylist() + [None])
    prepared = predict.prepare(tiny_model, texts, 64)
    scored = predictor.score(prepared)
    cut = float(np.median(scored.scores[0][:60]))
    out = predictor.columns(prepared, scored, "", scored.abstentions([np.array([cut, cut])]))
    under = np.r_[scored.scores[0][:60] < cut, False]
    assert under.sum() > 10
    assert out["label"].is_null().to_pylist() == (under | [False] * 60 + [True]).tolist()
    assert out["skip_reason"].to_pylist() == ["low_confidence" if u else None for u in under[:60]] + ["null_text"]
    assert np.allclose(np.asarray(out["score"].to_pylist()[:60], dtype=float), scored.scores[0][:60])


def test_validation_rows_without_a_mistake_leave_the_scores_as_they_are():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert calibration.fit_temperature(probs, np.array([0, 1, 0])) == 1.0  # would otherwise run to T -> 0
    assert calibration.fit_temperature(probs, np.array([0, 1, 1])) != 1.0
