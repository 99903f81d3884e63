"""`python -m loraflow_inference serve [--port 8080] [--host 0.0.0.0]`; SageMaker runs the image with `serve`.

gunicorn when installed (the Docker image), else Werkzeug's threaded server (the local cloud).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from flask import Flask
from loraflow_shared.errors import LoraflowError
from loraflow_shared.hub_token import load_hub_token

from loraflow_inference.handler import PreviewRenderer
from loraflow_inference.server import create_app
from loraflow_inference.settings import InferenceSettings

logger = logging.getLogger("loraflow_inference")

# Rendering takes minutes, /ping must answer meanwhile: one process, threads, no request timeout.
_GUNICORN_OPTIONS = {"workers": 1, "worker_class": "gthread", "threads": 4, "timeout": 0}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m loraflow_inference")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    settings = InferenceSettings.from_env()  # a bad setting fails here, before the port opens
    _load_hub_token()

    def app_factory() -> Flask:
        return create_app(PreviewRenderer.from_settings(settings))

    if importlib.util.find_spec("gunicorn") is not None:
        _serve_with_gunicorn(app_factory, args.host, args.port)
    else:
        _serve_with_werkzeug(app_factory, args.host, args.port)
    return 0


def _load_hub_token() -> None:
    """The token for gated base models. An unreadable secret must not take the endpoint down for every
    job: it is logged (never its value) and renders of gated models fail with MODEL_LOAD_FAILED."""
    try:
        load_hub_token()
    except LoraflowError as exc:
        logger.error("no Hugging Face token: %s", exc.message)


def _serve_with_werkzeug(app_factory: Callable[[], Flask], host: str, port: int) -> None:
    from werkzeug.serving import make_server

    server = make_server(host, port, app_factory(), threaded=True)
    logger.info("serving on http://%s:%d (werkzeug)", host, server.server_port)
    server.serve_forever()


def _serve_with_gunicorn(app_factory: Callable[[], Flask], host: str, port: int) -> None:
    from gunicorn.app.base import BaseApplication

    class _Application(BaseApplication):  # gunicorn's documented way to serve an app object
        def load_config(self) -> None:
            for key, value in {**_GUNICORN_OPTIONS, "bind": f"{host}:{port}"}.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Runs in the worker, after the fork: CUDA must not be touched before it.
            return app_factory()

    logger.info("serving on http://%s:%d (gunicorn)", host, port)
    _Application().run()


if __name__ == "__main__":
    sys.exit(main())
