"""gunicorn settings for Realplexor's WAIT line, for a service.

    REALPLEXOR_CONFIG=/etc/realplexor.toml \
        gunicorn -c contrib/init/gunicorn.conf.py --chdir /opt/realplexor wsgi:app

The worker starts the IN line from REALPLEXOR_CONFIG in the same process.
The channel state is in the worker's memory: exactly one worker.
"""
import os

from realplexor.worker import refuse_several_workers as on_starting  # noqa: F401

bind = os.environ.get("REALPLEXOR_BIND", "0.0.0.0:8088")
worker_class = "gevent"
workers = 1
# Long polls wait up to WAIT_TIMEOUT (300 s by default); keep the worker's
# timeout above it, and let many polls wait at once.
timeout = 600
graceful_timeout = 5
worker_connections = 100000
backlog = 4096

