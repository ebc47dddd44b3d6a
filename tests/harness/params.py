"""Parameters of the tests that run on several workers or kinds of queue."""

from __future__ import annotations

from typing import Any

import celery
import pytest

__all__ = [
    "CELERY_VERSION",
    "QUEUE_KINDS",
    "QUORUM",
    "WORKERS",
    "queue_kind",
    "shared_workers",
]

#: (broker, pool) of the shared workers (the ``worker`` fixture), started
#: once per session each.
WORKERS = [
    ("memory", "solo"),
    ("memory", "threads"),
    ("redis", "prefork"),
    ("redis", "solo"),
    ("redis", "gevent"),
    ("rabbitmq", "prefork"),
    ("rabbitmq", "solo"),
    ("rabbitmq", "eventlet"),
]


def shared_workers(*names: str) -> pytest.MarkDecorator:
    """Run a test on some of the shared workers only, e.g. ``"redis-prefork"``.

    Each keeps its session-wide instance: pytest matches parameters by value.
    """
    chosen = [w for w in WORKERS if "-".join(w) in names]
    assert len(chosen) == len(names), f"unknown shared workers in {names}"
    return pytest.mark.parametrize(
        "worker", chosen, ids=["-".join(w) for w in chosen], indirect=True
    )


CELERY_VERSION = tuple(int(part) for part in celery.__version__.split(".")[:2])

#: A worker consuming a quorum queue, as Celery 5.5+ declares one: the
#: default queue of type quorum on a topic exchange (which Celery's native
#: delayed delivery needs for ETA and countdown).
QUORUM = {"task_default_queue_type": "quorum", "task_default_exchange_type": "topic"}

#: (broker, worker settings) of each kind of queue a deployment consumes.
QUEUE_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "rabbitmq-classic": ("rabbitmq", {}),
    "rabbitmq-quorum": ("rabbitmq", QUORUM),
    "redis": ("redis", {}),
}


def queue_kind(kind: str, *values: object) -> Any:
    """A parameter naming a kind of queue (followed by ``values``).

    The quorum kind is skipped before Celery 5.5, which is the first to
    declare quorum queues.
    """
    marks = []
    if kind == "rabbitmq-quorum":
        marks.append(
            pytest.mark.skipif(
                CELERY_VERSION < (5, 5),
                reason="Celery declares quorum queues from 5.5 on",
            )
        )
    label = "-".join([kind, *map(str, values)])
    return pytest.param(kind, *values, id=label, marks=marks)
