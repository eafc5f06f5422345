"""What a metered request costs the engine in instructions, which a busy machine does not change.

    python bench/engine_instructions.py [--requests 100] [--sides CreditService,AsyncCreditService]

CPU time on a shared VM moves with its neighbours: bench/engine_cost.py's hand-written
baseline took 0.080 ms of client CPU per request and, an hour later on the same machine,
0.150 ms. valgrind's callgrind counts the instructions a process executes, which do not move.
Each side of bench/engine_cost.py runs in a process of its own under callgrind, twice: after
the same set-up and 20 requests of warm-up it makes `n` requests, then (in the second process)
`4n`; the difference over `3n` is its instructions per request (reserve + commit), the
hand-written SQL's the baseline. Only this Python process is counted, not PostgreSQL (whose
CPU bench/engine_cost.py measures). Under callgrind Python runs about fifty times slower: the
default takes a few minutes.

Needs valgrind and PostgreSQL (CREDITWORKER_BENCH_POSTGRES_URL, as bench/run.py). Not part of
the tests.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_cost import Sides, fresh_database, prepare

WARM_UP = 20
DEFAULT_SIDES = "CreditService,AsyncCreditService"


def child(url: str, side: str, count: int) -> None:
    """One side's requests in this process (run under callgrind by `instructions`)."""
    made = Sides(url)
    run = made.chosen(side)[side]
    run(WARM_UP)
    run(count)
    made.close()


def instructions(url: str, side: str, count: int, workdir: Path) -> int:
    """Instructions this script's process executes for `side` making `count` requests."""
    out = workdir / "callgrind.out"
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
         "--child", side, "--url", url, "--requests", str(count)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no total in {out}")
    out.unlink()
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="n: each side runs n, then 4n requests")
    parser.add_argument("--sides", default=DEFAULT_SIDES,
                        help="comma-separated, as bench/engine_cost.py names them; the hand-written SQL always runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.url, options.child, options.requests)
        return

    n = options.requests
    with fresh_database() as url, tempfile.TemporaryDirectory() as directory:
        prepare(url)
        per_request: dict[str, float] = {}
        for side in ["hand-written SQL", *(name.strip() for name in options.sides.split(","))]:
            few, many = (instructions(url, side, count, Path(directory)) for count in (n, 4 * n))
            per_request[side] = (many - few) / (3 * n)
            print(f"{side:>24}: {per_request[side] / 1e6:.3f} million instructions per request "
                  f"(reserve + commit)", flush=True)
        base = per_request["hand-written SQL"]
        for side, count in per_request.items():
            if side != "hand-written SQL":
                print(f"{side}: {count / base:.1f}x the baseline's instructions")


if __name__ == "__main__":
    main()
