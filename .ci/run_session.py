"""Run the interactive sessions (``.. code-block:: pycon``) of an rst page.

Usage: ``python run_session.py PAGE.rst``, in the directory a reader would
open their Python shell in. Each session runs as doctest runs it (``...``
matches anything), so every output must be the one the page shows. Exits 1,
with doctest's report of what differed, if any does, or if the page has no
session. Needs nothing but the standard library: it runs in the clean
virtual environments of ``.ci/fresh-install``.
"""

from __future__ import annotations

import doctest
import sys
import textwrap
from pathlib import Path

DIRECTIVE = ".. code-block:: pycon"


def sessions(page: Path) -> list[str]:
    """Return the page's pycon blocks, dedented."""
    lines = page.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() == DIRECTIVE:
            body = []
            for following in lines[i + 1 :]:
                if following and not following[0].isspace():
                    break
                body.append(following)
            found.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return found


def main(page: Path) -> int:
    blocks = sessions(page)
    if not blocks:
        print(f"{page}: no pycon session to run", file=sys.stderr)
        return 1
    # The shell a reader opens imports modules from its working directory.
    sys.path.insert(0, "")
    failed = tried = 0
    for n, block in enumerate(blocks, 1):
        name = f"{page.name} session {n}"
        test = doctest.DocTestParser().get_doctest(block, {}, name, str(page), 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test, out=sys.stdout.write)
        result = runner.summarize(verbose=False)
        failed += result.failed
        tried += result.attempted
    print(f"{page.name}: {tried} examples, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
