"""Prometheus metrics: what the workers did (counters and histograms, recorded where it
happens) and what the database and the broker hold (read at scrape time).

- `instruments`: the metric objects, their names and labels (never a user id: low
  cardinality). The worker's task bodies record into them.
- `state`: a collector that reads outbox lag, dead letters, expiring credits and queue depth
  when Prometheus scrapes, so nothing polls in between.
- `exposition`: the registry a process serves (its own, or every pool process's under
  `PROMETHEUS_MULTIPROC_DIR`) and the worker's metrics HTTP server.

The engine knows nothing of this package: its edges (worker tasks, gateway) record.
"""
