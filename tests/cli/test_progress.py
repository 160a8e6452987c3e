"""One progress bar over counted steps, and counting the columns of products."""

import io

import torch

from curvops.cli.progress import CountedOperator, StepBar, is_interactive
from curvops.linalg import hutchpp_trace
from curvops.structured import TensorLinearOperator


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_is_interactive():
    assert not is_interactive(io.StringIO()) and is_interactive(_Terminal())
    closed = io.StringIO()
    closed.close()  # isatty() raises ValueError
    assert not is_interactive(closed)
    assert not is_interactive(object())


def test_step_bar_counts_and_labels_without_escape_sequences():
    stream = io.StringIO()
    with StepBar(3, "job", file=stream) as bar:
        bar.label("first", force=True)
        bar.step()
        bar.step(2)
        assert (bar.count, bar.total) == (3, 3)
    text = stream.getvalue()
    assert "job" in text and "first" in text and "3/3" in text
    assert "\x1b[" not in text and text.isascii()  # ASCII bar when not a terminal


def test_step_bar_disabled_writes_nothing():
    stream = io.StringIO()
    with StepBar(2, "job", enabled=False, file=stream) as bar:
        bar.label("x", force=True)
        bar.step(2)
    assert stream.getvalue() == ""


def test_counted_operator_counts_columns_and_delegates():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    A = TensorLinearOperator(B @ B.T, symmetric=True, psd=True)
    calls = []
    counted = CountedOperator(A, calls.append)
    assert counted.is_self_adjoint and counted.is_psd and counted.shape == (5, 5)
    X = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(counted @ X, B @ B.T @ X)
    torch.testing.assert_close(X.T @ counted, X.T @ B @ B.T)  # adjoint products count too
    assert calls == [3, 3] and counted.columns == 6
    hutchpp_trace(counted, 9, generator=gen)
    assert counted.columns == 6 + 9


def test_counted_operator_of_a_nonsymmetric_operator():
    M = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    counted = CountedOperator(TensorLinearOperator(M))
    assert not counted.is_self_adjoint
    torch.testing.assert_close(torch.ones(2, dtype=torch.float64) @ counted, M.sum(0))
    assert counted.columns == 1
