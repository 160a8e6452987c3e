r"""Private glue operators that turn a layer's factors into an operator on its parameters.

* :class:`WeightBiasStacking` maps a layer's parameter tensors ``[W, b]`` to the matrix
  :math:`[W_\text{mat} \mid b] \in \mathbb{R}^{d_\text{out} \times (d_\text{in}+1)}` (and
  back, its adjoint). It is a permutation, so a joint weight-bias block
  :math:`P^\top (B \otimes A) P` inverts as :math:`P^\top (B \otimes A)^{-1} P`.
* :class:`RowDiagonalKroneckerLinearOperator` is :math:`(I \otimes Q)
  \operatorname{diag}(\operatorname{vec}_r \Lambda)(I \otimes Q^\top)` on a matrix
  :math:`X \in \mathbb{R}^{E \times D}`: the structure of an embedding's KFAC block
  :math:`\operatorname{diag}(a) \otimes B` (with :math:`\Lambda = a \lambda_B^\top`), of its
  EKFAC block and of their damped inverses, without forming an :math:`E \times E` matrix.
"""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor

from curvops.linear_operator import LinearOperator


class WeightBiasStacking(LinearOperator):
    r"""The permutation :math:`P: [W, b] \mapsto [W_\text{mat} \mid b]` (a column appended).

    Args:
        weight_shape: Shape of the weight (``[d_out, ...]``).
        dtype: Data type.
        device: Device.
    """

    def __init__(self, weight_shape: tuple[int, ...], *, dtype: torch.dtype, device):
        d_out, d_in = weight_shape[0], prod(weight_shape[1:])
        super().__init__([weight_shape, (d_out,)], [(d_out, d_in + 1)], dtype=dtype, device=device)
        self._d_in = d_in

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        W, b = X
        W = W.reshape(W.shape[0], self._d_in, W.shape[-1])
        return [torch.cat([W, b.unsqueeze(1)], dim=1)]

    def _adjoint_matmat(self, X: list[Tensor]) -> list[Tensor]:
        (M,) = X
        W, b = M[:, :-1], M[:, -1]
        return [W.reshape(*self._in_shapes[0], M.shape[-1]), b]


class RowDiagonalKroneckerLinearOperator(LinearOperator):
    r""":math:`(I_E \otimes Q)\operatorname{diag}(\operatorname{vec}_r\Lambda)(I_E \otimes Q^\top)`.

    Acts on one tensor ``[E, D]``: :math:`X \mapsto ((X Q) \odot \Lambda) Q^\top`. With
    ``eigenvectors=None`` (:math:`Q = I`) it is the diagonal operator :math:`\Lambda \odot X`.

    Args:
        eigenvectors: Orthogonal :math:`Q`, ``[D, D]``, or ``None`` for the identity.
        eigenvalues: :math:`\Lambda`, ``[E, D]``.
    """

    is_self_adjoint = True

    def __init__(self, eigenvectors: Tensor | None, eigenvalues: Tensor):
        shape = tuple(eigenvalues.shape)
        super().__init__([shape], [shape], dtype=eigenvalues.dtype, device=eigenvalues.device)
        self._Q = eigenvectors
        self._lam = eigenvalues
        self.is_psd = bool((eigenvalues >= 0).all())

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        (x,) = X
        if self._Q is None:
            return [self._lam.unsqueeze(-1) * x]
        rotated = torch.einsum("edk,df->efk", x, self._Q)
        return [torch.einsum("efk,df->edk", self._lam.unsqueeze(-1) * rotated, self._Q)]


class EmbeddingKroneckerLinearOperator(LinearOperator):
    r"""The embedding block :math:`\operatorname{diag}(a) \otimes B` on one tensor ``[E, D]``.

    Products are :math:`X \mapsto \operatorname{diag}(a) X B^\top`.

    Args:
        diagonal: :math:`a`, ``[E]``.
        matrix: Symmetric :math:`B`, ``[D, D]``.
    """

    is_self_adjoint = True
    is_psd = True

    def __init__(self, diagonal: Tensor, matrix: Tensor):
        shape = (diagonal.shape[0], matrix.shape[0])
        super().__init__([shape], [shape], dtype=matrix.dtype, device=matrix.device)
        self._a = diagonal
        self._B = matrix

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        (x,) = X
        return [self._a[:, None, None] * torch.einsum("edk,fd->efk", x, self._B)]
