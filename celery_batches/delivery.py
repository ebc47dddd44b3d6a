"""Choosing the Redis transport that delivers many messages per round trip.

A worker that runs batch tasks on Redis (``redis://``, ``rediss://`` or
``sentinel://``) consumes through :mod:`celery_batches.redis_transport`
unless the ``batches_redis_delivery`` setting is ``False`` or
``broker_transport`` names a transport of its own. The user's URL and
transport options stay as they are: only the class behind them changes,
for the connections of this worker's consumer (and of
:func:`~celery_batches.bulk.apply_many`'s publishing on Redis).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from celery.utils.log import get_logger

from ._compat import transport_created
from .errors import InvalidBatchSetting

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer
    from kombu.connection import Connection

__all__ = [
    "BATCH_TRANSPORTS",
    "batch_delivery_enabled",
    "batch_transport",
    "deliver_in_batches",
    "use_batch_transport",
]

logger = get_logger(__name__)

#: Kombu's aliases of its Redis transports, and ours for each.
BATCH_TRANSPORTS = {
    "redis": "celery_batches.redis_transport:Transport",
    "rediss": "celery_batches.redis_transport:Transport",
    "sentinel": "celery_batches.redis_transport:SentinelTransport",
}

UNSUPPORTED = (
    "celery_batches: this Kombu lacks what batch delivery on Redis relies "
    "on; the worker consumes one message per round trip, as Kombu does"
)


def batch_delivery_enabled(conf: Any) -> bool:
    """Return the ``batches_redis_delivery`` setting of an app's ``conf``.

    Raises:
        InvalidBatchSetting: if it is neither ``True`` nor ``False``.
    """
    value = conf.get("batches_redis_delivery", True)
    if value is None:
        return True
    if not isinstance(value, bool):
        raise InvalidBatchSetting(
            "worker", "batches_redis_delivery", value, "must be True or False"
        )
    return value


def batch_transport(connection: Connection) -> str | None:
    """Return our transport for ``connection``, or ``None`` to keep its own.

    Only a connection on one of Kombu's Redis transports, named by its
    alias (the URL's scheme, or ``broker_transport = "redis"``), is
    switched; a transport class given by the user is theirs.
    """
    name = connection.transport_cls
    if not isinstance(name, str) or name not in BATCH_TRANSPORTS:
        return None
    # Imported here: it needs redis-py, which only a Redis broker needs.
    from .redis_transport import supported

    if not supported():
        logger.warning(UNSUPPORTED)
        return None
    return BATCH_TRANSPORTS[name]


def use_batch_transport(connection: Connection) -> bool:
    """Switch the not yet connected ``connection`` to our Redis transport.

    Returns:
        ``True`` if it now uses ours (or did already).
    """
    if connection.transport_cls in BATCH_TRANSPORTS.values():
        return True
    transport = batch_transport(connection)
    if transport is None or transport_created(connection):
        return False
    connection.transport_cls = transport
    return True


def deliver_in_batches(consumer: Consumer) -> None:
    """Let ``consumer``'s broker connections deliver in batches on Redis.

    Celery's consumer makes each connection (the first, and one per
    reconnect) lazily and hands it to ``ensure_connected`` to connect it:
    that is where the transport is switched, before it exists.
    """
    if not batch_delivery_enabled(consumer.app.conf):
        return
    ensure_connected: Callable[..., Any] = consumer.ensure_connected

    def ensure_batch_connected(
        connection: Connection, *args: Any, **kwargs: Any
    ) -> Any:
        use_batch_transport(connection)
        return ensure_connected(connection, *args, **kwargs)

    consumer.ensure_connected = ensure_batch_connected
