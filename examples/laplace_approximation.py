"""Laplace approximations with laplace-torch on curvops' curvature backends.

MacKay, D. J. C. (1992). A practical Bayesian framework for backpropagation networks.
Daxberger, E., Kristiadi, A., Immer, A., Eschenhagen, R., Bauer, M., Hennig, P. (2021).
Laplace redux -- effortless Bayesian deep learning. NeurIPS.

A small MLP is trained on 300 digits of the classes 0-4 and gets a Gaussian posterior
:math:`\\mathcal{N}(\\theta_\\text{MAP}, (H + \\delta I)^{-1})` whose curvature :math:`H` is
the GGN of the summed loss, computed by curvops (``backend=CurvopsGGN``): Kronecker-factored
or diagonal over all weights, Kronecker-factored or full over the last layer. The prior
precision :math:`\\delta` maximises the Laplace approximation of the marginal likelihood;
predictions use the linearised (GLM) predictive with the probit approximation.

The effect: shown digits of the classes 5-9, which it never saw, the MAP network is still
confident; every Laplace predictive is less confident there, at the MAP's accuracy, and the
all-weights ones tell unseen from held-out seen digits better (higher AUROC of the top class
probability; the last-layer ones about as well as the MAP).

Needs laplace-torch (``pip install "curvops[laplace]"``; see docs/laplace.md).
Run: ``python examples/laplace_approximation.py`` (a script named ``laplace.py`` would
shadow the ``laplace`` package).
"""

from __future__ import annotations

import warnings

import torch
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops.cli.data import load_digits_tensors, make_batches
from curvops.cli.models import make_digits_mlp
from curvops.cli.training import train
from curvops.integrations.laplace import CurvopsGGN

NUM_TRAIN, NUM_UNSEEN = 300, 400
SEEN, UNSEEN = range(5), range(5, 10)
SETTINGS = [("all", "kron"), ("all", "diag"), ("last_layer", "kron"), ("last_layer", "full")]


def _auroc(seen: torch.Tensor, unseen: torch.Tensor) -> float:
    """Probability that a seen-class datum gets a higher score than an unseen one."""
    greater = (seen[:, None] > unseen[None, :]).double().mean()
    ties = (seen[:, None] == unseen[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def _summary(probs: torch.Tensor, probs_unseen: torch.Tensor, y: torch.Tensor) -> dict:
    confidence, confidence_unseen = probs.max(dim=1).values, probs_unseen.max(dim=1).values
    return {
        "accuracy": (probs.argmax(dim=1) == y).double().mean().item(),
        "confidence_seen": confidence.mean().item(),
        "confidence_unseen": confidence_unseen.mean().item(),
        "auroc": _auroc(confidence, confidence_unseen),
    }


def main(*, seed: int = 0) -> dict[str, float]:
    """Train a MAP network, fit four Laplace approximations, compare them on unseen classes.

    Args:
        seed: Seed of the data subsets, initialisation and data order.

    Returns:
        Accuracy, mean top-class probability on seen and unseen classes and the AUROC between
        them for the MAP network and each Laplace predictive, and each Laplace
        approximation's optimised prior precision and log marginal likelihood.
    """
    gen = torch.Generator().manual_seed(seed)
    X, y = load_digits_tensors(classes=SEEN, generator=gen)
    X_unseen, _ = load_digits_tensors(classes=UNSEEN, num_data=NUM_UNSEEN, generator=gen)
    X_train, y_train, X_test, y_test = X[:NUM_TRAIN], y[:NUM_TRAIN], X[NUM_TRAIN:], y[NUM_TRAIN:]
    model = make_digits_mlp(hidden=16, num_classes=len(SEEN), seed=seed)
    train(model, nn.CrossEntropyLoss(), make_batches(X_train, y_train, 50), epochs=100)
    model.eval()
    # laplace-torch iterates a DataLoader; its own generator keeps the global RNG untouched
    loader = DataLoader(TensorDataset(X_train, y_train), batch_size=100, generator=gen)

    with torch.no_grad():
        probs, probs_unseen = torch.softmax(model(X_test), 1), torch.softmax(model(X_unseen), 1)
    summary = _summary(probs, probs_unseen, y_test)
    results = {f"map_{key}": value for key, value in summary.items()}
    for subset, structure in SETTINGS:
        la = Laplace(
            model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
            backend=CurvopsGGN,
        )
        la.fit(loader)
        with warnings.catch_warnings():  # laplace reminds that the predictive uses probit
            warnings.simplefilter("ignore", UserWarning)
            la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
        name = f"{subset}_{structure}"
        summary = _summary(
            la(X_test, pred_type="glm", link_approx="probit"),
            la(X_unseen, pred_type="glm", link_approx="probit"),
            y_test,
        )
        results |= {f"{name}_{key}": value for key, value in summary.items()}
        results[f"{name}_prior_precision"] = la.prior_precision.item()
        results[f"{name}_log_marglik"] = la.log_marginal_likelihood().item()

    for subset, structure in SETTINGS:
        name = f"{subset}_{structure}"
        if subset == "all":
            assert results[f"{name}_auroc"] > results["map_auroc"], results
        assert results[f"{name}_confidence_unseen"] < results["map_confidence_unseen"], results
        assert results[f"{name}_accuracy"] >= results["map_accuracy"] - 0.01, results
    return results


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.4g}")
