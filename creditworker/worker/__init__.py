"""The Celery side: the app, the tasks, the canonical commands and the one-command launcher."""
