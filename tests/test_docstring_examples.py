"""The ``Examples:`` sections of the package's docstrings run as doctests."""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import curvops


def _modules():
    for info in pkgutil.walk_packages(curvops.__path__, prefix="curvops."):
        if ".cli" in info.name or info.name.endswith("__main__"):
            continue  # the command-line tool is tested in tests/cli
        if info.name.startswith("curvops.integrations.") and not _client_installed(info.name):
            continue  # an adapter whose client library (its module's name) is not installed
        yield info.name


def _client_installed(adapter: str) -> bool:
    return importlib.util.find_spec(adapter.rsplit(".", 1)[1]) is not None


MODULES_WITH_EXAMPLES = [
    name
    for name in _modules()
    if doctest.DocTestFinder().find(importlib.import_module(name))
    and any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(name)))
]


def test_some_examples_exist():
    assert len(MODULES_WITH_EXAMPLES) >= 10


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
