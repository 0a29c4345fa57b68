"""A real S3 API on loopback for the tests: moto's server, in a thread of the test process."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def s3_server(bucket: str, cache: Path) -> Iterator[str]:
    """Start the server with one bucket and point pyarrow, boto3 and genserve's cache at it through the environment
    (which Ray processes started inside the block inherit); yields `s3://BUCKET`."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://{host}:{port}", "GENSERVE_CACHE": str(cache)}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
