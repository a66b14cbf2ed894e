"""`ray job submit` end to end against a real `ray start --head` (token auth on), S3 on loopback."""

from __future__ import annotations

import json
import time
from collections import Counter

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import corpus, read_output, resolve
from rayhead import status as _status
from rayhead import submit as _submit
from textlabel import nights, storage


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


def _statuses(out: str) -> Counter:
    """The manifest's records by status, as a reader of the prefix sees them now."""
    from textlabel.manifest import Manifest

    return Counter(Manifest.load(resolve(out)).state["status"].cast(pa.string()).to_pylist())


def _label_args(model: str, prefix: str, *extra: str) -> list[str]:
    return ["jobs/label.py", "--model", model, "--input", f"{prefix}/in/", "--output", f"{prefix}/out",
            "--label-prefix", "pred_", "--max-length", "64", "--batch-size", "32", *extra]


def _assert_exactly_once(prefix: str, ids: list[int]) -> None:
    got = read_output(f"{prefix}/out")["id"].to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(ids)


def _kill_driver(head: dict, prefix: str) -> None:
    """SIGKILL the driver of the job labelling ``prefix`` (not the `sh -c` the job supervisor runs it in), then
    wait for Ray to stop its actors."""
    drivers = [p for p in _head_processes(head, f"--input {prefix}/in/ ") if p.name().startswith("python")]
    assert len(drivers) == 1
    drivers[0].kill()  # SIGKILL: no cleanup code runs
    _wait("the killed job's actors to go", lambda: not _head_processes(head, "PartLabeller"), timeout=60)


def _whole_or_absent(prefix: str, files: int, rows: int) -> list:
    """Every visible output file is whole: all of its input's rows."""
    loc = resolve(f"{prefix}/out")
    visible = storage.list_files(loc, ".parquet")
    for f in visible:
        number = int(f.base_name.split("-")[1].split(".")[0])
        assert pq.read_table(f.path, filesystem=loc.fs)["id"].to_pylist() == list(range(rows * number, rows * (number + 1)))
    return visible


@pytest.mark.parametrize("phase, fragment, nth, then", [
    ("a commit", "/out/_manifest/segment-", 2, "drop"),  # the second batch of records never lands
    ("the compaction", "/out/_manifest/snapshot-", 2, "forward"),  # the new snapshot lands after the driver died
])
def test_driver_killed_at_a_commit_then_rerun_loses_and_duplicates_nothing(ray_head, repo_root, tiny_model, s3_endpoint,
                                                                         s3_prefix, phase, fragment, nth, then):
    files = 12
    rows = corpus(f"{s3_prefix}/in", [50] * files)
    held = s3_endpoint.hold("PUT", s3_prefix[5:] + fragment, nth=nth, then=then)
    _submit(ray_head, repo_root, _label_args(tiny_model, s3_prefix, "--commit-every", "3"), wait=False)
    held.wait()
    _kill_driver(ray_head, s3_prefix)
    held.release()
    recorded = _statuses(f"{s3_prefix}/out")["done"]
    assert not storage.exists(resolve(f"{s3_prefix}/out/_summary.json"))  # killed mid-run
    visible = _whole_or_absent(s3_prefix, files, 50)
    _submit(ray_head, repo_root, _label_args(tiny_model, s3_prefix))
    summary = storage.read_json(resolve(f"{s3_prefix}/out/_summary.json"))
    assert summary["lease_taken_over"].startswith("its driver process") and summary["outputs_swept"]
    assert summary["files_unchanged"] == recorded
    assert summary["files_adopted"] + summary["files_labelled"] == files - recorded
    if phase == "a commit":  # the records of a lost batch: their complete outputs are adopted, not redone
        assert recorded == 3 and summary["files_adopted"] >= 3
    assert summary["orphans_deleted"] == len(visible) - recorded - summary["files_adopted"]
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
    loc = resolve(f"{s3_prefix}/out")
    names = sorted(f.path[len(loc.path) + 1:] for f in loc.fs.get_file_info(storage.pafs.FileSelector(loc.path, recursive=True))
                   if f.type == storage.pafs.FileType.File)
    assert [n for n in names if not n.startswith(("_runs/", "_manifest/"))] == [
        "_report/drift.json", "_report/drift.png", "_summary.json",
        *sorted(f"part-{i}.parquet" for i in range(files))]  # nothing partial, no lease left
    assert _statuses(f"{s3_prefix}/out") == Counter({"done": files})
    # The night the killed run began is one night in the drift history, every row counted once.
    history = nights.load(loc)
    assert len(history) == 1 and history[0]["rows"] == files * 50 and len(history[0]["runs"]) == 2
    assert summary["drift"]["rows"] == files * 50 and summary["drift"]["night"] == history[0]["runs"][0]


