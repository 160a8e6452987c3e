"""The ``curvops`` command line: a visual tour of curvature matrices and an analysis tool.

Sub-commands (see :func:`curvops.cli.main.main`):

* ``curvops tour``: trains a small CNN on scikit-learn's 8x8 digits and renders the paper's
  Fig. 2 (curvature matrices side by side), spectral densities and estimator accuracy curves
  (paper Fig. 4) together with a Markdown report.
* ``curvops analyze``: the same analyses for a user's own model and data factories.

The helpers in this package (digits data, the tour's CNN, a short training loop) are also
used by the runnable examples in ``examples/``.
"""
