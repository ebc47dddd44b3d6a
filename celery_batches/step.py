"""The consumer bootstep that flushes on shutdown and resets on reconnect."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable

from celery import bootsteps
from celery.bootsteps import CLOSE
from celery.exceptions import InvalidTaskError, WorkerTerminate
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from ._compat import (
    survive_collected_redis_transport,
    ticks_after_ready_callbacks,
    wake_hub_with_pending_callbacks,
)
from .acks import install_group_acks
from .collector import collectors_of
from .control import batches as _register_inspect_batches  # noqa: F401
from .delivery import deliver_in_batches
from .dispatch import inline_pool, uses_processes

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer

__all__ = ["BatchesStep"]

logger = get_logger(__name__)


def _cold_shutdown() -> bool:
    # Celery's SIGQUIT (and second SIGINT) handler sets should_terminate (it
    # may hold 0) when other threads run; in a single-threaded worker it
    # raises WorkerTerminate instead (Celery 5.2), and the worker stops its
    # steps while handling it, so that exception is the one in flight here.
    flag = worker_state.should_terminate
    if flag is not None and flag is not False:
        return True
    return isinstance(sys.exc_info()[1], WorkerTerminate)


def _connected(c: Consumer) -> bool:
    connection = getattr(c, "connection", None)
    if connection is None:
        return False
    try:
        return bool(connection.connected)
    # Asking a connection that went away may fail with the transport's own
    # errors, or with AttributeError once Kombu dropped its client.
    except (AttributeError, OSError, *c.connection_errors):
        return False


def _rejecting_poison(
    c: Consumer, on_decode_error: Callable[[Any, BaseException], Any]
) -> Callable[[Any, BaseException], Any]:
    """Wrap the task consumer's decode-error handler for batch tasks' messages.

    A message Kombu cannot even turn into a message (a body that does not
    decompress, an unknown compression) never reaches a strategy: Celery
    logs it and acks it. For a batch task's message that carries its id,
    it gets what every other poison message gets instead: FAILURE stored,
    and a reject without requeue (to the dead-letter exchange, if any).
    """

    def on_poison(message: Any, exc: BaseException) -> Any:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name, task_id = headers.get("task"), headers.get("id")
        # The headers are what the sender wrote: a task name that is not a
        # string (a list cannot even be looked up) is no batch task's.
        if (
            not isinstance(name, str)
            or name not in collectors_of(c)
            or not isinstance(task_id, str)
            or not task_id
        ):
            return on_decode_error(message, exc)
        error = InvalidTaskError(
            f"Malformed message for batch task {name}[{task_id}]: {exc!r}"
        )
        logger.error("Received invalid task message: %s", error)
        try:
            c.app.tasks[name].backend.mark_as_failure(task_id, error, store_result=True)
        # The result backend is the user's server: failing to store must
        # not keep the message from being rejected.
        except Exception:
            logger.warning("Cannot store failure of %s", task_id, exc_info=True)
        message.reject_log_error(logger, c.connection_errors)
        return None

    return on_poison


class BatchesStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Looks after buffered requests when the consumer stops.

    Added to the worker by :class:`~celery_batches.Batches` itself. On a
    warm shutdown it flushes every buffered request to the pool, which the
    worker then waits for; requests held for an ETA are left unacked, so the
    broker delivers them again. On a broker connection loss it forgets every
    buffered request: their delivery tags died with the channel and the
    broker delivers them again, so running them would run them twice.
    """

    name = "celery_batches.BatchesStep"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Consumer, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._tick: Any = None
        # Steps are made with the consumer, before its first connection:
        # on Redis, that connection delivers many messages per round trip.
        deliver_in_batches(c)

    def start(self, c: Consumer) -> None:
        # Runs after the Tasks step made the task consumer and before the
        # event loop delivers anything on its channel (again after every
        # reconnect, on the new channel).
        task_consumer = getattr(c, "task_consumer", None)
        hub = getattr(c, "hub", None)
        if task_consumer is not None:
            after_acks = None if hub is None else ticks_after_ready_callbacks(hub)
            install_group_acks(task_consumer.channel, c, after_acks)
            survive_collected_redis_transport(task_consumer.channel)
            task_consumer.on_decode_error = _rejecting_poison(
                c, task_consumer.on_decode_error
            )
        if hub is not None and self._tick is None:
            self._tick = wake_hub_with_pending_callbacks(
                hub, lambda: getattr(c, "qos", None)
            )
            if self._tick is not None:
                hub.on_tick.add(self._tick)

    def stop(self, c: Consumer) -> None:
        # Consumer.blueprint.stop() sets CLOSE before it stops the steps;
        # a connection loss restarts the steps with the blueprint running.
        if c.blueprint is not None and c.blueprint.state == CLOSE:
            if _cold_shutdown():
                # A cold shutdown stops the consumer the same way, but
                # promises nothing more runs: the unacked messages go back.
                self._discard(c, "Cold shutdown")
            elif _connected(c):
                self._flush(c)
            else:
                # Shutting down because the broker went away: the messages
                # are unacked and will be delivered again, so running them
                # now would run them twice.
                self._discard(c, "Shutdown after losing the broker")
        else:
            self._discard(c, "Broker connection lost")

    def terminate(self, c: Consumer) -> None:
        # Cold shutdown: run nothing more; unacked messages go back.
        self._discard(c, "Cold shutdown")

    def shutdown(self, c: Consumer) -> None:
        self._discard(c, "Worker shut down")

    @staticmethod
    def _flush(c: Consumer) -> None:
        # The prefork pool no longer takes new jobs once the event loop has
        # stopped (it discards unwritten jobs, as it does for plain tasks),
        # so the last batches run here, in the worker's main process.
        pool = inline_pool() if uses_processes(c.pool) else None
        for name, collector in list(collectors_of(c).items()):
            sent = collector.flush_all("shutdown", pool)
            held = collector.discard_all()
            if sent or held:
                logger.info(
                    "Warm shutdown: flushed %d buffered %s requests; %d "
                    "requests waiting for their ETA go back to the broker",
                    sent,
                    name,
                    held,
                )

    @staticmethod
    def _discard(c: Consumer, why: str) -> None:
        for name, collector in list(collectors_of(c).items()):
            dropped = collector.discard_all()
            if dropped:
                logger.warning(
                    "%s: dropped %d buffered %s requests; the broker will "
                    "deliver them again",
                    why,
                    dropped,
                    name,
                )
