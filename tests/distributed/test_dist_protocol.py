"""The distributed helpers without an initialised process group (single process).

The multi-process behaviour is tested in ``test_dist_operators.py``; here: the opt-in/opt-out
logic, the pure checks every rank runs on gathered summaries, seeds and generators, and that
a single process sees no change (errors propagate unchanged, reductions are no-ops).
"""

import pytest
import torch
import torch.distributed as dist
from cases import make_case

from curvops import GGNLinearOperator
from curvops.risk import EmpiricalRisk
from curvops.risk.distributed import (
    ProcessGroupHandle,
    check_rank_summaries,
    per_rank_seed,
    synchronized_generator,
)

LABELS = {"shapes": "parameter shapes", "dtype": "parameter dtypes"}


@pytest.fixture(autouse=True)
def _not_distributed():
    assert not dist.is_initialized(), "these tests assume no process group in the test process"


@pytest.mark.parametrize("process_group", [None, False])
def test_inactive_handle_is_a_single_process(process_group):
    h = ProcessGroupHandle(process_group)
    assert (h.active, h.communicating, h.rank, h.world_size) == (False, False, 0, 1)
    assert h.rank_seed(5) == 5
    t = torch.arange(3.0)
    assert h.all_reduce_([t], inputs=[t]) == [t] and torch.equal(t, torch.arange(3.0))
    assert h.gather_objects(lambda: {"a": 1}, what="x") == [{"a": 1}]
    table = h.exchange_status(None, torch.tensor([1.0, 2.0]), what="x")
    torch.testing.assert_close(table, torch.tensor([[1.0, 2.0]], dtype=torch.float64))


def test_inactive_handle_propagates_errors_unchanged():
    h = ProcessGroupHandle(None)
    error = KeyError("boom")
    with pytest.raises(KeyError, match="boom") as info:
        with h.partial_sums([torch.zeros(2)], inputs=[torch.zeros(2, 1)], what="x"):
            raise error
    assert info.value is error
    with pytest.raises(KeyError, match="boom") as info:
        h.exchange_status(error, what="x")
    assert info.value is error
    with pytest.raises(ZeroDivisionError):
        h.gather_objects(lambda: 1 / 0, what="x")


def test_local_context_nests():
    h = ProcessGroupHandle(None)
    with h.local():
        with h.local():
            assert h._local_depth == 2
        assert h._local_depth == 1
    assert h._local_depth == 0


def test_explicit_group_requires_initialisation():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ProcessGroupHandle(True)
    with pytest.raises(TypeError, match="process_group must be None .* got str"):
        ProcessGroupHandle("world")
    case = make_case("mlp-ce-mean")
    with pytest.raises(RuntimeError, match="process_group=False for a single process"):
        GGNLinearOperator(
            case.model_func, case.loss_func, case.params, case.data, process_group=True
        )


def test_per_rank_seed():
    assert per_rank_seed(5, 0) == 5
    assert per_rank_seed(5, 2) == 5 + 2 * 7919
    assert len({per_rank_seed(0, r) for r in range(64)}) == 64


def test_fingerprint():
    X = [torch.tensor([[1.0, -2.0]]), torch.tensor([[[3.0, 0.0]]])]
    fp = ProcessGroupHandle.fingerprint(X)
    torch.testing.assert_close(fp, torch.tensor([2.0, 2.0, 6.0, 14.0], dtype=torch.float64))


def test_check_rank_summaries_accepts_agreeing_ranks():
    same = {"num_data": 3, "shapes": [(2, 3)], "dtype": "torch.float64"}
    check_rank_summaries([same, {**same, "num_data": 1}], LABELS)


def test_check_rank_summaries_shapes_differ():
    a = {"num_data": 3, "shapes": [(2, 3)], "dtype": "torch.float64"}
    b = {**a, "shapes": [(2, 4)]}
    with pytest.raises(
        ValueError,
        match=r"shapes differ between ranks \(rank 0: \[\(2, 3\)\]; rank 1: \[\(2, 4\)\]\)",
    ):
        check_rank_summaries([a, b], LABELS)
    with pytest.raises(ValueError, match="parameter dtypes differ between ranks"):
        check_rank_summaries([a, {**a, "dtype": "torch.float32"}], LABELS)


def test_check_rank_summaries_empty_shards():
    a = {"num_data": 3, "shapes": [(2, 3)], "dtype": "torch.float64"}
    with pytest.raises(
        ValueError, match=r"shards of rank\(s\) \[1, 2\] are empty \(data per rank: \[3, 0, 0\]\)"
    ):
        check_rank_summaries([a, {**a, "num_data": 0}, {**a, "num_data": 0}], LABELS)


def test_single_process_empty_data_message_unchanged():
    case = make_case("mlp-ce-mean")
    with pytest.raises(ValueError, match="The data is empty: it yields no data points"):
        EmpiricalRisk(case.model_func, case.loss_func, case.params, [])


def test_synchronized_generator_single_process():
    g = synchronized_generator(3)
    expected = torch.randn(4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.randn(4, generator=g), expected)
    state = torch.get_rng_state()
    fresh = synchronized_generator()
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was touched"
    assert isinstance(fresh, torch.Generator) and fresh.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [
        (1.5, TypeError, "seed must be an int or None, got float"),
        (True, TypeError, "got bool"),
        (-1, ValueError, "seed must be non-negative, got -1"),
    ],
)
def test_synchronized_generator_bad_seed(seed, error, match):
    with pytest.raises(error, match=match):
        synchronized_generator(seed)
