"""The 0.11 public API: class defaults, decorator options, shared_task, Request."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from celery import Celery, shared_task
from celery.worker.request import Request

from celery_batches import Batches, SimpleRequest
from tests.unit.conftest import FakeWorker, make_message


def test_batches_keeps_the_original_defaults() -> None:
    # given the task class itself, as code written for 0.11 reads it
    assert Batches.abstract is True
    assert Batches.typing is False
    assert Batches.flush_every == 10
    assert Batches.flush_interval == 30


def test_a_body_that_is_not_implemented_says_what_to_write(app: Celery) -> None:
    class Unimplemented(Batches):
        name = "unit.unimplemented"

    task = app.register_task(Unimplemented())
    with pytest.raises(NotImplementedError, match=r"run\(requests\)"):
        task.run([])


def test_flush_outside_a_worker_is_a_clear_error(app: Celery) -> None:
    @app.task(base=Batches, shared=False)
    def body(requests: list[SimpleRequest]) -> None:
        pass

    with pytest.raises(RuntimeError, match="only available in a worker"):
        body.flush([])


def test_shared_task_takes_batch_options(app: Celery) -> None:
    # given a shared batch task with options in the decorator
    @shared_task(base=Batches, flush_every=7, flush_interval=3, acks_late=True)
    def shared_body(requests: list[SimpleRequest]) -> int:
        return len(requests)

    # when an app binds it
    task = app.tasks[shared_body.name]
    # then the options are the task's, and eager calls run it as a batch of one
    assert (task.flush_every, task.flush_interval, task.acks_late) == (7, 3, True)
    assert task.apply((1,)).get() == 1


class RecordingRequest(Request):  # type: ignore[misc]
    """A custom Request class, as users pass with ``Request=``."""

    built: ClassVar[list[str]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordingRequest.built.append(self.id)


def test_a_custom_request_class_is_used_by_the_worker(
    app: Celery, worker: FakeWorker
) -> None:
    # given a batch task declaring its own Request class
    @app.task(
        base=Batches,
        name="unit.custom_request",
        shared=False,
        Request=RecordingRequest,
        flush_every=2,
        flush_interval=60,
    )
    def body(requests: list[SimpleRequest]) -> None:
        pass

    handler = worker.strategy(body)
    RecordingRequest.built.clear()
    # when two calls arrive
    messages = [make_message(app, body.s(i)) for i in range(2)]
    for message in messages:
        worker.deliver(handler, message)
    # then the worker built them with that class and flushed them together
    assert RecordingRequest.built == [m.headers["id"] for m in messages]
    assert worker.pool.ids() == [[m.headers["id"] for m in messages]]
