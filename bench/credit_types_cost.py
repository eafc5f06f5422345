"""What credit types cost a deduct: this tree against a baseline tree (main before the
change), in the same run, on the same PostgreSQL.

    python bench/credit_types_cost.py [--baseline TREE] [--rounds 3] [--json PATH]

TREE is a checkout of the code before the change (`git archive <commit> | tar -x -C TREE`
gives one that does not move while the benchmark runs; default /work/main).

Each measurement is a child process that imports `creditworker` from one tree (its
PYTHONPATH), migrates a database of its own with that tree's migrations, grants 100 accounts
a large balance and times, in process: batches of 1,000 deducts (`apply_batch`, one
transaction each) and single deducts (`deduct_credits`, one transaction each), as a rate
(wall clock: the database's time in it) and as the process's CPU time per deduct (the
Python side; steadier on a shared machine). Children
run in turn, round after round (baseline, this tree's default type, this tree's `images`
type), so the machine's drift touches all alike; the figure compared is the median of the
rounds, and the ratio is against the baseline's median. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("CREDITWORKER_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
ACCOUNTS = 100


def child(database_url: str, credit_type: str | None, batches: int, singles: int) -> dict[str, float]:
    """Runs in the measured tree: only calls that exist before and after credit types."""
    from creditworker import CreditService

    service = CreditService(database_url, create_tables=True)
    typed = {} if credit_type is None else {"credit_type": credit_type}
    users = [f"u{i}" for i in range(ACCOUNTS)]
    service.apply_batch([{"op": "add", "user_id": user, "amount": 10**12, **typed} for user in users])

    def batch(round_: int) -> None:
        outcomes = service.apply_batch([
            {"op": "deduct", "user_id": users[i % ACCOUNTS], "amount": 1, "idempotency_key": f"b{round_}:{i}", **typed}
            for i in range(1000)])
        assert all(outcome.ok for outcome in outcomes)

    batch(-1)  # warm: statements compiled, caches filled
    started, cpu = time.perf_counter(), time.process_time()
    for round_ in range(batches):
        batch(round_)
    batched = batches * 1000 / (time.perf_counter() - started)
    batched_cpu = (time.process_time() - cpu) / (batches * 1000) * 1e6
    for i in range(50):
        service.deduct_credits(users[i % ACCOUNTS], 1, idempotency_key=f"warm:{i}", **typed)
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(singles):
        service.deduct_credits(users[i % ACCOUNTS], 1, idempotency_key=f"s:{i}", **typed)
    single = singles / (time.perf_counter() - started)
    single_cpu = (time.process_time() - cpu) / singles * 1e6
    service.engine.dispose()
    return {"batched_deducts_per_s": batched, "single_deducts_per_s": single,
            "batched_deduct_cpu_us": batched_cpu, "single_deduct_cpu_us": single_cpu}


def measure(tree: Path, credit_type: str | None, batches: int, singles: int) -> dict[str, float]:
    sys.path.insert(0, str(HERE))
    from tests import harness

    with harness.fresh_database(POSTGRES, prefix="cw_bench_types") as url:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", url, "--batches", str(batches),
                   "--singles", str(singles)] + (["--credit-type", credit_type] if credit_type else [])
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree,
                              capture_output=True, text=True, check=True, timeout=900)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=Path("/work/main"), help="the tree before the change")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="batches of 1,000 deducts per child")
    parser.add_argument("--singles", type=int, default=1000, help="single deducts per child")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--credit-type", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(child(arguments.child, arguments.credit_type, arguments.batches, arguments.singles)))
        return 0
    runs = {"baseline": (arguments.baseline, None), "types_default": (HERE, "credits"),
            "types_images": (HERE, "images")}
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for round_ in range(arguments.rounds):
        for name, (tree, credit_type) in runs.items():
            figures[name].append(measure(tree, credit_type, arguments.batches, arguments.singles))
            print(f"round {round_ + 1} {name}: {figures[name][-1]}", flush=True)
    medians: dict[str, Any] = {
        name: {metric: statistics.median(run[metric] for run in found) for metric in found[0]}
        for name, found in figures.items()
    }
    for name in ("types_default", "types_images"):
        for metric in ("batched_deducts_per_s", "single_deducts_per_s", "batched_deduct_cpu_us",
                       "single_deduct_cpu_us"):
            medians[f"{name}_{metric}_vs_baseline_ratio"] = medians[name][metric] / medians["baseline"][metric]
    print(json.dumps(medians, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps({"rounds": figures, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
