"""Batches whose targets have no entries (sequences of length 0) contribute nothing.

Found by the property suite: the Hessian through nn.Embedding with such a batch and
reduction="sum" failed in PyTorch's double backward of the embedding.
"""

import torch
from torch import nn

from curvops import HessianLinearOperator


class ChannelsFirst(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


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
