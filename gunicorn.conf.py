"""gunicorn settings for serving Realplexor's WAIT line (read from this folder)."""
from realplexor.worker import refuse_several_workers as on_starting  # noqa: F401

worker_class = "gevent"
workers = 1
