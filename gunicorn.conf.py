"""gunicorn settings for serving Realplexor's WAIT line (read from this folder)."""
import sys

worker_class = "gevent"
workers = 1


def on_starting(server):
    """Refuse several workers: each would hold its own channel state."""
    if server.cfg.workers != 1:
        sys.exit(f"realplexor: refusing to start {server.cfg.workers} gunicorn workers: "
                 "the channel state is in-memory and would silently split; use -w 1")
