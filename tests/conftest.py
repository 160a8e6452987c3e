"""Shared fixtures: parametrization over the case registry in ``tests/cases.py``.

``tests/`` is put on ``sys.path`` by pytest (rootdir conftest, default import mode), so test
files anywhere below it can ``from cases import make_case, FISHER_CASES``.
"""

import os

import pytest
from cases import FISHER_CASES, Case, case_ids, make_case
from hypothesis import HealthCheck, settings

# property-based tests (tests/properties): a small, reproducible budget in CI (derandomized,
# no example database), more examples locally with HYPOTHESIS_PROFILE=curvops-dev
settings.register_profile(
    "curvops-ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "curvops-dev",
    max_examples=150,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "curvops-ci"))


@pytest.fixture(params=case_ids())
def case(request) -> Case:
    """A fresh instance of every registered case."""
    return make_case(request.param)


@pytest.fixture(params=FISHER_CASES)
def fisher_case(request) -> Case:
    """A fresh instance of every case whose loss supports Fisher-type matrices."""
    return make_case(request.param)
