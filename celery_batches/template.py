"""The message of a bulk call on Redis, from the message of the call before it.

Within one ``apply_many``, Celery's task message (protocol 2) and Kombu's
Redis envelope around it differ from one call to the next only in what the
call brings: its id (``id``, ``root_id`` when it defaults to the id,
``correlation_id``), ``argsrepr``, ``kwargsrepr``, the serialized
``(args, kwargs, embed)`` body, and Kombu's delivery tag. A
:class:`Template` learns the rest from two messages Celery and Kombu built
themselves, and renders the next calls' messages with only those fields
replaced, each computed by the functions Celery and Kombu use (Celery's
``saferepr`` with its size limits, Kombu's serializer registry and body
encoding). It is only learnt if rendering the second of those calls gives,
field for field, the message Celery and Kombu built for it, and the two
messages differ in nothing else: a Celery that adds a field per call, or
fills one from the clock (a ``countdown``), gets no template, and every call
keeps being built by Celery.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from celery.utils.saferepr import saferepr
from kombu.serialization import dumps, registry

__all__ = ["PER_CALL_HEADERS", "Template", "flat_repr", "uuid4_strings"]

#: The headers of a protocol 2 task message that change from call to call.
PER_CALL_HEADERS = frozenset({"id", "root_id", "argsrepr", "kwargsrepr"})
#: Kombu's envelope: its keys, and those of its properties (Redis, 5.2-5.7).
_ENVELOPE = frozenset(
    {"body", "content-encoding", "content-type", "headers", "properties"}
)
_PER_CALL_PROPERTIES = frozenset({"correlation_id", "delivery_tag"})


def uuid4_strings(count: int) -> list[str]:
    """``count`` strings as ``str(uuid.uuid4())`` makes them, in one go.

    Random version 4 UUIDs, from one read of ``os.urandom`` (as
    ``uuid4()`` reads 16 bytes per call), formatted without making a
    ``UUID`` object for each: a fifth of the cost.
    """
    raw = bytearray(os.urandom(16 * count))
    out = []
    for start in range(0, 16 * count, 16):
        raw[start + 6] = (raw[start + 6] & 0x0F) | 0x40  # version 4
        raw[start + 8] = (raw[start + 8] & 0x3F) | 0x80  # RFC 4122 variant
        text = raw[start : start + 16].hex()
        out.append(f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}")
    return out


def _tags(batch: int = 1000) -> Iterator[str]:
    while True:
        yield from uuid4_strings(batch)


#: Scalars whose ``saferepr`` is ``str()`` (Celery formats numbers so).
_NUMBERS = (int, float, bool)


def _scalar(value: Any) -> str | None:
    """``saferepr`` of a number, a string or ``None``; ``None`` for others."""
    kind = type(value)
    if kind in _NUMBERS:
        return str(value)
    if kind is str:
        # saferepr's own quoting (not repr's): single quotes, escaped.
        text: str = value
        return "'" + text.replace("'", "\\'") + "'"
    if value is None:
        return "None"
    return None


def flat_repr(value: Any, limit: int) -> str | None:
    """``saferepr(value, limit)`` for flat arguments, quickly; else ``None``.

    Celery represents every call's arguments with its streaming
    ``saferepr``, the costliest part of building a message. For the usual
    arguments (a tuple, list or dict of numbers, strings and ``None``, one
    level deep, well within ``limit``) this writes the same text directly;
    for anything else it gives up, and ``saferepr`` itself is used.
    ``tests/unit/test_template.py`` holds the two equal with hypothesis.
    """
    kind = type(value)
    if kind is dict:
        parts = []
        for key, item in value.items():
            key_text, item_text = _scalar(key), _scalar(item)
            if key_text is None or item_text is None:
                return None
            parts.append(f"{key_text}: {item_text}")
        text = "{" + ", ".join(parts) + "}"
    elif kind is tuple or kind is list:
        parts = []
        for item in value:
            item_text = _scalar(item)
            if item_text is None:
                return None
            parts.append(item_text)
        inner = ", ".join(parts)
        if kind is list:
            text = "[" + inner + "]"
        elif len(parts) == 1:
            text = "(" + inner + ",)"
        else:
            text = "(" + inner + ")"
    else:
        return None
    # Well within the limit: saferepr would not have cut anything short.
    return text if len(text) < limit // 2 else None


def _repr(limit: int, conf: Any) -> Callable[[Any], str]:
    maxlevels = conf.get("task_repr_maxlevels")

    def represent(value: Any) -> str:
        text = flat_repr(value, limit)
        if text is not None:
            return text
        if maxlevels is None:  # Celery < 5.6 has no such setting
            return saferepr(value, limit)  # type: ignore[no-any-return]
        return saferepr(value, limit, maxlevels=maxlevels)  # type: ignore[no-any-return]

    return represent


class Template:
    """Renders a call's Redis message like the one it was learnt from."""

    def __init__(
        self,
        *,
        message: Mapping[str, Any],
        embed: Any,
        serializer: str,
        encode_body: Callable[[bytes, str | None], tuple[Any, Any]],
        argsrepr: Callable[[Any], str],
        kwargsrepr: Callable[[Any], str],
        root_is_id: bool,
    ) -> None:
        self._message = dict(message)
        self._headers = dict(message["headers"])
        self._properties = dict(message["properties"])
        self._info = self._properties["delivery_info"]
        self._body_encoding = self._properties.get("body_encoding")
        self._embed = embed
        self._serializer = serializer
        self._encode_body = encode_body
        self._argsrepr = argsrepr
        self._kwargsrepr = kwargsrepr
        self._root_is_id = root_is_id
        # Kombu gives each message a uuid4 delivery tag; so does this.
        self._next_tag = _tags().__next__

    def render(
        self, task_id: str, args: Any, kwargs: Any, delivery_tag: str | None = None
    ) -> dict[str, Any]:
        """The message of the call ``task_id`` with ``args`` and ``kwargs``."""
        headers = dict(self._headers)
        headers["id"] = task_id
        if self._root_is_id:
            headers["root_id"] = task_id
        # as_task_v2 represents what it was given, before the serializer.
        headers["argsrepr"] = self._argsrepr(args)
        headers["kwargsrepr"] = self._kwargsrepr(kwargs)
        properties = dict(self._properties)
        properties["correlation_id"] = task_id
        properties["delivery_tag"] = delivery_tag or self._next_tag()
        properties["delivery_info"] = dict(self._info)
        body = (args, kwargs, self._embed)
        _, _, data = dumps(body, serializer=self._serializer)  # type: ignore[no-untyped-call]
        encoded, _ = self._encode_body(data, self._body_encoding)
        message = dict(self._message)
        message["body"] = encoded
        message["headers"] = headers
        message["properties"] = properties
        return message

    @classmethod
    def learn(
        cls,
        *,
        first: Mapping[str, Any],
        second: Mapping[str, Any],
        call: tuple[str, Any, Any],
        embed: Any,
        amqp: Any,
        encode_body: Callable[[bytes, str | None], tuple[Any, Any]],
    ) -> Template | None:
        """A template from the messages of two calls, or ``None`` if unsafe.

        Arguments:
            first: the Redis message (Kombu's envelope, as handed to its
                ``_put``) of one call.
            second: that of the call after it; ``call`` is its
                ``(task_id, args, kwargs)`` and ``embed`` the third part of
                its body.
            amqp: the app's ``amqp``, whose size limits ``argsrepr`` takes.
            encode_body: the channel's ``encode_body``.
        """
        if set(first) != _ENVELOPE or set(second) != _ENVELOPE:
            return None
        headers, first_headers = second["headers"], first["headers"]
        properties = second["properties"]
        if (
            not isinstance(headers, Mapping)
            or not isinstance(first_headers, Mapping)
            or "compression" in headers
            or not set(headers) >= PER_CALL_HEADERS
            or set(headers) != set(first_headers)
            or not isinstance(properties, Mapping)
            or not isinstance(properties.get("delivery_info"), Mapping)
        ):
            return None
        changed = {k for k in headers if headers[k] != first_headers[k]}
        changed_properties = {
            k for k in properties if properties[k] != first["properties"].get(k)
        }
        if not changed <= PER_CALL_HEADERS or not (
            changed_properties <= _PER_CALL_PROPERTIES
        ):
            # Something else differs per call (the clock): Celery builds each.
            return None
        serializer = registry.type_to_name.get(second["content-type"])
        if serializer is None:
            return None
        task_id, args, kwargs = call
        conf = amqp.app.conf
        template = cls(
            message=second,
            embed=embed,
            serializer=serializer,
            encode_body=encode_body,
            argsrepr=_repr(amqp.argsrepr_maxsize, conf),
            kwargsrepr=_repr(amqp.kwargsrepr_maxsize, conf),
            root_is_id=headers["root_id"] == task_id,
        )
        rendered = template.render(task_id, args, kwargs, properties["delivery_tag"])
        return template if rendered == second else None
