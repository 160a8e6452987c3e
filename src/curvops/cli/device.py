"""The ``--device`` option: which device the command line computes on."""

from __future__ import annotations

import torch

from curvops.cli.errors import CLIError


def resolve_device(name: str | None) -> torch.device:
    """Turn ``--device`` into a device (default: CUDA if available, else the CPU).

    Args:
        name: The option's value.

    Returns:
        The device.

    Raises:
        CLIError: For an unknown or unavailable device.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device {name!r}; use e.g. cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} is not available here (no CUDA); use --device cpu.")
    return device
