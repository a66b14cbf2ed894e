"""Every model family: tiny random models of each (families.py), through the code the workers and the predictor
actors run, in-process (no Ray, no S3). The jobs run end to end on a GPT-2 (conftest's ``trained``), a RoBERTa
(test_multitask.py), a Llama under LoRA (test_lora.py's killed worker) and a BERT (test_long_texts.py);
benchmarks/families.py runs all eight through them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from support.corpus import easy_rows
from textlabel.scratch import DECODERS, FAMILIES, tiny_model
from textlabel import lora, multitask, predict
from textlabel import model as model_lib
from textlabel.chunking import LongTexts
from textlabel.train_loop import LoopSettings, _fresh, _inputs, _save_model

LABELS = ["negative", "positive"]
TWO_TASKS = [{"name": "sentiment", "labels": LABELS, "weight": 1.0, "column": "label_id"},
             {"name": "size", "labels": ["short", "long"], "weight": 1.0, "column": "size_id"}]


@pytest.fixture(scope="module")
def base_models(tmp_path_factory) -> dict[str, str]:
    """One tiny random model per family, saved as a base model from the hub would be (GPT-2's without a pad token)."""
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_model(f, root / f) for f in FAMILIES}


def _settings(model: str, tasks: list[dict], lora_settings: dict | None = None) -> LoopSettings:
    return LoopSettings(model=model, tasks=tasks, multitask=len(tasks) > 1, epochs=3, batch_size=16, learning_rate=3e-3,
                        warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, max_length=32, seed=0, use_gpu=False,
                        steps_per_epoch=0, label_counts=[], lora=lora_settings)


def _train(net, tokenizer, rows: pa.Table, golds: list[np.ndarray], epochs: int) -> list[str]:
    """What a worker does with its batches (train_loop._inputs, the masked task losses), on one process. Returns the
    trainable parameters that got no gradient in the first step: under DDP, any would stop training."""
    from textlabel.train_loop import _task_losses

    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    texts, no_gradient = np.array(rows["text"].to_pylist(), dtype=object), None
    for _ in range(epochs):
        net.train()
        for i in range(0, len(texts), 16):
            out = net(**_inputs(tokenizer, {"text": texts[i:i + 16]}, slice(None), 32, torch.device("cpu")))
            logits = out if isinstance(out, list) else [out.logits]
            sum(_task_losses(logits, [torch.as_tensor(g[i:i + 16]) for g in golds])).backward()
            if no_gradient is None:
                no_gradient = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return no_gradient or []


