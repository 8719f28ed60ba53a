"""The execution side of the hub: Celery app, tasks and the engine that runs a job.

``celery -A worker worker`` finds the app here.
"""

from worker.celery_app import app

__all__ = ["app"]
