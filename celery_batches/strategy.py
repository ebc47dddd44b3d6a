"""The worker-side message handler of a batch task."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from celery import signals
from celery.app import trace as app_trace
from celery.exceptions import InvalidTaskError
from celery.utils.imports import symbol_by_name
from celery.utils.log import get_logger
from celery.utils.time import timezone
from celery.worker.request import create_request_cls
from celery.worker.state import task_reserved
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.asynchronous.timer import to_timestamp
from kombu.exceptions import KombuError

from .collector import BatchCollector, worker_batches
from .shape import check_shape

if TYPE_CHECKING:
    from celery import Celery
    from celery.worker.consumer import Consumer
    from kombu.message import Message

    from .types import BatchTask

__all__ = ["batches_strategy"]

logger = get_logger(__name__)

#: The exceptions a malformed message raises while Celery decodes it:
#: Kombu's (an unknown content type, a body that does not decode) and those
#: of unpacking a body of the wrong shape. RecursionError: a JSON body
#: nested deeper than the interpreter's stack.
_MALFORMED = (
    KombuError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    RecursionError,
)

INTERNAL_ERROR = (
    "celery_batches: internal error while receiving a %s message; "
    "the message is rejected. Please report this with the traceback."
)

STEP_MISSING = (
    "celery_batches: the worker has no BatchesStep; buffered %s requests "
    "will not be flushed on shutdown or dropped on reconnect. Import the "
    "task module before the worker starts."
)


def _fail_malformed(
    task: BatchTask, message: Message, body: Any, exc: BaseException
) -> InvalidTaskError:
    """Store FAILURE for a message we cannot decode, if its id is known."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id")
    if task_id is None:
        # Protocol 1 keeps the id in the body.
        payload = body if isinstance(body, dict) else _payload_or_none(message)
        if isinstance(payload, dict):
            task_id = payload.get("id")
    error = InvalidTaskError(
        f"Malformed message for batch task {task.name}[{task_id}]: {exc!r}"
    )
    if isinstance(task_id, str) and task_id:
        try:
            task.backend.mark_as_failure(task_id, error, store_result=True)
        # The result backend is the user's server: failing to store must not
        # keep the message from being rejected.
        except Exception:
            logger.warning("Cannot store failure of %s", task_id, exc_info=True)
    return error


def _store_failure(task: BatchTask, request: Any, exc: BaseException) -> None:
    try:
        task.backend.mark_as_failure(
            request.id, exc, request=request._context, store_result=request.store_errors
        )
    # The result backend is the user's server: failing to store must not
    # keep the message from being rejected.
    except Exception:
        logger.warning("Cannot store failure of %s", request.id, exc_info=True)


def _payload_or_none(message: Message) -> Any:
    try:
        return message.payload
    # Decoding runs the serializer, which may be one the user registered:
    # a body it cannot decode has no id to store a failure under.
    except Exception:  # noqa: BLE001
        return None


