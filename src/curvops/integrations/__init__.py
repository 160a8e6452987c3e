"""Adapters that let client libraries use curvops' operators, on its public API only.

* :mod:`curvops.integrations.laplace`: curvature backends for laplace-torch
  (``pip install "curvops[laplace]"``).

Each adapter imports its client library when it is imported itself, so importing
:mod:`curvops` never needs them.
"""
