"""Fixtures every layer may use: small random models (textlabel.scratch) and the repository's root.

tests/unit holds the tests of pure pieces and of one model in this process (no Ray, no S3 server);
tests/e2e the user promises, through the jobs' entry points, a local Ray and the S3 server (its
conftest.py starts them once per session).
"""

from __future__ import annotations

from pathlib import Path

import pytest


# The long poles first (with --no-loadscope-reorder, pytest-xdist hands work out in this order): the search waits on
# its trials more than it computes, so it runs beside the rest rather than alone at the end; the unit tests come last
# and fill both workers' tails.
FIRST = ("tests/e2e/test_search.py", "tests/e2e/test_chaos.py", "tests/e2e/test_evaluate.py", "tests/e2e/test_label.py", "tests/e2e/test_tracking.py",
         "tests/e2e/test_train.py", "tests/e2e/test_long_texts.py", "tests/e2e/test_faults.py", "tests/e2e/test_lora.py",
         "tests/e2e/test_multitask.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> tuple[int, int]:
        path = item.nodeid.split("::", 1)[0]
        return (FIRST.index(path) if path in FIRST else len(FIRST), 1 if path.startswith("tests/unit/") else 0)

    items.sort(key=rank)  # stable: each file keeps its own order


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
