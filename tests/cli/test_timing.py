import torch

from curvops.cli.timing import timed


def test_timed_passes_arguments_and_measures():
    result, seconds = timed(lambda a, b=0: a + b, torch.device("cpu"), 2, b=3)
    assert result == 5 and seconds >= 0.0
