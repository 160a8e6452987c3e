"""Load the example scripts of ``examples/`` by path (they are scripts, not a package)."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parents[2] / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(
        f"curvops_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _single_thread_and_rng_untouched():
    """Run single-threaded (shared test machines); check the examples leave the RNG alone."""
    before = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    assert torch.equal(torch.random.get_rng_state(), rng), "the example touched the global RNG"
