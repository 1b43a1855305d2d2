"""The ``realplexor`` command."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import ConfigError, load_config
from .handoff import RESTART_STATUS, Handoff, HandoffError
from .lifecycle import Daemon, Restart, configure_logging
from .migration import convert
from .server import Realplexor, StartError
from .supervisor import Supervisor

CONVERT_CONFIG = "convert-config"


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="realplexor",
        description="Realplexor: a Comet (server push) server. "
                    "Browsers long-poll the WAIT line; back ends publish on the IN line.",
        epilog=f"{CONVERT_CONFIG} OLD.conf [OVERRIDE.conf ...]: print the old daemon's Perl "
               f"configuration as TOML (realplexor {CONVERT_CONFIG} --help).")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (default: built-in defaults)")
    parser.add_argument("--pidfile", metavar="PATH",
                        help="write the server's pid here once it listens; removed on exit")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and the files it names, then exit")
    parser.add_argument("--version", action="version", version=f"realplexor {__version__}")
    return parser


def build_convert_parser() -> argparse.ArgumentParser:
    """The options of ``realplexor convert-config``."""
    parser = argparse.ArgumentParser(
        prog=f"realplexor {CONVERT_CONFIG}",
        description="Print the old daemon's Perl configuration as this server's TOML on stdout. "
                    "A setting with no equivalent here becomes a comment line saying why; "
                    "anything not understood is refused with its line. No Perl is run.")
    parser.add_argument("files", nargs="+", metavar="OLD.conf",
                        help="the old main file (dklab_realplexor.conf), then override files; "
                             "later files win, as in the old daemon")
    return parser


def convert_config(argv: list[str]) -> int:
    """Print the TOML for the old files named in ``argv``; 1 with one line on failure."""
    args = build_convert_parser().parse_args(argv)
    try:
        sources = [(path, _read_old_file(path)) for path in args.files]
        toml = convert(sources)
    except ConfigError as exc:
        print(f"realplexor: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(toml)
    return 0


def _read_old_file(path: str) -> str:
    # Old files may hold comments in any 8-bit charset; only strings must be UTF-8.
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def check_config(path: str | None) -> int:
    """Validate everything a start would read; 0 when it is all usable."""
    config = load_config(path)
    Realplexor(config)
    print(f"realplexor: configuration OK ({path or 'built-in defaults'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the server; the exit status (1 with one clear line on failure)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CONVERT_CONFIG]:
        return convert_config(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.check_config:
            return check_config(args.config)
        handoff = Handoff.take_from(os.environ)
        config = load_config(args.config)
        configure_logging(config.VERBOSITY)
        if handoff is None and config.MAX_MEM_MB:
            return Supervisor(config, argv, args.pidfile).run()
        # A supervised server leaves the pidfile, naming the supervisor, to it.
        return Daemon(config, args.config, None if handoff else args.pidfile, handoff).run()
    except (ConfigError, StartError, HandoffError) as exc:
        print(f"realplexor: {exc}", file=sys.stderr)
        return 1
    except Restart:
        return RESTART_STATUS
