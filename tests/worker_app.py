"""Entry point of worker subprocesses: ``celery -A tests.worker_app worker``."""

from __future__ import annotations

import json
import os

from tests.app import create_app

app = create_app(
    broker=os.environ["CB_TEST_BROKER"],
    backend=os.environ["CB_TEST_BACKEND"],
    journal=os.environ["CB_TEST_JOURNAL"],
    queue=os.environ["CB_TEST_QUEUE"],
    **json.loads(os.environ.get("CB_TEST_CONF", "{}")),
)
