"""A worker with sentry-sdk or OpenTelemetry set up, run in a process of its own.

``python -m tests.integration.scripts.traced_worker sentry|opentelemetry``
runs a real worker (in-memory broker, in this process), sends it a failing
batch and a batch with one failed call, and prints what the integration
captured as JSON. Each integration patches Celery process-wide, so it is
kept out of the test process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_batches import Batches, SimpleRequest


def make_app() -> Celery:
    app = Celery("traced", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        broker_transport_options={"polling_interval": 0.01},
        result_backend="cache+memory://",
        worker_hijack_root_logger=False,
    )

    @app.task(base=Batches, name="traced.broken", flush_every=3, flush_interval=0.2)
    def broken(requests: list[SimpleRequest]) -> None:
        raise ValueError("the batch body broke")

    @app.task(
        base=Batches,
        name="traced.answers",
        flush_every=3,
        flush_interval=0.2,
        per_request_results=True,
    )
    def answers(requests: list[SimpleRequest]) -> list[Any]:
        return [KeyError(r.args[0]) if r.args[0] == 2 else r.args[0] for r in requests]

    return app


def run(app: Celery) -> tuple[list[str], list[str]]:
    """Send three calls to each task; return their ids once all are ready."""
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        broken = [app.tasks["traced.broken"].delay(n) for n in range(3)]
        answers = [app.tasks["traced.answers"].delay(n) for n in range(3)]
        for result in broken + answers:
            result.get(timeout=20, propagate=False)
    return [r.id for r in broken], [r.id for r in answers]


def with_sentry() -> dict[str, Any]:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.transport import Transport

    events: list[dict[str, Any]] = []

    class Captured(Transport):
        """Keeps each event instead of sending it: no network."""

        def capture_envelope(self, envelope: Any) -> None:
            for item in envelope.items:
                if item.type == "event":
                    events.append(item.payload.json)

    sentry_sdk.init(
        dsn="http://key@127.0.0.1:9/1",
        transport=Captured,
        integrations=[CeleryIntegration()],
    )
    app = make_app()
    broken, answers = run(app)
    sentry_sdk.flush(timeout=5)
    return {
        "broken": broken,
        "answers": answers,
        "events": [
            {
                "exceptions": [
                    (value.get("type"), value.get("value"))
                    for value in event.get("exception", {}).get("values", [])
                ],
                "message": (event.get("logentry") or {}).get("formatted")
                or (event.get("logentry") or {}).get("message"),
                "logger": event.get("logger"),
                "mechanism": [
                    (value.get("mechanism") or {}).get("type")
                    for value in event.get("exception", {}).get("values", [])
                ],
            }
            for event in events
        ],
    }


def with_opentelemetry() -> dict[str, Any]:
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)
    app = make_app()
    broken, answers = run(app)
    provider.force_flush()
    return {
        "broken": broken,
        "answers": answers,
        "spans": [
            {
                "name": span.name,
                "span_id": span.context.span_id,
                "trace_id": span.context.trace_id,
                "task_id": (span.attributes or {}).get("celery.task_id")
                or (span.attributes or {}).get("messaging.message.id"),
                "links": [
                    {
                        "span_id": link.context.span_id,
                        "message_id": (link.attributes or {}).get(
                            "messaging.message.id"
                        ),
                    }
                    for link in span.links
                ],
                "status": span.status.status_code.name,
            }
            for span in exporter.get_finished_spans()
        ],
    }


if __name__ == "__main__":
    which = sys.argv[1]
    report = with_sentry() if which == "sentry" else with_opentelemetry()
    print(json.dumps(report))
