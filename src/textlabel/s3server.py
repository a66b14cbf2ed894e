"""A real S3 HTTP endpoint on loopback (moto's server), for the demo and the tests.

Everything reaches it as it would reach AWS: through the standard AWS
environment variables, ``AWS_ENDPOINT_URL_S3`` included. Needs ``moto[server]``
(the ``test`` extra).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(buckets: tuple[str, ...] = ()) -> Iterator[str]:
    """Run an S3 server on 127.0.0.1, point the AWS environment at it, yield its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "textlabel-local", "AWS_SECRET_ACCESS_KEY": "textlabel-local",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
    })
    os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        from textlabel.storage import s3_filesystem

        for bucket in buckets:
            s3_filesystem().mkdir(bucket)
        logger.info("S3 server on %s", endpoint)
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
