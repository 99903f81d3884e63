"""moto's HTTP server on loopback, for processes that reach AWS through `AWS_ENDPOINT_URL` (tests, bench)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer


@contextmanager
def moto_server(port: int = 0) -> Iterator[str]:
    """Serve moto on 127.0.0.1 (`port` 0: any free one) until the block ends; yields its URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        host, bound = server.get_host_and_port()
        yield f"http://{host}:{bound}"
    finally:
        server.stop()
