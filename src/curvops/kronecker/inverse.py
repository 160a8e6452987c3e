r"""Damped inverses of KFAC and EKFAC, from eigendecompositions computed once.

Every KFAC block :math:`B \otimes A` (with :math:`A = Q_A \Lambda_A Q_A^\top`,
:math:`B = Q_B \Lambda_B Q_B^\top`) inverts in its eigenbasis, returned as a
:class:`~curvops.structured.KroneckerEigenLinearOperator`:

* factor-wise damping :math:`(\delta_A, \delta_B)`:
  :math:`(B + \delta_B I)^{-1} \otimes (A + \delta_A I)^{-1}`, eigenvalues
  :math:`1 / ((\lambda_B + \delta_B)(\lambda_A + \delta_A))` (a float :math:`\delta` means
  :math:`\delta_A = \delta_B = \delta`);
* heuristic (:math:`\pi`-) damping (Martens, J., Grosse, R. (2015). Optimizing neural networks
  with Kronecker-factored approximate curvature, §6.3):
  :math:`\pi = \sqrt{(\operatorname{tr} A / \dim A) / (\operatorname{tr} B / \dim B)}`,
  :math:`\delta_A = \max(\pi \sqrt\delta, \delta_\text{min})`,
  :math:`\delta_B = \max(\sqrt\delta / \pi, \delta_\text{min})` (:math:`\pi = 1` if a trace
  vanishes);
* exact damping :math:`(B \otimes A + \delta I)^{-1}`, eigenvalues
  :math:`1 / (\lambda_B \lambda_A + \delta)` (Grosse, R., Bae, J., Anil, C., et al. (2023).
  Studying large language model generalization with influence functions).

NOTE [damping of fallback blocks]: a fallback block :math:`\operatorname{diag}(d)` has no
factors; it is damped with the coefficient of :math:`I` in the damped Kronecker product,
:math:`\operatorname{diag}(d) + c I` with :math:`c = \delta_A \delta_B` for factor-wise
damping and :math:`c = \delta` for exact and heuristic damping (where
:math:`\pi\sqrt\delta \cdot \sqrt\delta/\pi = \delta`).
"""

from __future__ import annotations

from math import sqrt
from numbers import Real

import torch
from torch import Tensor

from curvops.kronecker.blocks import RowDiagonalKroneckerLinearOperator, WeightBiasStacking
from curvops.kronecker.ekfac import EKFACLinearOperator
from curvops.kronecker.kfac import KFACLinearOperator
from curvops.kronecker.product import (
    DiagonalBlock,
    EigenCore,
    FactoredBlocks,
    KroneckerCore,
    MatrixBlock,
)
from curvops.linear_operator import LinearOperator
from curvops.structured import (
    BlockDiagonalLinearOperator,
    DiagonalLinearOperator,
    KroneckerEigenLinearOperator,
)


