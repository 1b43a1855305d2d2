"""Publish-to-body latency of one kept-alive poll.

    python keepalive_latency.py [--engine wsgi|lean] [--polls 20]

One subscriber keeps one connection (``Connection: keep-alive``, as
browsers do) and polls again and again. Each time, once its headers and
first chunk have arrived (the server has parked it), one message is
published through the IN line; the figure is the time from just before
the publish request is sent to the moment the subscriber has read the
whole answer. Prints every time and the median.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import time

from server_process import IO_TIMEOUT, ServerProcess

CHANNEL = "kept"
# The answer to a parked kept-alive poll ends with the last chunk.
_LAST_CHUNK = b"\r\n0\r\n\r\n"
_FIRST_CHUNK = b"3\r\n \r\n\r\n"


def read_until(sock: socket.socket, buf: bytearray, done) -> None:
    """Receive into ``buf`` until ``done(buf)``, within IO_TIMEOUT."""
    deadline = time.monotonic() + IO_TIMEOUT
    while not done(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the kept-alive connection")
        buf += chunk


def measure(engine: str, polls: int) -> list[float]:
    """Seconds from publish to body, once per poll."""
    times = []
    with ServerProcess(WAIT_ENGINE=engine, WAIT_TIMEOUT=3600) as server, \
            socket.create_connection(("127.0.0.1", server.wait_port), timeout=IO_TIMEOUT) as sock:
        request = (f"GET /?identifier={CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Connection: keep-alive\r\n\r\n").encode()
        for number in range(polls):
            buf = bytearray()
            sock.sendall(request)
            read_until(sock, buf, lambda b: b"\r\n\r\n" in b and b.endswith(_FIRST_CHUNK))
            parked = len(buf)
            sent_at, _ = server.publish(CHANNEL, b'{"n": %d}' % number)
            read_until(sock, buf, lambda b: len(b) > parked + len(_LAST_CHUNK) and b.endswith(_LAST_CHUNK))
            times.append(time.monotonic() - sent_at)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["wsgi", "lean"], default="wsgi")
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    times = measure(args.engine, args.polls)
    print(" ".join(f"{1000 * t:.2f}" for t in times) + " ms")
    print(f"{args.engine}: median publish to body {1000 * statistics.median(times):.2f} ms "
          f"over {len(times)} polls")


if __name__ == "__main__":
    main()
