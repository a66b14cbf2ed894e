"""Exit codes: what a nightly scheduler reads from a job's end. No Ray, no S3."""

from __future__ import annotations

import pytest

from textlabel import cli
from textlabel.config import ConfigError
from textlabel.label import DriftFlagged, FilesFailed
from textlabel.lease import LeaseHeld, LeaseLost
from textlabel.storage import StorageError, StorageUnavailable


def _raised_from(cause: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("exc, code", [
    (ConfigError(["--batch-size must be positive"]), 2),
    (StorageError("s3://b/x: access denied"), 2),
    (LeaseHeld("--output s3://b/out is held by run r"), 2),
    (FilesFailed("2 input file(s) could not be labelled"), 3),
    (DriftFlagged("tonight's labels drifted"), 4),
    (StorageUnavailable("s3://b/x: the object store is unreachable"), 75),
    (LeaseLost("s3://b/out/_lease.json: this run no longer holds the lease"), 75),
    # A commit that failed because the lease was lost, or the store kept throttling after botocore's retries.
    (_raised_from(LeaseLost("now held by run r2"), RuntimeError("committing the manifest failed")), 75),
    (_raised_from(OSError("An error occurred (SlowDown) when calling the PutObject operation"), RuntimeError("x")), 75),
    (_raised_from(ConnectionResetError("Connection reset by peer"), RuntimeError("reading part-1.parquet")), 75),
    # A tracking server that refuses connections is a wrong --mlflow-tracking-uri as often as not: the message says.
    (_raised_from(ConnectionRefusedError("Connection refused"), ConfigError(["--mlflow-tracking-uri: no server"])), 2),
    (RuntimeError("read 500 rows where the footer says 600"), 1),  # a bug: its traceback is the report
    (KeyError("label"), 1),
])
def test_each_failure_has_the_exit_code_that_says_what_to_do(exc, code):
    assert cli.exit_code(exc, FilesFailed, DriftFlagged) == code


def test_a_lost_lease_ends_the_job_with_one_line_that_names_the_new_holder(caplog):
    lost = LeaseLost("s3://b/out/_lease.json: this run no longer holds the lease: it is now held by run r2 (host "
                     "node-b, pid 7)")

    def job(argv):
        raise RuntimeError("committing the manifest failed") from lost

    assert cli._run(job, []) == cli.Exit.TRANSIENT == 75
    last = caplog.records[-1]
    assert last.levelname == "ERROR" and "now held by run r2 (host node-b" in last.getMessage()
    assert "exit 75: transient; rerun the same command" in last.getMessage()


def test_an_unexpected_error_keeps_its_traceback():
    def job(argv):
        raise KeyError("label")

    with pytest.raises(KeyError):
        cli._run(job, [])
