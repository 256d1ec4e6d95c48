"""`logitfuse --help` start-up cost, side by side with what it used to pay (importing torch).

Each row runs a fresh interpreter (`python -m clients.cli ... --help` from this checkout) several times,
alternating with the references, and reports the smallest CPU seconds (user + system, which a loaded
machine distorts far less than wall time) and the wall seconds of that run.

    python bench/bench_cli.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "python -c pass (interpreter alone)": ["-c", "pass"],
    "logitfuse --help": ["-m", "clients.cli", "--help"],
    "logitfuse train --help": ["-m", "clients.cli", "train", "--help"],
    "logitfuse merge --help": ["-m", "clients.cli", "merge", "--help"],
    "python -c 'import torch' (reference)": ["-c", "import torch"],
}


def run(args: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one fresh interpreter."""
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ROWS}
    for _ in range(repeat):
        for name, args in ROWS.items():
            results[name].append(run(args))
    torch_cpu = min(results["python -c 'import torch' (reference)"])[0]
    print(f"{'command':40s} {'CPU s':>7s} {'wall s':>7s} {'CPU / import torch':>19s}")
    for name, runs in results.items():
        cpu, wall = min(runs)
        print(f"{name:40s} {cpu:7.2f} {wall:7.2f} {cpu / torch_cpu:18.2f}x")


if __name__ == "__main__":
    main()
