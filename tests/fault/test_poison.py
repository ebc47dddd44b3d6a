"""Poison messages among good calls: rejected once, the worker goes on."""

from __future__ import annotations

import re
from typing import Any

import pytest
from kombu.utils.uuid import uuid

from tests.conftest import Worker, wait_for
from tests.fault.conftest import Spawn, exit_code, queue_depth, run_counts, states

pytestmark = pytest.mark.fault

TASK = "tests.collect"

#: How the worker's one error line about a poison message of TASK begins.
#: The one error line per poison message: it names the task, the message's
#: id and the exception.
REJECTED = re.compile(
    r"Received invalid task message: Malformed message for batch task "
    r"tests\.collect\[(?P<id>[^\]]+)\]: (?P<exc>\w+)\("
)


def _headers(worker: Worker, task_id: str, **changes: Any) -> dict[str, Any]:
    """Protocol 2 headers of a call of ``TASK``, as Celery itself writes them."""
    message = worker.app.amqp.as_task_v2(task_id, TASK, args=(1,), kwargs={})
    headers = dict(message.headers)
    headers.update(changes)
    return headers


def _publish(
    worker: Worker,
    body: bytes,
    headers: dict[str, Any],
    content_type: str = "application/json",
) -> None:
    with worker.app.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key=worker.queue,
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            retry=True,
        )


def _poison(worker: Worker) -> dict[str, str]:
    """Publish one message of each kind of poison.

    Returns:
        The id of each message and the error its rejection names.
    """
    kinds: dict[str, str] = {}
    embed = b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
    good_body = b"[[1], {}, " + embed + b"]"

    task_id = uuid()
    _publish(worker, b"{}", _headers(worker, task_id))
    kinds[task_id] = "ValueError"

    task_id = uuid()
    _publish(worker, b"[1]", _headers(worker, task_id))
    kinds[task_id] = "ValueError"

    task_id = uuid()
    _publish(worker, good_body, _headers(worker, task_id, eta="not-a-date"))
    kinds[task_id] = "InvalidTaskError"

    task_id = uuid()
    _publish(
        worker,
        b"\x00\x01\x02",
        _headers(worker, task_id),
        content_type="application/x-celery-batches-unknown",
    )
    kinds[task_id] = "ContentDisallowed"

    task_id = uuid()
    _publish(worker, b"{not json", _headers(worker, task_id))
    kinds[task_id] = "DecodeError"
    return kinds


def _error_lines(log: str) -> list[str]:
    return re.findall(r"^\[[^]]*: (?:ERROR|CRITICAL)/MainProcess\] .*$", log, re.M)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_poison_messages_are_rejected_once_and_good_calls_run_once(
    spawn: Spawn, broker: str
) -> None:
    # given a worker, and its queue holding good calls with poison messages
    # between them: bodies {} and [1], a bad ETA, an unknown content type and
    # a body that is not JSON
    worker = spawn(broker, "prefork")
    task = worker.app.tasks[TASK]
    good = [task.delay(i) for i in range(3)]
    bad = _poison(worker)
    good += [task.delay(i) for i in range(3, 6)]
    good_ids = [r.id for r in good]

    # when the worker has consumed them all
    wait_for(
        lambda: states(worker, good_ids) == ["SUCCESS"] * 6,
        timeout=30,
        what="the good calls to succeed",
    )

    # then every good call ran exactly once
    assert run_counts(worker, good_ids) == dict.fromkeys(good_ids, 1)
    assert [r.result for r in good] == list(range(6))
    # and the worker is still running, every poison message ran never, a
    # FAILURE is stored for it, and the log has one error line for each
    assert worker.process is not None and worker.process.poll() is None
    assert run_counts(worker, bad) == dict.fromkeys(bad, 0)
    failed = dict(zip(bad, states(worker, bad)))
    assert failed == dict.fromkeys(bad, "FAILURE"), {
        bad[i]: state for i, state in failed.items() if state != "FAILURE"
    }
    errors = _error_lines(worker.log())
    rejected = [m for m in map(REJECTED.search, errors) if m is not None]
    assert len(rejected) == len(errors) == len(bad), errors
    named = {m["id"]: m["exc"] for m in rejected}
    assert named == bad, errors
    # and after a warm shutdown no message is left for a later worker: the
    # poison messages were rejected without requeue
    assert exit_code(worker) == 0, worker.log()
    assert queue_depth(worker) == 0
