"""The ``realplexor`` command."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .lifecycle import Daemon, configure_logging
from .server import StartError


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="realplexor",
        description="Realplexor: a Comet (server push) server. "
                    "Browsers long-poll the WAIT line; back ends publish on the IN line.")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (default: built-in defaults)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the server; the exit status (1 with one clear line on failure)."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure_logging(config.VERBOSITY)
        return Daemon(config, args.config).run()
    except (ConfigError, StartError) as exc:
        print(f"realplexor: {exc}", file=sys.stderr)
        return 1
