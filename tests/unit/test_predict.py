"""The one inference path (predict.py) and the pool sizing (pool.py): in-process, no Ray, no S3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from support.corpus import easy_rows
from textlabel import pool, predict


@pytest.mark.parametrize("lengths, max_tokens, max_rows", [
    ([5, 3, 9, 9, 2, 7, 1, 8], 20, 100),
    ([5, 3, 9, 9, 2, 7, 1, 8], 1000, 3),
    ([40, 3, 3], 16, 100),  # a row longer than the budget is a batch of its own
    (list(range(1, 200)), 512, 64),
])
def test_token_budget_batches_cover_every_row_once_within_the_budget(lengths, max_tokens, max_rows):
    lengths = np.array(lengths)
    batches = predict.token_batches(lengths, max_tokens, max_rows)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= max_rows
        assert len(b) == 1 or len(b) * lengths[b].max() <= max_tokens
    assert [lengths[b].max() for b in batches] == sorted(lengths[b].max() for b in batches)  # sorted by length


def test_short_rows_make_big_batches_and_long_rows_small_ones():
    sizes = [len(b) for b in predict.token_batches(np.array([4] * 100 + [100] * 10), 400, 1000)]
    assert sizes == [100, 4, 4, 2]


def test_output_columns_are_named_in_one_place():
    assert predict.output_columns([None], "pred_") == ["pred_label", "pred_label_id", "pred_score", "pred_truncated",
                                                       "pred_skip_reason"]
    assert predict.output_columns(["coarse", "fine"]) == ["coarse_label", "coarse_label_id", "coarse_score", "fine_label",
                                                          "fine_label_id", "fine_score", "truncated", "skip_reason"]


def _one_at_a_time(model: str, texts: list[str], max_length: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    net = AutoModelForSequenceClassification.from_pretrained(model).eval()
    tok = AutoTokenizer.from_pretrained(model)
    with torch.inference_mode():
        return [torch.softmax(net(**tok(t, truncation=True, max_length=max_length, return_tensors="pt")).logits[0], -1)
                for t in texts]


def test_token_budget_batches_give_the_labels_and_scores_of_one_row_at_a_time(tiny_model):
    texts = easy_rows(60, seed=7)["text"].to_pylist()
    texts[3] = "great " * 80  # one long row among short ones, longer than the budget and than --max-length
    prepared = predict.prepare(tiny_model, pa.array(texts + [None, "  "]), 64)
    predictor = predict.Predictor(tiny_model, max_tokens=48, max_rows=16)
    out = predictor.label(prepared)
    expected = _one_at_a_time(tiny_model, texts, 64)
    assert out["label_id"].to_pylist()[:60] == [int(p.argmax()) for p in expected]
    np.testing.assert_allclose(out["score"].to_numpy(zero_copy_only=False)[:60], [float(p.max()) for p in expected], rtol=1e-4)
    assert out["label"].to_pylist()[60:] == [None, None] and out["skip_reason"].to_pylist()[60:] == ["null_text", "blank_text"]
    assert out["truncated"].to_pylist()[3] is True and sum(out["truncated"].to_pylist()[:60]) == 1
    stats = predictor.stats
    assert stats.rows == 60 and stats.batches >= stats.real_tokens // 48  # many small batches under a 48-token budget
    assert stats.real_tokens <= stats.padded_tokens <= stats.real_tokens * 2


def test_a_batch_out_of_memory_is_split_and_retried_with_the_same_labels(tiny_model):
    prepared = predict.prepare(tiny_model, pa.array(easy_rows(80, seed=3)["text"].to_pylist()), 64)
    plain = predict.Predictor(tiny_model, max_tokens=4096).label(prepared)
    small = predict.Predictor(tiny_model, max_tokens=4096, hooks={"oom_above_tokens": 100})  # a device that fits 100
    out = small.label(prepared)
    assert out["label_id"].to_pylist() == plain["label_id"].to_pylist()
    np.testing.assert_allclose(out["score"].to_numpy(), plain["score"].to_numpy(), rtol=1e-5)
    assert small.stats.oom_splits > 0
    alone = predict.Predictor(tiny_model, hooks={"oom_above_tokens": 1})  # not even one row fits: that fails
    with pytest.raises(Exception, match="test hook"):
        alone.label(prepared)


def test_quantized_rows_under_the_margin_are_relabelled_in_full_precision(tiny_model):
    prepared = predict.prepare(tiny_model, pa.array(easy_rows(40, seed=9)["text"].to_pylist()), 64)
    full = predict.Predictor(tiny_model).label(prepared)
    int8 = predict.Predictor(tiny_model, quantize=True, recheck_margin=0.0).label(prepared)
    rechecked = predict.Predictor(tiny_model, quantize=True, recheck_margin=1.0)
    again = rechecked.label(prepared)
    assert not np.array_equal(int8["score"].to_numpy(), full["score"].to_numpy())  # int8 really ran
    assert again["label_id"].to_pylist() == full["label_id"].to_pylist() and rechecked.stats.rechecked == 40
    np.testing.assert_allclose(again["score"].to_numpy(), full["score"].to_numpy(), rtol=1e-6)


def test_onnx_runtime_labels_as_torch_does(tiny_model):
    prepared = predict.prepare(tiny_model, pa.array(easy_rows(60, seed=11)["text"].to_pylist()), 64)
    onnx, torch_ = predict.Predictor(tiny_model), predict.Predictor(tiny_model, runtime="torch")
    assert (onnx.runtime, torch_.runtime) == ("onnx", "torch")  # onnx is the CPU default
    a, b = onnx.label(prepared), torch_.label(prepared)
    assert a["label"].to_pylist() == b["label"].to_pylist()
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-5)


@pytest.mark.parametrize("cpus, gpus, use_gpu, units, expected", [
    ((2.0,), (0.0,), False, 100, (2, 2, 1.0, 1)),  # this machine: two actors of one thread, both cores
    ((16.0,), (0.0,), False, 100, (8, 8, 2.0, 2)),  # 8 actors x 2 threads
    ((16.0, 16.0), (0.0, 0.0), False, 100, (16, 16, 2.0, 2)),
    ((64.0,), (0.0,), False, 100, (16, 16, 4.0, 4)),  # at most 4 threads an actor
    ((16.0,), (0.0,), False, 3, (3, 3, 2.0, 2)),  # no more actors than units
    ((0.0,), (0.0,), False, 100, (1, 1, 1.0, 1)),  # an autoscaling cluster with no worker yet
    ((8.0, 8.0), (1.0, 1.0), True, 100, (2, 2, 7.0, 7)),  # one actor per GPU, the node's other CPUs feed it
    ((16.0,), (1.0,), True, 100, (1, 1, 8.0, 8)),
    ((2.0,), (0.0,), True, 100, (1, 1, 1.0, 1)),  # GPUs not up yet
])
def test_auto_pool_sizing(cpus, gpus, use_gpu, units, expected):
    found = pool.size_pool(None, pool.Cluster(cpus, gpus), use_gpu, units)
    assert (found.min_actors, found.max_actors, found.cpus_per_actor, found.threads) == expected
    assert found.why


def test_explicit_pool_options_win():
    found = pool.size_pool((2, 8), pool.Cluster((16.0,), (0.0,)), False, 100, cpus_per_actor=2.0)
    assert (found.min_actors, found.max_actors, found.cpus_per_actor, found.threads, found.why) == (2, 8, 2.0, 2, "as asked")
    with pytest.raises(Exception, match="need more than the cluster's 2 CPUs"):
        pool.check_fits(pool.size_pool((3, 3), pool.Cluster((2.0,), (0.0,)), False, 100), pool.Cluster((2.0,), (0.0,)))


def test_a_string_cell_that_is_not_utf8_is_skipped_alone_as_a_binary_one_is():
    """Parquet readers hand back a string column's bytes unchecked: a bad cell is one skipped row, not an error."""
    cells = [b"a great film", b"\xff\xfe bad bytes", None, b"  ", b"\xc3\xa7a va"]
    for column in (pa.array(cells, pa.binary()).view(pa.string()), pa.array(cells, pa.large_binary()),
                   pa.array(cells, pa.binary()).view(pa.string()).dictionary_encode()):
        texts, reasons, unread = predict.texts_of(column)
        assert reasons == [None, "invalid_utf8", "null_text", "blank_text", None]
        assert texts == ["a great film", None, None, None, "ça va"] and not unread.any()
    assert predict.texts_of(pa.array([7, None]))[1] == ["not_text", "null_text"]


def test_a_huge_cell_is_cut_in_bytes_before_it_becomes_a_python_string():
    import tracemalloc

    huge = pa.array([b"great " * (10 << 20), "é".encode() * 3, b"short"], pa.binary()).view(pa.string())  # 60 MB
    tracemalloc.start()
    texts, reasons, unread = predict.texts_of(huge, cap=5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # no Python copy of the 60 MB cell
    assert texts == ["great", "éé", "short"]  # a character the cap cuts in two is dropped, not an error
    assert reasons == [None, None, None] and unread.tolist() == [(60 << 20) - 5, 1, 0]


def test_prepare_flags_a_cell_cut_in_bytes_as_truncated(tiny_model):
    prepared = predict.prepare(tiny_model, pa.array(["great " * 20_000, "fine", None]), 64)
    assert prepared.truncated.tolist() == [True, False, False] and prepared.reasons == [None, None, "null_text"]
    assert len(prepared.windows[0]) == 64
