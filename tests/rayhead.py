"""A real `ray start --head` on loopback (token auth on, as users run it) and `ray job submit` against it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def stop_by_pid(temp_dir: str) -> None:
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


@contextmanager
def ray_head() -> Iterator[dict]:
    """A head of 2 CPUs: its job address, the environment a client needs, its temp dir (which names its processes)."""
    gcs, dashboard, client, agent, metrics = free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    subprocess.run(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": {**env, "RAY_AUTH_MODE": "token"}, "temp_dir": temp_dir}
    finally:
        stop_by_pid(temp_dir)


def status(head: dict, job_id: str) -> str:
    """What `ray job status` says of a job."""
    status = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                            env=head["env"], capture_output=True, text=True, timeout=60)
    return status.stdout + status.stderr


def submit(head: dict, repo_root, args: list[str], wait: bool = True) -> str:
    """`ray job submit --working-dir REPO -- python ARGS...` with the S3 environment; with ``wait``, fail the test
    (with the job's log) unless the job succeeded. Returns the job id."""
    job_id = f"textlabel-{uuid.uuid4().hex[:8]}"
    aws = {k: os.environ[k] for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"]}
    subprocess.run(
        ["ray", "job", "submit", "--address", head["address"], "--working-dir", str(repo_root), "--submission-id", job_id,
         "--runtime-env-json", json.dumps({"env_vars": aws}), *([] if wait else ["--no-wait"]), "--", "python", *args],
        env=head["env"], cwd=repo_root, timeout=600, capture_output=True, text=True,
    )
    if not wait:
        return job_id
    status = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                            env=head["env"], capture_output=True, text=True, timeout=60)
    if f"Job '{job_id}' succeeded" not in status.stdout + status.stderr:
        logs = subprocess.run(["ray", "job", "logs", "--address", head["address"], job_id],
                              env=head["env"], capture_output=True, text=True, timeout=60).stdout
        pytest.fail(f"job {job_id} did not succeed:\n{status.stdout}\n{status.stderr}\n{logs[-4000:]}")
    return job_id
