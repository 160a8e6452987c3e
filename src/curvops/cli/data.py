"""scikit-learn's 8x8 digits as PyTorch batches (ships with scikit-learn: no download).

Alpaydin, E., Kaynak, C. (1998). Optical Recognition of Handwritten Digits. UCI Machine
Learning Repository.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Batches = list[tuple[Tensor, Tensor]]


def _digits_file() -> Path | None:
    """Path of the digits CSV shipped inside scikit-learn, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as ``[1797, 64]`` pixel values in ``0..16`` and ``[1797]`` labels.

    Reads the CSV that ships inside scikit-learn directly (importing scikit-learn takes
    seconds); falls back to :func:`sklearn.datasets.load_digits` if the file moved.

    Returns:
        Pixels and labels as NumPy arrays.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    path = _digits_file()
    if path is not None:
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "The digits data needs scikit-learn. Install it with `pip install curvops[tour]`."
        ) from e
    digits = load_digits()
    return digits.data, digits.target.astype(np.int64)


def load_digits_tensors(
    *,
    num_data: int | None = None,
    classes: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Load the digits as images ``[N, 1, 8, 8]`` with pixel values in ``[0, 1]``.

    Args:
        num_data: Keep a random subset of this many images (all 1797 if ``None``).
        classes: Keep only these digit classes (labels stay the digit values).
        dtype: Floating-point type of the images.
        device: Device of the returned tensors.
        generator: Generator for the random subset and its order. ``None`` draws from the
            global RNG (only then).

    Returns:
        Images ``X`` of shape ``[N, 1, 8, 8]`` and integer labels ``y`` of shape ``[N]``.

    Raises:
        ValueError: If ``num_data`` is not positive or exceeds the available images, or a
            class is not a digit.
    """
    pixels, labels = load_digits_arrays()
    X = torch.as_tensor(pixels, dtype=dtype).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(labels, dtype=torch.long)
    if classes is not None:
        bad = [c for c in classes if c not in range(10)]
        if bad:
            raise ValueError(f"classes must be digits 0-9, got {bad}.")
        keep = torch.isin(y, torch.as_tensor(list(classes)))
        X, y = X[keep], y[keep]
    available = X.shape[0]
    if num_data is not None:
        if not 0 < num_data <= available:
            raise ValueError(
                f"num_data must lie in [1, {available}] (the number of available images), "
                f"got {num_data}."
            )
        perm = torch.randperm(available, generator=generator)[:num_data]
        X, y = X[perm], y[perm]
    return X.to(device), y.to(device)


def make_batches(X: Tensor, y: Tensor, batch_size: int) -> Batches:
    """Split data into a list of ``(X, y)`` batches (a re-iterable, deterministic loader).

    Args:
        X: Inputs, data along the leading axis.
        y: Targets, data along the leading axis.
        batch_size: Maximum number of data per batch (the last batch may be smaller).

    Returns:
        The list of batches.

    Raises:
        ValueError: If ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return list(zip(X.split(batch_size), y.split(batch_size)))
