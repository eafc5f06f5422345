"""The worker's Prometheus endpoint, when CREDITWORKER_METRICS_PORT is set: a worker bootstep.

A Celery worker runs its tasks in a prefork pool, so each counter lives in several processes;
`prometheus_client`'s multiprocess mode adds them up from files each process writes under
`PROMETHEUS_MULTIPROC_DIR`. That directory must be set before `prometheus_client` is first
imported and before the pool forks: the app sets it at Celery's first worker signal
(worker/app.py), and the metrics are made on first use (`metrics.instruments`). This step serves
the endpoint from the main process once the worker starts, reading the database's and the
broker's state at each scrape, and marks a pool process's live gauges dead when it exits.

The app adds this step by name (worker/app.py), so a producer that builds the app never
imports it, nor `prometheus_client` or the storage stack.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import bootsteps
from celery.signals import worker_process_shutdown
from sqlalchemy.pool import NullPool

from creditworker.metrics import exposition
from creditworker.metrics.state import StateCollector
from creditworker.storage.database import make_engine
from creditworker.worker.configured import settings_of

logger = logging.getLogger(__name__)


class MetricsEndpoint(bootsteps.StartStopStep):
    """Serves /metrics on CREDITWORKER_METRICS_ADDRESS:CREDITWORKER_METRICS_PORT."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.settings = settings_of(worker.app)
        self.server: Any = None
        if self.settings.metrics_port is not None:
            worker_process_shutdown.connect(_process_ended, dispatch_uid="creditworker.metrics.dead",
                                            weak=False)

    def include_if(self, worker: Any) -> bool:
        return self.settings.metrics_port is not None

    def start(self, worker: Any) -> None:
        # Its own engine without a pool: the prefork pool forks this process again when a
        # child is replaced, and a child must not inherit an open database connection.
        engine = make_engine(self.settings.database_url, poolclass=NullPool)
        collector = StateCollector(engine, celery_app=worker.app, expiring_days=self.settings.expiring_soon_days)
        self.server = exposition.serve_worker_metrics(
            self.settings.metrics_port or 0, self.settings.metrics_address, collector)
        logger.info("metrics on http://%s:%s/metrics", self.settings.metrics_address, self.settings.metrics_port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        exposition.remove_created_directory()

    shutdown = stop


def _process_ended(pid: int | None = None, **_kwargs: Any) -> None:
    exposition.mark_process_dead(pid or os.getpid())
