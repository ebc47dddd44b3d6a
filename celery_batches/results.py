"""Storing a batch's results in one round trip where the backend allows it."""

from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING, Any

from celery import states
from celery.utils.log import get_logger

if TYPE_CHECKING:
    from celery.backends.base import Backend

    from .request import SimpleRequest

__all__ = ["ResultWriter"]

logger = get_logger(__name__)

#: Stores results as Celery's Redis backend does (``SET`` with ``EX`` when
#: ``ARGV[1]`` is above 0, then ``PUBLISH`` on the key for waiting clients),
#: the values in ``ARGV[3..]`` paired with ``KEYS``. With ``ARGV[2]`` "new",
#: a key that holds a value already is left alone, and returned with that
#: value, for the writer to decide on;
#: with "all", every key is written.
STORE_SCRIPT = """
local ex = tonumber(ARGV[1])
local only_new = ARGV[2] == 'new'
local held = {}
for i, key in ipairs(KEYS) do
  local current = false
  if only_new then
    current = redis.pcall('GET', key)
    if type(current) == 'table' and current.err then
      current = ''
    end
  end
  if current then
    held[#held + 1] = i
    held[#held + 1] = current
  else
    local value = ARGV[i + 2]
    if ex > 0 then
      redis.call('SET', key, value, 'EX', ex)
    else
      redis.call('SET', key, value)
    end
    redis.call('PUBLISH', key, value)
  end
end
return held
"""
_STORE_SHA = hashlib.sha1(STORE_SCRIPT.encode()).hexdigest()

#: Results per script call: a script blocks the Redis server while it runs,
#: so a huge batch is written in slices of this many.
SCRIPT_SLICE = 1000

#: Backends whose server refused the script (scripting disabled or not
#: permitted to this user): they get the pipeline of ``SET`` and ``PUBLISH``.
_without_scripts: weakref.WeakSet[Any] = weakref.WeakSet()


#: The fields of a SUCCESS meta Celery builds without ``result_extended``
#: (5.2 to 5.7): only ``group_id``, ``parent_id`` and ``children`` differ
#: from one call to the next.
_PLAIN_META_FIELDS = frozenset(
    ("status", "result", "traceback", "children", "date_done", "group_id", "parent_id")
)


