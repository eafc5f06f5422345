"""Signed webhooks (Standard Webhooks) for consumers that have no broker: endpoints,
signing, sealed secrets, the addresses deliveries may go to, the retry schedule and the
sender. The SQL behind them is `records.webhooks`; the Celery task is a few lines in
`worker/tasks.py`. See docs/webhooks.md."""
