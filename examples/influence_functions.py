"""Influence functions with EKFAC (paper §3.1, Application 2).

Koh, P. W., Liang, P. (2017). Understanding black-box predictions via influence functions.
ICML. Grosse, R., Bae, J., Anil, C., et al. (2023). Studying large language model
generalization with influence functions.

The influence of up-weighting training datum :math:`n` on the loss of a test datum
:math:`z` is, up to sign and scale,

.. math::
    s_n(z) = \\nabla_\\theta \\ell(z)^\\top (C + \\lambda I)^{-1} \\nabla_\\theta \\ell_n,

with a curvature matrix :math:`C`. This example scores every training datum of a small MLP
on the 8x8 digits for a few test data with

* EKFAC (George, T., Laurent, C., Bouthillier, X., Ballas, N., Vincent, P. (2018). Fast
  approximate natural gradient descent in a Kronecker-factored eigenbasis. NeurIPS) and its
  damped inverse, and
* the exact damped GGN, inverted by conjugate gradients to a tight tolerance (the reference),
  and the exact damped Hessian (dense solve) for comparison.

The effect: EKFAC's scores rank the training data like the exact ones (Spearman rank
correlation clearly positive).

Run: ``python examples/influence_functions.py``.
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, grad, vmap

from curvops import (
    CGInverseLinearOperator,
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    IdentityLinearOperator,
)
from curvops.cli.data import load_digits_tensors, make_batches
from curvops.cli.models import make_digits_mlp
from curvops.cli.training import train

NUM_TRAIN = 256
NUM_TEST = 5
DAMPING = 1e-1  # exceeds |smallest Hessian eigenvalue|: the damped Hessian is invertible


def per_datum_gradients(model: nn.Module, loss_func: nn.Module, X, y) -> torch.Tensor:
    """Flat gradients ``[N, D]`` of the per-datum losses (``torch.func``)."""
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())

    def loss(theta, x, t):
        out = functional_call(model, dict(zip(names, theta)), (x.unsqueeze(0),))
        return loss_func(out, t.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(values, X, y)
    return torch.cat([g.flatten(start_dim=1) for g in grads], dim=1)


def main(*, seed: int = 0) -> dict[str, float]:
    """Score the training data with EKFAC and exact influence and compare their rankings.

    Args:
        seed: Seed of data subset and initialisation.

    Returns:
        Mean Spearman correlations of EKFAC's scores with the exact GGN and Hessian scores
        (over the test data), and the worst one with the GGN.
    """
    gen = torch.Generator().manual_seed(seed)
    X, y = load_digits_tensors(num_data=NUM_TRAIN + NUM_TEST, generator=gen)
    Xtr, ytr, Xte, yte = X[:NUM_TRAIN], y[:NUM_TRAIN], X[NUM_TRAIN:], y[NUM_TRAIN:]
    model = make_digits_mlp(hidden=8, seed=seed)
    loss_func = nn.CrossEntropyLoss()
    train(model, loss_func, make_batches(Xtr, ytr, 64), epochs=30, lr=1e-2)

    params = list(model.parameters())
    data = make_batches(Xtr, ytr, NUM_TRAIN)
    g_train = per_datum_gradients(model, loss_func, Xtr, ytr)  # [N, D]
    g_test = per_datum_gradients(model, loss_func, Xte, yte).T  # [D, num_test]

    EK = EKFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    ekfac_scores = g_train @ (EKFACInverseLinearOperator(EK, damping=DAMPING) @ g_test)

    G = GGNLinearOperator(model, loss_func, params, data)
    eye = IdentityLinearOperator(G.in_shapes, dtype=G.dtype, device=G.device)
    G_inv = CGInverseLinearOperator(G + DAMPING * eye, tolerance=1e-8)
    ggn_scores = g_train @ (G_inv @ g_test)

    H = HessianLinearOperator(model, loss_func, params, data).to_dense()
    H_damped = H + DAMPING * torch.eye(H.shape[0], dtype=H.dtype)
    hessian_scores = g_train @ torch.linalg.solve(H_damped, g_test)

    def rank_correlations(reference: torch.Tensor) -> list[float]:
        return [
            float(spearmanr(ekfac_scores[:, j], reference[:, j]).statistic) for j in range(NUM_TEST)
        ]

    with_ggn = rank_correlations(ggn_scores)
    with_hessian = rank_correlations(hessian_scores)
    results = {
        "spearman_ekfac_vs_ggn_mean": sum(with_ggn) / NUM_TEST,
        "spearman_ekfac_vs_ggn_min": min(with_ggn),
        "spearman_ekfac_vs_hessian_mean": sum(with_hessian) / NUM_TEST,
        "hessian_min_eigenvalue": float(torch.linalg.eigvalsh(H)[0]),
    }
    assert results["hessian_min_eigenvalue"] + DAMPING > 0, results
    assert results["spearman_ekfac_vs_ggn_mean"] > 0.5, results
    assert results["spearman_ekfac_vs_ggn_min"] > 0.3, results
    return results


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.4g}")
