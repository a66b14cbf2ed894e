"""Label Parquet corpora with a fine-tuned classifier, on a Ray Data actor pool.

    python jobs/label.py --model s3://bucket/runs/sentiment/model --input s3://corpus/2026-11-28/ --output s3://labels/2026-11-28/
    ray job submit --working-dir . -- python jobs/label.py --config label.yaml
"""

import sys

from textlabel.cli import label_main

if __name__ == "__main__":
    sys.exit(label_main())
