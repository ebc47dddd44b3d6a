"""The quarantine: every private name of Celery, Kombu, py-amqp and vine we use.

Nothing outside this package reaches into another library's private state.
Each name below is used in one function here, whose docstring says why;
``tests/unit/test_compat.py`` holds a canary test per name, which fails in
the tox environment of a release that changed it, instead of the package
falling back quietly.

============================================  ============  =====  ===================
Private name (library)                        Checked on    Safe?  Can go when
============================================  ============  =====  ===================
``celery._state._task_stack`` (Celery)        5.2-5.7       no     Celery exposes a
                                                                   way to push
                                                                   ``current_task``
``Request._payload`` (Celery)                 5.2-5.7       yes*   never: the decoded
                                                                   body, read once
``Request._context`` (Celery)                 5.2-5.7       yes    as above
``worker.state.revoked_stamps`` (Celery)      5.3-5.7       yes    5.2 is dropped
``Tasks.qos_global`` logic, repeated (Celery) 5.5-5.7       no     Celery records
                                                                   ``qos_global`` on
                                                                   the consumer before
                                                                   the strategies
``promise._svpending/_lvpending`` (vine)      vine 5.0-5.1  yes    Celery stops
                                                                   chaining the
                                                                   prefetch restore
                                                                   (since 5.3)
``Hub._ready``, ``_waker`` (Kombu)            5.5-5.7       yes    Kombu wakes its
                                                                   loop for ready
                                                                   callbacks itself
``QoS._mutex`` (Kombu)                        5.2-5.7       no     Kombu's QoS gets a
                                                                   floor to narrow to
green timers' ``entry`` (Celery)              5.2-5.7       yes    Celery's green
                                                                   timers cancel a
                                                                   repeat themselves
Redis ``QoS.pipe_or_acquire``,                5.2-5.7       yes    Kombu acks many
``_delivered`` and its keys (Kombu)                                tags in one call
py-amqp ``Channel.callbacks``,                5.0-5.3       no     (public attributes
``no_ack_consumers``                                               of py-amqp, listed
                                                                   for the canary)
``send_task``'s calls of ``app.amqp``'s       5.2-5.7       yes    Celery publishes
``create_task_message`` and                                        many calls in one
``send_task_message`` (Celery; public                              go itself
attributes, wrapped in place)
py-amqp ``Transport._write``, a channel's     5.0-5.3       yes    py-amqp writes
``basic_publish`` (wrapped in place)                               many frames at once
``Connection._transport`` (Kombu)             5.2-5.7       yes    (never: a guard)
============================================  ============  =====  ===================

The Redis transport subclass (:mod:`celery_batches.redis_transport`) is a
Kombu extension rather than a reach into Kombu's state: it overrides the
methods Kombu's own channel calls (``_brpop_start``, ``_brpop_read``,
``_put``, ``conn_or_acquire``...). What it relies on in them is checked by
the canaries in ``tests/unit/test_redis_transport.py``, and
:func:`celery_batches.redis_transport.supported` keeps Kombu's own
transport where a name is missing.

"Safe" says what happens if the name changes: *yes*, the package falls back
to Celery's own behaviour (slower, or without one fix); *no*, it fails, and
the canary says where. (*) ``Request._payload`` missing would reject every
message as malformed: loud, if not graceful.
"""

from __future__ import annotations

from .celery import (
    MessageCall,
    acks_plainly,
    current_task_stack,
    message_options,
    needs_revoke_check,
    per_consumer_qos,
    recording_task_messages,
    request_context,
    request_context_or_none,
)
from .kombu import (
    amqp_publishes_held,
    cancel_timer_entry,
    narrow_prefetch,
    redis_channel_class,
    redis_forget_delivered,
    redis_group_ackable,
    redis_remove_from_unacked,
    survive_collected_redis_transport,
    ticks_after_ready_callbacks,
    transport_created,
    wake_hub_with_pending_callbacks,
)

__all__ = [
    "MessageCall",
    "acks_plainly",
    "amqp_publishes_held",
    "cancel_timer_entry",
    "current_task_stack",
    "message_options",
    "narrow_prefetch",
    "needs_revoke_check",
    "per_consumer_qos",
    "recording_task_messages",
    "redis_channel_class",
    "redis_forget_delivered",
    "redis_group_ackable",
    "redis_remove_from_unacked",
    "request_context",
    "request_context_or_none",
    "survive_collected_redis_transport",
    "ticks_after_ready_callbacks",
    "transport_created",
    "wake_hub_with_pending_callbacks",
]
