import pytest
import torch

from curvops.cli.data import load_digits_arrays, load_digits_tensors, make_batches


def test_digits_match_scikit_learn():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    pixels, labels = load_digits_arrays()
    assert (pixels == digits.data).all() and (labels == digits.target).all()


def test_load_digits_tensors_subset_and_classes():
    gen = torch.Generator().manual_seed(0)
    X, y = load_digits_tensors(num_data=50, classes=(3, 7), generator=gen)
    assert X.shape == (50, 1, 8, 8) and X.dtype == torch.float64
    assert 0.0 <= X.min() and X.max() <= 1.0
    assert set(y.tolist()) <= {3, 7}
    X2, y2 = load_digits_tensors(
        num_data=50, classes=(3, 7), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(X, X2) and torch.equal(y, y2)


def test_load_digits_tensors_does_not_touch_global_rng_with_generator():
    state = torch.random.get_rng_state()
    load_digits_tensors(num_data=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_data": 0}, r"num_data must lie in \[1, 1797\]"),
        ({"num_data": 5000}, r"num_data must lie in \[1, 1797\]"),
        ({"classes": (1, 12)}, r"classes must be digits 0-9, got \[12\]"),
    ],
)
def test_load_digits_tensors_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_tensors(generator=torch.Generator(), **kwargs)


def test_make_batches():
    X, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    batches = make_batches(X, y, 2)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        make_batches(X, y, 0)
