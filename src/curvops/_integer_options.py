"""The one validator of integer options (private), shared by every layer of ``curvops``.

Integer options (``num_data``, ``mc_samples``, ``seed``, budgets such as ``num_matvecs``,
``k`` of ``eigsh``) are checked here, so every error names the option and says what it
accepts. ``bool`` is refused although it subclasses ``int`` (``mc_samples=True`` is a bug).
"""

from __future__ import annotations

from numbers import Integral

_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_positive_int(value: object, what: str, *, minimum: int = 1) -> int:
    """Check that ``value`` is an integer ``>= minimum``.

    Args:
        value: The value to check.
        what: Name of the option, used in error messages.
        minimum: Smallest allowed value.

    Returns:
        The value as a Python ``int``.

    Raises:
        TypeError: If ``value`` is not an integer.
        ValueError: If ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value}.")
    return int(value)


def check_seed(value: object, what: str = "seed") -> int:
    """Check that ``value`` is an integer seed that ``torch.Generator.manual_seed`` accepts.

    Args:
        value: The seed.
        what: Name of the option, used in error messages.

    Returns:
        The seed as a Python ``int``.

    Raises:
        TypeError: If ``value`` is not an integer (a float seed would be silently truncated).
        ValueError: If it is outside the range of 64-bit seeds.
    """
    low, high = _SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{what} must lie in [{low}, {high}] (a 64-bit seed), got {value}.")
    return int(value)
