"""Peak memory of the labelling job (every process of its Ray, summed) at two corpus sizes.

    .venv/bin/python benchmarks/label_memory.py                  # 5,000 and 50,000 rows

Memory is the proportional set size (PSS: shared pages split between the processes
that share them) of jobs/label.py and every process it starts (raylet, GCS, workers,
actors), sampled every 0.5 s; the peak of the sum is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil

from label_throughput import OUT, ROOT, ensure_model, local_ray_env, read_texts, write_corpus


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def peak_memory(model: str, rows: int, job_args: list[str]) -> dict:
    corpus, output = OUT / f"corpus-{rows}", OUT / f"labels-{rows}"
    write_corpus(read_texts(None), rows, corpus)
    subprocess.run(["rm", "-rf", str(output)], check=True)
    start = time.perf_counter()
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs/label.py"), "--model", model, "--input", str(corpus),
                            "--output", str(output), *job_args, "--max-drift", "1e9"], env=local_ray_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, peak = psutil.Process(job.pid), 0
    while job.poll() is None:
        peak = max(peak, tree_pss(root))
        time.sleep(0.5)
    if job.returncode != 0:
        raise SystemExit(f"label job failed with exit code {job.returncode}")
    summary = json.loads((output / "_summary.json").read_text())
    return {"rows": rows, "rows_out": summary["rows_out"], "peak_pss_mib": round(peak / 2**20),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000, help="the smaller size; the larger is 10x")
    parser.add_argument("--model", help="a fine-tuned model directory (default: as label_throughput.py)")
    parser.add_argument("--job-args", default="--quantize")
    args = parser.parse_args()
    model = ensure_model(args.model)
    small = peak_memory(model, args.rows, args.job_args.split())
    large = peak_memory(model, 10 * args.rows, args.job_args.split())
    print(json.dumps({"small": small, "large": large,
                      "ratio": round(large["peak_pss_mib"] / small["peak_pss_mib"], 2)}, indent=2))


if __name__ == "__main__":
    main()
