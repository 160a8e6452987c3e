"""Pruning with an estimated Hessian diagonal (paper §3.1, Application 4).

LeCun, Y., Denker, J. S., Solla, S. A. (1989). Optimal brain damage. NeurIPS. Hassibi, B.,
Stork, D. G. (1992). Second order derivatives for network pruning: Optimal brain surgeon.
NeurIPS.

Setting parameter :math:`i` of a trained net to zero increases the loss by about

.. math::
    \\rho_i = \\frac{[\\theta]_i^2}{2 [H^{-1}]_{ii}} \\approx \\frac{[\\theta]_i^2 H_{ii}}{2}

under the diagonal approximation :math:`[H^{-1}]_{ii} \\approx 1 / H_{ii}`. This example
estimates the Hessian's diagonal with Hutchinson's diagonal estimator (Bekas, C.,
Kokiopoulou, E., Saad, Y. (2007). An estimator for the diagonal of a matrix), prunes the
parameters with the smallest saliency :math:`\\rho_i`, and compares the loss increase with
magnitude pruning (the smallest :math:`|\\theta_i|`) at the same sparsity.

The effect: at every tested sparsity, the saliency-based pruning increases the training loss
less than magnitude pruning.

Run: ``python examples/obs_pruning.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from curvops import HessianLinearOperator, hutchinson_diag
from curvops.cli.data import load_digits_tensors, make_batches
from curvops.cli.models import make_digits_mlp
from curvops.cli.training import train

SPARSITIES = (0.2, 0.3, 0.5)
NUM_MATVECS = 300


def _loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y))


def _pruned(model: nn.Module, scores: torch.Tensor, sparsity: float) -> nn.Module:
    """A copy of ``model`` with the fraction ``sparsity`` of lowest-scoring parameters zeroed."""
    pruned = copy.deepcopy(model)
    num_zero = int(sparsity * scores.numel())
    mask = torch.ones_like(scores)
    mask[scores.topk(num_zero, largest=False).indices] = 0.0
    offset = 0
    with torch.no_grad():
        for p in pruned.parameters():
            p.mul_(mask[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return pruned


def main(*, seed: int = 0) -> dict[str, float]:
    """Train, estimate the Hessian diagonal, and compare saliency with magnitude pruning.

    Args:
        seed: Seed of data subset, initialisation and the diagonal estimator.

    Returns:
        Training loss before pruning and the loss increases of both prunings per sparsity.
    """
    gen = torch.Generator().manual_seed(seed)
    X, y = load_digits_tensors(num_data=512, generator=gen)
    model = make_digits_mlp(hidden=16, seed=seed)
    loss_func = nn.CrossEntropyLoss()
    train(model, loss_func, make_batches(X, y, 64), epochs=30, lr=1e-2)

    H = HessianLinearOperator(model, loss_func, list(model.parameters()), make_batches(X, y, 512))
    diag_H = hutchinson_diag(H, NUM_MATVECS, generator=gen)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    # the trained net's Hessian diagonal is (almost) non-negative; estimates of small entries
    # can come out negative from the estimator's noise, so use their magnitude (clamping them
    # to zero would mark such parameters as free to prune)
    saliency = theta**2 * diag_H.abs() / 2
    magnitude = theta.abs()

    base = _loss(model, X, y)
    results = {"loss_before": base}
    for s in SPARSITIES:
        results[f"obs_increase_{s:.0%}"] = _loss(_pruned(model, saliency, s), X, y) - base
        results[f"magnitude_increase_{s:.0%}"] = _loss(_pruned(model, magnitude, s), X, y) - base
        assert results[f"obs_increase_{s:.0%}"] < 0.8 * results[f"magnitude_increase_{s:.0%}"], (
            results
        )
    return results


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.4g}")
