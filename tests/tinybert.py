"""A tiny random BERT with the packaged model's tokenizer (a few MB), for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path


def tiny_bert(directory: str | Path, hidden: int = 32, heads: int = 2, intermediate: int = 64) -> str:
    """Save a 2-layer random BERT sequence classifier ``hidden`` wide into ``directory``; return its path."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from textlabel.model import packaged_model_dir

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)  # the same weights every session: a test's outcome never depends on the draw
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
