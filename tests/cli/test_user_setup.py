import pytest
import torch
from torch import nn

from curvops.cli.errors import CLIError
from curvops.cli.user_setup import cast_batches, parse_loss, probe


def test_cast_batches_casts_floats_keeps_labels_and_reiterates():
    data = [(torch.zeros(2, 3), torch.tensor([1, 0])), (torch.ones(1, 3), torch.tensor([2]))]
    cast = cast_batches(data, torch.float64, torch.device("cpu"))
    for _ in range(2):
        batches = list(cast)
        assert [X.dtype for X, _ in batches] == [torch.float64] * 2
        assert [y.dtype for _, y in batches] == [torch.long] * 2
    assert len(cast) == 2
    assert data[0][0].dtype == torch.float32  # the user's data is untouched


class _Unsized:
    def __iter__(self):
        yield torch.zeros(1, 3), torch.tensor([0])


def test_cast_batches_without_length_has_no_length():
    cast = cast_batches(_Unsized(), torch.float64, torch.device("cpu"))
    assert not hasattr(cast, "__len__")
    assert [X.dtype for X, _ in cast] == [torch.float64]


def test_parse_loss():
    assert isinstance(parse_loss("bce"), nn.BCEWithLogitsLoss)
    with pytest.raises(CLIError, match="unknown loss 'nll'"):
        parse_loss("nll")


@pytest.mark.parametrize(
    "model, batch, loss, match",
    [
        (nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4, 2)), nn.BCEWithLogitsLoss(), None),
        (
            nn.Linear(3, 2),
            (torch.zeros(4, 3), torch.zeros(4, 3)),
            nn.BCEWithLogitsLoss(),
            r"output has shape \(4, 2\) but the targets have shape \(4, 3\)",
        ),
        (
            nn.Flatten(0),
            (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)),
            nn.CrossEntropyLoss(),
            r"has shape \(4,\), but --loss ce needs \[N, C, ...\] logits",
        ),
        (
            nn.Linear(3, 2),
            (torch.zeros(4, 3), torch.full((4,), 5)),
            nn.CrossEntropyLoss(),
            "does not fit CrossEntropyLoss with targets of shape",
        ),
    ],
)
def test_probe(model, batch, loss, match):
    if match is None:
        probe(model, loss, [batch])
    else:
        with pytest.raises(CLIError, match=match):
            probe(model, loss, [batch])


class _TupleOut(nn.Module):
    def forward(self, x):
        return x, x


@pytest.mark.parametrize(
    "model, data, match",
    [
        (nn.Linear(3, 2), [], "returned no batches"),
        (nn.Linear(3, 2), [torch.zeros(2, 3)], "each batch must be a pair"),
        (_TupleOut(), [(torch.zeros(2, 3), torch.zeros(2))], "returned a tuple, not a tensor"),
        (nn.Linear(3, 2), [(torch.zeros(2, 3), [0, 1])], "targets of the first batch are a list"),
    ],
)
def test_probe_bad_data_or_model(model, data, match):
    with pytest.raises(CLIError, match=match):
        probe(model, nn.CrossEntropyLoss(), data)
