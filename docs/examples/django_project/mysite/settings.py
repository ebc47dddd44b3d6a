"""Settings of the example project: SQLite for the rows and the results."""

from __future__ import annotations

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# An example's key: set your own, from the environment, in a real project.
SECRET_KEY = "django-insecure-celery-batches-example"
DEBUG = False
ALLOWED_HOSTS: list[str] = []

INSTALLED_APPS = [
    "django_celery_results",
    "events",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",
        # The worker's pool processes and the callers write to one file:
        # wait for the lock rather than fail at once.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# -- Celery (read by mysite/celery.py; the CELERY_ prefix is dropped) --------

CELERY_BROKER_URL = "redis://localhost:6379/0"
# django-celery-results: each call's result is a TaskResult row.
CELERY_RESULT_BACKEND = "django-db"
# Store the task's name and arguments with each result, for the admin.
CELERY_RESULT_EXTENDED = True
