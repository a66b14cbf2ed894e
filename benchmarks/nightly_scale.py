"""The nightly control plane at scale: manifest, planning, commits, small files, no-op nights.

    .venv/bin/python benchmarks/nightly_scale.py                       # all four parts
    .venv/bin/python benchmarks/nightly_scale.py --parts a d           # some of them
    .venv/bin/python benchmarks/nightly_scale.py --parts a --sizes 10000 100000 1000000

(a) control plane alone: a manifest of N recorded files (written through the library's own
    manifest API, compacted to a snapshot) on a local disk and a synthetic listing of those N
    files plus 1,000 new ones; in a fresh process: load the manifest, plan the night, commit
    the 1,000 new records and finish (merge or compact). Time of each step and the process's
    peak memory (ru_maxrss).
(b) a no-op night over real files on S3 (moto's server on loopback, each request counted):
    every file labelled once (tiny model), then `jobs/label.py` run again as cron runs it, a
    fresh process: wall time and S3 requests, for 1,000 and 20,000 files.
(c) small files: the same 100,000 SST-2 rows as 5,000 files of 20 rows and as 2 files of
    50,000 rows, labelled S3 to S3 with the packaged all-MiniLM-L6-v2 and the same flags:
    the job's rows/s (from its summary) and their ratio.
(d) commits per second against S3 with 20 ms added to every request: the committer (batches
    of --commit-every 500) against one PUT per record (the design before).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
NEW = 1000


def _name(i: int) -> str:
    """A file name as Spark writes them (a UUID in each), so records compress as real ones do."""
    tag = hashlib.md5(str(i).encode()).hexdigest()
    return f"day-{i // 3000:04d}/part-{i % 3000:05d}-{tag[:8]}-{tag[8:12]}-{tag[12:16]}-{tag[16:20]}-{tag[20:]}-c000.snappy.parquet"


def _etag(i: int) -> str:
    return "etag:" + hashlib.md5(f"v1-{i}".encode()).hexdigest()


def _records(n: int, start: int = 0, model: str = "s3://models/sentiment/model [model.safetensors etag:0f3a]"):
    from textlabel.records import FileRecord, Status

    return [FileRecord(_name(i), _etag(i), 48_000, Status.DONE, [_name(i)], 20, 20, {}, 0, model=model,
                       run=f"2026{i // 3000:04d}T021500Z-abcdef", seconds=0.4) for i in range(start, start + n)]


def _listing(n: int, new: int) -> pa.Table:
    """What the job plans from for N + new files: list_table's columns, made relative (plan.relative). Built
    in chunks, as list_table builds it, so no million Python strings exist at once."""
    chunks = []
    for start in range(0, n + new, 50_000):
        ids = range(start, min(start + 50_000, n + new))
        names = [_name(i) for i in ids]
        chunks.append(pa.table({"size": pa.array([48_000] * len(ids), pa.int64()), "fingerprint": [_etag(i) for i in ids],
                                "input": names}))
    return pa.concat_tables(chunks)


def build_manifest(directory: str, n: int) -> None:
    """N records through the manifest API: segments of 100,000, then compaction into one snapshot."""
    from textlabel import storage
    from textlabel.manifest import Manifest

    manifest = Manifest.load(storage.resolve(directory))
    manifest.claim("s3://corpus/")
    for k, start in enumerate(range(0, n, 100_000)):
        manifest.write_segment(_records(min(100_000, n - start), start), k + 1)
    assert manifest.finish() == "compacted"


def night(directory: str, n: int) -> dict:
    """One night's control plane in this (fresh) process: load, plan, commit 1,000 records, finish."""
    from textlabel import plan, storage
    from textlabel.commit import Committer
    from textlabel.manifest import Manifest

    listing = _listing(n, NEW)  # what one LIST per 1,000 files brings; not timed (it is the store's cost)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    manifest = Manifest.load(storage.resolve(directory))
    t1 = time.perf_counter()
    selection = plan.select(listing, manifest.state, root="corpus")
    units = plan.make_units(selection.pending, {}, 250_000, 256 << 20, actors=8)
    t2 = time.perf_counter()
    committer = Committer(manifest, every=500, seconds=10)
    for record in _records(NEW, n):
        committer.add(record)
    committer.close()
    finished = manifest.finish()
    t3 = time.perf_counter()
    segment = sum(Path(directory, "_manifest", name).stat().st_size for name in manifest.written)  # tonight's records
    assert len(selection.pending) == NEW and selection.unchanged == n
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    units = len(units)
    del manifest, selection, committer, listing
    again = Manifest.load(storage.resolve(directory))  # the next night, which compacts (as every ~n/4 records)
    again.write_segment(_records(1, n + NEW), 1)
    t4 = time.perf_counter()
    assert again.finish(compact=True) == "compacted"
    t5 = time.perf_counter()
    return {"recorded": n, "load_s": round(t1 - t0, 3), "plan_s": round(t2 - t1, 3), "commit_and_finish_s": round(t3 - t2, 3),
            "load_plus_plan_s": round(t2 - t0, 3), "compaction_s": round(t5 - t4, 3), "units": units, "finish": finished,
            "segment_bytes_per_record": round(segment / NEW, 1),
            "peak_rss_mib": round(peak / 1024),
            "peak_rss_with_compaction_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_load_mib": round(base / 1024)}


