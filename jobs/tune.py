"""Search training settings with Ray Tune: every jobs/train.py option, plus the search's.

    python jobs/tune.py --data s3://bucket/train/ --output s3://bucket/searches/sentiment --num-samples 8
    ray job submit --working-dir . -- python jobs/tune.py --config train.yaml --search-space space.yaml
"""

import sys

from textlabel.cli import tune_main

if __name__ == "__main__":
    sys.exit(tune_main())
