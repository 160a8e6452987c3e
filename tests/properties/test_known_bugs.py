"""Inputs the property suite found that curvops still gets wrong (strict xfail).

Each test is a plain reproduction; the property tests leave these inputs out with
``hypothesis.assume`` and point here.
"""

import pytest
import torch
from torch import nn

from curvops import HessianLinearOperator


class ChannelsFirst(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="HessianLinearOperator (reverse-over-reverse) through nn.Embedding with a batch of "
    "empty sequences (token ids [N, 0]) and reduction='sum': PyTorch's double backward of "
    "the embedding raises 'cannot reshape tensor of 0 elements into shape [1, 0, -1]' "
    "(with reduction='mean' the batch has weight 0 and is skipped). Fix: skip batches whose "
    "model output has no entries in the Hessian pass, as the GGN, KFAC and diagonals do.",
)
def test_hessian_embedding_with_empty_sequences():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Embedding(5, 1), nn.Tanh(), nn.Linear(1, 2), ChannelsFirst()
        ).double()
    data = [
        (torch.tensor([[4]]), torch.tensor([[1]])),
        (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long)),
    ]
    loss = nn.CrossEntropyLoss(reduction="sum")
    H = HessianLinearOperator(model, loss, list(model.parameters()), data).to_dense()
    R = HessianLinearOperator(model, loss, list(model.parameters()), data[:1]).to_dense()
    torch.testing.assert_close(H, R)
