"""The metrics the worker records, with their names and labels (docs/metrics.md lists them).

They are made on first use, not at import: `prometheus_client` chooses how values are stored
when it is first imported, and in a worker `PROMETHEUS_MULTIPROC_DIR` is set by then
(worker/metrics_endpoint.py), so that every pool process writes to files the endpoint adds
up. Labels are never user ids: low cardinality.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

APPLIED = "applied"


@cache
def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "operations": Counter(
            "creditworker_operations",
            "Operations the workers finished, by operation and outcome (`applied`, `retried`, "
            "`failed`, or the error code).",
            ["operation", "outcome"],
        ),
        "batch_size": Histogram(
            "creditworker_batch_size",
            "Operations per gathered batch (one transaction).",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        ),
        "engine_seconds": Histogram(
            "creditworker_engine_seconds",
            "Time in the engine: per gathered batch (`scope=batch`), per operation run alone "
            "(`scope=operation`).",
            ["scope"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        ),
        "sweep_last_success": Gauge(
            "creditworker_sweep_last_success_timestamp_seconds",
            "When each beat sweep last finished without error (Unix time; alert on time() minus this).",
            ["sweep"],
            multiprocess_mode="max",
        ),
    }


def record_operation(operation: str, outcome: str) -> None:
    _metrics()["operations"].labels(operation=operation, outcome=outcome).inc()


def record_engine_time(scope: str, seconds: float) -> None:
    _metrics()["engine_seconds"].labels(scope=scope).observe(seconds)


def record_batch(size: int, seconds: float) -> None:
    _metrics()["batch_size"].observe(size)
    record_engine_time("batch", seconds)


def record_sweep_success(sweep: str) -> None:
    _metrics()["sweep_last_success"].labels(sweep=sweep).set(time.time())
