"""Shared fixtures: parametrization over the case registry in ``tests/cases.py``.

``tests/`` is put on ``sys.path`` by pytest (rootdir conftest, default import mode), so test
files anywhere below it can ``from cases import make_case, FISHER_CASES``.
"""

import pytest
from cases import FISHER_CASES, Case, case_ids, make_case


@pytest.fixture(params=case_ids())
def case(request) -> Case:
    """A fresh instance of every registered case."""
    return make_case(request.param)


@pytest.fixture(params=FISHER_CASES)
def fisher_case(request) -> Case:
    """A fresh instance of every case whose loss supports Fisher-type matrices."""
    return make_case(request.param)