def _ids(rows: pa.Table) -> np.ndarray:
    return np.array([LABELS.index(v) for v in rows["label"].to_pylist()])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tokenizer_gets_a_pad_token_and_pads_on_the_right(base_models, family):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(base_models[family])
    fitted = model_lib.load_tokenizer(base_models[family])
    if family in DECODERS:  # as the real ones ship: no pad token (and Llama's pads on the left)
        assert raw.pad_token is None and fitted.pad_token == raw.eos_token
    else:
        assert raw.pad_token is not None and fitted.pad_token == raw.pad_token
    assert fitted.padding_side == "right"
    # The artifact records the pad id: Hugging Face's decoder classifiers find each row's last token by it.
    net, tokenizer = _fresh(_settings(base_models[family], TWO_TASKS[:1]))
    assert net.config.pad_token_id == tokenizer.pad_token_id == fitted.pad_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_learns_with_the_worker_code_and_labels_as_pipeline_does(base_models, family, tmp_path):
    from transformers import pipeline

    net, tokenizer = _fresh(_settings(base_models[family], TWO_TASKS[:1]))
    train, held_out = easy_rows(600, seed=1), easy_rows(120, seed=2)
    assert _train(net, tokenizer, train, [_ids(train)], epochs=3) == []  # every weight learns: DDP needs it
    model_lib.save(net, tokenizer, str(tmp_path))
    model = str(tmp_path)
    texts = held_out["text"].to_pylist()
    texts[0] = " ".join(["the film was really quite a story"] * 8 + ["dull"])  # longer than the rest: padding in its batch
    truth = _ids(held_out)
    prepared = predict.prepare(model, pa.array(texts), 32)
    fp32 = predict.Predictor(model).label(prepared)  # ONNX Runtime, the CPU default
    assert np.mean(fp32["label_id"].to_numpy() == truth) > 0.9
    alone = predict.Predictor(model, max_rows=1, runtime="torch").label(prepared)  # no padding at all
    assert alone["label"].to_pylist() == fp32["label"].to_pylist()
    np.testing.assert_allclose(alone["score"].to_numpy(), fp32["score"].to_numpy(), atol=1e-4)
    # The artifact in plain transformers, batched (padding per batch, its tokenizer's own padding side):
    found = pipeline("text-classification", model=model, batch_size=16)(texts, truncation=True, max_length=32)
    assert [r["label"] for r in found] == fp32["label"].to_pylist()
    np.testing.assert_allclose([r["score"] for r in found], fp32["score"].to_numpy(), atol=1e-4)
    for variant in ({"quantize": True}, {"quantize": True, "runtime": "torch"}, {"precision": "bf16"}):
        predictor = predict.Predictor(model, **variant)
        if variant.get("runtime") == "torch":  # every weight matrix is int8, GPT-2's Conv1D layers included
            float_layers = [type(m).__name__ for m in predictor.fast.net.modules()
                            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
            assert float_layers == []
        if "precision" in variant:
            assert {p.dtype for p in predictor.full.net.parameters()} == {torch.bfloat16}
        other = predictor.label(prepared)
        assert np.mean(other["label_id"].to_numpy() == fp32["label_id"].to_numpy()) >= 0.95, variant


@pytest.mark.parametrize("family", FAMILIES)
def test_long_documents_are_cut_into_windows_with_the_family_s_special_tokens(base_models, family):
    model = base_models[family]
    tokenizer = model_lib.load_tokenizer(model)
    head, tail = predict.specials(model)
    text = " ".join(["the film was really quite a story"] * 40 + ["dull"])
    cut = predict.prepare(model, pa.array([text]), 32, LongTexts("chunk", 8, 64))
    assert cut.chunks.tolist() == [len(cut.windows)] and len(cut.windows) > 4
    for window in cut.windows:
        assert len(window) <= 32 and window[:len(head)] == head and window[len(window) - len(tail):] == tail
    body = [t for w in cut.windows for t in w[len(head):len(w) - len(tail)]]
    assert tokenizer.decode(body[-5:]).strip().endswith("dull")  # the last window reaches the end of the text


@pytest.mark.parametrize("family", FAMILIES)
def test_a_multi_task_model_pools_its_family_s_token_and_labels_after_saving(base_models, family, tmp_path):
    net, tokenizer = _fresh(_settings(base_models[family], TWO_TASKS))
    train = easy_rows(600, seed=1)
    sizes = np.array([int(len(t.split()) > 7) for t in train["text"].to_pylist()])
    sizes[::5] = -1  # a row without this task's label: masked out of its loss
    assert _train(net, tokenizer, train, [_ids(train), sizes], epochs=3) == []
    multitask.save_multitask(net, tokenizer, str(tmp_path))
    texts = easy_rows(60, seed=3)["text"].to_pylist()
    ours = predict.Predictor(str(tmp_path)).label(predict.prepare(str(tmp_path), pa.array(texts), 32))
    assert np.mean(ours["sentiment_label_id"].to_numpy() == _ids(easy_rows(60, seed=3))) > 0.9
    net.eval()
    with torch.no_grad():  # one row at a time, no padding: a decoder's last token, an encoder's first (or pooler)
        for i in (0, 7, 31):
            ids = torch.tensor([tokenizer(texts[i], truncation=True, max_length=32)["input_ids"]])
            hidden = net.encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
            pooled = (hidden.last_hidden_state[:, -1] if family in DECODERS else
                      hidden.pooler_output if getattr(hidden, "pooler_output", None) is not None else
                      hidden.last_hidden_state[:, 0])
            probs = torch.softmax(net.heads[1](pooled), -1)[0]
            assert ours["size_score"][i].as_py() == pytest.approx(float(probs.max()), abs=1e-4)


def _adapter_size(net, rank: int) -> int:
    """Parameters of rank-``rank`` LoRA factors on every adapted layer (A: r x in, B: out x r)."""
    size = 0
    for module in net.modules():
        if hasattr(module, "lora_A"):
            weight = module.base_layer.weight
            fan_in, fan_out = (weight.shape[0], weight.shape[1]) if type(module.base_layer).__name__ == "Conv1D" else \
                (weight.shape[1], weight.shape[0])
            size += rank * (fan_in + fan_out)
    return size


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_adapters_and_new_layers_and_the_merged_model_labels_as_the_adapted_one(base_models, family,
                                                                                                 tmp_path):
    net, tokenizer = _fresh(_settings(base_models[family], TWO_TASKS[:1], {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                                           "target_modules": None}))
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    new_layers = sum(p.numel() for n, p in net.named_parameters() if "modules_to_save" in n)
    counts = lora.parameter_counts(net)
    assert counts["trainable"] == _adapter_size(net, 4) + new_layers and 0 < counts["trainable"] < counts["total"] / 5
    train = easy_rows(200, seed=1)
    assert _train(net, tokenizer, train, [_ids(train)], epochs=1) == []
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)  # the base never moved
    merged_dir = tmp_path / "model"
    _save_model(net, tokenizer, str(merged_dir))  # what a LoRA run's checkpoint holds: merged weights, the adapter beside
    from safetensors import safe_open

    with safe_open(str(merged_dir / "model.safetensors"), "pt") as saved:  # a plain model's weights, no PEFT names
        assert not [k for k in saved.keys() if "lora_" in k or "base_layer" in k or "modules_to_save" in k]
    texts = easy_rows(40, seed=5)["text"].to_pylist()
    labelled = predict.Predictor(str(merged_dir), runtime="torch").label(predict.prepare(str(merged_dir), pa.array(texts), 32))
    net.eval()
    with torch.no_grad():
        adapted = torch.softmax(net(**_inputs(tokenizer, {"text": np.array(texts, dtype=object)}, slice(None), 32,
                                              torch.device("cpu"))).logits, -1)
    np.testing.assert_allclose(labelled["score"].to_numpy(), adapted.max(-1).values.numpy(), atol=1e-4)
    clear = adapted.max(-1).values.numpy() > 0.5 + 1e-3  # a near-tie may go either way in another summation order
    assert np.array(labelled["label_id"].to_pylist())[clear].tolist() == adapted.argmax(-1).numpy()[clear].tolist()
    from peft import PeftModel  # the adapter alone, on the base model, is the same model

    base = model_lib.load_for_training(base_models[family], LABELS, tokenizer.pad_token_id)
    again = PeftModel.from_pretrained(base, str(merged_dir / lora.ADAPTER_DIR)).eval()
    with torch.no_grad():
        ids = _inputs(tokenizer, {"text": np.array(texts, dtype=object)}, slice(None), 32, torch.device("cpu"))
        torch.testing.assert_close(torch.softmax(again(**ids).logits, -1), adapted, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family, tasks", [("gpt2", TWO_TASKS[:1]), ("roberta", TWO_TASKS)])
def test_a_lora_run_resumed_from_its_checkpoint_is_the_model_it_saved(base_models, family, tasks, tmp_path):
    """What a restarted worker does (train_loop._from_checkpoint): the frozen base rebuilt, the adapter and heads loaded."""
    from textlabel.train_loop import _from_checkpoint

    settings = _settings(base_models[family], tasks, {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None})
    net, tokenizer = _fresh(settings)
    train = easy_rows(200, seed=1)
    _train(net, tokenizer, train, [_ids(train)] * len(tasks), epochs=1)
    _save_model(net, tokenizer, str(tmp_path))
    again, _ = _from_checkpoint(settings, str(tmp_path))
    assert lora.parameter_counts(again) == lora.parameter_counts(net)  # the same trainable set: the optimizer state fits
    ids = _inputs(tokenizer, {"text": np.array(easy_rows(30, seed=9)["text"].to_pylist(), dtype=object)}, slice(None), 32,
                  torch.device("cpu"))
    net.eval(), again.eval()
    with torch.no_grad():
        before, after = net(**ids), again(**ids)
    for a, b in zip(before if tasks is TWO_TASKS else [before.logits], after if tasks is TWO_TASKS else [after.logits]):
        torch.testing.assert_close(a, b)


def test_a_decoder_whose_config_names_a_pad_id_pads_with_it(base_models, tmp_path):
    """Hugging Face's decoder classifiers pool the last token that is not config.pad_token_id: batches must pad with it."""
    import json

    shutil.copytree(base_models["gpt2"], tmp_path / "m")
    found = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**found, "pad_token_id": 7}))
    assert model_lib.load_tokenizer(str(tmp_path / "m")).pad_token_id == 7


