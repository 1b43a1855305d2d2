"""Run realplexor with a log of its garbage collections.

    python bench/gc_trace.py LOGFILE --config FILE

Starts the server exactly as ``python -m realplexor`` does, after adding
a ``gc.callbacks`` hook that appends one line per collection to LOGFILE:
``START_MONOTONIC GENERATION SECONDS COLLECTED``. The benchmarks use it
to see how much of a phase the collector took (py-spy cannot: the
collector has no Python frame).
"""
from __future__ import annotations

import gc
import sys
import time


def install(log_path: str) -> None:
    """Log every collection of this process to ``log_path`` (line buffered)."""
    log = open(log_path, "a", buffering=1, encoding="ascii")  # noqa: SIM115 - lives as long as the process
    started: dict[str, float] = {}

    def on_collect(phase: str, info: dict) -> None:
        if phase == "start":
            started["at"] = time.monotonic()
        elif "at" in started:
            at = started.pop("at")
            log.write(f"{at:.6f} {info['generation']} {time.monotonic() - at:.6f} "
                      f"{info['collected']}\n")

    gc.callbacks.append(on_collect)


def read_log(log_path: str, since: float, until: float) -> dict[int, tuple[int, float]]:
    """Collections that started in [since, until): {generation: (count, seconds)}."""
    totals: dict[int, tuple[int, float]] = {}
    with open(log_path, encoding="ascii") as log:
        for line in log:
            at, generation, seconds, _ = line.split()
            if since <= float(at) < until:
                count, total = totals.get(int(generation), (0, 0.0))
                totals[int(generation)] = (count + 1, total + float(seconds))
    return totals


def main() -> int:
    install(sys.argv[1])
    from realplexor.cli import main as realplexor_main  # after the hook: count startup too
    return realplexor_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
