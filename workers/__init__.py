"""Celery application, tasks, dispatcher/reconciler and the image pipelines."""
