"""Saving and loading Kronecker factors: round trips and every refused mismatch."""

from __future__ import annotations

import pytest
import torch
from helpers.kronecker_problems import DTYPE, embedding_gain_problem
from torch import nn

from curvops.kronecker import KFACLinearOperator


def make(separate=True, **kwargs):
    model, params, data = embedding_gain_problem()
    options = {"fisher_type": "type-2", "fallback": "diagonal"} | kwargs
    return KFACLinearOperator(
        model, nn.MSELoss(), params, data, separate_weight_and_bias=separate, **options
    )


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_state_dict_roundtrip(separate, tmp_path):
    K = make(separate)
    path = tmp_path / "kfac.pt"
    torch.save(K.state_dict(), path)
    fresh = make(separate, check_deterministic=False)
    fresh.load_state_dict(torch.load(path))
    assert fresh._factors is not None  # no data pass needed
    torch.testing.assert_close(fresh.to_dense(), K.to_dense())


def test_load_state_dict_checks():
    K = make()
    state = K.state_dict()
    with pytest.raises(ValueError, match="computed with separate_weight_and_bias=True"):
        make(separate=False, check_deterministic=False).load_state_dict(state)
    with pytest.raises(ValueError, match="computed with fisher_type='type-2'"):
        make(fisher_type="empirical", check_deterministic=False).load_state_dict(state)
    bad = K.state_dict()
    bad["factors"]["lin"]["gradient_factor"] = torch.zeros(3, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"Layer 'lin': gradient_factor has shape \(3, 3\)"):
        K.load_state_dict(bad)
    bad = K.state_dict()
    del bad["factors"]["out"]
    with pytest.raises(ValueError, match="holds factors for layers"):
        K.load_state_dict(bad)
    bad = K.state_dict()
    del bad["fallback_diagonals"]["gain"]
    with pytest.raises(ValueError, match="fallback diagonal of 'gain' is missing"):
        K.load_state_dict(bad)
    with pytest.raises(ValueError, match="Expected a state_dict of a KFACLinearOperator"):
        K.load_state_dict({"type": "Other"})
    bad = K.state_dict()
    bad["version"] = 0
    with pytest.raises(ValueError, match="State version 0 is not supported"):
        K.load_state_dict(bad)
    bad = K.state_dict()
    bad["factors"]["lin"]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="Layer 'lin': the state holds factors"):
        K.load_state_dict(bad)
