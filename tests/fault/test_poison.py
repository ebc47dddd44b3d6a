"""Poison messages among good calls: rejected once, the worker goes on."""

from __future__ import annotations

import re
from typing import Any

import pytest
from kombu.utils.uuid import uuid

from tests.harness.client import RawMessage
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, Workers

pytestmark = pytest.mark.fault

#: The one error line per poison message of ``tests.collect``: it names the
#: task, the message's id and the exception.
REJECTED = re.compile(
    r"Received invalid task message: Malformed message for batch task "
    r"tests\.collect\[(?P<id>[^\]]+)\]: (?P<exc>\w+)\("
)


def _poison(worker: Worker) -> dict[str, str]:
    """Publish one message of each kind of poison, as calls of ``tests.collect``.

    Returns:
        The id of each message and the error its rejection names.
    """
    collect = worker.tasks.collect
    embed = b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
    good_body = b"[[1], {}, " + embed + b"]"
    kinds: dict[str, str] = {}

    def poison(
        error: str, body: bytes, content_type: str = "application/json", **headers: Any
    ) -> None:
        task_id = uuid()
        headers = worker.headers(collect, task_id, **headers)
        worker.publish(RawMessage(body, headers, content_type))
        kinds[task_id] = error

    poison("ValueError", b"{}")
    poison("ValueError", b"[1]")
    poison("InvalidTaskError", good_body, eta="not-a-date")
    poison(
        "ContentDisallowed",
        b"\x00\x01\x02",
        content_type="application/x-celery-batches-unknown",
    )
    poison("DecodeError", b"{not json")
    return kinds


def _error_lines(log: str) -> list[str]:
    return re.findall(r"^\[[^]]*: (?:ERROR|CRITICAL)/MainProcess\] .*$", log, re.M)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_poison_messages_are_rejected_once_and_good_calls_run_once(
    workers: Workers, broker: str
) -> None:
    # given a worker, and its queue holding good calls with poison messages
    # between them: bodies {} and [1], a bad ETA, an unknown content type and
    # a body that is not JSON
    worker = workers.start(broker, "prefork")
    task = worker.tasks.collect
    good = [task.delay(i) for i in range(3)]
    bad = _poison(worker)
    good += [task.delay(i) for i in range(3, 6)]
    good_ids = [r.id for r in good]

    # when the worker has consumed them all
    wait_for(
        lambda: worker.states(good_ids) == ["SUCCESS"] * 6,
        timeout=30,
        what="the good calls to succeed",
    )

    # then every good call ran exactly once
    assert worker.run_counts(good_ids) == dict.fromkeys(good_ids, 1)
    assert [r.result for r in good] == list(range(6))
    # and the worker is still running, every poison message ran never, a
    # FAILURE is stored for it, and the log has one error line for each
    assert worker.process is not None and worker.process.poll() is None
    assert worker.run_counts(bad) == dict.fromkeys(bad, 0)
    failed = dict(zip(bad, worker.states(bad)))
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
    assert worker.exit() == 0, worker.log()
    assert worker.queue_depth() == 0