def test_a_killed_predictor_actor_is_replaced_and_the_run_completes_exactly_once(ray_head, repo_root, tiny_model,
                                                                                 s3_endpoint, s3_prefix):
    rows = corpus(f"{s3_prefix}/in", [50] * 10)
    held = s3_endpoint.hold("PUT", f"{s3_prefix[5:]}/out/part-")  # the actor, writing its first output
    job = _submit(ray_head, repo_root, _label_args(tiny_model, s3_prefix, "--num-actors", "1"), wait=False)
    held.wait()
    victims = _head_processes(ray_head, "PartLabeller")
    assert len(victims) == 1  # the pool's one actor, killed with a write on the wire
    victims[0].kill()
    held.release()

    def ended() -> str | None:
        status = _status(ray_head, job)
        return status if any(w in status for w in ("succeeded", "failed", "stopped")) else None

    status = _wait("the job to end", ended)
    assert f"Job '{job}' succeeded" in status
    summary = storage.read_json(resolve(f"{s3_prefix}/out/_summary.json"))
    assert (summary["files_labelled"], summary["files_failed"], summary["rows_out"]) == (10, 0, 500)
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())


def test_gpu_check_runs_reduced_on_cpu(ray_head, repo_root, tmp_path):
    # Submitted to the head, as it runs on a GPU cluster's head: no GPU here, so its steps run reduced on CPU.
    _submit(ray_head, repo_root, ["benchmarks/gpu_check.py", "--json-out", str(tmp_path / "r.json"), "--train-rows", "64",
                                  "--label-rows", "400", "--bert-base-rows", "100"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gpus"] == 0 and report["train"]["workers"] == 2 and report["train"]["samples_per_s"] > 0
    tuned, base = report["label"].values()
    assert (tuned["rows"], base["rows"]) == (400, 100)
    for figures in (tuned, base):
        assert figures["actors"] == 2  # the machine's pool: 2 CPUs, one actor each
        assert 0 < figures["rows_per_s_per_gpu"]["wall"] < figures["rows_per_s_per_gpu"]["steady"]
        assert figures["real_tokens_per_s_per_gpu"]["steady"] > figures["rows_per_s_per_gpu"]["steady"] * 8  # 8-46 words a row
        assert 0 <= figures["padding_share"] < 0.5 and 0 <= figures["input_wait_share"] < 1
        assert figures["peak_gpu_memory_gib"] is None and "mfu_real_tokens" not in figures  # no GPU, no bf16 peak
    # BERT-base costs about 8x all-MiniLM-L6-v2 per token (PERF.md: 0.17 against 0.021 GFLOP at ~20 tokens)
    assert 7 < base["gflop_per_real_token"] / tuned["gflop_per_real_token"] < 9


def test_driver_killed_while_relabelling_then_rerun_finishes_the_relabel(ray_head, repo_root, tiny_model, s3_endpoint,
                                                                        s3_prefix):
    files = 8
    rows = corpus(f"{s3_prefix}/in", [50] * files)
    out = f"{s3_prefix}/out"
    _submit(ray_head, repo_root, _label_args(tiny_model, s3_prefix))
    held = s3_endpoint.hold("PUT", f"{s3_prefix[5:]}/out/part-", nth=3)  # the relabel, part-way through its outputs
    _submit(ray_head, repo_root, _label_args(tiny_model, s3_prefix, "--relabel"), wait=False)
    held.wait()
    _kill_driver(ray_head, s3_prefix)
    held.release()
    assert _statuses(out) == Counter({"labelling": files})  # every file was unvouched before its parts were replaced
    # The same nightly command, without --relabel: the files caught half-replaced are labelled again.
    _submit(ray_head, repo_root, _label_args(tiny_model, s3_prefix))
    summary = storage.read_json(resolve(f"{out}/_summary.json"))
    assert summary["files_labelled"] + summary["files_adopted"] == files and summary["files_unchanged"] == 0
    assert _statuses(out) == Counter({"done": files})
    _assert_exactly_once(s3_prefix, rows["id"].to_pylist())
