"""demo.py, run as a newcomer runs it: a real worker on a broker with no server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.brokers import ROOT
from tests.harness.wait import wait_for


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    # The demo bounds itself (--timeout, then at most 30 s to stop its
    # worker); this bound only catches a demo that hangs anyway.
    return subprocess.run(
        [sys.executable, "demo.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )


def worker_pid(stdout: str) -> int:
    match = re.search(r"^worker ready in [\d.]+s \(pid (\d+),", stdout, re.M)
    assert match, stdout
    return int(match.group(1))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_demo_runs_every_call_and_ends_with_a_summary() -> None:
    # when the demo sends 300 calls on its default, server-less broker
    demo = run_demo("--calls", "300", "--timeout", "90")
    # then every call ran, in batches it showed as they were flushed
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert re.search(
        r"^Summary: 300/300 calls ran in \d+ batches, "
        r"mean batch size \d+\.\d, \d+ calls/s",
        demo.stdout,
        re.M,
    ), demo.stdout
    assert re.search(r"^  batch +1: +\d+ calls  by (size|interval)", demo.stdout, re.M)
    # and, its output not being a terminal, it drew no progress bar (which
    # moves the cursor with escape sequences)
    assert "\x1b" not in demo.stdout
    assert gone(worker_pid(demo.stdout))


@pytest.mark.slow
def test_demo_exits_non_zero_when_not_every_call_ran() -> None:
    # when the demo gives up long before its calls can have run
    demo = run_demo("--calls", "100000", "--timeout", "0.5")
    # then it says so, exits 1 and has stopped its worker
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert re.search(r"^FAILED: timed out after 0.5s; \d+ of 100000", demo.stdout, re.M)
    wait_for(lambda: gone(worker_pid(demo.stdout)), timeout=5, what="worker gone")
    # it keeps the worker's log for a look; this test has no use for it
    log = re.search(r"^worker log: (.+)$", demo.stdout, re.M)
    assert log, demo.stdout
    shutil.rmtree(Path(log.group(1)).parent)
