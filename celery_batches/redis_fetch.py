"""The server side of batch delivery on Redis: one script pops many messages.

Kombu's Redis transport takes one message per ``BRPOP`` and records it as
unacked with a second round trip. :data:`FETCH_SCRIPT` does both for up to
``count`` messages in one call: it pops them in the order Kombu's ``BRPOP``
would (priority level first, then the queues in the consumer's rotating
order), and writes each to the transport's unacked hash and index, in the
same format Kombu writes, before it returns. A script runs atomically, so
a message it takes is in the unacked index before the worker could die
with it; after a crash it comes back after the ``visibility_timeout``, as
any unacked message does. (An idle worker still waits with ``BRPOP``,
whose message comes with Kombu's window: Redis cannot wait on several
lists without taking from one.)

The functions here build the script's arguments and read its reply; they
know nothing of Kombu's classes and are tested on their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "FETCH_SCRIPT",
    "FETCH_SHA",
    "Fetched",
    "fetch_arguments",
    "read_reply",
]

#: Takes up to ``ARGV[1]`` messages and records the acked ones as unacked.
#:
#: ``KEYS[1]``, ``KEYS[2]``: the unacked hash and its index (a sorted set).
#: ``KEYS[3..]``: the queues' lists, level by level: for each priority
#: level, the list of every queue, in the consumer's order.
#: ``ARGV``: count, number of queues, number of levels, the delivery time
#: (the index's score, from the worker's clock as Kombu's), ``1`` if the
#: queue taken from moves to the end of the order (Kombu's round robin),
#: then per queue ``1`` if its messages get acked (``0``: ``no_ack``).
#:
#: Returns an error text (empty if none), then ``queue number, delivery tag
#: or false, message`` per message taken. A message is recorded before it
#: leaves its list: when the server refuses the write (out of memory), the
#: script stops and the message stays where it was. A message that is no
#: JSON, or carries no delivery tag, is taken unrecorded for the worker to
#: judge, as Kombu's ``BRPOP`` would; a key that is no list counts as
#: empty. The hash entry is ``[message, exchange, routing_key]``, the
#: message spliced in as it was sent, which is what Kombu writes.
FETCH_SCRIPT = """
local count = tonumber(ARGV[1])
local nqueues = tonumber(ARGV[2])
local nlevels = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local rotate = ARGV[5] == '1'
local out = {''}
local recorded = 0

local function record(item)
    local ok, message = pcall(cjson.decode, item)
    if not ok or type(message) ~= 'table'
            or type(message['properties']) ~= 'table' then
        return false
    end
    local properties = message['properties']
    local tag = properties['delivery_tag']
    if type(tag) ~= 'string' and type(tag) ~= 'number' then
        return false
    end
    tag = tostring(tag)
    local exchange, routing_key = nil, nil
    local info = properties['delivery_info']
    if type(info) == 'table' then
        exchange = info['exchange']
        routing_key = info['routing_key']
    end
    local entry = '[' .. item .. ',' .. cjson.encode(exchange) .. ','
        .. cjson.encode(routing_key) .. ']'
    local stored = redis.pcall('HSET', KEYS[1], tag, entry)
    if type(stored) == 'table' then
        return nil, stored['err']
    end
    -- A microsecond apart, so that Kombu's restore (by score) puts them
    -- back in the order they were taken.
    local indexed = redis.pcall('ZADD', KEYS[2], now + recorded / 1000000, tag)
    if type(indexed) == 'table' then
        redis.pcall('HDEL', KEYS[1], tag)
        return nil, indexed['err']
    end
    recorded = recorded + 1
    return tag
end

-- true: a message was taken; false: the list is empty; nil: stop.
local function take(q, key)
    local item = redis.pcall('LINDEX', key, -1)
    if type(item) ~= 'string' then
        return false
    end
    local tag = false
    if ARGV[5 + q] == '1' then
        local err
        tag, err = record(item)
        if tag == nil then
            out[1] = err or 'cannot record the message as unacked'
            return nil
        end
    end
    redis.call('RPOP', key)
    out[#out + 1] = q
    out[#out + 1] = tag
    out[#out + 1] = item
    return true
end

local order = {}
for q = 1, nqueues do order[q] = q end
local empty = {}
for taken = 1, count do
    local found = false
    for level = 0, nlevels - 1 do
        for position = 1, #order do
            local q = order[position]
            local key = 2 + level * nqueues + q
            if not empty[key] then
                local took = take(q, KEYS[key])
                if took == nil then
                    return out
                elseif took then
                    if rotate then
                        -- Kombu's round robin moves the queue it took
                        -- from to the end.
                        table.remove(order, position)
                        order[#order + 1] = q
                    end
                    found = true
                    break
                end
                empty[key] = true
            end
        end
        if found then break end
    end
    if not found then break end
end
return out
"""

#: What ``EVALSHA`` names :data:`FETCH_SCRIPT` by.
FETCH_SHA = hashlib.sha1(FETCH_SCRIPT.encode()).hexdigest()


class Fetched(NamedTuple):
    """One message the script popped."""

    #: The queue it came from.
    queue: str
    #: Its delivery tag if the script recorded it as unacked, else ``None``.
    recorded_tag: str | None
    #: The message as it was in the list (Kombu's JSON envelope).
    raw: bytes


def fetch_arguments(
    *,
    count: int,
    queues: Sequence[str],
    priority_keys: Sequence[Sequence[str]],
    acked: Sequence[bool],
    rotate: bool,
    unacked_key: str,
    unacked_index_key: str,
    now: float,
) -> list[Any]:
    """Return ``numkeys, *keys, *argv`` for one call of :data:`FETCH_SCRIPT`.

    Arguments:
        count: most messages to take.
        queues: the queues, in the order the consumer takes them.
        priority_keys: per priority level (highest first), the key of
            each queue's list at that level, in the order of ``queues``.
        acked: per queue, whether its messages get acked.
        rotate: whether the queue taken from moves to the end of the
            order, as Kombu's default ``round_robin`` queue order does.
        unacked_key: the unacked hash's key.
        unacked_index_key: the unacked index's key.
        now: the delivery time the index records.
    """
    keys = [unacked_key, unacked_index_key]
    for level in priority_keys:
        keys.extend(level)
    argv: list[Any] = [
        count,
        len(queues),
        len(priority_keys),
        repr(now),
        "1" if rotate else "0",
    ]
    argv.extend("1" if flag else "0" for flag in acked)
    return [len(keys), *keys, *argv]


def read_reply(reply: Any, queues: Sequence[str]) -> tuple[list[Fetched], str]:
    """Turn the script's flat reply into messages and an error text.

    Returns:
        One :class:`Fetched` per message taken, in order, and the error
        that stopped the script early (empty if none did).
    """
    if not reply:
        return [], ""
    error = reply[0]
    if isinstance(error, bytes):
        error = error.decode(errors="replace")
    fetched = []
    for index in range(1, len(reply) - 2, 3):
        number, tag, raw = reply[index : index + 3]
        if isinstance(tag, bytes):
            tag = tag.decode()
        fetched.append(Fetched(queues[int(number) - 1], tag or None, raw))
    return fetched, str(error or "")
