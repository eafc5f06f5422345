"""Serving the metrics: the registry a process exposes, and the worker's HTTP endpoint.

A Celery worker runs its tasks in a prefork pool, so a counter lives in several processes.
`prometheus_client`'s multiprocess mode adds them up: each process writes its values to files
under `PROMETHEUS_MULTIPROC_DIR`, and the endpoint (in the worker's main process) reads them
all. The directory must be set before `prometheus_client` is first imported and before the
pool forks, which is why `prepare_worker_metrics` runs at Celery's first worker signal
(worker/app.py), and why it starts empty. This module imports `prometheus_client` only
inside its functions: the Celery app, which producers build too, imports it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_created: list[str] = []
"""The temporary directory `prepare_worker_metrics` made, to remove when the worker stops."""


def prepare_worker_metrics() -> None:
    """Point `prometheus_client` at an empty directory: the one the environment names, else
    a new temporary one (removed by `remove_created_directory`)."""
    directory = os.environ.get(MULTIPROC_VARIABLE)
    if directory:
        os.makedirs(directory, exist_ok=True)
    else:
        directory = tempfile.mkdtemp(prefix="creditworker-metrics-")
        _created.append(directory)
        os.environ[MULTIPROC_VARIABLE] = directory
    # `celery` imports Flower's command, which imports `prometheus_client`, before any worker
    # signal: its choice of value storage, made then, is made again now (the metrics are
    # made later, on first use, and read the choice when they are).
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()
    for name in os.listdir(directory):  # values of an earlier run would be added up too
        path = os.path.join(directory, name)
        if name.endswith(".db"):
            os.remove(path)


def registry(*extra: Any) -> Any:
    """This process's metrics, or every pool process's under `PROMETHEUS_MULTIPROC_DIR`,
    plus `extra` collectors (the state read at scrape time)."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
    from prometheus_client.registry import Collector

    class _ThisProcess(Collector):
        def collect(self) -> Any:
            yield from REGISTRY.collect()

    collected = CollectorRegistry()
    if os.environ.get(MULTIPROC_VARIABLE):
        multiprocess.MultiProcessCollector(collected)
    else:
        collected.register(_ThisProcess())
    for collector in extra:
        collected.register(collector)
    return collected


def serve_worker_metrics(port: int, address: str, *extra: Any) -> Any:
    """Start the worker's metrics endpoint in a thread of this (the main) process."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=registry(*extra))
    return server


def mark_process_dead(pid: int) -> None:
    """A pool process ended: its live gauges stop counting (counters keep their totals)."""
    from prometheus_client import multiprocess

    if os.environ.get(MULTIPROC_VARIABLE):
        multiprocess.mark_process_dead(pid)


def remove_created_directory() -> None:
    while _created:
        shutil.rmtree(_created.pop(), ignore_errors=True)
