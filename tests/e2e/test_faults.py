"""Promise: a labelling run killed at any point loses and duplicates nothing; the next run finishes its work.
A predictor actor killed mid-write is replaced and its run finishes.

One corpus, two nights, and a driver SIGKILLed at each phase of a run, each at a chosen event (a request held
by the fault proxy, support/s3.py), never after a sleep: the first manifest commit, the sweep of outputs no
record vouches for, the compaction, a multipart upload's part, the `labelling` marks of a --relabel, and the
Nth output PUT. Each killed run is rerun by the next step, as the nightly schedule would; the last run must
leave every row labelled exactly once. The drivers are `python jobs/label.py` processes this test starts (on
the session's Ray, through RAY_ADDRESS), and the only processes it kills.
"""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
import time
from collections import Counter

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.corpus import corpus, put_parquet, read_output, resolve
from textlabel import storage
from textlabel.manifest import Manifest


def _statuses(out: str) -> Counter:
    """The manifest's records by status, as a reader of the prefix sees them now."""
    return Counter(Manifest.load(resolve(out)).state["status"].cast(pa.string()).to_pylist())


def _versions(out: str) -> dict[str, str]:
    """Each visible output file and its ETag: a rewritten file gets a new one."""
    loc = resolve(out)
    return {f["path"][len(loc.path) + 1:]: f["fingerprint"] for f in storage.list_versions(loc, ".parquet")}


def _actors() -> list[psutil.Process]:
    """The predictor actors of this session's Ray (its processes descend from this test process)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "PartLabeller" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


class Night:
    """Runs of `python jobs/label.py` on one corpus, each killed at an event or left to finish."""

    def __init__(self, repo_root, ray_address: str, tiny_model: str, prefix: str, logs):
        self.repo_root, self.prefix, self.logs = repo_root, prefix, logs
        self.env = {**os.environ, "RAY_ADDRESS": ray_address}
        self.args = [sys.executable, "jobs/label.py", "--model", tiny_model, "--input", f"{prefix}/in/", "--output",
                     f"{prefix}/out", "--label-prefix", "pred_", "--max-length", "64", "--batch-size", "32", "--commit-every", "3",
                     "--num-actors", "1", "--max-drift", "1e9"]
        self.runs = 0

    def start(self, extra: list[str], hooks: str | None = None) -> tuple[subprocess.Popen, str]:
        """Start a run; its process and its log file (its stdout and stderr, a file as under cron)."""
        self.runs += 1
        log = str(self.logs / f"run-{self.runs}.log")
        env = {**self.env, "TEXTLABEL_TEST_HOOKS": hooks} if hooks else self.env
        with open(log, "w") as out:
            return subprocess.Popen([*self.args, *extra], cwd=self.repo_root, env=env, stdout=out,
                                    stderr=subprocess.STDOUT), log

    def killed_at(self, held, *extra: str, hooks: str | None = None) -> None:
        """Start a run, wait for the held request, SIGKILL the run's driver, wait for Ray to end its actors, then
        let the request go on (or vanish, as the hold says)."""
        proc, log = self.start(list(extra), hooks)
        while not held.arrived.wait(0.05):
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before {held.method} {held.fragment} "
                            f"#{held.nth}:\n{open(log).read()[-3000:]}")
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait()
        deadline = time.monotonic() + 60
        while _actors():
            assert time.monotonic() < deadline, "the killed run's actors outlived it by a minute"
            time.sleep(0.05)
        held.release()

    def finishes(self, *extra: str) -> dict:
        proc, log = self.start(list(extra))
        assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
        return storage.read_json(resolve(f"{self.prefix}/out/_summary.json"))


def _whole_or_absent(out: str, inputs: dict[str, list[int]]) -> None:
    """Every visible output file holds all of its input's rows (a reader never sees part of a file)."""
    loc = resolve(out)
    for f in storage.list_files(loc, ".parquet"):
        name = f.path[len(loc.path) + 1:]
        assert pq.read_table(f.path, filesystem=loc.fs)["id"].to_pylist() == inputs[name], name


def _incompressible(n: int, seed: int) -> pa.Table:
    """n rows of 200 random letters: the output file is about 250 KB, over the test's multipart threshold."""
    rng = random.Random(seed)
    return pa.table({"id": pa.array(range(50_000, 50_000 + n), pa.int64()),
                     "text": ["".join(rng.choices(string.ascii_letters, k=200)) for _ in range(n)]})


