"""The gradient lives in the Hessian's top eigenspace (paper §3.1, Application 5).

Gur-Ari, G., Roberts, D. A., Dyer, E. (2018). Gradient descent happens in a tiny subspace.

After a short training with stochastic gradient descent of a small MLP on the 8x8 digits,
the top-:math:`k` eigenvectors :math:`U_k` of the Hessian (:math:`k = 10`, the number of
classes) are computed with Lanczos (:func:`curvops.linalg.eigsh`) and the gradient's
overlap with their span,

.. math::
    \\operatorname{overlap} = \\frac{\\|U_k U_k^\\top g\\|^2}{\\|g\\|^2} \\in [0, 1],

is compared with that of a random direction, whose expectation is :math:`k / D`. The effect:
the gradient's overlap is far above the random baseline.

Run: ``python examples/gradient_overlap.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from curvops import HessianLinearOperator, eigsh
from curvops.cli.data import load_digits_tensors, make_batches
from curvops.cli.models import make_digits_mlp
from curvops.cli.training import train

NUM_CLASSES = 10


def overlap(g: torch.Tensor, U: torch.Tensor) -> float:
    """Squared norm of the projection of ``g`` onto the span of ``U``'s orthonormal columns.

    Args:
        g: Flat vector ``[D]``.
        U: Orthonormal columns ``[D, k]``.

    Returns:
        :math:`\\|U U^\\top g\\|^2 / \\|g\\|^2`.
    """
    return float((U.T @ g).square().sum() / g.square().sum())


def main(*, seed: int = 0) -> dict[str, float]:
    """Train briefly, then measure the gradient's overlap with the top Hessian eigenspace.

    Args:
        seed: Seed of data subset, initialisation and Lanczos start vector.

    Returns:
        The overlap of the gradient, of a random direction, and the baseline :math:`k/D`.
    """
    gen = torch.Generator().manual_seed(seed)
    X, y = load_digits_tensors(num_data=512, generator=gen)
    model = make_digits_mlp(hidden=16, seed=seed)
    loss_func = nn.CrossEntropyLoss()
    train(model, loss_func, make_batches(X, y, 64), epochs=10, lr=0.5, optimizer="sgd")

    params = list(model.parameters())
    H = HessianLinearOperator(model, loss_func, params, make_batches(X, y, 256))
    g = torch.cat([gi.flatten() for gi in H.gradient_and_loss()[0]])
    _, U = eigsh(H, k=NUM_CLASSES, which="LA", tol=1e-6, generator=gen)
    D = H.shape[1]
    results = {
        "gradient_overlap": overlap(g, U),
        "random_direction_overlap": overlap(torch.randn(D, generator=gen, dtype=g.dtype), U),
        "random_baseline": NUM_CLASSES / D,
        "num_params": float(D),
    }
    assert results["gradient_overlap"] > 20 * results["random_baseline"], (
        f"gradient overlap {results['gradient_overlap']:.3f} is not far above the random "
        f"baseline {results['random_baseline']:.4f}"
    )
    return results


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.4g}")