def _nonnegative(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
    return float(value)


def _inverted(denominator: Tensor, what: str) -> Tensor:
    """Elementwise ``1 / denominator``, refusing singular (non-positive) entries."""
    if not bool((denominator > 0).all()) or not bool(torch.isfinite(denominator).all()):
        raise ValueError(
            f"The damped {what} is singular (an eigenvalue plus damping is not positive). "
            f"Pass a positive damping."
        )
    return 1.0 / denominator


def _inverse_factor(Q: Tensor, shifted_eigenvalues: Tensor) -> Tensor:
    r""":math:`Q \operatorname{diag}(1 / (\lambda + \delta)) Q^\top` from positive ``λ + δ``.

    Symmetrised, so that it is exactly symmetric (its products use it untransposed).
    """
    M = (Q * shifted_eigenvalues.reciprocal()) @ Q.T
    return (M + M.T) / 2


class _BlockInverse(LinearOperator):
    """Shared product of the inverse operators: a block-diagonal collection of blocks.

    Every block is kept twice: as a structured operator (:meth:`to_block_diagonal`) and as
    plain tensors for the products (:mod:`curvops.kronecker.product`).
    """

    is_self_adjoint = True
    is_psd = True

    def __init__(self, op: KFACLinearOperator):
        super().__init__(op.in_shapes, op.out_shapes, dtype=op.dtype, device=op.device)
        self._blocks: list[tuple[LinearOperator, list[int]]] = []
        self._product_blocks: list[MatrixBlock | DiagonalBlock] = []

    def _weight_block(self, op, layer, vals: Tensor, QA: Tensor | None, QB: Tensor):
        """The structured block of a layer's weight (with a joint bias) for eigenvalues ``vals``."""
        f = op.factors[layer.name]
        w, b = layer.weight_index, layer.bias_index
        if f.diagonal_input:
            return RowDiagonalKroneckerLinearOperator(QB, vals), [w]
        if f.joint:
            glue = WeightBiasStacking(self._in_shapes[w], dtype=self.dtype, device=self.device)
            eig = KroneckerEigenLinearOperator([QB, QA], vals, check_orthonormal=False)
            return glue.adjoint() @ eig @ glue, [w, b]
        eig = KroneckerEigenLinearOperator(
            [QB, QA], vals, shape=self._in_shapes[w], check_orthonormal=False
        )
        return eig, [w]

    def _add_weight_block(
        self, op, layer, vals: Tensor, QA: Tensor | None, QB: Tensor, core=None
    ) -> None:
        """Add a layer's weight block with eigenvalues ``vals`` in the basis ``QB (x) QA``.

        ``core`` replaces the eigenbasis form in the products (e.g. explicit inverse
        factors, two matrix products instead of four).
        """
        f = op.factors[layer.name]
        self._blocks.append(self._weight_block(op, layer, vals, QA, QB))
        if core is None:
            core = EigenCore(None, QB, vals) if f.diagonal_input else EigenCore(QB, QA, vals)
        w, b = layer.weight_index, layer.bias_index
        positions = (w, b) if f.joint else (w,)
        shapes = tuple(self._in_shapes[i] for i in positions)
        self._product_blocks.append(MatrixBlock(positions, shapes, core))

    def _add_bias_block(self, layer, vals: Tensor, QB: Tensor, core=None) -> None:
        """Add a separate bias block with eigenvalues ``vals`` in the basis ``QB``."""
        b = layer.bias_index
        eig = KroneckerEigenLinearOperator([QB], vals, check_orthonormal=False)
        self._blocks.append((eig, [b]))
        core = EigenCore(QB, None, vals.unsqueeze(-1)) if core is None else core
        self._product_blocks.append(MatrixBlock((b,), (self._in_shapes[b],), core))

    def _add_diagonal_block(self, index: int, vals: Tensor) -> None:
        self._blocks.append((DiagonalLinearOperator([vals]), [index]))
        self._product_blocks.append(DiagonalBlock((index,), vals))

    def _finish(self) -> None:
        """Assemble the blocks into one block-diagonal operator (and the product's blocks)."""
        self._operator = BlockDiagonalLinearOperator(
            [op for op, _ in self._blocks], [positions for _, positions in self._blocks]
        )
        self._product = FactoredBlocks(
            self._product_blocks, self._in_shapes, dtype=self.dtype, device=self.device, psd=True
        )

    def to_block_diagonal(self) -> BlockDiagonalLinearOperator:
        """The inverse as a block-diagonal composition of structured blocks."""
        return self._operator

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return self._product._matmat(X)


class KFACInverseLinearOperator(_BlockInverse):
    r"""Damped inverse of a :class:`~curvops.kronecker.kfac.KFACLinearOperator`.

    The factors' eigendecompositions are computed once at construction (cached on the KFAC
    operator) and every product costs a few small matrix products per layer. See the module
    docstring for the three damping schemes and NOTE [damping of fallback blocks].

    Args:
        K: The KFAC operator (its factors are computed if needed).
        damping: A float :math:`\delta \geq 0`, or a pair :math:`(\delta_A, \delta_B)` of
            per-factor dampings.
        use_heuristic_damping: Use :math:`\pi`-damping (a float ``damping`` only).
        min_damping: Lower bound of the heuristic per-factor dampings.
        use_exact_damping: Invert :math:`B \otimes A + \delta I` exactly (a float ``damping``
            only).
        retry_double_precision: Retry a failed eigendecomposition in float64 (otherwise
            raise an error naming the layer).

    Raises:
        TypeError: If ``K`` is not a KFAC operator (use
            :class:`EKFACInverseLinearOperator` for EKFAC).
        ValueError: For invalid or conflicting damping options, or a singular damped block.
    """

    def __init__(
        self,
        K: KFACLinearOperator,
        *,
        damping: float | tuple[float, float] = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        retry_double_precision: bool = True,
    ):
        if not isinstance(K, KFACLinearOperator) or isinstance(K, EKFACLinearOperator):
            raise TypeError(
                f"KFACInverseLinearOperator needs a KFACLinearOperator, got "
                f"{type(K).__name__}. For EKFAC use EKFACInverseLinearOperator."
            )
        if use_heuristic_damping and use_exact_damping:
            raise ValueError(
                "use_heuristic_damping and use_exact_damping exclude each other; choose one."
            )
        if isinstance(damping, (tuple, list)):
            if len(damping) != 2:
                raise ValueError(
                    f"A per-factor damping must be a pair (damping_A, damping_B), got {damping!r}."
                )
            if use_heuristic_damping or use_exact_damping:
                raise ValueError(
                    "Heuristic and exact damping take one float damping, not a pair "
                    f"{tuple(damping)!r}."
                )
            pair = (_nonnegative(damping[0], "damping[0]"), _nonnegative(damping[1], "damping[1]"))
            delta = None
        else:
            delta = _nonnegative(damping, "damping")
            pair = None if (use_heuristic_damping or use_exact_damping) else (delta, delta)
        min_damping = _nonnegative(min_damping, "min_damping")
        super().__init__(K)
        self._K = K
        self._damping = damping
        self._heuristic, self._exact = use_heuristic_damping, use_exact_damping
        self._min_damping = min_damping

        for layer, f in K._layer_items():
            where = f"{f.module_type} '{layer.name}'"
            lamB, QB = K.eigendecomposition(
                layer.name, "gradient", retry_double_precision=retry_double_precision
            )
            if f.input_factor is not None:
                if f.diagonal_input:
                    lamA, QA, trA = f.input_factor, None, f.input_factor.mean()
                else:
                    lamA, QA = K.eigendecomposition(
                        layer.name, "input", retry_double_precision=retry_double_precision
                    )
                    trA = f.input_factor.diagonal().mean()
                outer = torch.outer(lamA, lamB) if f.diagonal_input else torch.outer(lamB, lamA)
                core = None  # exact damping: the eigenbasis form
                if self._exact:
                    denominator = outer + delta
                else:
                    dA, dB = pair or self._heuristic_pair(delta, trA, f.gradient_factor)
                    denominator = (
                        torch.outer(lamA + dA, lamB + dB)
                        if f.diagonal_input
                        else torch.outer(lamB + dB, lamA + dA)
                    )
                vals = _inverted(denominator, f"Kronecker block of {where}")
                if not self._exact:  # products with the inverse factors
                    B_inv = _inverse_factor(QB, lamB + dB)
                    core = (
                        KroneckerCore((lamA + dA).reciprocal(), B_inv, symmetric=True)
                        if f.diagonal_input
                        else KroneckerCore(B_inv, _inverse_factor(QA, lamA + dA), symmetric=True)
                    )
                self._add_weight_block(K, layer, vals, QA, QB, core)
            if f.bias_input_factor is not None:
                a_b = f.bias_input_factor
                core = None
                if self._exact:
                    denominator = a_b * lamB + delta
                else:
                    dA, dB = pair or self._heuristic_pair(delta, a_b, f.gradient_factor)
                    denominator = (a_b + dA) * (lamB + dB)
                vals = _inverted(denominator, f"bias block of {where}")
                if not self._exact:
                    core = KroneckerCore(_inverse_factor(QB, lamB + dB) / (a_b + dA), None)
                self._add_bias_block(layer, vals, QB, core)
        shift = delta if pair is None else pair[0] * pair[1]
        names = K.param_names
        for i, diag in K._fallback_items():
            self._add_diagonal_block(i, _inverted(diag + shift, f"diagonal block of '{names[i]}'"))
        self._finish()

    def _heuristic_pair(self, delta: float, mean_trace_A: Tensor, B: Tensor) -> tuple[float, float]:
        """Per-factor dampings :math:`(\\delta_A, \\delta_B)` of the :math:`\\pi` heuristic."""
        mean_trace_B = B.diagonal().mean()
        ratio = float(mean_trace_A) / float(mean_trace_B) if float(mean_trace_B) > 0 else 0.0
        pi = sqrt(ratio) if ratio > 0 and ratio != float("inf") else 1.0
        root = sqrt(delta)
        return max(pi * root, self._min_damping), max(root / pi, self._min_damping)


class EKFACInverseLinearOperator(_BlockInverse):
    r"""Damped inverse :math:`(\text{EKFAC} + \delta I)^{-1}`, exact in the eigenbasis.

    Each block's eigenvalues become :math:`1 / (\Lambda^\star + \delta)`; fallback diagonals
    :math:`1/(d + \delta)`.

    Args:
        EK: The EKFAC operator (its factors and corrections are computed if needed).
        damping: :math:`\delta \geq 0`.

    Raises:
        TypeError: If ``EK`` is not an EKFAC operator.
        ValueError: For a negative damping or a singular damped block.
    """

    def __init__(self, EK: EKFACLinearOperator, *, damping: float = 0.0):
        if not isinstance(EK, EKFACLinearOperator):
            raise TypeError(
                f"EKFACInverseLinearOperator needs an EKFACLinearOperator, got "
                f"{type(EK).__name__}. For KFAC use KFACInverseLinearOperator."
            )
        delta = _nonnegative(damping, "damping")
        super().__init__(EK)
        self._damping = delta
        corrections = EK.eigenvalue_corrections
        for layer, f in EK._layer_items():
            where = f"{f.module_type} '{layer.name}'"
            QA, QB = EK._bases(layer.name)
            lam = corrections[layer.name]
            if "weight" in lam:
                vals = _inverted(lam["weight"] + delta, f"EKFAC block of {where}")
                self._add_weight_block(EK, layer, vals, QA, QB)
            if "bias" in lam:
                vals = _inverted(lam["bias"] + delta, f"EKFAC bias block of {where}")
                self._add_bias_block(layer, vals, QB)
        names = EK.param_names
        for i, diag in EK._fallback_items():
            self._add_diagonal_block(i, _inverted(diag + delta, f"diagonal block of '{names[i]}'"))
        self._finish()
