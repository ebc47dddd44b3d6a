"""Fixtures shared by the test suite; the machinery is in ``tests/harness``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.params import WORKERS
from tests.harness.worker import Worker, Workers, start_worker


@pytest.fixture(scope="session", params=WORKERS, ids=["-".join(w) for w in WORKERS])
def worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    """A worker shared by the tests of one broker and pool."""
    broker, pool = request.param
    with start_worker(broker, pool) as shared:
        yield shared


@pytest.fixture(params=[1, 2], ids=["proto1", "proto2"])
def protocol(request: pytest.FixtureRequest, worker: Worker) -> Iterator[int]:
    """Send the test's calls with task protocol 1, then 2.

    For the tests where decoding matters; the others send protocol 2 only.
    """
    amqp = worker.app.amqp
    previous = worker.app.conf.task_protocol
    # Celery picks the message format once per app (a cached property of
    # app.amqp); forget it so the new protocol takes effect.
    worker.app.conf.task_protocol = request.param
    amqp.__dict__.pop("create_task_message", None)
    yield request.param
    worker.app.conf.task_protocol = previous
    amqp.__dict__.pop("create_task_message", None)


@pytest.fixture
def journal_path(tmp_path: Path) -> str:
    """The journal this test's workers share."""
    return str(tmp_path / "journal")


@pytest.fixture
def workers(journal_path: str) -> Iterator[Workers]:
    """Start workers of this test's own; they are stopped with the test."""
    started = Workers(journal_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def gate(journal_path: str) -> Iterator[Path]:
    """The file that holds the gated tasks' running batches while it exists."""
    path = Path(journal_path + ".gate")
    try:
        yield path
    finally:
        # Lets a child orphaned by a failed test run out of the gate.
        path.unlink(missing_ok=True)
