"""The project's Celery app: settings from Django's, tasks from each app."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

app = Celery("mysite")
# Every CELERY_* setting in mysite/settings.py, e.g. CELERY_BROKER_URL.
app.config_from_object("django.conf:settings", namespace="CELERY")
# Imports tasks.py of each installed app when the worker starts, which
# registers events.tasks.record_event and the worker's batching step.
app.autodiscover_tasks()
