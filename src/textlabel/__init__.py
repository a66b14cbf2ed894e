"""textlabel: fine-tune BERT-family classifiers with Ray Train; label Parquet corpora with Ray Data."""

__version__ = "0.1.0"
