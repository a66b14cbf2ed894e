"""The labelling job end to end through its entry point, S3 to S3, and its predictor."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest

from support.corpus import corpus as make_corpus, easy_rows, put_parquet, read_output, resolve
from textlabel import predict, storage
from textlabel.cli import label_main

pytestmark = pytest.mark.xdist_group("trained")  # one worker: one trained model


def _label(args: list) -> int:
    return label_main([str(a) for a in args])


def _in_thread(target, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", target(*args)), daemon=True)
    thread.start()
    return thread, result


def test_labels_a_corpus_from_s3_to_s3_with_every_actor_at_work(trained, s3_prefix, s3_faults):
    """Promise: label.py labels every row of a Parquet prefix on S3 into S3, once, keeping every input column; a
    night of few files keeps every actor of the pool at work (its files are cut into row ranges)."""
    corpus = make_corpus(f"{s3_prefix}/corpus", [2100, 1005])  # two files, two actors
    # Two rows without text: kept, with a null label, never given a made-up one.
    texts = corpus["text"].to_pylist()
    texts[5] = texts[2200] = None
    corpus = corpus.set_column(1, "text", pa.array(texts, pa.string()))
    put_parquet(f"{s3_prefix}/corpus/part-0.parquet", corpus.slice(0, 2100))
    put_parquet(f"{s3_prefix}/corpus/part-1.parquet", corpus.slice(2100, 1005))
    model = f"{trained['output']}/model"
    out = f"{s3_prefix}/labels"
    # The first actor to write an output is held there, busy with its unit, until the other actor writes one too:
    # with both files as one unit each, the first actor ready took both and the second hold never arrived.
    first = s3_faults.hold("PUT", f"{out[5:]}/part-")
    job, result = _in_thread(_label, ["--model", model, "--input", f"{s3_prefix}/corpus/", "--output", out,
                                      "--label-prefix", "pred_", "--batch-size", 16, "--num-actors", "2",
                                      "--cpus-per-actor", 0.5, "--max-length", 32])
    first.wait(120)
    second = s3_faults.hold("PUT", f"{out[5:]}/part-")
    second.wait(120)
    first.release()
    second.release()
    job.join(300)
    assert result["code"] == 0
    result = read_output(out).sort_by("id")
    assert result.num_rows == corpus.num_rows
    assert result["id"].to_pylist() == corpus["id"].to_pylist()  # every row once, none duplicated
    assert set(result.column_names) == {"id", "text", "label", "source", "pred_label", "pred_label_id", "pred_score",
                                        "pred_truncated", "pred_skip_reason"}
    assert result["text"].to_pylist() == corpus["text"].to_pylist()
    assert result["source"].to_pylist() == corpus["source"].to_pylist()
    unlabelled = result.filter(pa.compute.is_null(result["pred_label"]))
    assert unlabelled["id"].to_pylist() == [5, 2200] and unlabelled["pred_score"].null_count == 2
    assert unlabelled["pred_skip_reason"].to_pylist() == ["null_text", "null_text"]
    result = result.filter(pa.compute.is_valid(result["pred_label"]))
    assert set(result["pred_label"].to_pylist()) == {"negative", "positive"}
    names = np.array(["negative", "positive"])
    assert (names[result["pred_label_id"].to_numpy()] == np.array(result["pred_label"].to_pylist())).all()
    scores = result["pred_score"].to_numpy()
    assert ((scores >= 0.5) & (scores <= 1.0)).all()  # the winning probability of two classes
    accuracy = np.mean(np.array(result["pred_label"].to_pylist()) == np.array(result["label"].to_pylist()))
    assert accuracy > 0.9
    summary = storage.read_json(resolve(out).join("_summary.json"))
    assert summary["rows_in"] == summary["rows_out"] == corpus.num_rows and summary["files_labelled"] == 2
    assert summary["rows_skipped"] == {"null_text": 2} and summary["rows_labelled"] == corpus.num_rows - 2
    pool = summary["pool"]
    assert pool["why"].startswith("as asked") and pool["cpus_per_actor"] == 0.5 and summary["units"] == 4
    assert len(pool["actors"]) == 2  # each actor: when it was ready, its first unit, its units, its busy share
    for actor in pool["actors"]:
        assert actor["units"] >= 1 and 0 < actor["busy_share"] <= 1 and actor["ready_s"] <= actor["first_unit_s"]
        assert actor["isa"] and actor["runtime"] in ("onnx", "torch") and actor["starts"] == 1
    assert sum(a["units"] for a in pool["actors"]) == 4
    inference = summary["inference"]  # what the predictors did: every row with text, in batches of at most 16
    assert inference["rows"] == corpus.num_rows - 2 and inference["batches"] >= (corpus.num_rows - 2) / 16
    assert 0 < inference["real_tokens"] <= inference["padded_tokens"] and 0 <= inference["padding_share"] < 0.5
    # Outputs named after their inputs: the 2,100-row file cut in three row ranges (2 actors x 4 units a night,
    # none under 1,024 rows), the other whole.
    assert sorted(f.base_name for f in storage.list_files(resolve(out), ".parquet")) == [
        "part-0.part-00000.parquet", "part-0.part-00001.parquet", "part-0.part-00002.parquet", "part-1.parquet"]
    # The artifact (a GPT-2: no pad token of its own) in plain transformers, batched, labels as the job did.
    from transformers import pipeline

    from textlabel.model import local_model_dir

    plain = pipeline("text-classification", model=local_model_dir(model), batch_size=32)
    some = result.slice(0, 300)
    found = plain(some["text"].to_pylist(), truncation=True, max_length=32)
    clear = np.array([r["score"] for r in found]) > 0.5 + 1e-3  # a near-tie may go either way in another summation order
    assert np.array([r["label"] for r in found])[clear].tolist() == np.array(some["pred_label"].to_pylist())[clear].tolist()


@pytest.mark.parametrize("case, expected", [
    ("no_text_column", "no input file can be labelled; the first, a.parquet: no column 'text' (columns: id, body)"),
    ("text_not_text", "no input file can be labelled; the first, a.parquet: column 'text' is int64, not text"),
    ("empty_prefix", "no *.parquet files there"),
    ("label_clash", "already has column(s) label; pass --label-prefix"),
    ("not_a_model", "no *.safetensors weights"),
    ("unknown_class", "--min-score names class(es) spam that the model does not have; its classes: negative, positive"),
    ("no_tokenizer", "no tokenizer files (tokenizer.json, vocab.txt, ...) beside the weights"),
    ("max_length", "--max-length 200 is beyond"),  # the GPT-2 has 128 positions
])
def test_bad_input_fails_before_any_model_loads(s3_prefix, trained, caplog, case, expected):
    """Promise: bad input to label.py fails in seconds with exit 2 and one line naming the fix, writing nothing."""
    model, extra = f"{trained['output']}/model", []
    if case in ("no_text_column", "text_not_text"):
        text = {"body": ["x"]} if case == "no_text_column" else {"text": [7]}
        put_parquet(f"{s3_prefix}/in/a.parquet", pa.table({"id": [1], **text}))
        model = f"{s3_prefix}/no-such-model"  # never reached: the column check comes first
    elif case == "empty_prefix":
        storage.write_bytes(resolve(f"{s3_prefix}/in/readme.txt"), b"not parquet")
    elif case == "label_clash":
        put_parquet(f"{s3_prefix}/in/a.parquet", pa.table({"text": ["x"], "label": ["y"]}))
    elif case in ("unknown_class", "max_length"):
        put_parquet(f"{s3_prefix}/in/a.parquet", pa.table({"text": ["x"]}))
        extra = ["--min-score", "spam=0.9"] if case == "unknown_class" else ["--max-length", "200"]
    elif case == "no_tokenizer":
        put_parquet(f"{s3_prefix}/in/a.parquet", pa.table({"text": ["x"]}))
        storage.copy_dir(resolve(model), resolve(f"{s3_prefix}/model"), suffixes=(".json", ".safetensors"),
                         exclude=("tokenizer.json", "tokenizer_config.json"))
        model = f"{s3_prefix}/model"
    else:
        put_parquet(f"{s3_prefix}/in/a.parquet", pa.table({"text": ["x"]}))
        storage.write_bytes(resolve(f"{s3_prefix}/model/config.json"), b"{}")
        storage.write_bytes(resolve(f"{s3_prefix}/model/pytorch_model.bin"), b"pickle")
        model = f"{s3_prefix}/model"
    assert _label(["--model", model, "--input", f"{s3_prefix}/in/", "--output", f"{s3_prefix}/out", *extra]) == 2
    assert expected in caplog.text
    assert not storage.exists(resolve(f"{s3_prefix}/out"))


def test_a_pool_bigger_than_the_cluster_is_refused(trained, s3_prefix, caplog):
    """Promise: an actor pool the cluster cannot hold is refused up front, not left pending."""
    for name in "abc":
        put_parquet(f"{s3_prefix}/in/{name}.parquet", pa.table({"text": ["x"]}))
    code = _label(["--model", f"{trained['output']}/model", "--input", f"{s3_prefix}/in/", "--output", f"{s3_prefix}/out",
                   "--num-actors", "3", "--cpus-per-actor", "1"])
    assert code == 2
    assert "3 predictor actors x --cpus-per-actor 1.0 need more than the cluster's 2 CPUs" in caplog.text
    assert not storage.exists(resolve(f"{s3_prefix}/out"))


def test_min_score_abstains_and_a_night_whose_labels_moved_is_flagged_after_committing(trained, s3_prefix, tmp_path):
    """Users route low-confidence rows to people, and are told (exit 4) when tonight's labels moved."""
    from support.corpus import NEGATIVE, POSITIVE, easy_rows

    from textlabel import nights

    balanced = easy_rows(400, seed=21)
    unsure = [f"the {POSITIVE[i % 8]} and {NEGATIVE[(i * 3) % 8]} film" for i in range(40)]  # both polar words
    night1 = pa.table({"text": balanced["text"].to_pylist() + unsure, "truth": balanced["label"].to_pylist() + [None] * 40})
    put_parquet(f"{s3_prefix}/in/night-1.parquet", night1)
    out = f"{s3_prefix}/out"
    config = tmp_path / "label.yaml"  # a wrong "positive" costs more: only positive labels need a score of 0.999
    config.write_text("min_score: {positive: 0.999}\n")
    args = ["--model", f"{trained['output']}/model", "--input", f"{s3_prefix}/in/", "--output", out, "--max-length", 32,
            "--num-actors", 1, "--config", config]
    assert _label(args) == 0
    labelled = read_output(out)
    abstained = np.array(labelled["label"].is_null().to_pylist())
    score = labelled["score"].to_numpy()
    assert (score > 0.5).all() and (score[abstained] < 0.999).all()  # every row keeps its score
    assert set(labelled["label"].drop_null().to_pylist()) == {"negative"}  # the class without a threshold
    truth = np.array(night1["truth"].to_pylist()[:400])
    assert np.mean(abstained[:400] == (truth == "positive")) > 0.97  # the rows predicted positive, as scored
    assert labelled["skip_reason"].to_pylist() == ["low_confidence" if a else None for a in abstained]
    summary = storage.read_json(resolve(out).join("_summary.json"))
    assert summary["rows_skipped"] == {"low_confidence": int(abstained.sum())}
    assert summary["rows_labelled"] == night1.num_rows - abstained.sum()
    drift = summary["drift"]
    assert drift["primary"] == "training" and not drift["flagged"] and drift["tasks"]["label"]["psi"]["training"] < 0.2
    assert drift["rows"] == night1.num_rows and drift["tasks"]["label"]["abstained"] == abstained.sum()
    assert sum(drift["tasks"]["label"]["score_histogram"]) == night1.num_rows
    # The second night's corpus is all one class: labelled, committed, then flagged.
    positive = easy_rows(600, seed=22).filter(pa.compute.equal(easy_rows(600, seed=22)["label"], "positive"))
    put_parquet(f"{s3_prefix}/in/night-2.parquet", pa.table({"text": positive["text"], "truth": positive["label"]}))
    assert _label(args) == 4
    summary = storage.read_json(resolve(out).join("_summary.json"))
    assert summary["files_labelled"] == 1 and read_output(out).num_rows == night1.num_rows + positive.num_rows
    drift = summary["drift"]
    assert drift["flagged"] and drift["tasks"]["label"]["shares"]["tonight"]["positive"] > 0.9
    assert drift["tasks"]["label"]["psi"]["training"] > 0.2 and drift["tasks"]["label"]["psi"]["last_7_nights"] > 0.2
    assert drift["nights_in_reference"] == 1 and "positive" in drift["moved"][0]
    assert [n["rows"] for n in nights.load(resolve(out))] == [night1.num_rows, positive.num_rows]
    png = storage.read_bytes(resolve(out).join("_report", "drift.png"))
    assert png.startswith(b"\x89PNG")


def test_bf16_weights_label_as_fp32_does(trained):
    """Promise: bf16 inference (the GPU default) labels as fp32 does."""
    from textlabel.model import local_model_dir

    model = local_model_dir(f"{trained['output']}/model")
    prepared = predict.prepare(model, pa.array(easy_rows(400, seed=21)["text"].to_pylist()), 32)
    fp32 = predict.Predictor(model).label(prepared)["label_id"].to_numpy()
    bf16 = predict.Predictor(model, precision="bf16").label(prepared)["label_id"].to_numpy()
    assert np.mean(fp32 == bf16) >= 0.995
