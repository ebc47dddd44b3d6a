"""The Django example project, run as a Django user runs it.

``manage.py migrate`` on a fresh SQLite file, a ``celery -A mysite worker``
subprocess (prefork, the default pool) on Redis with the
``django-celery-results`` backend, and callers in another process that set
Django up as ``manage.py shell`` does. Django is set up only in those
subprocesses: its settings and app registry are process-wide, and this
test process runs every other test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu.utils.uuid import uuid

from tests.harness.brokers import REDIS_URL, ROOT, require_server
from tests.harness.wait import wait_for
from tests.harness.worker import QUIET_STEPS

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PROJECT = ROOT / "docs" / "examples" / "django_project"
PAGE = ROOT / "docs" / "django.rst"

#: How many calls the first test sends at once: more than one batch of 100.
CALLS = 250

#: The project's settings, with what a test must not share: its database
#: file, the test Redis and a queue no other test's worker consumes.
SETTINGS = """\
from mysite.settings import *  # noqa: F403

DATABASES["default"]["NAME"] = {database!r}  # noqa: F405
CELERY_BROKER_URL = {broker!r}
CELERY_TASK_DEFAULT_QUEUE = {queue!r}
"""

#: The page's shell session (from the file named by its second argument)
#: first, then as many calls as its third argument says, at once; writes
#: what it saw as JSON to the file named by its first argument.
MANY_CALLS = """\
import doctest, json, sys

import django

django.setup()

from events.tasks import record_event

with open(sys.argv[2]) as f:
    session = f.read()
test = doctest.DocTestParser().get_doctest(session, {}, "django.rst", None, 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
runner.run(test)
failed, tried = runner.summarize(verbose=False)
calls = [record_event.delay("click", n=n) for n in range(int(sys.argv[3]))]
answers = [[call.id, call.get(timeout=60)] for call in calls]
with open(sys.argv[1], "w") as f:
    json.dump({"session": [failed, tried], "answers": answers}, f)
"""

#: Two good calls and a bad one (no kind: NOT NULL), in one batch of three.
ONE_BAD_CALL = """\
import json, sys

import django

django.setup()

from events.tasks import record_event

calls = [
    record_event.delay("signup", user="ada"),
    record_event.delay(None, user="eve"),
    record_event.delay("signup", user="bob"),
]
outcomes = []
for call in calls:
    try:
        outcomes.append(["SUCCESS", call.get(timeout=60)])
    except Exception as exc:
        outcomes.append([call.state, type(exc).__name__])
with open(sys.argv[1], "w") as f:
    json.dump(outcomes, f)
"""


def shell_session() -> str:
    """The ``manage.py shell`` session of docs/django.rst, dedented."""
    text = PAGE.read_text()
    start = text.index(".. code-block:: pycon")
    lines = []
    for line in text[start:].splitlines()[1:]:
        if line and not line[0].isspace():
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines)).strip() + "\n"


@dataclass
class Project:
    """A migrated copy of the project's database and its running worker."""

    tmp: Path
    env: dict[str, str]
    database: Path
    log: Path
    banner: Path

    def call(self, script: str, *args: str) -> Any:
        """Run ``script`` as a caller with Django set up; return its JSON."""
        out = self.tmp / f"out-{uuid()}.json"
        subprocess.run(
            [sys.executable, "-c", script, str(out), *args],
            cwd=PROJECT,
            env=self.env,
            check=True,
            timeout=120,
        )
        return json.loads(out.read_text())

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.database)) as db:
            return list(db.execute(sql))


@contextmanager
def running_project(tmp: Path, extra_settings: str = "") -> Iterator[Project]:
    """``manage.py migrate``, then ``celery -A mysite worker`` until the end."""
    require_server(REDIS_URL)
    database = tmp / "db.sqlite3"
    settings = SETTINGS.format(
        database=str(database), broker=REDIS_URL, queue=f"dj-{uuid()}"
    )
    (tmp / "test_settings.py").write_text(settings + extra_settings)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp), str(PROJECT), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "test_settings",
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=PROJECT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    project = Project(tmp, env, database, tmp / "worker.log", tmp / "worker.out")
    command = [sys.executable, "-m", "celery", "-A", "mysite", "worker", "-l", "INFO"]
    logging = ["--logfile", str(project.log)]
    with project.banner.open("w") as stdout:
        worker = subprocess.Popen(
            [*command, "-c", "2", *logging, *QUIET_STEPS],
            cwd=PROJECT,
            env=env,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert worker.poll() is None, project.banner.read_text()
            return project.log.exists() and " ready." in project.log.read_text()

        wait_for(ready, timeout=60, what="the Django project's worker")
        yield project
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
    assert worker.returncode == 0, project.log.read_text()


def test_the_project_inserts_in_batches_and_answers_each_call(tmp_path: Path) -> None:
    # given the project's worker, which knows the task only through
    # autodiscovery, writing rows and results to a fresh SQLite database
    with running_project(tmp_path) as project:
        # when the page's shell session runs, then 250 calls are sent at once
        session = tmp_path / "session.txt"
        session.write_text(shell_session())
        seen = project.call(MANY_CALLS, str(session), str(CALLS))
    log = project.log.read_text()
    # then the worker's banner lists the task autodiscovery found
    assert ". events.tasks.record_event" in project.banner.read_text()
    # and the session gave the output the page shows
    assert seen["session"] == [0, 4], "the page's session differs; see above"
    # and each call was answered with the id of its own row
    rows = dict(project.query("SELECT id, payload FROM events_event"))
    ids = [row_id for _, row_id in seen["answers"]]
    assert len(set(ids)) == CALLS
    payloads = [json.loads(rows[row_id]) for row_id in ids]
    assert payloads == [{"n": n} for n in range(CALLS)]
    # and django-celery-results holds each call's result, its row id
    stored = dict(
        project.query(
            "SELECT task_id, result FROM django_celery_results_taskresult"
            " WHERE status = 'SUCCESS'"
        )
    )
    for task_id, row_id in seen["answers"]:
        assert json.loads(stored[task_id]) == row_id
    # and the rows went in as batches of up to 100, one transaction each
    sizes = [int(n) for n in re.findall(r"inserted (\d+) events in one", log)]
    assert sum(sizes) == CALLS + 1  # and the session's one call
    assert max(sizes) == 100 and len(sizes) < CALLS / 10
    assert "ERROR" not in log and "Traceback" not in log, log


def test_one_bad_call_rolls_back_its_whole_batch(tmp_path: Path) -> None:
    # given the project's worker, its task set to batches of exactly three
    # (task_annotations, as a project may set any task option)
    annotations = (
        'CELERY_TASK_ANNOTATIONS = {"events.tasks.record_event":'
        ' {"flush_every": 3, "flush_interval": 60}}\n'
    )
    with running_project(tmp_path, annotations) as project:
        # when a batch holds two good calls and one without a kind
        outcomes = project.call(ONE_BAD_CALL)
    # then every call of the batch failed with the database's error
    assert outcomes == [["FAILURE", "IntegrityError"]] * 3
    # and none of its rows was written
    assert project.query("SELECT COUNT(*) FROM events_event") == [(0,)]
    failed = project.query(
        "SELECT COUNT(*) FROM django_celery_results_taskresult WHERE status = 'FAILURE'"
    )
    assert failed == [(3,)]
