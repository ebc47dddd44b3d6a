"""Storing a batch's results in one round trip where the backend allows it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import states
from celery.utils.log import get_logger

if TYPE_CHECKING:
    from celery.backends.base import Backend

    from .request import SimpleRequest

__all__ = ["ResultWriter"]

logger = get_logger(__name__)


class ResultWriter:
    """Collects the SUCCESS results of one batch and stores them together.

    On a Redis result backend the batch's results are written with one
    ``MGET`` (so a result already stored as SUCCESS is never overwritten,
    as Celery itself guarantees) and one pipeline of ``SET`` and
    ``PUBLISH``: two round trips per batch instead of two per request.
    Other backends store each result as it is settled.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.pending: list[tuple[SimpleRequest, Any, Any]] = []

    @classmethod
    def for_backend(cls, backend: Backend) -> ResultWriter | None:
        """Return a writer if ``backend`` can take many results at once."""
        # Celery's Redis backend module imports the redis client, which only
        # the `redis` extra installs: without it, no backend can be Redis's.
        try:
            from celery.backends.redis import RedisBackend
        except ImportError:
            return None

        if isinstance(backend, RedisBackend) and hasattr(backend, "_get_result_meta"):
            return cls(backend)
        return None

    def accepts(self, request: SimpleRequest) -> bool:
        """Whether ``request``'s result can wait for the batch to end.

        Chord members go to the backend at once: the chord counts them
        there.
        """
        return not request.ignore_result and not request.context.chord

    def add(self, request: SimpleRequest, result: Any) -> None:
        """Keep ``result`` for ``request``, to be stored when the batch ends.

        Raises:
            kombu.exceptions.EncodeError: the result serializer refuses
                ``result``; nothing is kept, and the caller fails the
                request, as Celery fails a task whose result cannot be
                stored.
        """
        backend: Any = self.backend
        meta = backend._get_result_meta(
            result=backend.encode_result(result, states.SUCCESS),
            state=states.SUCCESS,
            traceback=None,
            request=request.context,
        )
        meta["task_id"] = request.id
        self.pending.append((request, result, backend.encode(meta)))

    def flush(self) -> None:
        """Store every collected result."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        try:
            self._store_redis(pending)
        # The Redis server, its client library or our pipeline failed: the
        # results are stored one by one instead, as Celery would have.
        except Exception:
            logger.warning(
                "Storing %d results in one pipeline failed; storing one by one",
                len(pending),
                exc_info=True,
            )
            for request, result, _ in pending:
                try:
                    self.backend.mark_as_done(
                        request.id, result, request=request.context
                    )
                # The server is unreachable: nothing more can be done here.
                except Exception:
                    logger.error(
                        "Cannot store the result of %s[%s]",
                        request.name,
                        request.id,
                        exc_info=True,
                    )

    def _store_redis(self, pending: list[tuple[SimpleRequest, Any, Any]]) -> None:
        backend: Any = self.backend
        keys = [backend.get_key_for_task(request.id) for request, _, _ in pending]
        current = backend.ensure(backend.mget, (keys,))
        expires = backend.expires
        with backend.client.pipeline() as pipe:
            for (_, _, value), key, stored in zip(pending, keys, current):
                if stored is not None:
                    meta = backend.decode_result(stored)
                    if meta.get("status") == states.SUCCESS:
                        continue
                # SET with EX, not SETEX: redis-py 8 deprecates setex().
                pipe.set(key, value, ex=expires or None)
                pipe.publish(key, value)
            pipe.execute()
