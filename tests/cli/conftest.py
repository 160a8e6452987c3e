"""Shared fixtures of the command-line tests."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def factories() -> Path:
    """Path of the tiny factories file."""
    return FIXTURES / "tiny_factories.py"


@pytest.fixture(autouse=True)
def _single_thread():
    """Run single-threaded (the test machines are shared) and restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
