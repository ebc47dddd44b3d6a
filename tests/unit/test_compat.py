"""Version switches: the hub wake-up tick only where kombu has a waker."""

from __future__ import annotations

from types import SimpleNamespace

from kombu.asynchronous import Hub

from celery_batches._compat import wake_hub_with_pending_callbacks


def test_no_tick_for_a_hub_without_a_waker() -> None:
    # kombu 5.5 has the ready set and its lock, but no waker to wake
    hub = SimpleNamespace(_pop_ready=lambda: set(), _ready=set(), _ready_lock=None)
    assert wake_hub_with_pending_callbacks(hub, lambda: None) is None


def test_the_tick_never_fails_on_this_kombus_hub() -> None:
    hub = Hub()
    try:
        tick = wake_hub_with_pending_callbacks(hub, lambda: None)
        if tick is not None:
            hub.call_soon(lambda: None)
            tick()  # wakes the waker if there is one; must not raise
    finally:
        hub.close()
