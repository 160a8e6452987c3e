"""Fixtures of ``tests/linalg``.

The problems here are tiny (D of a few hundred) and run thousands of small products; on a
shared machine with few cores, PyTorch's intra-op thread pool then costs far more than it
gains (we measured a 6x slower suite). Each test runs single-threaded and restores the
thread count afterwards.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_threaded_torch():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
