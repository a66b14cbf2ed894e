"""Command-line entry points: ``textlabel train|...`` and the ``jobs/*.py`` scripts."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from enum import IntEnum

from textlabel.config import (ConfigError, EvaluateConfig, LabelConfig, PromoteConfig, SearchConfig, TrainConfig,
                              parse_config)
from textlabel.data import DataError
from textlabel import redact
from textlabel.lease import LeaseHeld, LeaseLost
from textlabel.model import ModelError
from textlabel.storage import StorageError, StorageUnavailable, is_transient
from textlabel.watch import ScheduleTimeout

logger = logging.getLogger("textlabel")



class Exit(IntEnum):
    """What a job's exit code tells the scheduler that runs it nightly."""

    OK = 0
    FAILED = 1  # a bug or an unexpected failure: read the traceback
    BAD_INPUT = 2  # fix the options or the input (the message says which), then rerun
    FILES_FAILED = 3  # every other file is labelled; fix or remove the files named, then rerun
    DRIFTED = 4  # every label is committed, but the labels moved past --max-drift: look before trusting them
    TRANSIENT = 75  # nothing to fix (the store unavailable, the lease lost, no room for the pool yet): rerun the same command


# Problems the user can fix: one line, no traceback, exit code 2.
USER_ERRORS = (ConfigError, DataError, LeaseHeld, ModelError, StorageError)


def _ended(exc: BaseException) -> bool:
    """Whether the run was ended for a reason a rerun clears: its lease lost, or no room for its pool yet."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (LeaseLost, ScheduleTimeout)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def setup_logging() -> None:
    """Log textlabel's lines to stderr with timestamps (called once, by the entry point); every line that reaches
    the root logger's handlers (textlabel's, Ray's, botocore's, MLflow's) and an uncaught error's traceback have
    URI credentials redacted (redact.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("botocore", "aiobotocore"):  # "Found credentials in environment variables", per client
        logging.getLogger(chatty).setLevel(logging.WARNING)
    redact.install(logging.getLogger())
    sys.excepthook = redact.excepthook


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
    except Exception as exc:
        code = exit_code(exc, files_failed=FilesFailed, drifted=DriftFlagged)
        if code == Exit.FAILED:
            raise
        logger.error("%s", _last_words(exc) if code == Exit.TRANSIENT else exc)
        return code
    return Exit.OK


def exit_code(exc: BaseException, files_failed: type[BaseException] | None = None,
              drifted: type[BaseException] | None = None) -> Exit:
    """The exit code of a job that raised ``exc`` (the labelling job's FilesFailed and DriftFlagged are passed
    in: label.py is imported only by the jobs that run it)."""
    if _ended(exc):
        return Exit.TRANSIENT
    if isinstance(exc, USER_ERRORS):  # what the message names is the fix, whatever it was raised from
        return Exit.TRANSIENT if isinstance(exc, StorageUnavailable) else Exit.BAD_INPUT
    if files_failed is not None and isinstance(exc, files_failed):
        return Exit.FILES_FAILED
    if drifted is not None and isinstance(exc, drifted):
        return Exit.DRIFTED
    return Exit.TRANSIENT if is_transient(exc) else Exit.FAILED


def _last_words(exc: BaseException) -> str:
    """A transient failure's one line: what happened (the lost lease names its new holder) and what to do."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, (LeaseLost, ScheduleTimeout, StorageError)):
        cause = cause.__cause__ or cause.__context__
    return f"{cause or exc} (exit {int(Exit.TRANSIENT)}: transient; rerun the same command)"


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
    """``jobs/label.py``: label what is new; exits with an ``Exit`` code: 0 when every file is labelled, 3 when
    some file could not be (the rest are), 4 when every file is labelled but the labels drifted past --max-drift,
    2 on bad input, 75 when a rerun of the same command is the fix (store unavailable, lease lost), 1 on failure."""
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
