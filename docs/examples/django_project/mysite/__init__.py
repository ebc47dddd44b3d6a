"""The example project: its Celery app is loaded with Django, for shared_task."""

from __future__ import annotations

from .celery import app as celery_app

__all__ = ["celery_app"]