def test_lora_trains_layers_the_checkpoint_did_not_have_in_full(tmp_path):
    """A base model saved without a pooler (as some are): its pooler, like the classifier, is new, so it trains."""
    from transformers import BertModel

    from textlabel.scratch import config, tokenizer

    tok = tokenizer("bert")
    BertModel(config("bert", tok), add_pooling_layer=False).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    net, _ = _fresh(_settings(str(tmp_path), TWO_TASKS[:1], {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}))
    trained = {n.split(".modules_to_save")[0] for n, p in net.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {"base_model.model.bert.pooler.dense", "base_model.model.classifier"}
    assert lora.parameter_counts(net)["trainable"] == _adapter_size(net, 4) + (32 * 32 + 32) + (32 * 2 + 2)


def _unusable(kind: str, base_models: dict[str, str], root) -> tuple[str, list[str]]:
    """A --model (and extra options) that cannot work, of the given kind."""
    import transformers as tf

    target = root / kind
    if kind in ("encoder-decoder", "not a text classifier"):
        config = tf.T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=16) if kind == "encoder-decoder" else \
            tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
        tf.AutoModel.from_config(config).save_pretrained(target)  # a real model directory: config and safetensors
        return str(target), []
    shutil.copytree(base_models["gpt2" if kind != "max length" else "roberta"], target)
    if kind == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(target / name)
    return str(target), {"max length": ["--max-length", "129"], "lora targets": ["--lora", "--lora-target-modules", "q_proj"]
                         }.get(kind, [])


