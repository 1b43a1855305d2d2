"""gunicorn settings for Realplexor's WAIT line, for a service.

From the repository root:

    REALPLEXOR_CONFIG=/etc/realplexor.toml \
        .venv/bin/gunicorn -c contrib/init/gunicorn.conf.py wsgi:app

From elsewhere, with absolute paths (gunicorn reads ``-c`` before it
changes to ``--chdir``):

    REALPLEXOR_CONFIG=/etc/realplexor.toml \
        /opt/realplexor/.venv/bin/gunicorn -c /opt/realplexor/contrib/init/gunicorn.conf.py \
        --chdir /opt/realplexor wsgi:app

The worker starts the IN line from REALPLEXOR_CONFIG in the same process.
The channel state is in the worker's memory: exactly one worker.
"""
import os

from realplexor.worker import refuse_several_workers as on_starting  # noqa: F401

bind = os.environ.get("REALPLEXOR_BIND", "0.0.0.0:8088")
worker_class = "gevent"
workers = 1
# The gevent worker reports to the master every second whatever its polls
# do, so long polls never reach this; it only restarts a worker whose loop
# has been stuck this long. A restart loses every queued message: be slow.
timeout = 600
graceful_timeout = 5
# Connections served at once (each waiting poll is one), and the accept queue.
worker_connections = 100000
backlog = 4096
