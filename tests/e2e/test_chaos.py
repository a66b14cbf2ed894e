"""Promise: under a seeded, randomized schedule of faults, night after night, no row is lost or duplicated.

A seeded night of benchmarks/chaos_nights.py (its docstring says what a night is): a growing corpus with bad cells,
zero-row row groups, an input named like a part and replaced inputs; faults drawn from the seed (a driver
SIGKILLed at a request, the lease taken by another host, a burst of 503 SlowDown, a file replaced while it is
read, ...); the job rerun as a scheduler reruns it; every invariant checked from the store after each night.

The benchmark runs as its own process, with its own S3 server and local Ray: its faults are fired by a hook on
the server (textlabel.demo.local_s3), and the Ray workers that read and write S3 must inherit that server's
address when the Ray starts, which the session's Ray (started beside the session's server) cannot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys

# One night that draws a driver SIGKILLed at its first request after the listing, then the lease taken by node-b
# at its rerun's 13th request: the two faults that end a run (exit -9, then 75), and no actor kill or held read (the
# slowest faults). One night, not more: the issue gives this test 60 s, and a night with two reruns takes about 50 s
# on a 2-core AVX2 host. The benchmark's 200 nights (README) cover the other kinds.
SEED, NIGHTS = 46, 1


def _chaos(repo_root):
    """benchmarks/chaos_nights.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("chaos_nights", repo_root / "benchmarks" / "chaos_nights.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_seeded_nights_of_faults_lose_and_duplicate_no_row(repo_root, tmp_path):
    """Promise: a driver killed and a lease taken over cost no row and duplicate none; every invariant holds after
    the night."""
    chaos = _chaos(repo_root)
    rng = random.Random(f"{SEED}-faults")  # the schedule is the seed's alone: drawn here as the benchmark draws it
    drawn = {f.kind for _ in range(NIGHTS) for f in chaos.draw(rng, 40)}
    assert {"driver_kill", "lease_stolen"} <= drawn, drawn

    result_file = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "benchmarks/chaos_nights.py", "--nights", str(NIGHTS), "--seed", str(SEED),
                           "--json-out", str(result_file), "--workdir", str(tmp_path / "work")],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["invariants_held"] and result["nights"] == NIGHTS, result["broken"]
    injected = result["faults_injected"]
    assert injected.get("driver_kill") and injected.get("lease_stolen"), (injected, proc.stdout[-6000:])
    assert result["exit_codes"].get("-9") and result["exit_codes"].get("75"), result["exit_codes"]  # killed; lease lost
    assert (result["rows_lost"], result["rows_duplicated"]) == (0, 0)
    assert result["rows_labelled"] == result["rows"] > 0  # every row of every present input, at its current version
