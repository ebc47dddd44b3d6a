"""Task handler methods and log lines, per call, as Celery gives a plain task."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
from celery import Celery, states

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import run_batch
from tests.unit.test_trace import calls, result_of


class Recording(Batches):
    """A batch task class that records each handler call."""

    abstract = True
    seen: ClassVar[list[tuple[Any, ...]]] = []

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        self.seen.append(("before_start", task_id, len(args[0])))

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        self.seen.append(("on_success", task_id, retval, tuple(args)))

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        self.seen.append(("on_failure", task_id, type(exc).__name__, einfo is not None))

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        self.seen.append(("on_retry", task_id))

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Any,
        kwargs: Any,
        einfo: Any,
    ) -> None:
        self.seen.append(("after_return", task_id, status))


def recording_task(app: Celery, body: Any, **options: Any) -> Any:
    Recording.seen = []
    name = f"unit.handlers.{id(body)}"
    app.task(base=Recording, name=name, shared=False, **options)(body)
    return app.tasks[name]


def test_each_call_gets_its_own_handlers_with_its_id_args_and_outcome(
    app: Celery,
) -> None:
    # given a per_request_results body answering 1 and failing 2
    def body(requests: list[SimpleRequest]) -> list[Any]:
        return [r.args[0] if r.args[0] != 2 else KeyError(2) for r in requests]

    task = recording_task(app, body, per_request_results=True)
    one, two = calls(task, 1, 2)
    # when the batch runs
    run_batch(task, [one, two])
    # then before_start ran once for the batch, and each call got the
    # handlers of its own outcome, with its own id and args
    seen = Recording.seen
    assert seen[0][0] == "before_start" and seen[0][2] == 2
    assert ("on_success", one.id, 1, (1,)) in seen
    assert ("after_return", one.id, states.SUCCESS) in seen
    assert ("on_failure", two.id, "KeyError", True) in seen
    assert ("after_return", two.id, states.FAILURE) in seen
    assert len(seen) == 5


def test_a_retried_call_gets_on_retry_and_no_after_return(app: Celery) -> None:
    # given a body that retries its one call
    def body(requests: list[SimpleRequest]) -> None:
        requests[0].retry(countdown=60)

    task = recording_task(app, body)
    (call,) = calls(task, 1)
    run_batch(task, [call])
    # then, as for a plain task, on_retry runs and after_return does not
    assert [entry[0] for entry in Recording.seen] == ["before_start", "on_retry"]


def test_a_handler_that_raises_is_logged_and_the_call_keeps_its_outcome(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    class Raising(Batches):
        abstract = True

        def on_success(self, *args: Any) -> None:
            raise RuntimeError("handler broke")

    def body(requests: list[SimpleRequest]) -> list[Any]:
        return [r.args[0] for r in requests]

    name = "unit.handlers.raising"
    app.task(base=Raising, name=name, shared=False, per_request_results=True)(body)
    task = app.tasks[name]
    (call,) = calls(task, 7)
    with caplog.at_level(logging.ERROR):
        run_batch(task, [call])
    assert result_of(app, call) == (states.SUCCESS, 7)
    assert "on_success handler raised" in caplog.text


def test_each_call_is_logged_as_celery_logs_a_task(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    # given a batch whose body answers 1, fails 2 and retries 3
    def body(requests: list[SimpleRequest]) -> None:
        for r in requests:
            if r.args[0] == 1:
                r.mark_as_done("one")
            elif r.args[0] == 2:
                r.mark_as_failure(ValueError("two"))
            else:
                r.retry(countdown=60)

    task = batch_task_named(app, body)
    one, two, three = calls(task, 1, 2, 3)
    # when it runs with Celery's tracer logger at INFO
    with caplog.at_level(logging.INFO, logger="celery_batches.calls"):
        run_batch(task, [one, two, three])
    lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "celery_batches.calls"
    ]
    # then each call has Celery's own line, at Celery's level, with its id
    assert any(
        level == logging.INFO
        and f"Task {task.name}[{one.id}] succeeded in " in text
        and text.endswith(": 'one'")
        for level, text in lines
    ), lines
    assert (
        logging.ERROR,
        f"Task {task.name}[{two.id}] raised unexpected: ValueError('two')",
    ) in lines
    assert any(
        level == logging.INFO
        and text.startswith(f"Task {task.name}[{three.id}] retry:")
        for level, text in lines
    ), lines


def test_a_body_that_raises_logs_each_call_with_its_traceback(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    def body(requests: list[SimpleRequest]) -> None:
        raise ValueError("boom")

    task = batch_task_named(app, body)
    requests = calls(task, 1, 2, 3)
    with caplog.at_level(logging.ERROR, logger="celery_batches.calls"):
        run_batch(task, requests)
    failed = [r for r in caplog.records if r.name == "celery_batches.calls"]
    assert [r.getMessage() for r in failed] == [
        f"Task {task.name}[{r.id}] raised unexpected: ValueError('boom')"
        for r in requests
    ]
    assert [r.exc_info is not None for r in failed] == [True, True, True]


def batch_task_named(app: Celery, body: Any, **options: Any) -> Any:
    name = f"unit.handlers.logged.{id(body)}"
    app.task(base=Batches, name=name, shared=False, **options)(body)
    return app.tasks[name]
