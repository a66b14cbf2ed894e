"""Dry-run material made offline: random-weight models of every family textlabel supports, and synthetic
labelled rows a small model learns in seconds.

Teams use it to check a cluster end to end before real weights or data are there; textlabel's own tests and
benchmarks build their small models and rows with it (nothing is downloaded).

Each model gets a tokenizer of its family's kind trained on the shipped SST-2 sample: byte-level BPE for
GPT-2, RoBERTa and ModernBERT, WordPiece for BERT, DistilBERT and ELECTRA, a SentencePiece unigram for
DeBERTa-v2, a SentencePiece-style BPE for Llama. Every build gives the same vocabulary and weights, so a
test's outcome never depends on the run. Each tokenizer is saved with the family's own tokenizer class and
defaults, so a decoder's has no pad token and Llama's pads on the left, as the real ones do.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
from collections import Counter
from importlib import resources
from pathlib import Path

import pyarrow as pa

FAMILIES = ("bert", "roberta", "distilbert", "deberta-v2", "electra", "modernbert", "gpt2", "llama")
DECODERS = ("gpt2", "llama")
VOCAB = 600


@functools.lru_cache(maxsize=1)
def sample_texts() -> tuple[str, ...]:
    """The first 3,000 sentences of the shipped SST-2 sample."""
    with resources.files("textlabel").joinpath("demo_data/sst2_train.tsv").open(encoding="utf-8") as f:
        return tuple(row["text"] for _, row in zip(range(3000), csv.DictReader(f, delimiter="\t")))


def _trained(kind: str, specials: list[str]) -> dict:
    """BPE vocabulary and merges learned from the sample (the BPE trainer is deterministic)."""
    import tokenizers

    tok = tokenizers.ByteLevelBPETokenizer() if kind == "bytelevel" else tokenizers.SentencePieceBPETokenizer()
    tok.train_from_iterator(list(sample_texts()), vocab_size=VOCAB, special_tokens=specials, show_progress=False)
    return json.loads(tok.to_str())["model"]


@functools.lru_cache(maxsize=1)
def _word_counts() -> tuple[tuple[str, int], ...]:
    """The sample's words (BERT's pre-tokenizer) by count, most frequent first, ties alphabetical."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    counts = Counter(w.lower() for t in sample_texts() for w, _ in BertPreTokenizer().pre_tokenize_str(t))
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    """Every character (alone and as a ##continuation), then the most frequent words. Built here rather than by
    tokenizers' WordPiece trainer, whose ties fall differently from run to run: a test's model must not."""
    chars = sorted({c for w, _ in _word_counts() for c in w})
    pieces = specials + chars + ["##" + c for c in chars]
    pieces += [w for w, _ in _word_counts() if w not in pieces][:VOCAB - len(pieces)]
    return {p: i for i, p in enumerate(pieces)}


def _unigram_vocab(specials: list[str]) -> list[tuple[str, float]]:
    """A unigram model: the most frequent words (log-probability scores) over every character; deterministic, as
    tokenizers' Unigram trainer is not."""
    total = sum(n for _, n in _word_counts())
    chars = sorted({c for w, _ in _word_counts() for c in w} | {"▁"})
    pieces = [(p, 0.0) for p in specials] + [(c, math.log(1 / total) - 5) for c in chars]
    pieces += [("▁" + w, math.log(n / total)) for w, n in _word_counts()][:VOCAB - len(pieces)]
    return pieces


