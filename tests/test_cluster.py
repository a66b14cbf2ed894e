"""`ray job submit` end to end against a real `ray start --head` (token auth on), S3 on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid

import psutil
import pytest

from conftest import easy_rows, put_parquet
from textlabel import storage


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_by_pid(temp_dir: str) -> None:
    """Stop only this head: every process started under its temp dir, and their children."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
            procs += [p, *p.children(recursive=True)]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def ray_head():
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    subprocess.run(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": {**env, "RAY_AUTH_MODE": "token"}}
    finally:
        _stop_by_pid(temp_dir)


def _submit(head: dict, repo_root, args: list[str]) -> str:
    job_id = f"textlabel-{uuid.uuid4().hex[:8]}"
    aws = {k: os.environ[k] for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"]}
    subprocess.run(
        ["ray", "job", "submit", "--address", head["address"], "--working-dir", str(repo_root), "--submission-id", job_id,
         "--runtime-env-json", json.dumps({"env_vars": aws}), "--", "python", *args],
        env=head["env"], cwd=repo_root, timeout=600, capture_output=True, text=True,
    )
    status = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                            env=head["env"], capture_output=True, text=True, timeout=60)
    if f"Job '{job_id}' succeeded" not in status.stdout + status.stderr:
        logs = subprocess.run(["ray", "job", "logs", "--address", head["address"], job_id],
                              env=head["env"], capture_output=True, text=True, timeout=60).stdout
        pytest.fail(f"job {job_id} did not succeed:\n{status.stdout}\n{status.stderr}\n{logs[-4000:]}")
    return job_id


def test_train_then_label_submitted_as_ray_jobs(ray_head, repo_root, tiny_model, s3_prefix):
    rows = easy_rows(1200, seed=5)
    put_parquet(f"{s3_prefix}/train/part-0.parquet", rows)
    put_parquet(f"{s3_prefix}/corpus/part-0.parquet", easy_rows(200, seed=6).append_column("id", [list(range(200))]))
    _submit(ray_head, repo_root, ["jobs/train.py", "--data", f"{s3_prefix}/train/", "--output", f"{s3_prefix}/run",
                                  "--model", tiny_model, "--epochs", "3", "--learning-rate", "3e-3", "--batch-size", "16",
                                  "--max-length", "32"])
    metrics = storage.read_json(storage.resolve(f"{s3_prefix}/run/metrics.json"))
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3] and metrics["epochs"][-1]["val_accuracy"] > 0.9
    _submit(ray_head, repo_root, ["jobs/label.py", "--model", f"{s3_prefix}/run/model", "--input", f"{s3_prefix}/corpus/",
                                  "--output", f"{s3_prefix}/labels", "--label-prefix", "pred_"])
    summary = storage.read_json(storage.resolve(f"{s3_prefix}/labels/_summary.json"))
    assert summary["rows_in"] == summary["rows_out"] == 200


def test_gpu_check_runs_reduced_on_cpu(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user runs it
    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks/gpu_check.py"), "--json-out", str(tmp_path / "r.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gpus"] == 0 and report["train"]["workers"] == 2
    assert report["train"]["samples_per_s"] > 0 and report["train"]["effective_tflops"] > 0
    assert report["label"]["rows"] == 2000 and report["label"]["rows_per_s"] > 0
