"""A Realplexor server run as a child process, for when none is running yet."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

_LISTENING_RE = re.compile(r"\b(WAIT|IN) line listening on (\S+):(\d+)")


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    if not port:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def write_config(path: Path, wait_addr: str, in_addr: str, offline_timeout: float) -> Path:
    """A small TOML configuration for the sandbox's own server."""
    path.write_text(f'WAIT_ADDR = ["{wait_addr}"]\n'
                    f'IN_ADDR = ["{in_addr}"]\n'
                    f"OFFLINE_TIMEOUT = {offline_timeout!r}\n"
                    "VERBOSITY = 1\n")
    return path


class ServerProcess:
    """``python -m realplexor --config FILE`` as a child: started, watched, stopped.

    Its log lines go on to ``echo``; the ports it reports (``WAIT line
    listening on HOST:PORT``) land in ``ports`` (``{"WAIT": port, "IN": port}``).
    """

    def __init__(self, config_path: Path, echo: TextIO | None = None):
        self.config_path = config_path
        self.echo = echo if echo is not None else sys.stderr
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 15,
              expected: dict[str, tuple[str, int]] | None = None) -> dict[str, int]:
        """Start the server and wait until both lines listen; their ports.

        A line's port comes from the server's log, or, for a server that
        logs nothing (VERBOSITY 0), from ``expected`` (``{"IN": (host,
        port)}``) once that port answers. Raises RuntimeError, with the server's last words, when it exits
        or does not listen within ``timeout`` seconds.
        """
        self.process = subprocess.Popen(
            [sys.executable, "-m", "realplexor", "--config", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._pump, name="realplexor-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while len(self.ports) < 2:
            if self.process.poll() is not None:
                self._reader.join(1)
                raise RuntimeError("the Realplexor server stopped at start:\n  " + "\n  ".join(self.lines[-5:]))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Realplexor server did not listen within {timeout:g} s")
            time.sleep(0.05)
            for line, (host, port) in (expected or {}).items():
                if line not in self.ports and answers(host, port, 0.2):
                    self.ports[line] = port
        return dict(self.ports)

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            del self.lines[:-50]
            match = _LISTENING_RE.search(line)
            if match:
                self.ports[match.group(1)] = int(match.group(3))
            try:
                print(line, file=self.echo, flush=True)
            except (OSError, ValueError):
                pass  # nowhere to echo to any more; keep draining the pipe

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM the server (SIGKILL after ``timeout``); its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return process.returncode
