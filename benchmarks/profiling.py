"""Where our batch worker spends its time per message.

``python benchmarks/run.py --profile`` profiles our worker (``flush_every=100``,
default settings) on each broker, with the solo pool (consumer, flush and
batch body in one process) and with prefork ``-c 2``. Two samplers:

``--sampler cprofile`` (default, nothing to install)
    The worker drains the queue under :mod:`cProfile`, which sees the main
    process only. Exact call counts, but its per-call overhead inflates small
    functions: read the times as shares.
``--sampler py-spy`` (``pip install py-spy``)
    py-spy samples the running worker and its pool children for a few
    seconds at full speed. Each sample is charged to one step, the most
    specific one found in its stack; times per message are the step's share
    of the samples times the wall time per message.

Reports go to the terminal and ``benchmarks/results/profile-<sampler>.txt``.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import brokers
from harness import Journal, run_consumer, stop_process

__all__ = ["CHILD_STEPS", "LIBRARIES", "STEPS", "STEPS_SPY", "main"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

#: cProfile steps, ``(label, file suffix, function)``, inclusive times:
#: the strategy contains ``Request()``; the flush contains the snapshots and,
#: with the solo pool, the batch run and the acks.
STEPS = [
    ("idle in poll (epoll)", "~", "<method 'poll' of 'select.epoll' objects>"),
    ("AMQP reads (py-amqp drain_events)", "amqp/connection.py", "drain_events"),
    ("Redis reads (BRPOP)", "kombu/transport/redis.py", "_brpop_read"),
    ("redis.Redis() built by kombu", "kombu/transport/redis.py", "_create_client"),
    ("message decode (JSON)", "kombu/message.py", "decode"),
    ("our strategy, per message", "celery_batches/strategy.py", "task_message_handler"),
    ("  Celery Request()", "celery/worker/request.py", "__init__"),
    ("  buffer add (and flush)", "celery_batches/collector.py", "add"),
    ("flush: dispatch", "celery_batches/collector.py", "dispatch"),
    ("  SimpleRequest snapshots", "celery_batches/request.py", "from_request"),
    ("    Request._context: Context()", "celery/worker/request.py", "_context"),
    ("  pool.apply_async", "celery/concurrency/base.py", "apply_async"),
    ("  batch run (trace)", "celery_batches/trace.py", "run_batch"),
    ("  on_accepted (acks)", "celery_batches/dispatch.py", "on_accepted"),
    ("  on_success (settle)", "celery_batches/dispatch.py", "on_success"),
    ("Message.ack", "kombu/message.py", "ack"),
]

#: py-spy steps of the main process. A sample is charged to the first of
#: these that appears anywhere in its stack (``idle``: its innermost frame)...
STEPS_SPY = [
    ("idle: event loop waiting (poll)", r"^_?epoll\.poll |^poll |^select "),
    ("redis.Redis() built per command (kombu)", r"^Redis\.__init__ \(redis/"),
    ("JSON decode of the message body", r"^Message\.decode \(kombu/"),
    ("Celery Request()", r"^Request\.__init__ \(celery/worker/request"),
    ("Request._context: Context() per message", r"^Request\._context \("),
    ("SimpleRequest snapshots", r"\(celery_batches/request\.py"),
    ("batch body + trace (run_batch)", r"^run_batch \(celery_batches/"),
    ("acks: on_accepted, Message.ack", r"^BatchJob\.on_accepted|^Message\.ack \("),
    ("settle: on_success", r"^BatchJob\.on_success"),
]

#: ... else to the library of its innermost frame that is not the standard
#: library's (so time in ``socket`` under redis-py is redis-py's).
LIBRARIES = [
    ("Redis client I/O (redis-py)", r"\(redis/"),
    ("AMQP client I/O (py-amqp)", r"\(amqp/"),
    ("prefork: jobs to, results from children", r"\((billiard|celery/concurrency)/"),
    ("our strategy + collector (rest)", r"\(celery_batches/"),
    ("kombu / celery / vine (rest)", r"\((kombu|celery|vine|click)/"),
]

#: The same for a prefork pool child.
CHILD_STEPS = [
    ("idle: waiting for a job", r"^Connection\._recv \(billiard/|^_?epoll\.poll "),
    ("batch body + trace (run_batch)", r"^run_batch \(celery_batches/"),
    ("unpickle job, pickle outcomes", r"pickle|loads|dumps|_recv|send"),
]


def _worker(
    broker: str, pool: str, queue: str, journal: Path, log: Path
) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
        BENCH_BROKER=brokers.BROKERS[broker],
        BENCH_QUEUE=queue,
        BENCH_JOURNAL=str(journal),
        BENCH_KIND="batches",
        BENCH_FLUSH_EVERY="100",
    )
    cmd = [
        "-m", "celery", "-A", "workload", "worker",
        "-P", pool, "-c", "1" if pool == "solo" else "2", "-Q", queue,
        "-n", f"{queue}@%h", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-l", "WARNING", "--logfile", str(log),
    ]  # fmt: skip
    return cmd, env


def _cprofile(broker: str, pool: str, messages: int, tmp: Path) -> str:
    url = brokers.BROKERS[broker]
    queue = f"cb-bench-profile-{pool}-{os.getpid()}-{int(time.time())}"
    journal, log, prof = (tmp / f"{queue}.{ext}" for ext in ("j", "log", "prof"))
    args, env = _worker(broker, pool, queue, journal, log)
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), *args]
    try:
        brokers.publish(url, queue, messages, "bench.work")
        result = run_consumer(
            cmd, env=env, journal=journal, log=log, expected=messages,
            timeout=60 + messages / 50,
            wake=lambda: brokers.publish(url, queue, 1, "bench.wake-up"),
        )  # fmt: skip
    finally:
        brokers.delete_queue(url, queue)
    title = f"{broker}, {pool}, cProfile: {messages} messages"
    if result.error or not prof.exists():
        return f"== {title}: FAILED {result.error}\n{result.log_tail}"
    raw: dict[Any, Any] = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    lines = [
        f"== {title}, {result.rate:,.0f} msg/s under cProfile, "
        f"batch {result.mean_batch:.1f} (main process only)",
        f"{'step, inclusive':<40} {'µs/msg':>8} {'calls':>9}",
    ]
    for label, suffix, name in STEPS:
        cumulative = calls = 0.0
        for (filename, _line, function), (_cc, nc, _tt, ct, _) in raw.items():
            if function == name and filename.endswith(suffix):
                cumulative += ct
                calls += nc
        lines.append(f"{label:<40} {cumulative / messages * 1e6:>8.1f} {calls:>9.0f}")
    lines.append("functions with the most own time, µs/msg and calls:")
    top = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:15]
    for (filename, line, function), (_cc, nc, tt, _ct, _) in top:
        where = "/".join(Path(filename).parts[-2:])
        lines.append(
            f"  {tt / messages * 1e6:7.1f} {nc:>9}  {where}:{line}({function})"
        )
    return "\n".join(lines)


def _charge(
    frames: list[str],
    steps: list[tuple[str, re.Pattern[str]]],
    libraries: list[tuple[str, re.Pattern[str]]],
) -> str:
    (idle_label, idle), *specific = steps
    if frames and idle.search(frames[-1]):
        return idle_label
    for label, pattern in specific:
        if any(pattern.search(frame) for frame in frames):
            return label
    for frame in reversed(frames):
        for label, pattern in libraries:
            if pattern.search(frame):
                return label
    return "other"


def _categorise(raw_path: Path) -> tuple[dict[str, Counter[str]], Counter[str]]:
    def compiled(pairs: list[tuple[str, str]]) -> list[tuple[str, re.Pattern[str]]]:
        return [(label, re.compile(pattern)) for label, pattern in pairs]

    main_steps, child_steps = compiled(STEPS_SPY), compiled(CHILD_STEPS)
    libraries = compiled(LIBRARIES)
    by_process: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for line in raw_path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count_text = line.rsplit(" ", 1)
        count = int(count_text)
        frames = stack.split(";")
        # py-spy starts a child's stack with its parent's "process" frame.
        owners = [f for f in frames if f.startswith("process ")]
        frames = frames[len(owners) :]
        if len(owners) <= 1:
            role, label = "main process", _charge(frames, main_steps, libraries)
        else:
            role = "pool children"
            label = _charge(frames, child_steps, []) or "pool child loop (rest)"
            if label == "other":
                label = "pool child loop (rest)"
        by_process.setdefault(role, Counter())[label] += count
        totals[role] += count
    return by_process, totals


def _py_spy(
    spy: str, broker: str, pool: str, messages: int, tmp: Path, seconds: float
) -> str:
    url = brokers.BROKERS[broker]
    queue = f"cb-bench-profile-{pool}-{os.getpid()}-{int(time.time())}"
    journal, log, raw = (tmp / f"{queue}.{ext}" for ext in ("j", "log", "raw"))
    args, env = _worker(broker, pool, queue, journal, log)
    title = f"{broker}, {pool}, py-spy"
    brokers.publish(url, queue, messages, "bench.work")
    process = subprocess.Popen(
        [sys.executable, *args], cwd=HERE, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    reader = Journal(journal)
    try:
        deadline = time.monotonic() + 60
        while not reader.poll() and time.monotonic() < deadline:
            time.sleep(0.02)
        before, started = reader.poll(), time.time()
        subprocess.run(
            [
                spy, "record", "--pid", str(process.pid), "--subprocesses",
                "--idle", "--format", "raw", "--rate", "200", "--duration",
                str(int(seconds)), "--output", str(raw),
            ],
            capture_output=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
        processed, elapsed = reader.poll() - before, time.time() - started
    finally:
        stop_process(
            process, timeout=30,
            wake=lambda: brokers.publish(url, queue, 1, "bench.wake-up"),
        )  # fmt: skip
        brokers.delete_queue(url, queue)
    if not raw.exists() or processed <= 0:
        return f"== {title}: FAILED (processed {processed}, samples: {raw.exists()})"
    per_message = elapsed / processed * 1e6
    by_process, totals = _categorise(raw)
    lines = [
        f"== {title}: {processed:,} messages in {elapsed:.1f}s while sampled, "
        f"{per_message:.0f} µs of wall time per message",
    ]
    for process_name, counter in sorted(by_process.items()):
        lines.append(f"{process_name} ({totals[process_name]} samples):")
        for label, count in counter.most_common():
            share = count / totals[process_name]
            lines.append(f"  {share:6.1%}  {share * per_message:7.1f} µs/msg  {label}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``run.py --profile``."""
    sampler = getattr(args, "sampler", "cprofile")
    messages = args.messages or (2000 if args.smoke else 20_000)
    spy = shutil.which("py-spy") or shutil.which(
        "py-spy", path=str(Path(sys.executable).parent)
    )
    if sampler == "py-spy" and spy is None:
        print("py-spy is not installed: pip install py-spy")
        return 1
    names = [b.strip() for b in args.brokers.split(",") if b.strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    reports = []
    with tempfile.TemporaryDirectory(prefix="cb-profile-") as tmp:
        for broker in names:
            problem = brokers.ensure_broker(broker)
            if problem:
                print(f"{broker}: skipped, {problem}")
                continue
            for pool in ("solo", "prefork"):
                if sampler == "py-spy":
                    assert spy is not None
                    # Enough messages that the queue outlasts the sampling.
                    text = _py_spy(spy, broker, pool, messages, Path(tmp), 6)
                else:
                    text = _cprofile(broker, pool, messages, Path(tmp))
                print(text + "\n", flush=True)
                reports.append(text)
    path = RESULTS / f"profile-{sampler}.txt"
    path.write_text("\n\n".join(reports) + "\n")
    print(f"wrote {path}")
    return 0
