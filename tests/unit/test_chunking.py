"""Long documents as windows (chunking.py, predict.chunk): pure logic and the in-process predictor; no Ray, no S3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from textlabel import chunking, multitask, predict
from textlabel.chunking import LongTexts


@pytest.mark.parametrize("tokens, body, overlap", [(1000, 126, 31), (127, 126, 31), (126, 126, 31), (500, 10, 0),
                                                    (501, 62, 15), (63, 62, 15)])
def test_windows_cover_every_token_with_the_stated_overlap(tokens, body, overlap):
    spans, dropped = chunking.spans(tokens, body, overlap, max_chunks=10_000)
    assert dropped == 0 and spans[0][0] == 0 and spans[-1][1] == tokens
    assert all(b - a <= body for a, b in spans) and all(b - a == body for a, b in spans[:-1])
    assert all(prev[1] - nxt[0] == overlap for prev, nxt in zip(spans, spans[1:]))  # each pair shares exactly `overlap`
    assert spans[-1][1] > (spans[-2][1] if len(spans) > 1 else 0)  # no window adds nothing


def test_a_text_that_fits_the_window_is_one_window():
    assert chunking.spans(126, 126, 31, 64) == ([(0, 126)], 0)
    assert chunking.spans(0, 126, 31, 64) == ([(0, 0)], 0)  # an empty text: the special tokens alone, as truncate does


def test_max_chunks_caps_and_counts_what_it_drops():
    spans, dropped = chunking.spans(10_000, 100, 20, max_chunks=5)
    assert len(spans) == 5 and dropped == chunking.spans(10_000, 100, 20, 10_000)[0].__len__() - 5 == 120
    assert chunking.covered(100, 20, 5) == spans[-1][1] == 420


def test_options_are_checked_against_the_window():
    assert LongTexts("chunk").overlap_for(128) == 32
    assert LongTexts("chunk", overlap=0).problems(128) == []
    problems = LongTexts("paginate", overlap=100, max_chunks=0).problems(128)
    assert len(problems) == 3 and "--long-texts" in problems[0] and "--max-chunks" in problems[1] and "--chunk-overlap" in problems[2]
    assert LongTexts("chunk").problems(8) == ["--max-length must be >= 16 with --long-texts chunk, got 8"]
    assert LongTexts("truncate").problems(8) == []
    with pytest.raises(ValueError, match="cannot overlap"):
        chunking.spans(500, 10, 10, 64)


def test_combination_methods():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]], dtype=np.float32)
    owner = np.array([0, 0, 0, 2])  # row 1 has no window (a skipped row)
    np.testing.assert_allclose(chunking.combine(probs, owner, 3, "mean"), [[0.5, 0.5], [0, 0], [0.7, 0.3]], atol=1e-6)
    np.testing.assert_allclose(chunking.combine(probs, owner, 3, "tokens", sizes=np.array([1, 3, 0, 5]))[0], [0.375, 0.625])
    np.testing.assert_allclose(chunking.combine(probs, owner, 3, "max")[0], [0.9, 0.1])
    geo = chunking.combine(probs, owner, 3, "geometric")
    expected = np.exp(np.log(probs[:3]).mean(axis=0))
    np.testing.assert_allclose(geo[0], expected / expected.sum(), rtol=1e-5)
    assert not geo[1].any()


# The predictor, on a tiny BERT whose tokenizer knows the words of easy_rows: "great"/"awful" decide the label.

FILLER = "the report was filed on a tuesday and nothing else happened " * 6


def _document(word: str) -> str:
    return FILLER * 3 + f"it was {word} {word} {word}. " + FILLER


def test_chunked_rows_keep_skip_reasons_and_count_windows(tiny_model):
    texts = [_document("great"), "short one", None, "   ", "w " * 126]
    long = LongTexts("chunk", overlap=16, max_chunks=64)
    prepared = predict.prepare(tiny_model, pa.array(texts), 64, long)
    head, tail = predict.specials(tiny_model)
    assert len(head) + len(tail) == 2
    assert prepared.reasons == [None, None, "null_text", "blank_text", None]
    assert prepared.chunks[1] == 1 and prepared.chunks[2] == prepared.chunks[3] == 0 and prepared.chunks[0] > 3
    assert all(len(w) <= 64 for w in prepared.windows) and not prepared.truncated.any()
    out = predict.Predictor(tiny_model).label(prepared)
    assert out["chunks"].to_pylist()[:4] == [prepared.chunks[0], 1, None, None]
    assert out["skip_reason"].to_pylist() == [None, None, "null_text", "blank_text", None]
    assert predict.output_columns([None], "", chunked=True) == list(out)
    capped = predict.prepare(tiny_model, pa.array(texts), 64, LongTexts("chunk", overlap=16, max_chunks=2))
    assert capped.chunks[0] == 2 and capped.dropped[0] == prepared.chunks[0] - 2 and capped.truncated.tolist() == [
        True, False, False, False, True]


def test_a_text_of_exactly_max_length_tokens_is_one_window_and_labels_as_truncate_does(tiny_model):
    tok = predict.tokenizer_for(tiny_model)
    text = " ".join(["great", "movie"] * 40)
    exact = tok.decode(tok(text, truncation=True, max_length=64)["input_ids"][1:-1])
    assert len(tok(exact)["input_ids"]) == 64
    rows = pa.array([exact, exact + " great"])
    chunked = predict.prepare(tiny_model, rows, 64, LongTexts("chunk"))
    cut = predict.prepare(tiny_model, rows, 64)
    assert chunked.chunks.tolist() == [1, 2] and chunked.windows[0] == cut.windows[0]
    assert cut.truncated.tolist() == [False, True] and chunked.truncated.tolist() == [False, False]


def test_a_ten_megabyte_text_costs_at_most_max_chunks_windows(tiny_model):
    huge = "the plot was great and the cast was fine " * 250_000  # 10.25 MB
    long = LongTexts("chunk", overlap=16, max_chunks=64)
    prepared = predict.prepare(tiny_model, pa.array([huge, "short"]), 64, long)
    assert prepared.chunks.tolist() == [64, 1] and len(prepared.windows) == 65
    assert prepared.truncated.tolist() == [True, False]
    # The windows not scored, counted: about 2.25M tokens at 46 new tokens a window (estimated past the
    # characters the 64 windows could use).
    assert 40_000 < prepared.dropped[0] < 60_000 and prepared.dropped[1] == 0


def test_a_multi_task_model_combines_each_tasks_windows(tiny_model, tmp_path):
    import torch

    torch.manual_seed(0)
    tasks = [{"name": "sentiment", "labels": ["negative", "positive"], "weight": 1.0},
             {"name": "topic", "labels": ["acting", "music", "visuals"], "weight": 1.0}]
    net = multitask.load_multitask_for_training(tiny_model, tasks)
    multitask.save_multitask(net, predict.tokenizer_for(tiny_model), str(tmp_path))
    prepared = predict.prepare(str(tmp_path), pa.array([_document("great"), "short", None]), 64, LongTexts("chunk", 16))
    predictor = predict.Predictor(str(tmp_path))
    out = predictor.label(prepared)
    assert list(out) == predict.output_columns(["sentiment", "topic"], chunked=True)
    windows = predictor.probabilities(prepared.windows)
    for task, probs in zip(["sentiment", "topic"], windows):
        expected = chunking.combine(probs, prepared.owner, 3)[:2]
        assert out[f"{task}_label_id"].to_pylist() == expected.argmax(1).tolist() + [None]
        np.testing.assert_allclose(out[f"{task}_score"].to_numpy(zero_copy_only=False)[:2], expected.max(1), rtol=1e-6)
    assert out["chunks"].to_pylist() == [prepared.chunks[0], 1, None] and prepared.chunks[0] > 1