def part_a(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        work = tempfile.mkdtemp(prefix="textlabel-scale-")
        built = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", work, str(n)], check=True)
        built = time.perf_counter() - built
        snapshot = next(Path(work, "_manifest").glob("snapshot-*.parquet")).stat().st_size
        out = subprocess.run([sys.executable, __file__, "--night", work, str(n)], check=True, capture_output=True, text=True)
        night = json.loads(out.stdout.strip().splitlines()[-1])
        row = {**night, "snapshot_mib": round(snapshot / 2**20, 1), "snapshot_bytes_per_record": round(snapshot / n, 1),
               "build_s": round(built, 1)}
        print("a", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _put_files(prefix: str, count: int, rows: int, texts: list[str] | None = None) -> None:
    from textlabel import storage

    loc = storage.resolve(prefix)

    def put(i: int) -> None:
        if texts:
            chunk = [texts[(i * rows + j) % len(texts)] for j in range(rows)]
        else:
            chunk = [f"row {j} of file {i}: a fine film" for j in range(rows)]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": pa.array(range(i * rows, (i + 1) * rows), pa.int64()), "text": chunk}), sink)
        storage.write_bytes(loc.join(f"day-{i // 1000:03d}", f"part-{i:05d}.parquet"), sink.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


class Requests:
    """The S3 server's requests, counted by method, each delayed by ``delay`` seconds (a far-away store)."""

    def __init__(self) -> None:
        self.by_method: Counter = Counter()
        self.requests = 0
        self.delay = 0.0
        self._lock = threading.Lock()  # the server answers each request on its own thread

    def seen(self, method: str, path: str, headers) -> None:
        """demo.local_s3's on_request: count, delay, serve (returns None)."""
        with self._lock:
            self.requests += 1
            self.by_method[method] += 1
        if self.delay:
            time.sleep(self.delay)


def _job(args: list[str], proxy: Requests) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each run starts its own local Ray
    before, methods = proxy.requests, dict(proxy.by_method)
    start = time.perf_counter()
    # --max-drift 1e9: a throughput figure, not a drift verdict
    subprocess.run([sys.executable, str(ROOT / "jobs/label.py"), *args, "--max-drift", "1e9"], check=True, env=env)
    wall = time.perf_counter() - start
    requests = proxy.requests - before  # the job's alone: reading its summary below is the benchmark's
    by_method = {k: v - methods.get(k, 0) for k, v in proxy.by_method.items() if v - methods.get(k, 0)}
    from textlabel import storage

    output = args[args.index("--output") + 1]
    summary = storage.read_json(storage.resolve(output).join("_summary.json"))
    return {"wall_s": round(wall, 2), "job_s": summary["seconds"], "s3_requests": requests,
            "by_method": by_method, "files_labelled": summary["files_labelled"], "files_unchanged": summary["files_unchanged"],
            "rows_per_s": summary["rows_per_second"], "units": summary["units"]}


def part_b(proxy, model: str, sizes: list[int]) -> list[dict]:
    rows = []
    for files in sizes:
        prefix = f"s3://bench/noop-{files}"
        _put_files(f"{prefix}/corpus", files, 20)
        args = ["--model", model, "--input", f"{prefix}/corpus/", "--output", f"{prefix}/labels/", "--num-actors", "2",
                "--cpus-per-actor", "1"]
        row = {"files": files, "first": _job(args, proxy), "nothing_new": _job(args, proxy),
               "nothing_new_again": _job(args, proxy)}
        from textlabel import storage

        start = time.perf_counter()  # the listing alone, as the job makes it: what the store costs
        storage.list_table(storage.resolve(f"{prefix}/corpus/"), ".parquet")
        row["listing_alone_s"] = round(time.perf_counter() - start, 2)
        assert row["nothing_new"]["files_labelled"] == 0 and row["nothing_new"]["files_unchanged"] == files
        print("b", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def part_c(proxy) -> dict:
    import pyarrow.csv as pacsv

    from textlabel.model import packaged_model_dir

    sst2 = pacsv.read_csv(str(ROOT / "src/textlabel/demo_data/sst2_train.tsv"),
                          parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))["text"].to_pylist()
    flags = ["--model", packaged_model_dir(), "--batch-size", "64", "--threads-per-actor", "2", "--max-length", "128"]
    _put_files("s3://bench/small/corpus", 5000, 20, sst2)
    _put_files("s3://bench/big/corpus", 2, 50_000, sst2)
    result = {}
    for name in ("big", "small"):
        result[name] = _job([*flags, "--input", f"s3://bench/{name}/corpus/", "--output", f"s3://bench/{name}/labels/"], proxy)
        print("c", name, json.dumps(result[name]), flush=True)
    result["ratio"] = round(result["small"]["rows_per_s"] / result["big"]["rows_per_s"], 3)
    return result


def part_d(proxy, records: int = 20_000, one_by_one: int = 200) -> dict:
    from textlabel import storage
    from textlabel.commit import Committer
    from textlabel.manifest import Manifest

    proxy.delay = 0.02
    try:
        manifest = Manifest.load(storage.resolve("s3://bench/commits/batched"))
        start = time.perf_counter()
        committer = Committer(manifest, every=500, seconds=10)
        for record in _records(records):
            committer.add(record)
        added = time.perf_counter() - start
        committer.close()
        batched = time.perf_counter() - start
        out = storage.resolve("s3://bench/commits/one-by-one")
        start = time.perf_counter()
        for record in _records(one_by_one):  # the design before: one JSON object per record, written in the result loop
            storage.write_json(out.join("_manifest", f"{record.input.replace('/', '_')}.json"), record.to_row())
        single = time.perf_counter() - start
    finally:
        proxy.delay = 0.0
    return {"added_per_s_in_result_loop": round(records / added), "batched_records_per_s": round(records / batched),
            "batched_segments": committer.commits, "one_put_per_record_per_s": round(one_by_one / single, 1),
            "added_latency_ms": 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000], help="(a) recorded files")
    parser.add_argument("--noop-files", nargs="+", type=int, default=[1000, 20_000], help="(b) files on S3")
    parser.add_argument("--json-out", help="also write the figures to this file")
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--night", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_manifest(args.build[0], int(args.build[1]))
    if args.night:
        return print(json.dumps(night(args.night[0], int(args.night[1]))))
    figures = {}
    if "a" in args.parts:
        figures["a_control_plane"] = part_a(args.sizes)
    if set(args.parts) & {"b", "c", "d"}:
        from textlabel.demo import local_s3
        from textlabel.scratch import packaged_bert

        proxy = Requests()
        with local_s3(buckets=("bench",), on_request=proxy.seen):
            if "d" in args.parts:
                figures["d_commits"] = part_d(proxy)
                print("d", json.dumps(figures["d_commits"]), flush=True)
            if "b" in args.parts:
                figures["b_noop"] = part_b(proxy, packaged_bert(tempfile.mkdtemp(prefix="textlabel-tiny-")), args.noop_files)
            if "c" in args.parts:
                figures["c_small_files"] = part_c(proxy)
    print(json.dumps(figures, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
