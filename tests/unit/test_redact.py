"""redact.py: credentials in URIs never reach a log line, an error or a written record."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from textlabel.redact import RedactingFilter, excepthook, install, redact, redact_values


@pytest.mark.parametrize("text, expected", [
    ("http://user:secret@mlflow:5000", "http://***@mlflow:5000"),
    ("https://user:secret@mlflow.example.com/api/2.0", "https://***@mlflow.example.com/api/2.0"),
    ("postgresql://mlflow:secret@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("mysql+pymysql://root:secret@127.0.0.1/mlflow", "mysql+pymysql://***@127.0.0.1/mlflow"),
    ("s3://AKIAEXAMPLE:secret@bucket/prefix/part-0.parquet", "s3://***@bucket/prefix/part-0.parquet"),
    ("http://user:secret@[::1]:5000/", "http://***@[::1]:5000/"),
    ("https://ghp_secret@github.com/org/repo", "https://***@github.com/org/repo"),  # a token as the user
    ("http://user@mlflow:5000", "http://***@mlflow:5000"),  # a user without a password is still hidden
    ("http://user:p%40ss%2Fsecret@mlflow:5000", "http://***@mlflow:5000"),  # percent-encoded, as RFC 3986 wants
    ("http://user:p@ss@mlflow:5000/x", "http://***@mlflow:5000/x"),  # an unencoded '@': the host is after the last
    ("http://user:pa/secret@mlflow:5000/x", "http://***@mlflow:5000/x"),  # an unencoded '/' in the password
    ("http://user:1234@mlflow", "http://***@mlflow"),  # a password of digits is not a port
])
def test_the_userinfo_of_a_uri_is_hidden_and_the_rest_kept(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "",
    "training 3 epochs on 1200 rows",
    "http://mlflow:5000/api/2.0/mlflow/runs/get",
    "http://[::1]:5000/health",
    "http://[::1]:5000/artifacts/a@b",
    "s3://bucket/prefix/part@2024.parquet",
    "http://mlflow:5000/artifacts/a@b",  # an '@' in the path, after a port
    "https://host/search?email=ops@example.com",
    "write to ops@example.com, or git@github.com:org/repo",
    "models:/sentiment@champion",
    "file:///tmp/mlruns",
    "val_macro_f1=0.91, T=1.20, max_chunks=64",
])
def test_text_without_credentials_is_left_as_it_is(text):
    assert redact(text) == text


def test_every_uri_in_a_message_is_redacted():
    text = ("MLflow: out was tracked at http://a:secret1@old:5000, this run at https://b:secret2@new:443/; "
            "data s3://bucket/x?next=http://c:secret3@third/")
    assert redact(text) == ("MLflow: out was tracked at http://***@old:5000, this run at https://***@new:443/; "
                            "data s3://bucket/x?next=http://***@third/")


def test_credential_parameters_keep_their_names_and_lose_their_values():
    presigned = ("https://bucket.s3.amazonaws.com/model.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
                 "&X-Amz-Security-Token=secret1&X-Amz-Signature=secret2")
    assert redact(presigned) == ("https://bucket.s3.amazonaws.com/model.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                                 "&X-Amz-Credential=***&X-Amz-Date=20240101T000000Z"
                                 "&X-Amz-Security-Token=***&X-Amz-Signature=***")
    assert redact("http://h/api?token=secret&page=2") == "http://h/api?token=***&page=2"
    assert redact("postgresql://db/mlflow?user=u&password=secret") == "postgresql://db/mlflow?user=u&password=***"
    assert redact("env: AWS_SECRET_ACCESS_KEY=secret MLFLOW_TRACKING_PASSWORD=secret2") == (
        "env: AWS_SECRET_ACCESS_KEY=*** MLFLOW_TRACKING_PASSWORD=***")


def test_a_record_is_redacted_through_and_through():
    record = {"tracking_uri": "http://u:secret@h:5000", "epochs": [{"val_macro_f1": 0.9}], "rows": 10, "note": None,
              "failed": {"in/a.parquet": "fetching https://u:secret@h/x failed"}, "labels": ("a", "b")}
    written = redact_values(record)
    assert "secret" not in repr(written)
    assert written["epochs"] == [{"val_macro_f1": 0.9}] and written["rows"] == 10 and written["labels"] == ("a", "b")
    assert "in/a.parquet" in written["failed"]


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(name)
    logger.handlers, logger.propagate = [handler], False
    install(logger)
    return logger, stream


def test_a_logged_message_and_its_arguments_are_redacted():
    logger, stream = _logger("test_redact.message")
    logger.warning("MLflow: run %s at %s", "r1", "http://user:secret@mlflow:5000")
    logger.warning("%d%% done at %s", 50, "http://mlflow:5000")  # rendered once: a '%' in the result stays
    logger.warning("tracked at http://user:secret2@mlflow:5000")
    assert stream.getvalue().splitlines() == ["WARNING test_redact.message: MLflow: run r1 at http://***@mlflow:5000",
                                              "WARNING test_redact.message: 50% done at http://mlflow:5000",
                                              "WARNING test_redact.message: tracked at http://***@mlflow:5000"]


def test_a_logged_traceback_is_redacted():
    logger, stream = _logger("test_redact.traceback")
    try:
        raise ConnectionError("API request to http://user:secret@mlflow:5000/api/2.0/mlflow/runs/create failed")
    except ConnectionError:
        logger.exception("MLflow failed")
    logged = stream.getvalue()
    assert "secret" not in logged
    assert "Traceback" in logged and "ConnectionError: API request to http://***@mlflow:5000/api" in logged


def test_installing_twice_filters_once():
    logger, _ = _logger("test_redact.twice")
    install(logger)
    assert sum(isinstance(f, RedactingFilter) for f in logger.handlers[0].filters) == 1


def test_the_jobs_logging_redacts_every_library_s_lines(caplog, monkeypatch):
    from textlabel.cli import setup_logging

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # setup_logging replaces it: restored after the test
    setup_logging()
    with caplog.at_level(logging.INFO):
        logging.getLogger("mlflow.utils.rest_utils").warning("API request to %s failed", "http://u:secret@mlflow:5000/api")
        logging.getLogger("textlabel.train").info("training at https://u:secret@mlflow")
    assert "secret" not in caplog.text and "training at https://***@mlflow" in caplog.text


def test_a_library_with_its_own_handler_that_does_not_propagate_is_redacted_too(monkeypatch):
    """MLflow, once imported, logs through a handler of its own with propagation off: the root's filters never
    see its lines."""
    import io

    from textlabel.cli import setup_logging

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())  # restored after the test
    setup_logging()
    own = logging.getLogger("a_library_like_mlflow")
    stream = io.StringIO()
    own.addHandler(logging.StreamHandler(stream))
    monkeypatch.setattr(own, "propagate", False)
    own.warning("API request to %s failed", "http://u:secret@mlflow:5000/api")
    own.removeHandler(own.handlers[-1])
    assert stream.getvalue() == "API request to http://***@mlflow:5000/api failed\n"


def test_an_uncaught_error_s_traceback_is_redacted(capsys):
    try:
        raise RuntimeError("cannot reach http://user:secret@mlflow:5000")
    except RuntimeError as exc:
        excepthook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "secret" not in err and "RuntimeError: cannot reach http://***@mlflow:5000" in err


def test_the_run_summary_is_written_without_credentials(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    from textlabel import storage, summary

    built = {"run": "r1", "input": "s3://bucket/in/", "model": "models:/sentiment/3",
             "registered_model": {"name": "sentiment", "source": "http://u:secret@mlflow:5000/api/2.0/mlflow-artifacts/x"},
             "failed": {"in/a.parquet": "ConnectionError: https://u:secret@mlflow:5000/x refused"},
             "files_labelled": 1, "rows_out": 2, "rows_per_second": 1.0, "files_adopted": 0, "files_unchanged": 0,
             "files_failed": 1, "rows_skipped_total": 0, "rows_skipped": {}, "rows_truncated": 0, "rows_chunked": 0,
             "drift": None}
    monkeypatch.setattr(summary, "build", lambda night, seconds, crashed: built)
    night = SimpleNamespace(out=storage.resolve(str(tmp_path)), run="r1")
    returned = summary.write_summary(night, 1.0, None)
    for written in (tmp_path / summary.SUMMARY, tmp_path / summary.RUNS / "r1.json"):
        assert "secret" not in written.read_text()
    assert json.loads((tmp_path / summary.SUMMARY).read_text())["registered_model"]["source"].startswith("http://***@mlflow")
    assert "secret" not in repr(returned)
