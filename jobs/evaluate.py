"""Evaluate a fine-tuned classifier on labelled data and write a report.

    python jobs/evaluate.py --model s3://bucket/runs/sentiment/model --data s3://bucket/holdout.parquet --output s3://bucket/eval/sentiment
"""

import sys

from textlabel.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
