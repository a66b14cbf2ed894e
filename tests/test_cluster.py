"""`ray job submit` end to end against a real `ray start --head` (token auth on), S3 on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter

import psutil
import pyarrow.parquet as pq
import pytest

from conftest import corpus, easy_rows, put_parquet, read_output
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
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": {**env, "RAY_AUTH_MODE": "token"}, "temp_dir": temp_dir}
    finally:
        _stop_by_pid(temp_dir)


def _status(head: dict, job_id: str) -> str:
    status = subprocess.run(["ray", "job", "status", "--address", head["address"], job_id],
                            env=head["env"], capture_output=True, text=True, timeout=60)
    return status.stdout + status.stderr


def _submit(head: dict, repo_root, args: list[str], wait: bool = True) -> str:
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


def _wait(what: str, check, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _head_processes(head: dict, name: str) -> list[psutil.Process]:
    """Processes of this head (its raylet's and job supervisor's descendants) whose command line has ``name``."""
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


def _records(out: str) -> int:
    """Files the manifest vouches for so far (per-file records not yet folded)."""
    loc = storage.resolve(f"{out}/_manifest")
    return len(storage.list_files(loc, ".json")) if storage.exists(loc) else 0


def _label_args(model: str, prefix: str) -> list[str]:
    return ["jobs/label.py", "--model", model, "--input", f"{prefix}/in/", "--output", f"{prefix}/out",
            "--label-prefix", "pred_", "--max-length", "64", "--batch-size", "32"]


def _assert_exactly_once(prefix: str, ids: list[int]) -> None:
    got = read_output(f"{prefix}/out")["id"].to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(ids)


def test_driver_killed_mid_run_then_rerun_labels_every_row_exactly_once(ray_head, repo_root, s3_prefix):
    from textlabel.model import packaged_model_dir

    files = 16
    rows = corpus(f"{s3_prefix}/in", [150] * files)  # ~0.5 s a file for the packaged model on one CPU here
    out = f"{s3_prefix}/out"
    _submit(ray_head, repo_root, _label_args(packaged_model_dir(), s3_prefix), wait=False)
    _wait("the first file's record", lambda: _records(out) >= 1)
    drivers = [p for p in _head_processes(ray_head, f"jobs/label.py --model {packaged_model_dir()} --input {s3_prefix}/in/")
               if p.name().startswith("python")]  # not the `sh -c` the job supervisor runs it in
    assert len(drivers) == 1
    drivers[0].kill()  # SIGKILL: no cleanup code runs
    # Ray stops the dead driver's actors; then look at what a reader of the output sees.
    _wait("the killed job's actors to go", lambda: not _head_processes(ray_head, "PartLabeller"), timeout=60)
    recorded = _records(out)
    assert 1 <= recorded < files and not storage.exists(storage.resolve(f"{out}/_summary.json"))  # killed mid-run
    loc = storage.resolve(out)
    visible = storage.list_files(loc, ".parquet")
    for f in visible:  # every visible file is whole: all of its input's rows
        number = int(f.base_name.split("-")[1].split(".")[0])
        assert pq.read_table(f.path, filesystem=loc.fs)["id"].to_pylist() == list(range(150 * number, 150 * (number + 1)))

    _submit(ray_head, repo_root, _label_args(packaged_model_dir(), s3_prefix))
    summary = storage.read_json(storage.resolve(f"{out}/_summary.json"))
    assert (summary["files_unchanged"], summary["files_labelled"]) == (recorded, files - recorded)
    assert summary["orphans_deleted"] == len(visible) - recorded  # written but never recorded: redone, not trusted
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
    # Nothing partial or temporary is left, visible or hidden: the files, the manifest, the summaries.
    names = sorted(f.path[len(loc.path) + 1:] for f in loc.fs.get_file_info(storage.pafs.FileSelector(loc.path, recursive=True))
                   if f.type == storage.pafs.FileType.File)
    assert [n for n in names if not n.startswith("_runs/")] == ["_manifest.json", "_summary.json",
                                                               *sorted(f"part-{i}.parquet" for i in range(files))]


def test_a_killed_predictor_actor_is_replaced_and_the_run_completes_exactly_once(ray_head, repo_root, s3_prefix):
    from textlabel.model import packaged_model_dir

    rows = corpus(f"{s3_prefix}/in", [150] * 10)
    job = _submit(ray_head, repo_root, _label_args(packaged_model_dir(), s3_prefix), wait=False)
    _wait("the first file's record", lambda: _records(f"{s3_prefix}/out") >= 1)
    victims = _head_processes(ray_head, "PartLabeller")
    assert len(victims) == 1  # the pool's one actor, part-way through the corpus ...
    assert victims[0].cpu_percent(interval=0.3) > 30  # ... and busy labelling a part when it dies
    victims[0].kill()
    def ended() -> str | None:
        status = _status(ray_head, job)
        return status if any(w in status for w in ("succeeded", "failed", "stopped")) else None

    status = _wait("the job to end", ended)
    assert f"Job '{job}' succeeded" in status
    summary = storage.read_json(storage.resolve(f"{s3_prefix}/out/_summary.json"))
    assert (summary["files_labelled"], summary["files_failed"], summary["rows_out"]) == (10, 0, 1500)
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())


def test_gpu_check_runs_reduced_on_cpu(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user runs it
    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks/gpu_check.py"), "--json-out", str(tmp_path / "r.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gpus"] == 0 and report["train"]["workers"] == 2
    assert report["train"]["samples_per_s"] > 0 and report["train"]["effective_tflops"] > 0
    assert report["label"]["rows"] == 2000 and report["label"]["rows_per_s"] > 0


def test_driver_killed_while_relabelling_then_rerun_finishes_the_relabel(ray_head, repo_root, s3_prefix):
    from textlabel.manifest import Manifest
    from textlabel.model import packaged_model_dir

    files = 12
    rows = corpus(f"{s3_prefix}/in", [150] * files)
    out = storage.resolve(f"{s3_prefix}/out")
    _submit(ray_head, repo_root, _label_args(packaged_model_dir(), s3_prefix))

    first_run = storage.read_json(out.join("_summary.json"))["run"]

    def statuses(relabelled_only: bool = False) -> Counter:
        return Counter(rec["status"] for rec in Manifest.load(out).files.values()
                       if not relabelled_only or rec["run"] != first_run)

    _submit(ray_head, repo_root, [*_label_args(packaged_model_dir(), s3_prefix), "--relabel"], wait=False)
    # Every file is marked `labelling` before its parts are replaced; wait until some are done again.
    _wait("part of the relabel", lambda: statuses()["labelling"] and statuses(True)["done"])
    driver = [p for p in _head_processes(ray_head, f"--input {s3_prefix}/in/ ") if p.name().startswith("python")]
    driver[0].kill()
    _wait("the killed job's actors to go", lambda: not _head_processes(ray_head, "PartLabeller"), timeout=60)
    after_kill = statuses()
    assert after_kill["labelling"] >= 1 and after_kill["done"] >= 1 and sum(after_kill.values()) == files
    # The same nightly command, without --relabel: the files caught half-replaced are labelled again.
    _submit(ray_head, repo_root, _label_args(packaged_model_dir(), s3_prefix))
    summary = storage.read_json(out.join("_summary.json"))
    assert (summary["files_labelled"], summary["files_unchanged"]) == (after_kill["labelling"], after_kill["done"])
    assert statuses() == Counter({"done": files})
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
