"""Test support, in one place: the S3 server and its fault proxy (s3.py), a real `ray start --head` and
`ray job submit` (rayhead.py), an MLflow server (mlflowserver.py), and corpus builders on S3 (corpus.py).

Small models and synthetic rows come from the package's dry-run kit, textlabel.scratch, which the benchmarks
use too; nothing outside tests/ imports this package.
"""
