"""NOTE [functional tied head]: ``F.linear(h, wte.weight)`` as the output layer (GPT style)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import EKFACLinearOperator, KFACLinearOperator


class _FunctionalHead(nn.Module):
    """The output layer is ``F.linear`` with the embedding's weight; no module holds it."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 4)

    def forward(self, ids):
        return F.linear(torch.tanh(self.hidden(self.wte(ids))), self.wte.weight).flatten(0, 1)


class _ModuleHead(_FunctionalHead):
    """The same model with an ``nn.Linear`` head tied to the embedding (already supported)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.wte(ids)))).flatten(0, 1)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_functional_tied_head_equals_module_tied_head(cls):
    """Was "used by torch.nn.functional.linear in a way the first batch did not use it"."""
    torch.manual_seed(0)
    functional = _FunctionalHead().double()
    module = _ModuleHead().double()
    module.load_state_dict(functional.state_dict(), strict=False)
    data = [(torch.randint(0, 7, (n, 5)), torch.randint(0, 7, (n * 5,))) for n in (3, 2)]
    dense = []
    for model in (functional, module):
        params = list(model.parameters())  # wte.weight, hidden.weight, hidden.bias
        assert len(params) == 3
        A = cls(model, nn.CrossEntropyLoss(), params, data, fisher_type="type-2")
        dense.append(A.to_dense())
    torch.testing.assert_close(dense[0], dense[1], rtol=1e-12, atol=1e-14)
    assert dense[0].abs().max() > 0
