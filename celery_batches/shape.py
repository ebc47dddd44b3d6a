"""Checking that a received call has the shape of a task call, before it waits.

Celery's default strategy hands a message to the pool as it is, and a body
of the wrong shape fails there, in one task. A batch call waits in the
worker's main process and is unpacked again when its batch is flushed, so
a wrong shape must be found on arrival: later it would fail the batch, or
the worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._compat import message_options

if TYPE_CHECKING:
    from celery.worker.request import Request

__all__ = ["check_shape"]

#: Options of a call that hold a list of signatures (mappings), or None.
_SIGNATURE_LISTS = ("callbacks", "errbacks", "chain")


def check_shape(request: Request) -> None:
    """Raise ``TypeError`` if ``request`` is not shaped as a task call.

    The task id must be a non-empty string and ``stamped_headers`` a list
    of strings. The body must be ``[args, kwargs, options]``: ``args`` a
    list or tuple, ``kwargs`` a mapping, and ``options``
    (the third part of a protocol 2 body) ``None`` or a mapping whose
    ``callbacks``, ``errbacks`` and ``chain`` are lists of signatures and
    whose ``chord`` is a signature.
    """
    task_id = request.id
    if not isinstance(task_id, str) or not task_id:
        # The buffer, the revoked set and the result backend all key calls
        # by id: None, "" or a number would fail in each of them later.
        raise TypeError(f"the task id must be a non-empty string, got {task_id!r:.80}")
    stamped = request.request_dict.get("stamped_headers")
    if stamped is not None and not (
        isinstance(stamped, (list, tuple))
        and all(isinstance(name, str) for name in stamped)
    ):
        # Celery's revoke check walks them, and looks each up in a dict.
        raise TypeError(
            f"stamped_headers must be a list of header names, got {stamped!r:.80}"
        )
    stamps = request.request_dict.get("stamps")
    if stamps is not None and not isinstance(stamps, dict):
        raise TypeError(f"stamps must be a mapping, got {stamps!r:.80}")
    args, kwargs = request.args, request.kwargs
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise TypeError(
            "args must be a list and kwargs a mapping, got "
            f"{type(args).__name__} and {type(kwargs).__name__}"
        )
    options = message_options(request)
    if not options:
        return
    if not isinstance(options, dict):
        raise TypeError(
            "the options part of the body (callbacks, errbacks, chain, "
            f"chord) must be a mapping, got {type(options).__name__}"
        )
    for name in _SIGNATURE_LISTS:
        value = options.get(name)
        if value is not None and not _signatures(value):
            raise TypeError(f"{name} must be a list of signatures, got {value!r:.80}")
    chord = options.get("chord")
    if chord is not None and not isinstance(chord, Mapping):
        raise TypeError(f"chord must be a signature, got {chord!r:.80}")


def _signatures(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(item, Mapping) for item in value
    )
