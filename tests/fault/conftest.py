"""Brokers the fault tests own, which they may restart, and workers they may kill.

The shared servers on 127.0.0.1:6379 and :5672 serve other test runs too, so
a test that restarts its broker (or needs a short Redis visibility timeout,
which acts on every unacked message of a database) gets a Redis server and a
RabbitMQ node of its own (``tests/harness/servers.py``), on free ports,
started on first use and stopped at the end of the session. Without the
binaries those tests skip, and under CI (``CI=true``) they fail.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.brokers import require_binary
from tests.harness.servers import RabbitNode, RedisServer, port_open
from tests.harness.worker import Workers


@pytest.fixture
def workers(journal_path: str) -> Iterator[Workers]:
    """Start workers of this test's own; whatever still runs is killed after it."""
    started = Workers(journal_path, kill=True)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[RedisServer]:
    require_binary("redis-server")
    with tempfile.TemporaryDirectory(prefix="cbfault-redis-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def own_redis(_redis_server: RedisServer) -> RedisServer:
    """A Redis server of this session's own, which tests may restart.

    Started again for the next test if a failed test left it stopped.
    """
    process = _redis_server.process
    if process is None or process.poll() is not None:
        _redis_server.start()
    return _redis_server


@pytest.fixture(scope="session")
def _rabbit_node() -> Iterator[RabbitNode]:
    require_binary("rabbitmq-server")
    require_binary("rabbitmqctl")
    node = RabbitNode()
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def own_rabbit(_rabbit_node: RabbitNode) -> RabbitNode:
    """A RabbitMQ node of this session's own, which tests may restart.

    Its application is started again if a failed test left it stopped.
    """
    if not port_open(_rabbit_node.port):
        _rabbit_node.start_app()
    return _rabbit_node
