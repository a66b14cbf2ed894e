"""Register a trained model in MLflow's model registry as a new version (optionally under an alias).

    python jobs/promote.py --model s3://bucket/runs/sentiment/model --name sentiment --alias champion
    python jobs/label.py --model models:/sentiment@champion --input ... --output ...
"""

import sys

from textlabel.cli import promote_main

if __name__ == "__main__":
    sys.exit(promote_main())
