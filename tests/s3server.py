"""A real S3-protocol server for the tests: moto's ``ThreadedMotoServer`` on 127.0.0.1, port 0.

    s3_server   (session) the endpoint URL; AWS_ENDPOINT_URL and dummy AWS credentials are set
                in this process's environment for the session, so s3fs, obstore and every
                ``kdcache`` subprocess (``cli_env`` copies os.environ) reach it the standard way
    s3_url      (function) a fresh, empty bucket: ``s3://<bucket>``

Not moto's in-process mocks: requests go over HTTP to a real server thread (start ~1 s).
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

ENV = {"AWS_ACCESS_KEY_ID": "kdcache-test", "AWS_SECRET_ACCESS_KEY": "kdcache-test-secret",
       "AWS_DEFAULT_REGION": "us-east-1"}


def start_server():
    """(server, endpoint URL) of a new moto S3 server on 127.0.0.1 with an ephemeral port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("s3fs", reason="the S3 tests need the test extra: pip install -e '.[test]'")
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the test extra)")
    server, endpoint = start_server()
    saved = {k: os.environ.get(k) for k in (*ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_url(s3_server) -> str:
    import s3fs

    bucket = f"kdcache-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"
