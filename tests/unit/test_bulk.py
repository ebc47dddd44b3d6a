"""What apply_many repeats of the first call, and what it leaves to Celery."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from celery import Celery

from celery_batches import Batches, SimpleRequest
from celery_batches._compat import MessageCall
from celery_batches.bulk import _replayer

ETA = datetime(2031, 1, 1, tzinfo=timezone.utc)


def _recorded(producer: Any, countdown: float | None) -> list[MessageCall]:
    """What send_task asked of app.amqp for call ``id-1`` of ``replay.work``."""
    return [
        MessageCall(
            "create_task_message",
            ("id-1", "replay.work", (1,), {}, countdown, ETA),
            {},
        ),
        MessageCall("send_task_message", (producer, "replay.work", object()), {}),
    ]


def test_a_countdown_worked_out_from_the_clock_is_not_repeated() -> None:
    # given a batch task
    app = Celery("replay", broker="memory://", set_as_current=False)

    @app.task(base=Batches, name="replay.work", shared=False)
    def work(requests: list[SimpleRequest]) -> None:
        pass

    # (apply_many replays on the task itself, not its lazy proxy)
    task: Any = work._get_current_object()
    producer = object()
    # when send_task turned an eta into a countdown of its own (native
    # delayed delivery on a quorum queue), the first call is not repeated:
    # every call goes through apply_async, with its own countdown
    assert (
        _replayer(task, producer, {"eta": ETA}, _recorded(producer, 12.5), "id-1")
        is None
    )
    # while an eta left as it is, or the caller's own countdown, is
    assert _replayer(task, producer, {"eta": ETA}, _recorded(producer, None), "id-1")
    assert _replayer(task, producer, {"countdown": 12}, _recorded(producer, 12), "id-1")
    app.close()