def test_a_run_killed_at_each_phase_is_finished_by_the_next_and_every_row_is_labelled_once(
        ray_session, repo_root, tiny_model, s3_endpoint, s3_prefix, tmp_path):
    """Promise: wherever a night is killed, the next run finishes it and every row is labelled exactly once."""
    proxy, bucket_prefix, out = s3_endpoint, s3_prefix[len("s3://"):], f"{s3_prefix}/out"
    rows = corpus(f"{s3_prefix}/in", [50] * 12)
    inputs = {f"part-{i}.parquet": list(range(50 * i, 50 * (i + 1))) for i in range(12)}
    night = Night(repo_root, ray_session, tiny_model, s3_prefix, tmp_path)

    # 1. The first manifest commit (3 files' records), lost with its driver: their outputs stay, unvouched.
    night.killed_at(proxy.hold("PUT", f"{bucket_prefix}/out/_manifest/segment-", then="drop"))
    assert _statuses(out) == Counter() and not storage.exists(resolve(f"{out}/_summary.json"))
    written = storage.list_files(resolve(out), ".parquet")
    assert len(written) >= 3
    _whole_or_absent(out, inputs)

    # 2. The rerun sweeps the outputs: it adopts the complete ones and deletes one no input explains (left by
    # hand, say). Killed while that delete is held; the delete is lost.
    storage.write_bytes(resolve(f"{out}/stray.parquet"), b"PAR1 nobody's output")
    night.killed_at(proxy.hold("POST", "?delete", then="drop"))
    assert storage.exists(resolve(f"{out}/stray.parquet"))

    # 3. The next rerun labels the rest and commits every record; killed at the compaction, whose new snapshot
    # lands after its driver died (it was on the wire).
    night.killed_at(proxy.hold("PUT", f"{bucket_prefix}/out/_manifest/snapshot-"))
    assert _statuses(out) == Counter({"done": 12})
    assert not storage.exists(resolve(f"{out}/stray.parquet")) and not storage.exists(resolve(f"{out}/_summary.json"))
    _whole_or_absent(out, inputs)

    # 4. Night 2: a big file lands, and its output goes up in parts (a test hook lowers the part size to
    # 32 KiB). Killed with its second part held: the upload never completes, so no part of it is visible.
    big = _incompressible(1000, seed=3)
    put_parquet(f"{s3_prefix}/in/big.parquet", big)
    inputs["big.parquet"] = big["id"].to_pylist()
    night.killed_at(proxy.hold("PUT", f"{bucket_prefix}/out/big.parquet?partNumber=2"),
                    hooks='{"multipart_bytes": 32768}')
    assert not storage.exists(resolve(f"{out}/big.parquet")) and _statuses(out) == Counter({"done": 12})

    # 5. --relabel first marks every labelled file `labelling` (3 to a commit here), and replaces no output before
    # the marks are committed. Killed with the first marks on the wire: they land; those files count as
    # half-replaced, and no output has changed.
    before = _versions(out)
    night.killed_at(proxy.hold("PUT", f"{bucket_prefix}/out/_manifest/segment-"), "--relabel")
    assert _statuses(out) == Counter({"labelling": 3, "done": 9}) and _versions(out) == before

    # 6. The relabel again, killed at its third output PUT: outputs already replaced are whole, the held one is
    # written after its sender died, the rest are the old ones.
    night.killed_at(proxy.hold("PUT", f"{bucket_prefix}/out/part-", nth=3), "--relabel", hooks='{"multipart_bytes": 32768}')
    assert sum(before.get(name) != version for name, version in _versions(out).items()) >= 3
    _whole_or_absent(out, inputs)

    # The plain nightly command ends the night: every row of both nights exactly once, every file done, nothing
    # partial (a half-replaced file's outputs are adopted when complete, labelled again when not).
    summary = night.finishes()
    assert summary["lease_taken_over"].startswith("its driver process") and summary["outputs_swept"]
    assert _statuses(out) == Counter({"done": 13})
    got = read_output(out)["id"].to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(rows["id"].to_pylist() + big["id"].to_pylist())
    _whole_or_absent(out, inputs)
    loc = resolve(out)
    names = sorted(f.path[len(loc.path) + 1:] for f in loc.fs.get_file_info(storage.pafs.FileSelector(loc.path, recursive=True))
                   if f.type == storage.pafs.FileType.File)
    assert [n for n in names if not n.startswith(("_runs/", "_manifest/", "_report/"))] == [
        "_summary.json", "big.parquet", *sorted(inputs)[1:]]  # no lease left, nothing partial


def test_a_killed_predictor_actor_is_replaced_and_its_log_is_progress_lines_not_bars(
        ray_session, repo_root, tiny_model, s3_endpoint, s3_prefix, tmp_path):
    """Promise: a predictor actor that dies (out of memory, a lost node) is replaced and the night completes, every
    row once; and the job's log, written to a file, is one progress line every so often, not redrawn bars."""
    rows = corpus(f"{s3_prefix}/in", [50] * 10)
    night = Night(repo_root, ray_session, tiny_model, s3_prefix, tmp_path)
    held = s3_endpoint.hold("PUT", f"{s3_prefix[5:]}/out/part-")  # the actor, writing its first output
    proc, log = night.start(["--progress-seconds", "0.5"])
    held.wait()
    victims = _actors()
    assert len(victims) == 1  # the pool's one actor, killed with a write on the wire
    victims[0].kill()
    held.release()
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    summary = storage.read_json(resolve(f"{s3_prefix}/out/_summary.json"))
    assert (summary["files_labelled"], summary["files_failed"], summary["rows_out"]) == (10, 0, 500)
    got = read_output(f"{s3_prefix}/out")["id"].to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == rows["id"].to_pylist()
    text = open(log).read()
    progress = [line for line in text.splitlines() if "textlabel.progress: labelled " in line]
    assert len(progress) >= 2 and "labelled 10/10 files (100% of the bytes): 500 rows" in progress[-1], text[-3000:]
    assert "\r" not in text and "%|" not in text, text[-3000:]  # no bar, redrawn or not