def _template_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The part of ``meta`` every call of the batch shares, if it is known.

    Celery's ``_get_result_meta`` reads the clock, the timezone and the
    ``result_extended`` setting for every result: a fifth of what storing
    a batch's results costs. The batch's results are written together, so
    they share the first one's ``date_done``. A meta with a field this
    module does not know (``result_extended``, a Celery to come) gets no
    template, and every result is built by Celery. ``meta`` is that of a
    call without children (the caller picks one).
    """
    if not meta.keys() <= _PLAIN_META_FIELDS:
        return None
    return {
        key: value
        for key, value in meta.items()
        if key not in ("group_id", "parent_id")
    }


def _passes(exc: Exception) -> bool:
    """Whether ``exc`` is a moment of the server's, not a refusal of scripts.

    Out of memory (``maxmemory`` with ``noeviction``), a read-only replica
    or a master down during a failover, a busy or misconfigured server, a
    script cache flushed between ``SCRIPT LOAD`` and ``EVALSHA``: the next
    batch may run the script. Any other error answer (``NOPERM``, an
    unknown ``EVALSHA``, a proxy's own refusal) is taken as for good.
    """
    from redis import exceptions

    # Looked up by name: older redis-py releases lack some of them.
    transient = tuple(
        getattr(exceptions, name)
        for name in (
            "OutOfMemoryError",
            "ReadOnlyError",
            "NoScriptError",
            "TryAgainError",
            "ClusterDownError",
        )
        if hasattr(exceptions, name)
    )
    return isinstance(exc, transient) or str(exc).startswith(
        ("BUSY", "MISCONF", "NOREPLICAS")
    )


class ResultWriter:
    """Collects the SUCCESS results of one batch and stores them together.

    On a Redis result backend the batch's results are written by one
    server-side script per thousand results, which stores each result not
    stored yet and announces it as Celery does: one round trip for a batch
    instead of two per request. A result already stored (a redelivered
    call whose first run completed) is read back, and a SUCCESS is never
    overwritten, as Celery itself guarantees. A server that refuses scripts
    gets one ``MGET`` and one pipeline instead. Other backends store each
    result as it is settled.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.pending: list[tuple[SimpleRequest, Any, Any]] = []
        # Built from the batch's first meta, when the rest can copy it.
        self._template: dict[str, Any] | None = None
        self._probed = False

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
        return not request.ignore_result and not request._context_value("chord")

    def add(self, request: SimpleRequest, result: Any) -> None:
        """Keep ``result`` for ``request``, to be stored when the batch ends.

        Raises:
            kombu.exceptions.EncodeError: the result serializer refuses
                ``result``; nothing is kept, and the caller fails the
                request, as Celery fails a task whose result cannot be
                stored.
        """
        backend: Any = self.backend
        encoded = backend.encode_result(result, states.SUCCESS)
        template = self._template
        if template is None or request._context is not None:
            # Celery's own meta; a context already built may carry children.
            meta = backend._get_result_meta(
                result=encoded,
                state=states.SUCCESS,
                traceback=None,
                request=request.context,
            )
            # A call with children (its link callbacks, say) tells nothing
            # of the others: the template comes from the first without.
            if not self._probed and not meta.get("children"):
                self._probed = True
                self._template = _template_of(meta)
        else:
            meta = template.copy()
            meta["result"] = encoded
            meta["children"] = []
            group = request.request_dict.get("group")
            if group:
                meta["group_id"] = group
            parent_id = request.request_dict.get("parent_id")
            if parent_id:
                meta["parent_id"] = parent_id
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
                "Storing %d results in one round trip failed; storing one by one",
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
        values = [value for _, _, value in pending]
        # Here only for a Redis backend, so the client library is installed
        # (a bare install, for RabbitMQ, has none).
        from redis.exceptions import ResponseError

        if backend not in _without_scripts:
            try:
                self._store_by_script(keys, values)
                return
            # The server answered with an error: the pipeline stores this
            # batch. Kept for the worker's life when scripting is disabled
            # on this server or not permitted to this user (a server
            # refusing for another reason only costs speed), but not for an
            # error that passes: one moment out of memory must not cost
            # every later batch its single round trip.
            except ResponseError as exc:
                if _passes(exc):
                    logger.warning(
                        "The Redis result backend failed our script (%s); "
                        "this batch's results are stored with a pipeline",
                        exc,
                    )
                else:
                    _without_scripts.add(backend)
                    logger.warning(
                        "The Redis result backend refused our script (%s); "
                        "results are stored with a pipeline per batch from now on",
                        exc,
                    )
        self._store_by_pipeline(keys, values)

    def _store_by_script(self, keys: list[str], values: list[Any]) -> None:
        expires = int(self.backend.expires or 0)
        held = self._run_sliced(keys, values, expires, "new")
        # A held result that is not a SUCCESS (STARTED, RETRY, a FAILURE of
        # an earlier run) is written over, as Celery writes over it.
        again = [
            (key, value)
            for key, value, current in held
            if not self._is_success(current)
        ]
        if again:
            self._run_sliced(
                [key for key, _ in again], [value for _, value in again], expires, "all"
            )

    def _run_sliced(
        self, keys: list[str], values: list[Any], expires: int, mode: str
    ) -> list[tuple[str, Any, Any]]:
        """Run the script per slice; return ``(key, value, held)`` per key held."""
        backend: Any = self.backend
        held = []
        for start in range(0, len(keys), SCRIPT_SLICE):
            some_keys = keys[start : start + SCRIPT_SLICE]
            some_values = values[start : start + SCRIPT_SLICE]
            # Retried on a lost connection like Celery's own writes: a slice
            # stored before the loss comes back as held SUCCESS, kept as is.
            reply = backend.ensure(
                self._run_script, (some_keys, some_values, expires, mode)
            )
            for index, current in zip(reply[::2], reply[1::2]):
                held.append((some_keys[index - 1], some_values[index - 1], current))
        return held

    def _run_script(
        self, keys: list[str], values: list[Any], expires: int, mode: str
    ) -> list[Any]:
        from redis.exceptions import NoScriptError

        client: Any = self.backend.client
        arguments = (_STORE_SHA, len(keys), *keys, expires, mode, *values)
        try:
            return client.evalsha(*arguments)  # type: ignore[no-any-return]
        # First use on this server, or its script cache was flushed (a
        # restart, a failover): load it and run it again.
        except NoScriptError:
            client.script_load(STORE_SCRIPT)
            return client.evalsha(*arguments)  # type: ignore[no-any-return]

    def _is_success(self, stored: Any) -> bool:
        try:
            meta = self.backend.decode_result(stored)
        # Not a result Celery can read: written over, as a new result.
        except Exception:  # noqa: BLE001
            return False
        return isinstance(meta, dict) and meta.get("status") == states.SUCCESS

    def _store_by_pipeline(self, keys: list[str], values: list[Any]) -> None:
        backend: Any = self.backend
        current = backend.ensure(backend.mget, (keys,))
        expires = backend.expires
        with backend.client.pipeline() as pipe:
            for key, value, stored in zip(keys, values, current):
                if stored is not None and self._is_success(stored):
                    continue
                # SET with EX, not SETEX: redis-py 8 deprecates setex().
                pipe.set(key, value, ex=expires or None)
                pipe.publish(key, value)
            pipe.execute()
