import importlib.util

import pytest
from conftest import load_example

needs_laplace = pytest.mark.skipif(
    importlib.util.find_spec("laplace") is None,
    reason="laplace-torch (the `laplace` extra) is not installed",
)


@needs_laplace
def test_laplace_is_less_confident_on_unseen_classes():
    results = load_example("laplace_approximation").main()
    for name in ("all_kron", "all_diag"):
        assert results[f"{name}_auroc"] > results["map_auroc"] + 0.02, results
    for name in ("all_kron", "all_diag", "last_layer_kron", "last_layer_full"):
        assert results[f"{name}_confidence_unseen"] < results["map_confidence_unseen"], results
        assert results[f"{name}_log_marglik"] < 0 < results[f"{name}_prior_precision"], results
