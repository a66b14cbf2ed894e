"""Fine-tune a BERT-family classifier with Ray Train.

    python jobs/train.py --data s3://bucket/train/ --output s3://bucket/runs/sentiment
    ray job submit --working-dir . -- python jobs/train.py --config train.yaml
"""

import sys

from textlabel.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
