"""The interleaved timing of the benchmark suite (``benchmarks/timing.py``)."""

import torch

import benchmarks.timing as timing


def test_call_order_rotates_and_ratios_pair_calls_of_the_same_repeat(monkeypatch):
    calls = []
    costs = {"gradient": 1.0, "task": 2.0, "other": 4.0}

    def fake_timer(device, clock):
        # a machine whose load changes from repeat to repeat: every call of a repeat (three
        # calls) is slowed by the same factor, so only ratios within a repeat are exact
        def run(fn):
            fn()
            load = 1 + (len(calls) - 1) // 3
            return costs[calls[-1]] * load

        return run

    monkeypatch.setattr(timing, "_timer", fake_timer)
    mine, theirs, gradient = timing.time_task(
        lambda: calls.append("gradient"),
        lambda: calls.append("task"),
        lambda: calls.append("other"),
        device=torch.device("cpu"),
        repeats=6,
        warmup=1,
    )
    timed = calls[3:]  # after the warm-up calls
    rounds = [tuple(timed[i : i + 3]) for i in range(0, len(timed), 3)]
    assert (
        rounds
        == [
            ("gradient", "task", "other"),
            ("task", "other", "gradient"),
            ("other", "gradient", "task"),
        ]
        * 2
    )
    assert mine.gradients == 2.0 and mine.spread == 0.0 and mine.vs_other == 0.5
    assert theirs.gradients == 4.0 and theirs.vs_other == 2.0
    assert gradient == 4.5  # median of the gradient's times under loads 2..7
