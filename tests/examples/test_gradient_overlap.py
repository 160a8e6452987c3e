import torch
from conftest import load_example


def test_gradient_lies_in_top_hessian_eigenspace():
    results = load_example("gradient_overlap").main()
    assert results["gradient_overlap"] > 20 * results["random_baseline"], results
    # a random direction's overlap is about k / D
    assert results["random_direction_overlap"] < 5 * results["random_baseline"], results


def test_overlap_of_known_subspace():
    module = load_example("gradient_overlap")
    U = torch.eye(4, dtype=torch.float64)[:, :2]
    g = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    assert module.overlap(g, U) == 1.0
    assert module.overlap(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64), U) == 0.5