def tokenizer(family: str):
    """A tokenizer of ``family``'s class, trained on the sample."""
    import transformers as tf

    if family in ("gpt2", "roberta", "modernbert"):
        specials = {"gpt2": ["<|endoftext|>"], "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                    "modernbert": ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]}[family]
        found = _trained("bytelevel", specials)
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in found["merges"]]
        if family == "gpt2":
            return tf.GPT2Tokenizer(vocab=found["vocab"], merges=merges)
        if family == "roberta":
            return tf.RobertaTokenizer(vocab=found["vocab"], merges=merges)
        return tf.RobertaTokenizer(vocab=found["vocab"], merges=merges, bos_token="[CLS]", cls_token="[CLS]",
                                   eos_token="[SEP]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]")
    if family in ("bert", "distilbert", "electra"):
        cls = {"bert": tf.BertTokenizer, "distilbert": tf.DistilBertTokenizer, "electra": tf.ElectraTokenizer}[family]
        return cls(vocab=_wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    if family == "deberta-v2":
        return tf.DebertaV2Tokenizer(vocab=_unigram_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]), unk_id=1)
    if family == "llama":
        found = _trained("spbpe", ["<unk>", "<s>", "</s>"])
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in found["merges"]]
        return tf.LlamaTokenizer(vocab=found["vocab"], merges=merges)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def config(family: str, tok, num_labels: int = 2, hidden: int = 32, heads: int = 2, intermediate: int = 64):
    """A tiny random configuration of ``family`` for ``tok``'s vocabulary."""
    import transformers as tf

    vocab = len(tok)
    size = {"hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": heads, "intermediate_size": intermediate,
            "max_position_embeddings": 128}
    labels = {"num_labels": num_labels}
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab, **size, **labels)
    if family == "roberta":
        return tf.RobertaConfig(vocab_size=vocab, **{**size, "max_position_embeddings": 130}, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **labels)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=2, n_heads=heads, hidden_dim=intermediate,
                                   max_position_embeddings=128, pad_token_id=tok.pad_token_id, **labels)
    if family == "deberta-v2":
        return tf.DebertaV2Config(vocab_size=vocab, **size, relative_attention=True, position_buckets=32,
                                  pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=tok.pad_token_id,
                                  **labels)
    if family == "electra":
        return tf.ElectraConfig(vocab_size=vocab, embedding_size=16, **size, **labels)
    if family == "modernbert":
        return tf.ModernBertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                   intermediate_size=intermediate, max_position_embeddings=128, global_attn_every_n_layers=2,
                                   local_attention=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                   eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
                                   sep_token_id=tok.sep_token_id, **labels)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=heads, n_inner=intermediate, n_positions=128,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **labels)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                              num_key_value_heads=1, intermediate_size=intermediate, max_position_embeddings=128,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **labels)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def tiny_model(family: str, directory: str | Path, hidden: int = 32, heads: int = 2, intermediate: int = 64) -> str:
    """Save a tiny random ``family`` sequence classifier and its tokenizer into ``directory`` (as a base model
    from the hub would come: a decoder without a pad token); return its path."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer(family)
    torch.manual_seed(0)  # the same weights every session
    AutoModelForSequenceClassification.from_config(config(family, tok, 2, hidden, heads, intermediate)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def packaged_bert(directory: str | Path, hidden: int = 32, heads: int = 2, intermediate: int = 64) -> str:
    """Save a 2-layer random BERT sequence classifier ``hidden`` wide, with the packaged model's tokenizer (a few
    MB), into ``directory``; return its path."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from textlabel.model import packaged_model_dir

    tok = AutoTokenizer.from_pretrained(packaged_model_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=128)
    torch.manual_seed(0)  # the same weights every build
    BertForSequenceClassification(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


POSITIVE = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "charming", "excellent"]
NEGATIVE = ["awful", "dull", "tedious", "terrible", "boring", "clumsy", "lifeless", "painful"]
FILLER = ["the", "film", "movie", "plot", "acting", "was", "is", "really", "quite", "story", "a", "and", "cast"]
TOPICS = {"acting": ["actor", "actress", "performance"], "music": ["music", "score", "song"],
          "visuals": ["camera", "colour", "scenery"]}


def easy_rows(n: int, seed: int = 0) -> pa.Table:
    """Sentiment rows (text, label) a small model learns in seconds: one polar word among filler."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        words = rng.choices(FILLER, k=rng.randint(3, 10))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return pa.table({"text": texts, "label": labels})


def two_task_rows(n: int, seed: int = 0, missing: float = 0.0) -> pa.Table:
    """Rows with two label sets: sentiment (a polar word) and topic (a topic word); a ``missing`` share of each
    task's labels is null, as rows from mixed sources have."""
    rng = random.Random(seed)
    base = easy_rows(n, seed)
    texts, topics = [], []
    for text in base["text"].to_pylist():
        topic = rng.choice(sorted(TOPICS))
        words = text.split()
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[topic]))
        texts.append(" ".join(words))
        topics.append(topic)
    sentiment = [None if rng.random() < missing else s for s in base["label"].to_pylist()]
    topics = [None if rng.random() < missing else t for t in topics]
    return pa.table({"text": texts, "sentiment": pa.array(sentiment, pa.string()), "topic": pa.array(topics, pa.string())})
