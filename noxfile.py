"""nox sessions: the tests that depend on Lightning's internals, against another Lightning than the installed one.

``nox -s lightning`` runs them with the newest release of the tested range (pyproject.toml), ``nox -s lightning --
2.7.0`` with any other release, to see whether it can join the range.
"""

from __future__ import annotations

import re
from pathlib import Path

import nox

#: The tests of exact resume and preemption, and of the Lightning internals they use.
RESUME_TESTS = [
    "tests/test_lightning_internals.py",
    "tests/checkpointing",
    "tests/test_optim.py",
    "tests/cli/test_resume_runs.py",
]


def tested_range() -> str:
    """The Lightning requirement of pyproject.toml (``lightning>=2.6,<2.7``)."""
    text = (Path(__file__).parent / "pyproject.toml").read_text()
    return re.search(r'"(lightning[<>=!~][^"]*)"', text).group(1)


@nox.session
def lightning(session: nox.Session) -> None:
    """Install this package, then the Lightning release given after ``--``, and run :data:`RESUME_TESTS`."""
    session.install("-e", ".[dev]")
    session.install(f"lightning=={session.posargs[0]}" if session.posargs else tested_range())
    session.run("python", "-c", "import lightning; print('lightning', lightning.__version__)")
    session.run("python", "-m", "pytest", *RESUME_TESTS, "-x", "-q", env={"WANDB_MODE": "offline"})
