import pytest
import torch
from torch import nn

from curvops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator
from curvops.cli.curvatures import Curvature, build_curvature, parse_curvature
from curvops.cli.errors import CLIError
from curvops.kronecker import EKFACLinearOperator, KFACLinearOperator
from curvops.testing import assert_operator_matches, dense_ggn


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    return model, nn.CrossEntropyLoss(), list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.mark.parametrize(
    "name, cls",
    [
        ("ggn", GGNLinearOperator),
        ("ef", EFLinearOperator),
        ("mc", FisherMCLinearOperator),
        ("kfac", KFACLinearOperator),
        ("ekfac", EKFACLinearOperator),
    ],
)
def test_build_curvature_classes(problem, name, cls):
    assert type(build_curvature(name, *problem)) is cls


def test_build_ggn_matches_reference(problem):
    G = build_curvature(Curvature.GGN, *problem)
    assert_operator_matches(G, dense_ggn(*problem), rtol=1e-10, atol=1e-12)


def test_mc_fisher_uses_the_seed(problem):
    a = build_curvature("mc", *problem, seed=1).to_dense()
    b = build_curvature("mc", *problem, seed=1).to_dense()
    c = build_curvature("mc", *problem, seed=2).to_dense()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_parse_curvature():
    assert parse_curvature("hessian") == Curvature.HESSIAN
    with pytest.raises(CLIError, match=r"unknown curvature 'H'; use one of hessian\|ggn"):
        parse_curvature("H")
