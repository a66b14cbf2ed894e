"""Two nights of the labelling job as cron runs it, its log written to a file: the README's sample log.

    .venv/bin/python benchmarks/night_log.py [--model DIR]     # about 2 minutes on 2 cores

The corpus is the shipped SST-2 sample (12,000 sentences) as 12 Parquet files on an S3 server on
loopback (the demo's); night 2 adds 2 files. The model defaults to benchmarks/out/sst2-model/model
(written by benchmarks/label_throughput.py), else the packaged all-MiniLM-L6-v2 with an untrained head
(the log has the same shape). Writes benchmarks/out/night-log/night-1.log and night-2.log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "night-log"


def main() -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from textlabel import storage
    from textlabel.demo import local_s3

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trained = ROOT / "benchmarks" / "out" / "sst2-model" / "model"
    parser.add_argument("--model", default=str(trained) if trained.exists() else None)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    texts = pacsv.read_csv(str(ROOT / "src/textlabel/demo_data/sst2_train.tsv"),
                           parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))["text"]
    with local_s3(buckets=("corpus",)):
        fs = storage.s3_filesystem()

        def put(name: str, start: int, n: int) -> None:
            table = pa.table({"id": pa.array(range(start, start + n), pa.int64()), "text": texts.slice(start, n)})
            with fs.open(f"corpus/sst2/{name}.parquet", "wb") as f:
                pq.write_table(table, f)

        for i in range(12):
            put(f"2026-11-28/part-{i:02d}", i * 900, 900)
        job = [sys.executable, str(ROOT / "jobs/label.py"), "--input", "s3://corpus/sst2/", "--output",
               "s3://corpus/sst2-labels/", *(["--model", args.model] if args.model else [])]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        for night in (1, 2):
            if night == 2:
                for i in range(2):
                    put(f"2026-11-29/part-{i:02d}", 10_800 + i * 600, 600)
            log = OUT / f"night-{night}.log"
            with open(log, "w") as out:  # a file, as under cron: no terminal
                code = subprocess.run(job, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
            print(f"night {night}: exit {code}, log {log}")


if __name__ == "__main__":
    main()
