"""``torch.compile`` around operator products, and the compilation helpers."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from curvops import (
    CGInverseLinearOperator,
    EFLinearOperator,
    EKFACInverseLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    IdentityLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvops._compilation import check_compile_options, column_passes, private_copy


def _problem():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    data = [(torch.randn(4, 3, generator=gen), torch.randint(0, 3, (4,), generator=gen))]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def _operators():
    model, loss, params, data = _problem()
    G = GGNLinearOperator(model, loss, params, data)
    K = KFACLinearOperator(model, loss, params, data)
    E = EKFACLinearOperator(model, loss, params, data)
    damped = G + 0.1 * IdentityLinearOperator(G.in_shapes, dtype=G.dtype, device=G.device)
    return {
        "hessian": HessianLinearOperator(model, loss, params, data),
        "ggn": G,
        "ef": EFLinearOperator(model, loss, params, data),
        "mc": FisherMCLinearOperator(model, loss, params, data),
        "kfac": K,
        "ekfac": E,
        "kfac-inverse": KFACInverseLinearOperator(K, damping=0.1),
        "ekfac-inverse": EKFACInverseLinearOperator(E, damping=0.1),
        "cg-inverse": CGInverseLinearOperator(damped, tolerance=1e-10),
    }


@pytest.mark.slow
def test_torch_compile_of_products_equals_eager():
    """Dynamo failed inside the products before (double backward; frozen dataclasses)."""
    operators = _operators()
    v = torch.randn(next(iter(operators.values())).shape[1], generator=torch.Generator())
    for name, A in operators.items():
        torch._dynamo.reset()
        compiled = torch.compile(lambda v, A=A: A @ v)  # default backend: inductor
        torch.testing.assert_close(compiled(v), A @ v, rtol=1e-5, atol=1e-6, msg=name)


def test_column_passes():
    assert list(column_passes(1)) == [(0, 1, 1)]
    assert list(column_passes(3)) == [(0, 3, 4)]
    assert list(column_passes(8)) == [(0, 8, 8)]
    assert list(column_passes(19)) == [(0, 8, 8), (8, 8, 8), (16, 3, 4)]
    assert {width for _, _, width in column_passes(1000)} == {8}


def test_private_copy_has_its_own_code_object():
    offset = 2

    def f(x, *, y=1):
        return x + y + offset

    g = private_copy(f)
    assert g.__code__ is not f.__code__
    assert g(1) == f(1) == 4
    assert g(1, y=3) == 6


def test_check_compile_options_merges_defaults():
    assert check_compile_options(False, None, "A") is None
    assert check_compile_options(True, None, "A") == {"dynamic": False}
    assert check_compile_options(True, {"dynamic": None, "mode": "max-autotune"}, "A") == {
        "dynamic": None,
        "mode": "max-autotune",
    }


def test_first_product_inside_torch_compile():
    """No eager product before the compiled call (the eager regions are made lazily)."""
    model, loss, params, data = _problem()
    kwargs = {"check_deterministic": False}
    G = GGNLinearOperator(model, loss, params, data, **kwargs)
    K = KFACLinearOperator(model, loss, params, data, **kwargs)
    inner = GGNLinearOperator(
        model, loss, params, data, compile=True, compile_options={"backend": "eager"}, **kwargs
    )
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(0))
    for A in (G, KFACInverseLinearOperator(K, damping=0.1), inner):
        torch._dynamo.reset()
        result = torch.compile(lambda v, A=A: A @ v, backend="eager")(v)
        torch.testing.assert_close(result, A @ v, rtol=1e-5, atol=1e-6)


def test_import_does_not_import_dynamo():
    """``torch.compiler.disable`` is applied lazily: importing Dynamo takes seconds."""
    code = "import sys, curvops; assert 'torch._dynamo' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
