"""The offline end-to-end demo (``make demo``): S3 on loopback, SST-2 sample, fine-tune."""

import sys

from textlabel.cli import setup_logging
from textlabel.demo import run_demo

if __name__ == "__main__":
    setup_logging()
    run_demo()
    sys.exit(0)
