"""Randomized estimators of the trace, diagonal and squared Frobenius norm.

One file per method, named after it. All take ``num_matvecs`` (the budget of products),
``distribution`` (``"rademacher"``, ``"normal"`` or ``"sphere"``), ``generator`` (NOTE
[estimator randomness] in :mod:`curvops.linalg._sampling`), ``return_error`` (return an
:class:`EstimateWithError`, whose ``estimate ± 2 * error`` is an approximate 95% interval:
NOTE [estimator error bars] in :mod:`curvops.linalg.estimators._error_bars`), and stop
adaptively with ``target_rel_error`` and ``max_matvecs`` (a
:class:`BudgetExhaustedWarning` if the budget runs out first).
"""

from curvops.linalg._sampling import Distribution
from curvops.linalg.estimators.hutchinson_diag import hutchinson_diag
from curvops.linalg.estimators.hutchinson_squared_fro import hutchinson_squared_fro
from curvops.linalg.estimators.hutchinson_squared_fro_halved import (
    hutchinson_squared_fro_halved,
)
from curvops.linalg.estimators.hutchinson_trace import hutchinson_trace
from curvops.linalg.estimators.hutchpp_trace import hutchpp_trace
from curvops.linalg.estimators.result import BudgetExhaustedWarning, EstimateWithError
from curvops.linalg.estimators.xdiag import xdiag
from curvops.linalg.estimators.xtrace import xtrace

__all__ = [
    "BudgetExhaustedWarning",
    "Distribution",
    "EstimateWithError",
    "hutchinson_diag",
    "hutchinson_squared_fro",
    "hutchinson_squared_fro_halved",
    "hutchinson_trace",
    "hutchpp_trace",
    "xdiag",
    "xtrace",
]
