"""Realplexor inside a WSGI server's worker (gunicorn's gevent worker).

The WSGI server serves the WAIT line; this worker starts the IN line and
the housekeeping from the configuration, in the same process, so both
lines share one channel state.
"""
from __future__ import annotations

import os
import sys

from .config import ConfigError, load_config
from .lifecycle import configure_logging, tune_gc
from .server import Realplexor, StartError
from .wait_wsgi import WaitApp

# gunicorn treats this exit status of a worker as "failed to boot" and stops.
WORKER_BOOT_ERROR = 3


def create_app(config_path: str | None) -> WaitApp:
    """Start the IN line in this worker and return the WAIT line's WSGI app."""
    try:
        config = load_config(config_path)
        configure_logging(config.VERBOSITY)
        server = Realplexor(config)
        server.start(wait_line=False)
        tune_gc()
    except (ConfigError, StartError) as exc:
        print(f"realplexor: {exc}", file=sys.stderr)
        if "in use" in str(exc):
            print("realplexor: is another worker or server already running? "
                  "The in-memory channel state needs exactly one worker (-w 1).", file=sys.stderr)
        sys.exit(WORKER_BOOT_ERROR)
    return server.wait_app


def refuse_several_workers(server) -> None:
    """gunicorn ``on_starting`` hook: with the memory store each worker would hold its own channels."""
    if server.cfg.workers != 1 and _backend() == "memory":
        sys.exit(f"realplexor: refusing to start {server.cfg.workers} gunicorn workers: "
                 "the channel state is in-memory and would silently split; use -w 1, "
                 "or a shared BACKEND (redis://...) with REUSE_PORT = true")


def _backend() -> str:
    try:
        return load_config(os.environ.get("REALPLEXOR_CONFIG") or None).BACKEND
    except ConfigError:
        return "memory"     # the worker reports the broken file
