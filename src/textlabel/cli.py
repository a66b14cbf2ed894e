"""Command-line entry points: ``textlabel train|...`` and the ``jobs/*.py`` scripts."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from textlabel.config import (ConfigError, EvaluateConfig, LabelConfig, PromoteConfig, SearchConfig, TrainConfig,
                              parse_config)
from textlabel.data import DataError
from textlabel.lease import LeaseHeld
from textlabel.model import ModelError
from textlabel.storage import StorageError

logger = logging.getLogger("textlabel")

# Problems the user can fix: one line, no traceback, exit code 2.
USER_ERRORS = (ConfigError, DataError, LeaseHeld, ModelError, StorageError)


def setup_logging() -> None:
    """Log textlabel's lines to stderr with timestamps (called once, by the entry point)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("botocore", "aiobotocore"):  # "Found credentials in environment variables", per client
        logging.getLogger(chatty).setLevel(logging.WARNING)


def init_ray() -> None:
    """Join the cluster (``ray job submit``, ``RAY_ADDRESS``) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    # A job submitted to a cluster, or RAY_ADDRESS, names the cluster; otherwise start one here.
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def _run(job: Callable[[list[str] | None], object], argv: list[str] | None) -> int:
    from textlabel.label import DriftFlagged, FilesFailed

    setup_logging()
    try:
        job(argv)
    except USER_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    except FilesFailed as exc:
        logger.error("%s", exc)
        return 3
    except DriftFlagged as exc:
        logger.error("%s", exc)
        return 4
    return 0


def _train(argv: list[str] | None) -> object:
    cfg = parse_config(TrainConfig, argv, "textlabel train", "Fine-tune a BERT-family classifier with Ray Train.")
    from textlabel.train import run_training

    return run_training(cfg, start_ray=init_ray)  # after the data and the model are checked


def train_main(argv: list[str] | None = None) -> int:
    """``jobs/train.py``: fine-tune; exit 0 on success, 2 on bad input, 1 on failure."""
    return _run(_train, argv)


def _tune(argv: list[str] | None) -> object:
    cfg = parse_config(SearchConfig, argv, "textlabel tune",
                       "Search training settings with Ray Tune: N training runs, ASHA stopping bad ones early, the best "
                       "exported to OUTPUT/best/model.")
    from textlabel.search import run_search

    return run_search(cfg, start_ray=init_ray)  # after the data, the model and the search space are checked


def tune_main(argv: list[str] | None = None) -> int:
    """``jobs/tune.py``: search; exit 0 when the best trial is exported, 2 on bad input, 1 on failure."""
    return _run(_tune, argv)


def _label(argv: list[str] | None) -> object:
    cfg = parse_config(LabelConfig, argv, "textlabel label", "Label Parquet corpora with a fine-tuned classifier, on Ray Data.")
    from textlabel.label import run_labelling

    # Bad input fails before Ray starts or any model loads; a night with nothing new never starts Ray.
    return run_labelling(cfg, start_ray=init_ray)


def label_main(argv: list[str] | None = None) -> int:
    """``jobs/label.py``: label what is new; exit 0 when every file is labelled, 3 when some file could
    not be (the rest are), 4 when every file is labelled but the labels drifted past --max-drift, 2 on bad
    input, 1 on failure."""
    return _run(_label, argv)


def _evaluate(argv: list[str] | None) -> object:
    cfg = parse_config(EvaluateConfig, argv, "textlabel evaluate", "Evaluate a fine-tuned classifier on labelled data; write a report.")
    from textlabel.evaluate import run_evaluation

    return run_evaluation(cfg, start_ray=init_ray)  # after the data and the model are checked


def evaluate_main(argv: list[str] | None = None) -> int:
    """``jobs/evaluate.py``: evaluate a model; exit 0 on success, 2 on bad input, 1 on failure."""
    return _run(_evaluate, argv)


def _promote(argv: list[str] | None) -> object:
    cfg = parse_config(PromoteConfig, argv, "textlabel promote",
                       "Register a trained model as a new version of an MLflow registered model (the labelling job "
                       "then takes --model models:/NAME/VERSION or models:/NAME@ALIAS).")
    from textlabel import tracking

    found = tracking.promote(cfg.model, cfg.name, cfg.alias or [], cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
    print(found.describe(alias=False))
    return found


def promote_main(argv: list[str] | None = None) -> int:
    """``textlabel promote`` / ``jobs/promote.py``: register a model; prints models:/NAME/VERSION; exit 0, 2 on
    bad input, 1 on failure."""
    return _run(_promote, argv)


COMMANDS: dict[str, Callable[[list[str] | None], int]] = {"train": train_main, "label": label_main, "evaluate": evaluate_main,
                                                          "promote": promote_main, "tune": tune_main}


def main(argv: list[str] | None = None) -> int:
    """``textlabel COMMAND [options]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: textlabel {{{','.join(COMMANDS)}}} [options]  (textlabel COMMAND --help)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
