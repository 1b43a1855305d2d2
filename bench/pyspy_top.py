"""Top functions of a py-spy profile, by own and by total samples.

Reads py-spy's raw (collapsed stack) output: one line per distinct stack,
``root;caller;...;leaf COUNT``, each frame ``function (file:line)``. A
function's *own* samples are those where it was the running frame; its
*total* samples are those where it was anywhere on the stack (counted
once per stack). Frames are merged per function unless ``--lines``.

Code compiled to C (gevent's Cython modules such as its Event and hub
loop, and the interpreter's garbage collector) has no Python frame: its
time shows as own time of the Python function that called into it.

    py-spy record --format raw --nonblocking -p PID -o profile.txt -d 30
    python bench/pyspy_top.py profile.txt [more.txt ...] --top 15 [--lines]
"""
from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

SAMPLE_RATE = 250
_LINE_RE = re.compile(r":\d+\)$")


def read_stacks(paths: list[Path], lines: bool = False) -> list[tuple[list[str], int]]:
    """The stacks of raw py-spy profiles with their sample counts.

    Unless ``lines``, the line numbers are dropped so frames name functions.
    """
    stacks = []
    for path in paths:
        for line in path.read_text().splitlines():
            frames, _, count = line.rpartition(" ")
            if frames and count.isdigit():
                names = frames.split(";")
                if not lines:
                    names = [_LINE_RE.sub(")", name) for name in names]
                stacks.append((names, int(count)))
    return stacks


def tally(stacks: list[tuple[list[str], int]]) -> tuple[Counter, Counter, int]:
    """Own and total samples per function, and the number of samples."""
    own: Counter = Counter()
    total: Counter = Counter()
    samples = 0
    for frames, count in stacks:
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total, samples


def summary(paths: list[Path], top: int = 15, lines: bool = False) -> str:
    """The top-``top`` functions (or lines) of profiles, by own and by total samples."""
    own, total, samples = tally(read_stacks(paths, lines))
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples (CPU only, idle excluded)", "",
             f"top {top} by own samples:", "   own%  total%  function"]
    for frame, count in own.most_common(top):
        lines.append(f"  {100 * count / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}")
    lines += ["", f"top {top} by total samples:", "   own%  total%  function"]
    for frame, count in total.most_common(top):
        lines.append(f"  {100 * own[frame] / samples:5.1f}  {100 * count / samples:6.1f}  {frame}")
    return "\n".join(lines) + "\n"


def py_spy_command() -> str:
    """The py-spy next to this Python (a virtualenv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


class Recorder:
    """``py-spy record`` attached to a process until :meth:`stop`."""

    def __init__(self, pid: int, output: Path, rate: int = SAMPLE_RATE):
        self.output = output
        self.process = subprocess.Popen(
            [py_spy_command(), "record", "--format", "raw", "--nonblocking",
             "--rate", str(rate), "--pid", str(pid), "--output", str(output)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # let it attach before the work starts
        if self.process.poll() is not None:
            raise RuntimeError("py-spy failed: " + self.process.stdout.read().decode(errors="replace"))

    def stop(self, timeout: float = 30) -> str:
        """Stop sampling, let py-spy write its file; py-spy's own output."""
        self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate(timeout=5)
        return out.decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", type=Path, nargs="+", help="py-spy raw output files")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--lines", action="store_true", help="rank lines, not functions")
    args = parser.parse_args()
    sys.stdout.write(summary(args.profiles, args.top, args.lines))


if __name__ == "__main__":
    main()
