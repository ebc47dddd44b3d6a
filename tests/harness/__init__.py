"""The integration and fault tests' harness: see ``tests/harness/README.rst``.

Import from the modules (``tests.harness.worker``, ``tests.harness.journal``,
...): this package imports nothing itself, so that a worker subprocess, or
the soak importing :mod:`tests.harness.servers`, loads only what it uses.
"""
