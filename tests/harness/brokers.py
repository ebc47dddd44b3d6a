"""Where the test servers are, and what a test does when one is missing.

Broker tests run against real servers: the in-memory transport, and the
shared Redis and RabbitMQ servers named by ``CELERY_BATCHES_REDIS_URL`` and
``CELERY_BATCHES_AMQP_URL``. On a machine without a server those tests skip;
under CI (``CI=true``) they fail, so a broken CI machine cannot pass by
skipping everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kombu.connection import Connection

from tests.harness.servers import MissingBinary, RedisServer, find_binary

__all__ = [
    "AMQP_URL",
    "BROKERS",
    "IN_CI",
    "REDIS_BACKEND",
    "REDIS_URL",
    "ROOT",
    "redis_urls",
    "require_binary",
    "require_server",
    "servers_for",
]

#: The repository's root: the working directory of worker subprocesses.
ROOT = Path(__file__).resolve().parent.parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

REDIS_URL = os.environ.get("CELERY_BATCHES_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get(
    "CELERY_BATCHES_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
#: Every worker on a real broker stores its results here, database 1.
REDIS_BACKEND = REDIS_URL.rsplit("/", 1)[0] + "/1"

#: (broker URL, result backend URL) of each shared broker, by name.
BROKERS = {
    "memory": ("memory://", "cache+memory://"),
    "redis": (REDIS_URL, REDIS_BACKEND),
    "rabbitmq": (AMQP_URL, REDIS_BACKEND),
}


def _unreachable(url: str) -> str | None:
    """Return why ``url`` cannot be reached, or ``None`` if it can."""
    try:
        if url.startswith("redis"):
            import redis

            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        else:
            with Connection(url, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
    # Whatever the client raises, the answer is the same: the server is not
    # usable, and the message says why.
    except Exception as exc:
        return f"{url}: {exc!r}"
    return None


_checked: dict[str, str | None] = {}


def require_server(url: str) -> None:
    """Skip (or under CI, fail) the test if the server at ``url`` is down."""
    if url not in _checked:
        _checked[url] = _unreachable(url)
    problem = _checked[url]
    if problem is not None:
        if IN_CI:
            pytest.fail(f"broker test cannot run under CI: {problem}")
        pytest.skip(f"server not reachable: {problem}")


def servers_for(broker: str) -> tuple[str, str]:
    """Return the broker and backend URLs of ``broker``, skipping if one is down."""
    url, backend = BROKERS[broker]
    if broker != "memory":
        require_server(url)
        require_server(REDIS_URL)
    return url, backend


def require_binary(name: str) -> str:
    """Return the path of ``name``; skip the test without it (fail under CI)."""
    try:
        return find_binary(name)
    except MissingBinary as exc:
        if IN_CI:
            pytest.fail(f"fault test cannot run under CI: {exc}")
        pytest.skip(str(exc))


def redis_urls(server: RedisServer, db: int) -> tuple[str, str]:
    """Broker and backend URLs for a worker on a private Redis server."""
    return server.url(db), REDIS_BACKEND
