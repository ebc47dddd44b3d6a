"""The test app: its settings, its tasks, and the signals it journals.

Built by :func:`create_app` in the test process (to send calls, and to run
an in-thread worker) and by :mod:`tests.harness.worker_app` in worker
subprocesses, from the same code, so both sides agree on every task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from celery_batches.signals import batch_flushed
from tests.harness.journal import (
    Failure,
    Flush,
    Journal,
    Postrun,
    Prerun,
    Received,
    Retried,
    Revoked,
)
from tests.harness.tasks import Tasks, register_tasks

__all__ = ["create_app", "journal_flushes"]


def create_app(
    *,
    broker: str,
    backend: str,
    journal: str,
    queue: str,
    **conf: Any,
) -> tuple[Celery, Tasks]:
    """Return the test app and its tasks, which record what they run in ``journal``.

    Arguments:
        broker: The broker URL.
        backend: The result backend URL.
        journal: The journal file's path; ``<journal>.gate`` is the gate
            file of the gated tasks.
        queue: The app's default queue.
        conf: Settings over the test app's own.
    """
    app = Celery("batches_tests", broker=broker, backend=backend, set_as_current=False)
    settings: dict[str, Any] = {
        "task_default_queue": queue,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "result_expires": 600,
        "worker_send_task_events": False,
    }
    settings.update(conf)
    app.conf.update(settings)
    log = Journal(journal)
    tasks = register_tasks(app, log, gate=journal + ".gate")
    journal_flushes(app, log)
    _journal_outcomes(app, log)
    _journal_lifecycle(app, log)
    return app, tasks


def journal_flushes(app: Celery, journal: Journal) -> Callable[..., None]:
    """Record every ``batch_flushed`` of ``app``'s tasks in ``journal``.

    Returns:
        The receiver, connected for good unless disconnected from
        ``batch_flushed``.
    """

    @batch_flushed.connect(weak=False)
    def on_flushed(sender: Any, size: int, key: Any, reason: str, **kw: Any) -> None:
        if sender.app is app:
            text = None if key is None else str(key)
            journal.write(Flush(task=sender.name, size=size, reason=reason, key=text))

    return on_flushed


def _journal_outcomes(app: Celery, log: Journal) -> None:
    """Record the failures, revokes and retries Celery signals for ``app``'s calls."""

    @signals.task_failure.connect(weak=False)
    def on_failure(
        sender: Any = None, task_id: str = "", exception: Any = None, **kw: Any
    ) -> None:
        if sender is not None and sender.app is app:
            log.write(Failure(id=task_id, exception=type(exception).__name__))

    @signals.task_revoked.connect(weak=False)
    def on_revoked(sender: Any = None, request: Any = None, **kw: Any) -> None:
        if sender is not None and sender.app is app:
            log.write(Revoked(id=request.id))

    @signals.task_retry.connect(weak=False)
    def on_retry(sender: Any = None, request: Any = None, **kw: Any) -> None:
        if sender is not None and sender.app is app:
            log.write(Retried(id=request.id))


def _journal_lifecycle(app: Celery, log: Journal) -> None:
    """Record the task_received, task_prerun and task_postrun of ``app``'s calls."""

    @signals.task_received.connect(weak=False)
    def on_received(sender: Any = None, request: Any = None, **kw: Any) -> None:
        if request is not None and request.task.app is app:
            log.write(Received(id=request.id))

    @signals.task_prerun.connect(weak=False)
    def on_prerun(sender: Any = None, task_id: str = "", **kw: Any) -> None:
        if sender is not None and sender.app is app:
            log.write(Prerun(id=task_id, task=sender.name))

    @signals.task_postrun.connect(weak=False)
    def on_postrun(
        sender: Any = None, task_id: str = "", state: str = "", **kw: Any
    ) -> None:
        if sender is not None and sender.app is app:
            log.write(Postrun(id=task_id, task=sender.name, state=state))
