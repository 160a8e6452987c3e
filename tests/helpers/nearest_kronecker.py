"""Dense references for KFOC: nearest Kronecker products of blocks of a dense curvature matrix.

Written independently of ``curvops.kronecker``: the rearrangement of Van Loan & Pitsianis
(1993) of a dense block and its SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rearrange(block: Tensor, m: int, n: int) -> Tensor:
    """R(C) with R(B kron A) = vec(B) vec(A)^T for B [m, m], A [n, n] (row-major kron)."""
    return block.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)


def nearest_kronecker(block: Tensor, m: int, n: int) -> Tensor:
    """The Kronecker product B kron A nearest to ``block`` in Frobenius norm (dense)."""
    U, S, Vh = torch.linalg.svd(rearrange(block, m, n))
    return S[0] * torch.kron(U[:, 0].reshape(m, m), Vh[0].reshape(n, n))


def nearest_diagonal_kronecker(block: Tensor, E: int, D: int) -> Tensor:
    """The nearest diag(a) kron B (first factor diagonal, [E, E]; B [D, D]) to ``block``."""
    R = rearrange(block, E, D)  # rows: entries (i, k) of the first factor
    diagonal_rows = torch.arange(E) * (E + 1)
    U, S, Vh = torch.linalg.svd(R[diagonal_rows])
    return S[0] * torch.kron(torch.diag(U[:, 0]), Vh[0].reshape(D, D))


@dataclass
class Block:
    """One block of a layer-wise approximation, in the layout the approximation uses.

    Attributes:
        index: Flat coordinates (into the parameter vector) of the block's entries, in the
            row-major order of the block's matrix ([W_mat | b] for a joint block).
        kind: ``"kron"`` (nearest B kron A, B [m, m], A [n, n]), ``"diag-kron"`` (nearest
            diag(a) kron B, an embedding: m = num_embeddings, n = dim), ``"exact"`` (the
            block itself) or ``"diagonal"`` (its diagonal).
        m: First dimension.
        n: Second dimension.
    """

    index: Tensor
    kind: str
    m: int = 0
    n: int = 0

    def approximate(self, dense: Tensor) -> Tensor:
        """The block's approximation computed from the dense matrix."""
        C = dense[self.index[:, None], self.index[None, :]]
        if self.kind == "kron":
            return nearest_kronecker(C, self.m, self.n)
        if self.kind == "diag-kron":
            return nearest_diagonal_kronecker(C, self.m, self.n)
        if self.kind == "diagonal":
            return torch.diag(C.diagonal())
        return C


def offsets(params: list[Tensor]) -> list[int]:
    out = [0]
    for p in params:
        out.append(out[-1] + p.numel())
    return out


def weight_block(params: list[Tensor], w: int, b: int | None = None) -> Block:
    """The block of weight ``params[w]`` (as [d_out, -1]) with an optional joint bias."""
    off = offsets(params)
    m = params[w].shape[0]
    n = params[w].numel() // m
    W = torch.arange(off[w], off[w + 1]).reshape(m, n)
    if b is None:
        return Block(W.reshape(-1), "kron", m, n)
    bias = torch.arange(off[b], off[b + 1]).reshape(m, 1)
    return Block(torch.cat([W, bias], dim=1).reshape(-1), "kron", m, n + 1)


def param_block(params: list[Tensor], i: int, kind: str) -> Block:
    """The block of one parameter: ``"exact"``, ``"diagonal"`` or ``"diag-kron"`` (embedding)."""
    off = offsets(params)
    m, n = (params[i].shape[0], params[i].numel() // params[i].shape[0])
    return Block(torch.arange(off[i], off[i + 1]), kind, m, n)


def blockwise_approximation(dense: Tensor, blocks: list[Block]) -> Tensor:
    """The block-diagonal matrix of every block's approximation (zero elsewhere)."""
    out = torch.zeros_like(dense)
    for block in blocks:
        out[block.index[:, None], block.index[None, :]] = block.approximate(dense)
    return out
