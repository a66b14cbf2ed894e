"""Fixtures every layer may use: small random models (textlabel.scratch) and the repository's root.

tests/unit holds the tests of pure pieces and of one model in this process (no Ray, no S3 server);
tests/e2e the user promises, through the jobs' entry points, a local Ray and the S3 server (its
conftest.py starts them once per session).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with the packaged model's tokenizer (a few MB)."""
    from textlabel.scratch import packaged_bert

    return packaged_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random GPT-2 with a byte-level BPE trained on the shipped sample, and no pad token (as
    the real gpt2 ships): a decoder, which classifies from each row's last token."""
    from textlabel.scratch import tiny_model

    return tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))
