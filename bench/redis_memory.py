"""What the shared store costs Redis: bytes per channel and per queued message.

Starts its own redis-server on a free loopback port, publishes through
the real store (``realplexor.redis_store``) to K channels, one message
each, then more messages to the same channels, and reads Redis's
``used_memory`` before and after each step.

    python redis_memory.py [--channels 10000] [--messages 10] [--size 100]
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from realplexor.redis_store import RedisStore, connect  # noqa: E402
from realplexor.store import Settings  # noqa: E402


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    """A redis-server with no persistence, answering PING (at most 10 s)."""
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=10000)
    parser.add_argument("--messages", type=int, default=10, help="messages per channel in all")
    parser.add_argument("--size", type=int, default=100, help="bytes of JSON data per message")
    args = parser.parse_args()
    port = free_port()
    process = start_redis(port)
    try:
        client = redis.Redis(port=port)
        store = RedisStore(connect(f"redis://127.0.0.1:{port}/0"), Settings(), "bench")
        store.check()
        data = b'"' + b"x" * (args.size - 2) + b'"'
        ids = [f"bench_channel_{n:07d}" for n in range(args.channels)]
        base = client.info("memory")["used_memory"]
        for channel_id in ids:
            store.publish([(channel_id, None, None)], data, frozenset())
        first = client.info("memory")["used_memory"]
        for _ in range(args.messages - 1):
            for channel_id in ids:
                store.publish([(channel_id, None, None)], data, frozenset())
        last = client.info("memory")["used_memory"]
        print(f"{args.channels} channels, {args.size}-byte messages, redis {client.info()['redis_version']}")
        print(f"  a channel with one message  {(first - base) / args.channels:8.0f} bytes")
        if args.messages > 1:
            print(f"  each further message        {(last - first) / (args.channels * (args.messages - 1)):8.0f} bytes")
    finally:
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    main()
