"""The WAIT line for gunicorn: ``gunicorn -k gevent -w 1 -b HOST:PORT wsgi:app``.

The worker also starts the IN line (every IN_ADDR) from the configuration
file named by the REALPLEXOR_CONFIG environment variable (built-in
defaults when unset). The channel state lives in the worker's memory, so
exactly one worker may run: ``gunicorn.conf.py`` beside this file refuses
more, and so does the IN line's port.
"""
import os

from realplexor.worker import create_app

app = create_app(os.environ.get("REALPLEXOR_CONFIG") or None)