# One closure per task, as Celery's own strategy: the per-message path reads
# locals bound once, and splitting it up would cost a call per message.
def batches_strategy(  # noqa: C901
    task: BatchTask, app: Celery, consumer: Consumer
) -> Callable[..., None]:
    """Return the function the worker calls with each message of ``task``.

    Messages are decoded exactly as Celery's default strategy does; instead
    of going to the pool one by one, requests wait in the task's buffer.
    """
    hostname = consumer.hostname
    connection_errors = consumer.connection_errors
    _does_info = logger.isEnabledFor(logging.INFO)
    eventer = consumer.event_dispatcher
    task_sends_events = eventer and eventer.enabled and task.send_events
    send_event = eventer and eventer.send
    to_system_tz = timezone.to_system
    # Celery asks this per message, but app.timezone is a cached property:
    # the answer cannot change while the worker runs.
    utc_timezone = app.uses_utc_timezone()
    revoked_tasks = consumer.controller.state.revoked
    Req = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, hostname, eventer, app=app
    )
    info = logger.info
    log_received = app_trace.LOG_RECEIVED
    task_received = signals.task_received

    batches = worker_batches(consumer, app)
    collector = batches.collectors.get(task.name)
    if collector is None:
        collector = batches.collectors[task.name] = BatchCollector(
            task, consumer, consumer.pool
        )
    batches.prepare_window(consumer)
    add = collector.add
    hold = collector.hold
    key_of = collector.key_of
    probe_key = collector.probe_key
    if "celery_batches.BatchesStep" not in consumer.blueprint.steps:
        logger.warning(STEP_MISSING, task.name)

    # This runs once per message: everything above is bound to locals so
    # the per-message path does only the decoding Celery itself does.
    def task_message_handler(  # noqa: C901
        message: Message,
        body: Any,
        ack: Any,
        reject: Any,
        callbacks: Any,
        to_timestamp: Callable[..., float] = to_timestamp,
    ) -> None:
        raw_body = body
        try:
            if body is None and "args" not in message.payload:
                body, headers, decoded, utc = (
                    message.body,
                    message.headers,
                    False,
                    utc_timezone,
                )
            elif "args" in message.payload:
                body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
            else:
                body, headers, decoded, utc = proto1_to_proto2(message, body)
            req = Req(
                message,
                on_ack=ack,
                on_reject=reject,
                app=app,
                hostname=hostname,
                eventer=eventer,
                task=task,
                connection_errors=connection_errors,
                body=body,
                headers=headers,
                decoded=decoded,
                utc=utc,
            )
            check_shape(req)
        except InvalidTaskError as exc:
            # Celery's own checks (bad ETA string, bad expires): the
            # consumer rejects the message; store the failure first.
            raise _fail_malformed(task, message, raw_body, exc) from exc
        except _MALFORMED as exc:
            # A body like ``{}`` or ``[1]`` makes Celery's default strategy
            # raise out of the consumer and stop the worker; turn it into
            # InvalidTaskError so the consumer rejects it and goes on.
            raise _fail_malformed(task, message, raw_body, exc) from exc
        except Exception as exc:
            # Not a shape we know to be malformed: a bug of ours, or of
            # Celery's, that this message found. Say so loudly, with the
            # traceback, but reject only this message and keep the worker.
            logger.critical(INTERNAL_ERROR, task.name, exc_info=True)
            raise _fail_malformed(task, message, raw_body, exc) from exc

        if key_of is None:
            key = None
        else:
            try:
                key = key_of(req)
                # Buffers are keyed by it: a key that cannot be hashed (a
                # list from the message, say), or compared with the keys
                # waiting already, must fail here, inside the guard.
                probe_key(key)
            # The user's batch_key runs here: whatever it raises, or a key
            # that cannot be hashed, rejects this message only.
            except Exception as exc:
                raise _fail_malformed(task, message, raw_body, exc) from exc

        eta = req.eta
        if eta:
            # Before anything is announced: a call whose ETA cannot be
            # converted is poison, which gets no signal.
            try:
                when = (
                    to_timestamp(to_system_tz(eta))
                    if req.utc
                    else to_timestamp(eta, app.timezone)
                )
            except (OverflowError, ValueError) as exc:
                logger.error(
                    "Couldn't convert ETA %r to timestamp: %r. Task: %r",
                    eta,
                    exc,
                    req.info(safe=True),
                )
                _store_failure(task, req, exc)
                req.reject(requeue=False)
                return

        if _does_info:
            context = {
                "id": req.id,
                "name": req.name,
                "args": req.argsrepr,
                "kwargs": req.kwargsrepr,
                "eta": req.eta,
            }
            info(log_received, context, extra={"data": context})
        if (req.expires or req.id in revoked_tasks) and req.revoked():
            return

        if task_received.receivers:
            task_received.send(sender=consumer, request=req)

        if task_sends_events:
            send_event(
                "task-received",
                uuid=req.id,
                name=req.name,
                args=req.argsrepr,
                kwargs=req.kwargsrepr,
                root_id=req.root_id,
                parent_id=req.parent_id,
                retries=req.request_dict.get("retries", 0),
                eta=req.eta and req.eta.isoformat(),
                expires=req.expires and req.expires.isoformat(),
            )

        if eta:
            hold(req, when, key)
            return

        task_reserved(req)
        if callbacks:
            for callback in callbacks:
                callback(req)
        add(req, key)

    return task_message_handler
