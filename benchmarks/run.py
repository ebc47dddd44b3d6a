"""Throughput and memory of batch tasks against a bare consumer and plain Celery.

Usage::

    python benchmarks/run.py            # full run, about 35 minutes
    python benchmarks/run.py --smoke    # ~1,000 messages, one repeat, < 2 min
    python benchmarks/run.py --profile  # where our worker spends its time

Every setup drains the same queue contents: ``--messages`` task messages
published before the consumer starts. The consumer records when each
execution started and ended, so worker start-up is not timed. Then, in the
same run: publishing (a ``delay()`` loop against ``delay_many``, see
``publishing.py``) and latency at fixed offered loads (``latency.py``).
Results go to ``benchmarks/results/latest.json`` (``smoke.json`` for
``--smoke``) and, with matplotlib, to charts. See ``benchmarks/README.rst``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import brokers  # noqa: E402
import latency  # noqa: E402
import publishing  # noqa: E402
import report  # noqa: E402
from harness import Measurement, run_consumer  # noqa: E402

__all__ = ["SETUPS", "Setup", "main"]

RESULTS = HERE / "results"
DOCS_CHART = ROOT / "docs" / "_static" / "benchmark.png"
DOCS_LATENCY_CHART = ROOT / "docs" / "_static" / "latency.png"
ORIGINAL_VERSION = "0.11"
TASK_NAME = "bench.work"


@dataclass(frozen=True)
class Setup:
    """One way of draining the queue."""

    #: Short name used in the JSON and on the command line.
    key: str
    #: What the table shows.
    label: str
    #: ``bare``, ``ours``, ``plain`` (a plain Celery task) or ``original``.
    impl: str
    #: Celery pool, ``solo`` or ``prefork`` (``-c 2``); ``None`` for bare.
    pool: str | None = None
    #: Store a result per request in the Redis result backend.
    results: bool = False
    #: In the default selection of a full run.
    full: bool = True
    #: In the quick ``--smoke`` selection.
    smoke: bool = True
    #: The bare consumer acks each message (``False``: ``no_ack``).
    acks: bool = True
    #: On Redis, ours consumes through celery-batches' transport (batch
    #: delivery, the default); ``False``: through Kombu's own.
    redis_delivery: bool = True
    #: The brokers it runs on (``None``: every one).
    brokers: tuple[str, ...] | None = None


SETUPS = [
    Setup("bare", "bare kombu consumer (prefetch 100)", "bare"),
    Setup("bare-noack", "bare kombu consumer, no acks", "bare", acks=False),
    Setup("ours-solo", "ours, solo", "ours", "solo"),
    Setup(
        "ours-solo-kombu",
        "ours, solo, Kombu's Redis delivery",
        "ours",
        "solo",
        redis_delivery=False,
        brokers=("redis",),
    ),
    Setup("ours-prefork", "ours, prefork -c 2", "ours", "prefork"),
    Setup(
        "plain-solo",
        "plain Celery task, solo",
        "plain",
        "solo",
        full=False,
        smoke=False,
    ),
    Setup("plain-prefork", "plain Celery task, prefork -c 2", "plain", "prefork"),
    Setup(
        "original-solo",
        "original 0.11, prefetch 0, solo",
        "original",
        "solo",
        smoke=False,
    ),
    Setup(
        "original-prefork",
        "original 0.11, prefetch 0, prefork -c 2",
        "original",
        "prefork",
    ),
    Setup(
        "results-prefork",
        "ours + per-request results, prefork -c 2",
        "ours",
        "prefork",
        results=True,
    ),
    Setup(
        "results-solo",
        "ours + per-request results, solo",
        "ours",
        "solo",
        results=True,
        # What the latency rows run (and why 5,000 calls/s is a lot for them).
        brokers=("redis",),
    ),
]


# -- the original package -------------------------------------------------------


def install_original(target: Path, timeout: float) -> tuple[Path | None, str]:
    """Install celery-batches 0.11 into ``target``; return it and a status line."""
    marker = target / f"celery_batches-{ORIGINAL_VERSION}.dist-info"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--disable-pip-version-check", "--target", str(target),
            f"celery-batches=={ORIGINAL_VERSION}",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"pip install failed: {exc!r}"
        if done.returncode != 0 or not marker.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"pip install failed: {tail[0]}"
    # It pins celery<5.7 in its metadata, which --no-deps ignores: check that
    # it imports and defines a task with the Celery installed here.
    probe = (
        "import celery, celery_batches as cb\n"
        "app = celery.Celery('probe', broker='memory://')\n"
        "app.task(base=cb.Batches, flush_every=2)(lambda requests: None)\n"
        "print(cb.__file__)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True,
            timeout=60, env=_env_with_path(target), cwd=HERE, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"import check failed: {exc!r}"
    if done.returncode != 0 or str(target) not in done.stdout:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"does not import with this Celery: {tail[0]}"
    import celery

    return target, f"installed, imports with celery {celery.__version__}"


# -- one run ------------------------------------------------------------------------


def _env_with_path(impl_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    # A worker whose benchmark was killed stops by itself (see workload.py).
    env["BENCH_PARENT_PID"] = str(os.getpid())
    # Only the chosen celery_batches and this directory: never both packages.
    env["PYTHONPATH"] = os.pathsep.join([str(impl_dir), str(HERE)])
    return env


@dataclass
class Context:
    """What every run needs to know."""

    messages: int
    work_dir: Path
    #: The snapshot of this checkout's package that "ours" runs import.
    ours_dir: Path
    original_dir: Path | None
    budget_end: float
    #: Seconds after its first execution at which a run is ended (0: never).
    max_seconds: float


def _worker_cmd(setup: Setup, queue: str, log: Path) -> list[str]:
    assert setup.pool is not None
    return [
        sys.executable, "-m", "celery", "-A", "workload", "worker",
        "-P", setup.pool, "-c", "1" if setup.pool == "solo" else "2",
        "-Q", queue, "-n", f"{queue}@%h",
        # Gossip, mingle and heartbeats talk to other workers on the shared
        # servers; they cost nothing per message, so they are left out.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", "WARNING", "--logfile", str(log),
    ]  # fmt: skip


def run_safely(ctx: Context, broker: str, setup: Setup, **options: Any) -> Measurement:
    """:func:`run_once`, with a failure reported in the result, not raised."""
    try:
        return run_once(ctx, broker, setup, **options)
    except Exception as exc:
        # One broker hiccup must not lose the other setups' results.
        return Measurement(expected=ctx.messages, error=f"run failed: {exc!r}")


def run_once(
    ctx: Context, broker: str, setup: Setup, *, messages: int | None = None,
    queued: int | None = None,
) -> Measurement:  # fmt: skip
    """Publish, drain and clean up once; return what was measured.

    ``queued`` messages are published (default: ``messages``) and the run
    stops once ``messages`` of them were processed.
    """
    url = brokers.BROKERS[broker]
    queue_type = brokers.QUEUE_TYPES.get(broker)
    count = messages or ctx.messages
    queued = queued or count
    from kombu.utils.uuid import uuid

    tag = uuid()[:8]
    queue = f"cb-bench-{setup.key}-{tag}"
    journal = ctx.work_dir / f"{queue}.journal"
    log = ctx.work_dir / f"{queue}.log"
    impl_file = ctx.work_dir / f"{queue}.impl"
    ids: list[str] = []
    try:
        ids = brokers.publish(url, queue, queued, TASK_NAME, queue_type=queue_type)
        # Start-up takes seconds; then the run lasts max_seconds, or as long
        # as draining at a slow 250 msg/s would.
        timeout = 45 + (ctx.max_seconds or count / 250)
        timeout = min(timeout, max(20.0, ctx.budget_end - time.monotonic()))
        if setup.impl == "bare":
            cmd = [
                sys.executable, "bare_consumer.py", url, queue, str(count),
                str(journal), str(timeout), "100", str(ctx.max_seconds),
                queue_type or "", "ack" if setup.acks else "noack",
            ]  # fmt: skip
            return run_consumer(
                cmd, env=_env_with_path(HERE), journal=journal, log=log,
                expected=count, timeout=timeout + 10, exits_by_itself=True,
            )  # fmt: skip
        impl_dir = ctx.original_dir if setup.impl == "original" else ctx.ours_dir
        assert impl_dir is not None
        env = _env_with_path(impl_dir)
        env.update(
            BENCH_BROKER=url,
            BENCH_QUEUE=queue,
            BENCH_JOURNAL=str(journal),
            BENCH_KIND="plain" if setup.impl == "plain" else "batches",
            BENCH_FLUSH_EVERY="100",
            BENCH_IMPL_FILE=str(impl_file),
        )
        if queue_type:
            env["BENCH_QUEUE_TYPE"] = queue_type
        if setup.impl == "original":
            # What the original's README recommends: no prefetch limit.
            env["BENCH_PREFETCH"] = "0"
        if not setup.redis_delivery:
            env["BENCH_REDIS_DELIVERY"] = "0"
        if setup.results:
            env["BENCH_BACKEND"] = brokers.redis_backend_url()
            env["BENCH_RESULTS"] = "1"
        result = run_consumer(
            _worker_cmd(setup, queue, log), env=env, journal=journal, log=log,
            expected=count, timeout=timeout, max_seconds=ctx.max_seconds,
            wake=lambda: brokers.publish(
                url, queue, 1, "bench.wake-up", queue_type=queue_type
            ),
        )  # fmt: skip
        if setup.impl != "plain" and result.error is None:
            imported = impl_file.read_text() if impl_file.exists() else "?"
            if not imported.startswith(str(impl_dir)):
                result.error = f"worker imported celery_batches from {imported}"
        return result
    finally:
        brokers.delete_queue(url, queue, queue_type)
        if setup.results and ids:
            brokers.delete_results(brokers.redis_backend_url(), ids)


# -- the whole benchmark --------------------------------------------------------


def _latency(ctx: Context) -> dict[str, Any]:
    """Latency rows on Redis: ours with batch delivery, and with Kombu's."""
    url = brokers.BROKERS["redis"]
    solo = next(s for s in SETUPS if s.key == "ours-solo")
    return latency.run_latency(
        [
            ("ours-solo", "ours, solo", {}),
            (
                "ours-solo-kombu",
                "ours, solo, Kombu's Redis delivery",
                {"BENCH_REDIS_DELIVERY": "0"},
            ),
        ],
        url=url,
        worker_cmd=lambda queue, log: _worker_cmd(solo, queue, log),
        env_for=lambda extra: {**_env_with_path(ctx.ours_dir), **extra},
        work_dir=ctx.work_dir,
        say=_say,
    )


