"""What the metering middleware adds to a served request, in instructions of the server process.

    python bench/middleware_instructions.py [--requests 50] [--modes handwritten inprocess-async inprocess-sync]

bench/middleware.py times requests at 200 per second, and its tail moves with whatever else
the two cores run. This counts what the tail is made of where the machine cannot move it: the
app of bench/middleware.py is served by uvicorn under valgrind's callgrind, in each mode in
turn, and one client sends it `n` requests one after the other (after 20 not counted), then,
in a second server, `4n`; the difference over `3n` is the server process's instructions per
request, all its threads included (uvicorn, the app, the middleware, the engine, the
hand-offs to threads). The bare app (no middleware) is the baseline; a metered mode's
instructions less the baseline's are what metering adds. `handwritten` (bench/middleware.py's
`HandWrittenMetering`, asked for by name) counts the same for a middleware with nothing but
the hand-written SQL's two writes: the floor. PostgreSQL's own work is not
counted (bench/engine_cost.py measures its CPU).

Unlike bench/engine_instructions.py, this count is not quite blind to the machine: an idle
uvicorn still wakes every 0.1 s, so a server that waits longer counts more. On a quiet machine
two runs at n = 20 agreed within 2%; with another benchmark running beside it, one baseline
came out at 423 million instructions a request instead of about one million (the cause was
not isolated further). Run it alone.

Needs valgrind and PostgreSQL (CREDITWORKER_BENCH_POSTGRES_URL, as bench/run.py). Not part of
the tests; under callgrind Python runs about fifty times slower: a few minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from middleware import METERED_IN_PROCESS, USERS, grant, serve
from run import fresh_database

WARM_UP = 20


def served_instructions(mode: str, database_url: str, count: int, workdir: Path) -> int:
    """Instructions the server process of `mode` executes while serving `count` requests
    (after the warm-up; start-up and shutdown are the same for every count)."""
    out = workdir / f"callgrind.{mode}.{count}"
    server, url = serve(mode, database_url, workdir, None, ready_within=300,
                        wrapper=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
    try:
        _requests(url, WARM_UP + count)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(300)
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no total in {out}")
    out.unlink()
    return int(match.group(1))


def _requests(url: str, count: int) -> None:
    """`count` metered requests, one after the other, on one kept-alive connection."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        for index in range(count):
            response = client.post("/api/answer", headers={
                "X-User-ID": f"bench-{index % USERS}", "X-Estimated-Tokens": "5",
                "X-Request-ID": uuid.uuid4().hex})
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="n: each mode serves n, then 4n requests")
    parser.add_argument("--modes", nargs="+", choices=["handwritten", *METERED_IN_PROCESS],
                        default=list(METERED_IN_PROCESS))
    options = parser.parse_args()
    n = options.requests
    os.environ["PYTHONHASHSEED"] = "0"  # the served processes' dicts alike from run to run
    with fresh_database() as url, tempfile.TemporaryDirectory() as directory:
        grant(url)
        per_request: dict[str, float] = {}
        for mode in ["baseline", *options.modes]:
            few, many = (served_instructions(mode, url, count, Path(directory)) for count in (n, 4 * n))
            per_request[mode] = (many - few) / (3 * n)
            added = per_request[mode] - per_request["baseline"]
            print(f"{mode:>16}: {per_request[mode] / 1e6:.3f} million instructions per request"
                  + (f" (+{added / 1e6:.3f} million for metering)" if mode != "baseline" else ""),
                  flush=True)


if __name__ == "__main__":
    main()
