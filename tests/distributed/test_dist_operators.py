"""Distributed operators on 2 and 3 local processes (gloo, CPU) against single-process truths.

Each session starts its processes once (``dist_launcher.run_session``) and runs every check of
``dist_worker.py`` on every rank; each test below reports one check on all ranks. A check that
raised on any rank fails here with that rank's traceback; a hung session fails with the
workers' output after a time limit instead of blocking the suite.
"""

import pytest
from dist_launcher import run_session
from dist_worker import checks_for

pytestmark = pytest.mark.slow  # two sessions of local processes, about a minute on 2 idle cores


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_session(2)


@pytest.fixture(scope="module")
def three_ranks() -> list[dict]:
    return run_session(3)


def _report(results: list[dict], name: str) -> None:
    missing = [rank for rank, r in enumerate(results) if name not in r]
    assert not missing, f"check {name} did not run on rank(s) {missing}"
    entries = [r[name] for r in results]
    failed = [(rank, e["message"]) for rank, e in enumerate(entries) if e["status"] == "failed"]
    if failed:
        pytest.fail("\n".join(f"--- rank {rank} ---\n{msg}" for rank, msg in failed))
    skipped = {e["message"] for e in entries if e["status"] == "skipped"}
    if skipped:
        assert len(skipped) == 1 and all(e["status"] == "skipped" for e in entries), entries
        pytest.skip(skipped.pop())


@pytest.mark.parametrize("name", checks_for(2))
def test_two_processes(two_ranks, name):
    _report(two_ranks, name)


@pytest.mark.parametrize("name", checks_for(3))
def test_three_processes(three_ranks, name):
    _report(three_ranks, name)
