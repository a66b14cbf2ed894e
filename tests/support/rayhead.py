"""A real `ray start --head` on loopback (token auth on, as users run it) and `ray job submit` against it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    _, alive = psutil.wait_procs(procs, timeout=2)
    for p in alive:
        p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def ray_head() -> Iterator[dict]:
    """A head of 2 CPUs: its job address, the environment a client needs, its temp dir (which names its processes)."""
    gcs, dashboard, client, agent, metrics = free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    # RAY_ADDRESS: the head's processes inherit it. Without it, code in them that looks the cluster up (Ray Train's
    # placement-group cleaner, through the state API) finds the test session's other Ray instance too, fails, and
    # leaks the placement groups of trials Tune stopped: later trials then wait for CPUs forever.
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
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
    found = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                           env=head["env"], capture_output=True, text=True, timeout=60)
    return found.stdout + found.stderr


@dataclass
class Job:
    """A submitted job and its `ray job submit` client, which follows the job's log until the job ends."""

    head: dict
    id: str
    client: subprocess.Popen
    log_file: str

    def wait(self, timeout: float = 600) -> str:
        """Wait for the job to end (its client exits then); what `ray job status` says of it."""
        self.client.wait(timeout)
        return status(self.head, self.id)

    def log(self) -> str:
        """The job's log, as `ray job submit` printed it (the driver's output, through a pipe: no terminal)."""
        with open(self.log_file, errors="replace") as f:
            return f.read()

    def succeeded(self) -> "Job":
        """Wait, and fail the test (with the job's log) unless the job succeeded."""
        found = self.wait()
        if f"Job '{self.id}' succeeded" not in found:
            pytest.fail(f"job {self.id} did not succeed:\n{found}\n{self.log()[-4000:]}")
        return self


def start(head: dict, repo_root, args: list[str]) -> Job:
    """`ray job submit --working-dir REPO -- python ARGS...` with the S3 environment, its client in the background."""
    job_id = f"textlabel-{uuid.uuid4().hex[:8]}"
    aws = {k: os.environ[k] for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"]}
    log_file = os.path.join(head["temp_dir"], f"{job_id}.client.log")
    with open(log_file, "w") as log:
        client = subprocess.Popen(
            ["ray", "job", "submit", "--address", head["address"], "--working-dir", str(repo_root), "--submission-id",
             job_id, "--runtime-env-json", json.dumps({"env_vars": aws}), "--", "python", *args],
            env=head["env"], cwd=repo_root, stdout=log, stderr=subprocess.STDOUT)
    return Job(head, job_id, client, log_file)


def submit(head: dict, repo_root, args: list[str]) -> Job:
    """Submit a job and wait for it; fail the test (with the job's log) unless it succeeded."""
    return start(head, repo_root, args).succeeded()


def processes(head: dict, name: str) -> list[psutil.Process]:
    """Processes of this head (its raylet's and job supervisor's descendants) whose command line has ``name``:
    the only ones a test of the head may kill."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(head["temp_dir"] in a for a in (p.info["cmdline"] or []))]
    found = {}
    for p in roots:
        for c in p.children(recursive=True):
            try:
                if name in " ".join(c.cmdline()):
                    found[c.pid] = c
            except psutil.NoSuchProcess:
                pass
    return list(found.values())
