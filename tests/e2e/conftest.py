"""The real parts the end-to-end tests share, one of each per session: an S3 server on loopback (behind the
fault proxy, support/s3.py), a local Ray, a `ray start --head` for `ray job submit`, an MLflow server, and
one trained model.

The S3 server starts before Ray, so that every Ray worker inherits the AWS environment pointing at it, as
workers on a cluster inherit an instance profile.
"""

from __future__ import annotations

import os

import psutil
import pytest

# moto refuses multipart parts under 5 MiB, as S3 does; the multipart kill test (test_faults.py) uploads a small
# output in 32 KiB parts. Read by moto when it is imported, below.
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(32 * 1024))
# Ray Train's controller polls its workers every 2 s by default: each epoch's report, and the end of a run, wait
# for the next poll. Tests with epochs of a second poll every 0.5 s (a documented Ray Train setting; Ray passes it
# on to the controller and workers).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts a preemption watcher actor per worker group (a process, about 1.5 CPU-s) that polls Ray for
# draining nodes, which a one-node local Ray never has: off in tests (Ray Train reads it in its controller).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from support.corpus import fresh_prefix, put_parquet
from textlabel.scratch import easy_rows


@pytest.fixture(scope="session")
def s3_endpoint():
    """The S3 server, behind a fault-injecting proxy that passes everything until a test sets its fail_rate."""
    from support.s3 import s3_server

    with s3_server(buckets=("tests",)) as proxy:
        yield proxy


@pytest.fixture
def s3_faults(s3_endpoint):
    """The session's fault proxy; faults stop when the test ends."""
    yield s3_endpoint
    s3_endpoint.fail_rate = 0.0


@pytest.fixture(scope="session")
def ray_session(s3_endpoint) -> str:
    """The session's local Ray (its processes are this test process's descendants); its GCS address, which a job's
    driver started by a test joins through RAY_ADDRESS."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, object_store_memory=2 * 1024**3)
    yield context.address_info["gcs_address"]
    started = [p for p in psutil.Process().children(recursive=True) if _is_ray(p)]
    ray.shutdown()
    # A worker can outlive its raylet (once, a predictor actor was left sleeping for an hour): whatever of this
    # session's Ray is still there after a grace period is killed.
    for survivor in psutil.wait_procs(started, timeout=10)[1]:
        survivor.kill()


def _is_ray(proc: psutil.Process) -> bool:
    try:
        command = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return command.startswith("ray::") or "/site-packages/ray/" in command


@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    """A real `ray start --head` (token auth on) that jobs are submitted to (rayhead.submit), for one module: it
    stops when its tests are done."""
    from support.rayhead import ray_head as start

    with start() as head:
        yield head


@pytest.fixture
def s3_prefix(s3_endpoint) -> str:
    """A fresh, empty s3:// prefix for one test."""
    return fresh_prefix()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (support/mlflowserver.py) for the session; its URL."""
    from support.mlflowserver import mlflow_server as start

    with start(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="session")
def trained(ray_session, tiny_gpt2, s3_endpoint, mlflow_server):
    """One 2-worker run of jobs/train.py from S3 to S3, shared by the tests that inspect it. Its base model is a
    GPT-2 (a decoder without a pad token: the family most unlike BERT); BERTs are trained end to end by
    test_long_texts.py, a Llama under LoRA by test_lora.py, a RoBERTa by test_multitask.py."""
    prefix = "s3://tests/train-e2e"
    table = easy_rows(1200, seed=1)
    table = table.sort_by("label")  # one class after the other: training must shuffle globally
    put_parquet(f"{prefix}/data/part-0.parquet", table.slice(0, 600))
    put_parquet(f"{prefix}/data/part-1.parquet", table.slice(600))
    output = f"{prefix}/run"
    args = ["--data", f"{prefix}/data/", "--output", output, "--model", tiny_gpt2, "--num-workers", 2,
            "--epochs", 6, "--early-stopping-patience", 1, "--learning-rate", 3e-3, "--batch-size", 16, "--max-length", 32,
            # Tracked in MLflow, and the model registered as sentiment version 1 (test_tracking.py).
            "--mlflow-tracking-uri", mlflow_server, "--mlflow-experiment", "e2e", "--mlflow-register", "sentiment"]
    from textlabel.cli import train_main

    assert train_main([str(a) for a in args]) == 0
    return {"output": output, "args": args, "rows": table.num_rows, "mlflow": mlflow_server}
