"""The benchmark of issue 7: the hub end to end against a bare Celery app (``python -m bench``)."""