def _revision() -> str:
    """The commit of the measured ``celery_batches``, ``+dirty`` if edited."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "celery_batches"], cwd=ROOT,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _snapshot(target: Path) -> Path:
    """Copy this checkout's ``celery_batches`` to ``target``; return ``target``.

    Every run of one benchmark then measures the same code, even if the
    checkout changes meanwhile.
    """
    shutil.copytree(
        ROOT / "celery_batches",
        target / "celery_batches",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return target


def _machine() -> dict[str, Any]:
    import celery
    import kombu

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        memory = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "platform": platform.platform(),
    }


def _summary(runs: list[Measurement]) -> dict[str, Any]:
    good = [r for r in runs if r.error is None]
    out: dict[str, Any] = {
        "runs": [
            {k: v for k, v in asdict(r).items() if k != "log_tail"} | {"rate": r.rate}
            for r in runs
        ],
        "errors": [r.error for r in runs if r.error],
    }
    if good:
        out.update(
            rate=statistics.median(r.rate for r in good),
            mean_batch=statistics.median(r.mean_batch for r in good),
            peak_rss_mib=statistics.median(r.peak_rss for r in good) / 2**20,
            peak_rss_hwm_mib=statistics.median(r.peak_rss_hwm for r in good) / 2**20,
        )
    return out


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="quick CI run")
    parser.add_argument("--profile", action="store_true", help="profile instead")
    parser.add_argument(
        "--sampler", choices=["cprofile", "py-spy"], default="cprofile",
        help="profiler used by --profile",
    )  # fmt: skip
    parser.add_argument("-n", "--messages", type=int, help="messages per run")
    parser.add_argument("--repeat", type=int, help="runs per setup (median)")
    parser.add_argument(
        "--brokers",
        help="comma-separated broker names (default: rabbitmq, rabbitmq-quorum "
        "and redis; --smoke: rabbitmq and redis)",
    )
    parser.add_argument(
        "--setups", help="comma-separated setup keys (default: all, or the smoke set)"
    )
    parser.add_argument(
        "--rss-queued", type=int, default=200_000,
        help="queue length for the memory scaling run (0 skips it)",
    )  # fmt: skip
    parser.add_argument(
        "--max-seconds", type=float,
        help="end each run this long after its first execution (0: drain all)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=float, help="seconds after which remaining runs are skipped"
    )
    parser.add_argument("--skip-micro", action="store_true", help="no microbenchmark")
    parser.add_argument(
        "--skip-publishing", action="store_true", help="no delay() / delay_many rows"
    )
    parser.add_argument(
        "--latency", choices=["on", "off", "auto"], default="auto",
        help="latency at fixed offered loads (auto: in a full run, not --smoke)",
    )  # fmt: skip
    parser.add_argument("--chart", type=Path, help="where to write the PNG chart")
    parser.add_argument(
        "--output", type=Path,
        help="results file (default: results/latest.json, smoke: results/smoke.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # SIGTERM (CI's timeout) unwinds like Ctrl-C, so that the running worker
    # is stopped and its queue deleted by the ``finally`` clauses.
    signal.signal(signal.SIGTERM, _interrupted)

    if args.profile:
        import profiling

        return profiling.main(args)

    smoke = args.smoke
    if args.output is None:
        # A smoke run must not replace the last full run's results.
        args.output = RESULTS / ("smoke.json" if smoke else "latest.json")
    messages = args.messages or (1000 if smoke else 20_000)
    repeat = args.repeat or (1 if smoke else 3)
    budget = args.budget or (100.0 if smoke else 2400.0)
    max_seconds = args.max_seconds
    if max_seconds is None:
        max_seconds = 0 if smoke else 10
    started = time.monotonic()
    budget_end = started + budget
    default_brokers = "rabbitmq,redis" if smoke else "rabbitmq,rabbitmq-quorum,redis"
    names = [b.strip() for b in (args.brokers or default_brokers).split(",")]
    names = [name for name in names if name]
    if args.setups:
        wanted = {s.strip() for s in args.setups.split(",")}
        setups = [s for s in SETUPS if s.key in wanted]
    else:
        setups = [s for s in SETUPS if (s.smoke if smoke else s.full)]
    RESULTS.mkdir(parents=True, exist_ok=True)

    data: dict[str, Any] = {
        "smoke": smoke,
        "messages": messages,
        "repeat": repeat,
        "flush_every": 100,
        "flush_interval": 1.0,
        "max_seconds": max_seconds,
        "machine": _machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "setups": {s.key: asdict(s) for s in setups},
        "brokers": {},
        "notes": [],
    }
    capped = f", runs end {max_seconds:g}s after their first execution"
    _say(
        f"celery-batches benchmark: {messages} messages queued per run"
        f"{capped if max_seconds else ''}, median of {repeat}"
    )

    # (d) the original package, in a directory of its own.
    original_dir: Path | None = None
    if any(s.impl == "original" for s in setups):
        original_dir, status = install_original(
            RESULTS / f"original-{ORIGINAL_VERSION}", timeout=60 if smoke else 180
        )
        data["original"] = status
        _say(f"original celery-batches {ORIGINAL_VERSION}: {status}")
        if original_dir is None:
            setups = [s for s in setups if s.impl != "original"]
            data["notes"].append(f"original {ORIGINAL_VERSION} skipped: {status}")

    # Brokers: reachable, else started, else skipped.
    live: list[str] = []
    for name in names:
        if name not in brokers.BROKERS:
            _say(f"unknown broker {name!r}; known: {', '.join(brokers.BROKERS)}")
            continue
        problem = brokers.ensure_broker(name)
        if problem:
            _say(f"{name}: skipped, {problem}")
            data["brokers"][name] = {"skipped": problem}
        else:
            live.append(name)
            data["brokers"][name] = {
                "url": brokers.BROKERS[name],
                "server": brokers.server_version(name),
                "setups": {},
            }
    redis_ok = "redis" in live or brokers.ensure_broker("redis") is None
    if not redis_ok and any(s.results for s in setups):
        setups = [s for s in setups if not s.results]
        data["notes"].append("results setups skipped: no Redis for the backend")

    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        data["revision"] = _revision()
        ours = _snapshot(Path(tmp) / "ours")
        ctx = Context(
            messages=messages,
            work_dir=Path(tmp),
            ours_dir=ours,
            original_dir=original_dir,
            budget_end=budget_end,
            max_seconds=max_seconds,
        )
        runs: dict[tuple[str, str], list[Measurement]] = {}
        # Repeats are interleaved, so that drift on the shared machine
        # spreads over every setup instead of biasing one.
        for round_ in range(repeat):
            for broker in live:
                for setup in setups:
                    if setup.brokers is not None and broker not in setup.brokers:
                        continue
                    if time.monotonic() > budget_end:
                        break
                    result = run_safely(ctx, broker, setup)
                    runs.setdefault((broker, setup.key), []).append(result)
                    _say(report.progress(round_ + 1, repeat, broker, setup, result))
        skipped = [
            (b, s.key)
            for b in live
            for s in setups
            if (s.brokers is None or b in s.brokers)
            and len(runs.get((b, s.key), ())) < repeat
        ]
        if skipped:
            data["notes"].append(f"time budget of {budget:.0f}s hit; short: {skipped}")
        for (broker, key), measured in runs.items():
            data["brokers"][broker]["setups"][key] = _summary(measured)

        # Memory with a long queue, at default settings: does the worker
        # hold more messages when more are waiting? Compared with the
        # ours-prefork runs above, which had ``messages`` queued.
        baseline = next(s for s in SETUPS if s.key == "ours-prefork")
        if not smoke and args.rss_queued and baseline in setups:
            for broker in live:
                if time.monotonic() > budget_end:
                    data["notes"].append(f"memory scaling on {broker} skipped: budget")
                    continue
                small = data["brokers"][broker]["setups"].get(baseline.key, {})
                large = run_safely(ctx, broker, baseline, queued=args.rss_queued)
                _say(report.progress(1, 1, broker, baseline, large, args.rss_queued))
                if large.error is None and small.get("peak_rss_mib"):
                    large_mib = large.peak_rss / 2**20
                    data["brokers"][broker]["rss_scaling"] = {
                        "queued_small": messages,
                        "queued_large": args.rss_queued,
                        "processed_small": statistics.median(
                            r["processed"] for r in small["runs"] if not r["error"]
                        ),
                        "processed_large": large.processed,
                        "rate_large": large.rate,
                        "small_mib": small["peak_rss_mib"],
                        "large_mib": large_mib,
                        "ratio": large_mib / small["peak_rss_mib"],
                    }

        # This process imports the snapshot from here on (publishing,
        # latency's publisher, the microbenchmark).
        sys.path.insert(0, str(ours))
        if not args.skip_publishing:
            data["publishing"] = publishing.run_publishing(
                [b for b in live if b in ("redis", "rabbitmq")],
                repeat=repeat,
                calls=(
                    {"delay": 300, "delay_many": 2000}
                    if smoke
                    else {"delay": 3000, "delay_many": 20_000}
                ),
                say=_say,
            )
        run_latency = args.latency == "on" or (args.latency == "auto" and not smoke)
        if run_latency and "redis" in live:
            data["latency"] = _latency(ctx)

        # (f) the strategy microbenchmark, in this process, on the snapshot.
        if not args.skip_micro and time.monotonic() < budget_end + 60:
            from microbench import run_microbench

            data["microbench"] = run_microbench(
                count=1000 if smoke else 5000, rounds=3 if smoke else 7
            )

    data["seconds"] = time.monotonic() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2, default=str) + "\n")
    _say("")
    _say(report.table(data))
    _say(f"\nwrote {args.output}")
    chart = args.chart
    if chart is None:
        # A smoke run's chart must not replace the one the docs show.
        chart = RESULTS / "benchmark-smoke.png" if smoke else DOCS_CHART
    if report.chart(data, chart):
        _say(f"wrote {chart}")
    latency_chart = RESULTS / "latency-smoke.png" if smoke else DOCS_LATENCY_CHART
    if data.get("latency") and report.latency_chart(data, latency_chart):
        _say(f"wrote {latency_chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
