"""How long a nightly run takes when nothing is new, on a 1,000-file prefix in S3.

    .venv/bin/python benchmarks/incremental_noop.py               # 1,000 files
    .venv/bin/python benchmarks/incremental_noop.py --files 10000

Puts FILES small Parquet files into an S3 server on loopback (moto), labels them all
once (a tiny random BERT: the model does not matter here), then times `jobs/label.py`
run again over the same prefix, as cron would run it: a fresh process, from launch to
exit. It also counts the S3 requests each run makes (through a counting proxy), which is
what a no-op run costs against a real object store, where each request takes ~10-50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny BERT and S3 proxy (here only counting requests)


def main() -> None:
    from faultproxy import FaultProxy
    from tinybert import tiny_bert
    from textlabel import storage
    from textlabel.s3server import local_s3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rows-per-file", type=int, default=20)
    parser.add_argument("--json-out", help="also write the figures to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="textlabel-noop-"))
    model = tiny_bert(work / "model")
    with local_s3(buckets=("bench",)) as endpoint, FaultProxy(int(endpoint.rsplit(":", 1)[1])) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each run starts its own local Ray

        corpus = storage.resolve("s3://bench/corpus")  # one S3 client for all the uploads

        def put(i: int) -> None:
            table = pa.table({"id": range(i * args.rows_per_file, (i + 1) * args.rows_per_file),
                              "text": [f"row {j} of file {i}: a fine film" for j in range(args.rows_per_file)]})
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            storage.write_bytes(corpus.join(f"day-{i // 100:03d}", f"part-{i:05d}.parquet"), sink.getvalue())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(args.files)))
        command = [sys.executable, str(ROOT / "jobs/label.py"), "--model", model, "--input", "s3://bench/corpus/",
                   "--output", "s3://bench/labels/", "--num-actors", "2"]
        figures = {"files": args.files, "rows": args.files * args.rows_per_file}
        for run in ("first", "nothing_new", "nothing_new_again"):
            before = proxy.requests
            start = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            seconds = time.perf_counter() - start
            summary = storage.read_json(storage.resolve("s3://bench/labels/_summary.json"))
            figures[run] = {"wall_seconds": round(seconds, 2), "job_seconds": summary["seconds"],
                            "s3_requests": proxy.requests - before, "files_labelled": summary["files_labelled"],
                            "files_unchanged": summary["files_unchanged"]}
            print(run, json.dumps(figures[run]), flush=True)
        assert figures["nothing_new"]["files_labelled"] == 0 and figures["nothing_new"]["files_unchanged"] == args.files
    print(json.dumps(figures, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
