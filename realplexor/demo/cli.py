"""The ``python -m realplexor.demo`` command: the sandbox, and a server if none runs."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from ..client import Realplexor
from ..config import Config, ConfigError, load_config, parse_address
from .app import Sandbox, SandboxServer
from .online import OnlineList
from .process import ServerProcess, answers, write_config

log = logging.getLogger("realplexor.demo")

DEFAULT_PORT = 8090
DEFAULT_IN = ("127.0.0.1", 10010)
DEFAULT_WAIT = ("127.0.0.1", 8088)
DEFAULT_NAMESPACE = "demo_"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m realplexor.demo",
        description="The Realplexor sandbox: a live multi-channel chat. Uses the Realplexor "
                    "server that answers on the IN line, or starts one when none does.")
    parser.add_argument("--host", default="127.0.0.1", help="address the sandbox listens on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port the sandbox listens on ({DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--config", metavar="FILE",
                        help="Realplexor configuration: where the server listens, and what a "
                             "server started here runs with")
    parser.add_argument("--in-host", help=f"the server's IN line host ({DEFAULT_IN[0]})")
    parser.add_argument("--in-port", type=int, help=f"the server's IN line port ({DEFAULT_IN[1]})")
    parser.add_argument("--wait-url", help="the server's WAIT line as browsers reach it "
                                           f"(http://{DEFAULT_WAIT[0]}:{DEFAULT_WAIT[1]}/)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                        help=f"prefix of the sandbox's channel ids ({DEFAULT_NAMESPACE})")
    parser.add_argument("--offline-timeout", type=float, default=5,
                        help="OFFLINE_TIMEOUT of a server started here without --config (5 s)")
    parser.add_argument("--no-server", action="store_true",
                        help="never start a Realplexor server; fail when none answers")
    return parser


def _browser_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _first_addr(config: Config | None, option: str, default: tuple[str, int]) -> tuple[str, int]:
    if config is None:
        return default
    host, port = parse_address(getattr(config, option)[0], option)
    return _browser_host(host), port


class Launch:
    """Everything ``main`` starts, stopped in reverse by ``close``."""

    def __init__(self) -> None:
        self.server_process: ServerProcess | None = None
        self.online: OnlineList | None = None
        self.http: SandboxServer | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def ensure_server(self, args, config: Config | None) -> tuple[str, int, str]:
        """The IN host and port and the WAIT URL, starting a server when none answers."""
        in_host, in_port = _first_addr(config, "IN_ADDR", DEFAULT_IN)
        in_host, in_port = args.in_host or in_host, args.in_port if args.in_port is not None else in_port
        wait_host, wait_port = _first_addr(config, "WAIT_ADDR", DEFAULT_WAIT)
        if answers(in_host, in_port):
            print(f"Using the Realplexor server whose IN line is {in_host}:{in_port}.", flush=True)
            return in_host, in_port, args.wait_url or f"http://{wait_host}:{wait_port}/"
        if args.no_server:
            raise RuntimeError(f"no Realplexor server answers on {in_host}:{in_port} (and --no-server)")
        if args.config:
            config_path = Path(args.config)
        else:
            if args.wait_url:
                url = urlsplit(args.wait_url)
                wait_port = url.port or (443 if url.scheme == "https" else 80)
            self._tmp = tempfile.TemporaryDirectory(prefix="realplexor-sandbox-")
            config_path = write_config(Path(self._tmp.name) / "realplexor.toml",
                                       f"{wait_host}:{wait_port}", f"{in_host}:{in_port}",
                                       args.offline_timeout)
        if in_port:
            print(f"No Realplexor server answers on {in_host}:{in_port}: starting one.", flush=True)
        else:
            print("Starting a Realplexor server on the ports its configuration names.", flush=True)
        self.server_process = ServerProcess(config_path)
        ports = self.server_process.start(expected={"IN": (in_host, in_port), "WAIT": (wait_host, wait_port)})
        print(f"Realplexor server started (pid {self.server_process.pid}).", flush=True)
        return in_host, ports["IN"], args.wait_url or f"http://{wait_host}:{ports['WAIT']}/"

    def close(self) -> None:
        if self.http is not None:
            self.http.server_close()
        if self.online is not None:
            self.online.stop()
        if self.server_process is not None:
            self.server_process.stop()
            print("Realplexor server stopped.", flush=True)
        if self._tmp is not None:
            self._tmp.cleanup()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox until Ctrl-C or SIGTERM; the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sandbox %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    launch = Launch()
    try:
        config = load_config(args.config) if args.config else None
        in_host, in_port, wait_url = launch.ensure_server(args, config)
        client = Realplexor(in_host, in_port, namespace=args.namespace, timeout=5)
        launch.online = OnlineList(client)
        launch.online.start()
        launch.http = SandboxServer((args.host, args.port), Sandbox(client, wait_url, launch.online))
        print(f"Realplexor sandbox: open {launch.http.url} in a browser "
              f"(or two). Ctrl-C stops it.", flush=True)
        launch.http.serve_forever()
    except KeyboardInterrupt:
        print("Stopping.", flush=True)
    except (ConfigError, RuntimeError, ValueError, OSError) as exc:
        print(f"realplexor.demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        launch.close()
    return 0
