"""The documentation's own examples, run for real: each page's promise holds.

Every Python sample in ``docs/*.rst`` is pulled from a module of
``docs/examples`` with ``literalinclude``; these tests run those modules
with a real worker on the in-memory transport (and the result store on a
Redis server for the bulk-results promise) and check what the pages say.
"""

from __future__ import annotations

import doctest
import sys
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals, states

from celery_batches import Batches, SimpleRequest
from celery_batches.results import STORE_SCRIPT
from celery_batches.signals import batch_flushed
from tests.harness.brokers import REDIS_BACKEND, ROOT, require_server
from tests.harness.examples import EXAMPLES, Load, loading
from tests.harness.wait import wait_for
from tests.harness.worker import Worker, start_worker

DOCS = ROOT / "docs"


@pytest.fixture
def load() -> Iterator[Load]:
    with loading() as load:
        yield load


def flushed(worker: Worker, task: Any) -> int:
    """How many calls of ``task`` the worker has flushed."""
    return sum(flush.size for flush in worker.flushes(task))


# -- getting-started.rst and README.rst -----------------------------------------


def test_getting_started_gives_each_call_its_own_result_in_batches(load: Load) -> None:
    # given the getting-started app and its task (flush_every=100)
    example = load("getting_started")
    words = [f"word{i}" for i in range(250)]
    # (an interval long enough that only the last 50 wait for it, however
    # slowly a loaded machine publishes the first 200)
    with start_worker(app=example.app, batch_options={"flush_interval": 2}) as worker:
        # when 250 calls are sent and their results read
        results = example.send_words(words)
        # then each call has its own result, computed in batches of at most 100
        assert results == [word.upper() for word in words]
        sizes = [f.size for f in worker.flushes(example.shout)]
        assert sum(sizes) == 250 and max(sizes) == 100 and len(sizes) < 250
        # and a call's state can be read from its id alone
        call = example.shout.delay("ada")
        assert call.get(timeout=20) == "ADA"
        assert example.state_of(call.id) == states.SUCCESS


def code_blocks(page: Path, language: str) -> list[str]:
    """Return the ``.. code-block:: <language>`` blocks of an rst file, dedented."""
    blocks = []
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f".. code-block:: {language}":
            body = []
            for following in lines[i + 1 :]:
                if following and not following[0].isspace():
                    break
                body.append(following)
            blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def run_session(session: str, name: str) -> tuple[int, int]:
    """Run an interactive session as doctest does; return (failed, tried)."""
    test = doctest.DocTestParser().get_doctest(session, {}, name, name, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=lambda text: None)
    failed, tried = runner.summarize(verbose=False)
    return failed, tried


