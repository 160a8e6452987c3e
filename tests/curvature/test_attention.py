"""Products through F.scaled_dot_product_attention with PyTorch's default (fused) backend.

The operators must work on a transformer without the user selecting an attention backend, and
match dense float64 references. The references are computed with the math backend (the only
one torch.func can differentiate twice), an independent implementation of attention.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvops.curvature.attention as attention
from curvops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator
from curvops.testing import assert_operator_matches
from curvops.testing.dense import dense_ef, dense_ggn, dense_hessian

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}


class TinyAttentionModel(nn.Module):
    """Embedding, one causal SDPA block with LayerNorm and an MLP, per-token logits."""

    def __init__(self, vocab: int = 5, dim: int = 4, heads: int = 2, norm: bool = True):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        self.ln = nn.LayerNorm(dim) if norm else nn.Identity()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return self.head(torch.tanh(x)).permute(0, 2, 1)  # [N, vocab, T] for CrossEntropyLoss


def _case(norm: bool = True):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = TinyAttentionModel(norm=norm).to(DT).eval()
        data = [(torch.randint(0, 5, (n, 3)), torch.randint(0, 5, (n, 3))) for n in (2, 3)]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def test_default_backend_cannot_do_forward_mode():
    """Documents why curvops needs its own tangent rule (fails if PyTorch adds one)."""
    q = torch.randn(1, 1, 3, 2, dtype=DT)
    with pytest.raises(Exception, match="forward AD|not implemented"):
        jvp(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), (q,), (q,))


@pytest.mark.parametrize(
    "cls, reference",
    [
        (GGNLinearOperator, dense_ggn),
        (HessianLinearOperator, dense_hessian),
        (EFLinearOperator, dense_ef),
    ],
)
def test_products_match_dense_reference(cls, reference):
    # torch.func differentiates LayerNorm twice wrongly (torch 2.13), so the Hessian's dense
    # reference runs without it; test_products checks the Hessian with LayerNorm separately
    model, loss_func, params, data = _case(norm=cls is not HessianLinearOperator)
    A = cls(model, loss_func, params, data)  # default backend, determinism check included
    with sdpa_kernel([SDPBackend.MATH]):
        dense = reference(model, loss_func, params, data)
    assert_operator_matches(A, dense, **TOL)


@pytest.mark.parametrize(
    "options",
    [
        {"is_causal": True},
        {},
        {"scale": 0.3, "is_causal": True},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"enable_gqa": True, "is_causal": True},
    ],
)
def test_attention_jvp_matches_math_backend(options, monkeypatch):
    monkeypatch.setattr(attention, "_MAX_BLOCK_ENTRIES", 2 * 7)  # several query blocks
    gen = torch.Generator().manual_seed(0)
    L, S = (5, 5) if options.get("is_causal") else (5, 7)
    kv_heads = 1 if options.get("enable_gqa") else 2
    q = torch.randn(2, 2, L, 3, generator=gen, dtype=DT)
    k = torch.randn(2, kv_heads, S, 3, generator=gen, dtype=DT)
    v = torch.randn(2, kv_heads, S, 4, generator=gen, dtype=DT)
    tangents = [torch.randn(t.shape, generator=gen, dtype=DT) for t in (q, k, v)]
    if options.get("attn_mask") == "bool":
        options = {"attn_mask": torch.rand(L, S, generator=gen) > 0.3}
    elif options.get("attn_mask") == "float":
        options = {"attn_mask": torch.randn(L, S, generator=gen, dtype=DT)}

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **options)

    with sdpa_kernel([SDPBackend.MATH]):
        out, expected = jvp(sdpa, (q, k, v), tuple(tangents))
        for missing in range(3):  # absent tangents count as zero
            partial = [None if i == missing else t for i, t in enumerate(tangents)]
            zeroed = [torch.zeros_like(t) if p is None else t for p, t in zip(partial, tangents)]
            got = attention.attention_jvp(q, k, v, out, *partial, **options)
            torch.testing.assert_close(got, jvp(sdpa, (q, k, v), tuple(zeroed))[1], **TOL)
    got = attention.attention_jvp(q, k, v, out, *tangents, **options)
    torch.testing.assert_close(got, expected, **TOL)