@pytest.mark.parametrize("kind, expected", [
    ("encoder-decoder", "t5 is an encoder-decoder model, which textlabel does not fine-tune"),
    ("not a text classifier", "no sequence-classification class for model type 'vit'"),
    ("no tokenizer", "no tokenizer files (tokenizer.json, vocab.txt, ...) beside the weights"),
    ("max length", "--max-length 129 is beyond"),  # RoBERTa: 130 position embeddings, 2 before the first token
    ("lora targets", "--lora-target-modules q_proj: no such module in this gpt2 model; its linear layers are named c_attn"),
])
def test_a_model_that_cannot_work_is_refused_before_ray_starts(base_models, tmp_path, kind, expected):
    from textlabel.config import ConfigError, TrainConfig, parse_config
    from textlabel.train import run_training

    pq.write_table(easy_rows(40), tmp_path / "d.parquet")
    model, extra = _unusable(kind, base_models, tmp_path)
    cfg = parse_config(TrainConfig, ["--data", str(tmp_path / "d.parquet"), "--output", str(tmp_path / "o"),
                                                "--model", model, *extra], "t", "t")
    started = []
    with pytest.raises((model_lib.ModelError, ConfigError)) as refused:
        run_training(cfg, start_ray=lambda: started.append(True))
    assert expected in str(refused.value) and not started and not (tmp_path / "o").exists()