def test_the_getting_started_session_runs_as_shown(
    load: Load, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the interactive session that getting-started.rst shows
    example = load("getting_started")
    monkeypatch.setitem(sys.modules, "getting_started", example)
    (session,) = code_blocks(DOCS / "getting-started.rst", "pycon")
    # when it runs against a worker, then every output is the one shown
    with start_worker(app=example.app, batch_options={"flush_interval": 0.2}):
        failed, tried = run_session(session, "getting-started.rst")
    assert (failed, tried) == (0, 5)


def test_the_readme_shows_the_getting_started_module_whole(
    load: Load, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the README's usage example (the repository host renders no
    # literalinclude, so the README carries its own copy)
    (block,) = code_blocks(ROOT / "README.rst", "python")
    # then it is the tested getting-started module, every line of it
    assert block == (EXAMPLES / "getting_started.py").read_text()
    # and the README's session gives the output shown, on a real worker
    example = load("getting_started")
    monkeypatch.setitem(sys.modules, "getting_started", example)
    (session,) = code_blocks(ROOT / "README.rst", "pycon")
    with start_worker(app=example.app, batch_options={"flush_interval": 0.2}):
        assert run_session(session, "README.rst") == (0, 3)


def test_getting_started_shows_the_module_whole() -> None:
    # given the getting-started page
    page = (DOCS / "getting-started.rst").read_text()
    # then it includes the example module once, whole: no line range, no
    # single object, so that what a reader copies runs as it stands
    includes = [
        line.split("::", 1)[1].strip()
        for line in page.splitlines()
        if line.startswith(".. literalinclude::")
    ]
    assert includes == ["examples/getting_started.py"]
    directive = page.index(".. literalinclude:: examples/getting_started.py")
    options = page[directive:].split("\n\n", 1)[0].splitlines()[1:]
    assert [option.strip() for option in options] == [":language: python"]
    # and the session it shows imports only what the module defines
    (session,) = code_blocks(DOCS / "getting-started.rst", "pycon")
    assert "from getting_started import send_words, shout" in session


# -- per-request.rst --------------------------------------------------------------


@pytest.fixture(scope="module")
def per_request() -> Iterator[Any]:
    """The per-request examples, served by one worker for the tests below."""
    with loading() as load:
        example = load("per_request")
        example.RETRY_IN = 0.2
        example.app.tasks[example.send_sms.name].retry_kwargs = {
            "countdown": 0.2,
            "max_retries": 5,
        }
        # Long enough that the calls a test sends at once make one batch.
        with start_worker(
            app=example.app, batch_options={"flush_interval": 0.5}
        ) as worker:
            example.worker = worker
            yield example


def test_fetch_quote_settles_each_call_done_failed_or_retried(per_request: Any) -> None:
    # given the quote service, where INITECH has no price on its first lookup
    example = per_request
    # when one batch asks for a known, a warming-up and an unknown symbol
    acme, initech, nope = (
        example.fetch_quote.delay(symbol) for symbol in ("ACME", "INITECH", "NOPE")
    )
    # then the known one is done, the unknown one failed on its own
    assert acme.get(timeout=20) == 12.5
    wait_for(nope.ready, what="NOPE to fail")
    assert nope.state == states.FAILURE
    assert isinstance(nope.result, LookupError)
    # and the warming-up one was retried alone, under its id, and is done
    assert initech.get(timeout=20) == 3.25
    assert example.quotes.calls == 2


def test_a_sequence_of_results_with_an_exception_fails_only_that_call(
    per_request: Any,
) -> None:
    good = per_request.normalize_email.delay("Ada@Example.COM")
    bad = per_request.normalize_email.delay("not-an-address")
    assert good.get(timeout=20) == "Ada@example.com"
    wait_for(bad.ready, what="the bad address to fail")
    assert bad.state == states.FAILURE
    assert isinstance(bad.result, ValueError)


def test_a_mapping_of_results_answers_each_call_by_id(per_request: Any) -> None:
    skus = ("apple", "pear", "apple", "kiwi")
    results = [per_request.stock_level.delay(sku) for sku in skus]
    assert [r.get(timeout=20) for r in results] == [12, 0, 12, 0]
    assert flushed(per_request.worker, per_request.stock_level) == 4


def test_autoretry_for_retries_every_call_of_the_batch(per_request: Any) -> None:
    # given a gateway that is down for the first bulk call
    gateway = per_request.gateway
    # when a batch of three messages is sent
    results = [per_request.send_sms.delay(f"+4470000000{i}", "hi") for i in range(3)]
    # then each call is retried and gets its own receipt
    receipts = [r.get(timeout=20) for r in results]
    assert sorted(receipts) == ["receipt-0", "receipt-1", "receipt-2"]
    assert gateway.outages == 0 and len(gateway.sent) == 3


def test_self_retry_in_a_bound_body_retries_the_batch(per_request: Any) -> None:
    # given a push provider that is away for the first batch
    results = [per_request.push_notification.delay(user) for user in ("ada", "bob")]
    # then the batch is retried, and each call gets its own result
    pushed = [r.get(timeout=20) for r in results]
    assert pushed == ["pushed to ada", "pushed to bob"]
    assert per_request.push_provider["available"] is True


@pytest.mark.redis
def test_results_are_stored_in_bulk_on_redis(
    load: Load, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the getting-started task with a Redis result backend
    require_server(REDIS_BACKEND)
    import redis

    example = load("getting_started")
    worker_calls: Counter[str] = Counter()
    main = threading.current_thread()

    def counting(name: str, method: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not main:
                worker_calls[name] += 1
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(redis.Redis, "mget", counting("mget", redis.Redis.mget))
    monkeypatch.setattr(
        redis.Redis, "evalsha", counting("evalsha", redis.Redis.evalsha)
    )
    monkeypatch.setattr(
        redis.client.Pipeline,
        "execute",
        counting("pipeline", redis.client.Pipeline.execute),
    )
    # The server knows the writer's script already (as after a first batch).
    admin = redis.Redis.from_url(REDIS_BACKEND)
    admin.script_load(STORE_SCRIPT)
    admin.close()
    with start_worker(
        app=example.app,
        urls=("memory://", REDIS_BACKEND),
        batch_options={"flush_every": 5, "flush_interval": 60},
    ) as worker:
        # when one full batch of five calls runs (the solo pool runs it
        # before batch_flushed is sent)
        results = [example.shout.delay(word) for word in "abcde"]
        wait_for(lambda: flushed(worker, example.shout) == 5, what="a batch")
        # then its five results took one script call, nothing per result
        assert worker_calls == Counter({"evalsha": 1})
        assert [r.get(timeout=20) for r in results] == list("ABCDE")


# -- batching-by-key.rst ----------------------------------------------------------


def test_a_keyword_batch_key_never_mixes_tenants(load: Load) -> None:
    # given calls of three tenants, interleaved, and batches of three
    example = load("by_key")
    tenants = ["acme", "initech", "umbrella"] * 6
    with start_worker(
        app=example.app, batch_options={"flush_every": 3, "flush_interval": 60}
    ) as worker:
        for n, tenant in enumerate(tenants):
            example.record_usage.delay(tenant=tenant, units=n)
        wait_for(lambda: flushed(worker, example.record_usage) == 18, what="18")
    # then every batch wrote to one tenant, and each tenant got all its units
    expected: Counter[str] = Counter()
    for n, tenant in enumerate(tenants):
        expected[tenant] += n
    assert example.usage.units == expected
    flushes = worker.flushes()
    assert len(example.usage.writes) == len(flushes) == 6
    assert {f.key for f in flushes} == set(tenants)
    assert {f.reason for f in flushes} == {"size"}


def test_a_callable_batch_key_groups_by_mail_domain(load: Load) -> None:
    example = load("by_key")
    addresses = ["ada@a.example", "bob@B.example", "cy+news@a.example", "di@b.example"]
    with start_worker(app=example.app, batch_options={"flush_interval": 0.2}):
        results = [example.verify_mailbox.delay(address) for address in addresses]
        assert [r.get(timeout=20) for r in results] == [True, True, False, True]
    sessions = dict(example.smtp_sessions)
    assert sessions == {
        "a.example": ["ada@a.example", "cy+news@a.example"],
        "b.example": ["bob@B.example", "di@b.example"],
    }


# -- monitoring.rst ---------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics and parse it as Prometheus does: {(sample, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_flushes_by_reason_batch_sizes_and_waits(load: Load) -> None:
    # given the metrics receivers connected, serving on a free local port
    metrics = load("metrics")
    metrics.METRICS_PORT = 0
    example = load("getting_started")
    name = example.shout.name
    # Long enough that only the last 30 wait for it, however slowly a
    # loaded machine publishes the first 200.
    interval = 2
    try:
        metrics.start_metrics_server()
        server = metrics.metrics_server
        assert server is not None
        with start_worker(
            app=example.app, batch_options={"flush_interval": interval}
        ) as worker:
            # when 230 calls run: full batches of 100, the rest by interval
            example.send_words([f"w{i}" for i in range(230)])
            wait_for(
                lambda: flushed(worker, example.shout) == 230,
                what="230 calls flushed",
            )
        flushes = worker.flushes(example.shout)
        # then a scrape of the real exposition counts each flush by reason
        samples = scrape(server.server_address[1])

        def sample(metric: str, **labels: str) -> float:
            return samples[metric, frozenset({"task": name, **labels}.items())]

        reasons = Counter(f.reason for f in flushes)
        assert reasons["size"] >= 2 and reasons["interval"] >= 1
        for reason, count in reasons.items():
            assert sample("celery_batches_flushes_total", reason=reason) == count
        # and the size histogram has each batch in its buckets
        sizes = [f.size for f in flushes]
        for bound in (50, 100):
            assert sample("celery_batches_batch_size_bucket", le=f"{bound}.0") == sum(
                size <= bound for size in sizes
            )
        assert sample("celery_batches_batch_size_sum") == 230
        assert sample("celery_batches_batch_size_count") == len(sizes)
        # and the wait histogram has each batch's oldest call: those flushed
        # by interval waited the interval at least, none near the 30 s bucket
        waits = "celery_batches_oldest_wait_seconds"
        assert sample(f"{waits}_count") == len(sizes)
        assert sample(f"{waits}_sum") >= reasons["interval"] * interval * 0.9
        assert sample(f"{waits}_bucket", le="10.0") == len(sizes)
        # and nothing is left noted for calls that were flushed
        assert metrics.received_at == {}
    finally:
        batch_flushed.disconnect(metrics.on_batch_flushed)
        for signal, receiver in (
            (signals.task_received, metrics.on_task_received),
            (signals.task_revoked, metrics.on_task_revoked),
            (signals.worker_ready, metrics.start_metrics_server),
        ):
            signal.disconnect(receiver)
        if metrics.metrics_server is not None:
            metrics.metrics_server.shutdown()
            metrics.metrics_server.server_close()


def test_metrics_forget_a_call_revoked_while_it_waits(load: Load) -> None:
    # given the metrics receivers, and a call waiting in a buffer that
    # flushes every 2 seconds
    metrics = load("metrics")
    example = load("getting_started")
    try:
        with start_worker(
            app=example.app, batch_options={"flush_interval": 2}
        ) as worker:
            call = example.shout.delay("late")
            wait_for(lambda: call.id in metrics.received_at, what="the call noted")
            # when it is revoked before its batch is flushed
            example.app.control.revoke(call.id)
            # then the flush leaves it out, and the metrics forget it
            wait_for(lambda: metrics.received_at == {}, what="the call forgotten")
            assert call.state == states.REVOKED
            assert worker.flushes() == []
    finally:
        batch_flushed.disconnect(metrics.on_batch_flushed)
        for signal, receiver in (
            (signals.task_received, metrics.on_task_received),
            (signals.task_revoked, metrics.on_task_revoked),
            (signals.worker_ready, metrics.start_metrics_server),
        ):
            signal.disconnect(receiver)


def test_flower_sees_each_call_with_its_share_of_the_batch_runtime() -> None:
    # given a batch task of 5 calls whose body takes half a second, on a
    # worker that sends task events, and a receiver of them (as Flower is)
    app = Celery("flower_runtime", set_as_current=False)
    app.conf.worker_send_task_events = True

    @app.task(base=Batches, flush_every=5, flush_interval=60, shared=False)
    def slow(requests: list[SimpleRequest]) -> None:
        time.sleep(0.5)

    events: dict[str, dict[str, Any]] = {}
    with start_worker(app=app), app.connection_for_read() as connection:
        receiver = app.events.Receiver(
            connection,
            handlers={"task-succeeded": lambda e: events.update({e["uuid"]: e})},
        )
        # Its queue exists before the first call, so no event is missed.
        receiver.queue(connection.default_channel).declare()
        listening = threading.Thread(target=receiver.capture, daemon=True)
        listening.start()
        calls = [slow.delay(n) for n in range(5)]
        try:
            wait_for(lambda: len(events) == 5, what="5 task-succeeded events")
        finally:
            receiver.should_stop = True
            listening.join(10)
    # then each call is a task of its own, with its own id
    assert set(events) == {call.id for call in calls}
    # and its runtime is its share of the batch's: the same for each, and
    # summed over the batch, the batch's run time once (not five times)
    runtimes = [event["runtime"] for event in events.values()]
    assert len(set(runtimes)) == 1
    assert 0.5 <= sum(runtimes) < 1.25


def test_inspect_reserved_lists_buffered_calls(load: Load) -> None:
    # given three calls waiting in a buffer that flushes at 100 or every minute
    inspecting = load("inspecting")
    example = load("getting_started")
    with start_worker(app=example.app, batch_options={"flush_interval": 60}) as worker:
        calls = [example.shout.delay(word) for word in ("a", "b", "c")]
        ids = {call.id for call in calls}

        def waiting() -> set[str]:
            found = inspecting.waiting_calls(example.app)
            return {task_id for task_ids in found.values() for task_id in task_ids}

        # then `inspect reserved` lists them
        wait_for(lambda: ids <= waiting(), what="the calls to be listed as reserved")
        assert worker.flushes() == []
        # and they run with the calls that fill their batch
        calls += [example.shout.delay("z") for _ in range(97)]
        assert [call.get(timeout=20) for call in calls[:3]] == ["A", "B", "C"]
        assert [(f.size, f.reason) for f in worker.flushes()] == [(100, "size")]
        # (Celery's start_worker() ends its worker with a cold shutdown, which
        # runs nothing from the buffer; the warm shutdown that does is tested
        # with real worker processes in tests/fault/test_shutdown.py.)


def test_inspect_active_lists_each_call_of_the_running_batch(load: Load) -> None:
    # given a batch that stays running until the test lets it go
    inspecting = load("inspecting")
    app = Celery("inspect_active", set_as_current=False)
    started, release = threading.Event(), threading.Event()

    @app.task(base=Batches, flush_every=2, flush_interval=60, shared=False)
    def hold(requests: list[SimpleRequest]) -> None:
        started.set()
        release.wait(20)

    with start_worker(app=app, pool="threads"):
        calls = [hold.delay(n) for n in range(2)]
        assert started.wait(20)

        def active() -> set[str]:
            found = inspecting.running_calls(app)
            return {task_id for task_ids in found.values() for task_id in task_ids}

        # then `inspect active` lists both of its calls
        try:
            wait_for(lambda: {c.id for c in calls} <= active(), what="active calls")
        finally:
            release.set()


# -- faq.rst: testing a batch body -------------------------------------------------


def test_the_testing_helper_examples_pass(load: Load) -> None:
    example = load("testing_helper")
    tests = [value for name, value in vars(example).items() if name.startswith("test_")]
    assert len(tests) == 4
    for test in tests:
        test()


# -- migration.rst ----------------------------------------------------------------


@pytest.fixture(scope="module")
def migration() -> Iterator[Any]:
    """The migration examples, served by one worker for the tests below."""
    with loading() as load:
        example = load("migration")
        # The tests send each batch's calls within milliseconds: a second
        # leaves no room for an interval flush to split them.
        with start_worker(
            app=example.app, batch_options={"flush_interval": 1}
        ) as worker:
            example.worker = worker
            yield example


def test_a_0_11_body_storing_results_through_the_backend_still_works(
    migration: Any,
) -> None:
    results = [migration.square.delay(n) for n in range(5)]
    assert [r.get(timeout=20) for r in results] == [0, 1, 4, 9, 16]


def test_a_body_that_stores_nothing_leaves_results_pending(migration: Any) -> None:
    # given a body that returns a value but stores no result
    results = [migration.count_words.delay("a b c") for _ in range(3)]
    # when its batch has run (on the solo pool, batch_flushed comes after)
    task = migration.count_words
    wait_for(lambda: flushed(migration.worker, task) == 3, what="the batch")
    # then the calls' results are still PENDING, as with 0.11
    assert migration.batch_sizes == [3]
    assert {r.state for r in results} == {states.PENDING}


def test_a_body_that_raises_fails_every_call_of_its_batch(migration: Any) -> None:
    # given an all-or-nothing import whose batch holds an empty row
    results = [migration.import_rows.delay(row) for row in ("a", "", "b")]
    # then every call of the batch failed with the body's exception
    for result in results:
        wait_for(result.ready, what=f"{result.id} ready")
    assert {r.state for r in results} == {states.FAILURE}
    assert all(isinstance(r.result, ValueError) for r in results)
    assert migration.imported == []


# -- transports.rst ---------------------------------------------------------------


def test_the_sqs_example_outlasts_the_longest_hold_of_a_call(load: Load) -> None:
    # given the SQS example's task and transport options
    example = load("transports")
    task = example.index_documents
    timeout = example.app.conf.broker_transport_options["visibility_timeout"]
    # then a call held the longest the page says (its wait in the buffer,
    # and with acks_late its batch's run) is acked before SQS hands its
    # message to another consumer
    assert task.acks_late
    held = task.flush_interval + task.time_limit
    assert timeout > held
    # and the body is a batch body that runs
    with start_worker(app=example.app, batch_options={"flush_interval": 0.2}):
        for n in range(3):
            task.delay(document=f"doc {n}")
        wait_for(lambda: len(example.search_index.documents) == 3, what="3 docs")
    assert sorted(example.search_index.documents) == ["doc 0", "doc 1", "doc 2"]


# -- configuration.rst ------------------------------------------------------------


def test_the_configuration_example_runs_with_every_option(load: Load) -> None:
    example = load("configuration")
    task = example.app.tasks[example.charge.name]
    assert (task.flush_every, task.flush_interval) == (200, 2.5)
    assert task.acks_late and task.reject_on_worker_lost and task.per_request_results
    assert (task.soft_time_limit, task.time_limit) == (50, 60)
    with start_worker(app=example.app, batch_options={"flush_interval": 0.2}) as worker:
        results = [
            example.charge.delay(account=account, amount=amount)
            for account, amount in [("a", 5), ("b", 7), ("a", 9)]
        ]
        receipts = [r.get(timeout=20) for r in results]
    assert [r.split("-")[0] for r in receipts] == ["a", "b", "a"]
    assert sorted(example.payments.charges) == [("a", [5, 9]), ("b", [7])]
    assert {f.key for f in worker.flushes()} == {"a", "b"}
