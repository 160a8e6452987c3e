r"""Damped inverses of KFAC and EKFAC, factorised once at construction.

Every KFAC block :math:`B \otimes A` is inverted factor by factor or in its eigenbasis
(:math:`A = Q_A \Lambda_A Q_A^\top`, :math:`B = Q_B \Lambda_B Q_B^\top`):

* factor-wise damping :math:`(\delta_A, \delta_B)`:
  :math:`(B + \delta_B I)^{-1} \otimes (A + \delta_A I)^{-1}` (a float :math:`\delta` means
  :math:`\delta_A = \delta_B = \delta`), from Cholesky factorisations of the damped factors
  (NOTE [Cholesky inverse factors]); its eigenvalues are
  :math:`1 / ((\lambda_B + \delta_B)(\lambda_A + \delta_A))`;
* heuristic (:math:`\pi`-) damping (Martens, J., Grosse, R. (2015). Optimizing neural networks
  with Kronecker-factored approximate curvature, §6.3): factor-wise damping with
  :math:`\pi = \sqrt{(\operatorname{tr} A / \dim A) / (\operatorname{tr} B / \dim B)}`,
  :math:`\delta_A = \max(\pi \sqrt\delta, \delta_\text{min})`,
  :math:`\delta_B = \max(\sqrt\delta / \pi, \delta_\text{min})` (:math:`\pi = 1` if a trace
  vanishes);
* exact damping :math:`(B \otimes A + \delta I)^{-1}`, in the eigenbasis with eigenvalues
  :math:`1 / (\lambda_B \lambda_A + \delta)` (Grosse, R., Bae, J., Anil, C., et al. (2023).
  Studying large language model generalization with influence functions).

NOTE [Cholesky inverse factors]: a factor-damped block needs only the inverse factors
:math:`(A + \delta_A I)^{-1}` and :math:`(B + \delta_B I)^{-1}`, computed from the Cholesky
factorisation :math:`F + \delta I = L L^\top` as :math:`L^{-\top} L^{-1}` (about :math:`n^3`
flops, several times cheaper than a symmetric eigendecomposition; Golub, G. H., Van Loan, C. F.
(2013). Matrix Computations, 4th ed., §4.2). The products use the inverse factors
untransposed, so they must be exactly symmetric: on CPU they are (LAPACK's ``potri`` computes
one triangle and torch mirrors it), elsewhere they are symmetrised. Every pivot satisfies
:math:`L_{ii}^2 \geq \lambda_\min(F + \delta I)` (it is the reciprocal of a diagonal entry of
the inverse of a leading principal submatrix, whose smallest eigenvalue is at least
:math:`\lambda_\min`), so a pivot :math:`L_{ii}^2 \leq n \varepsilon \max_i (F + \delta I)_{ii}`
shows that the damped factor is singular up to round-off (the tolerance of NOTE [numerical
rank of factors] in :mod:`curvops.kronecker.eigen`, with the largest diagonal entry in place
of the largest eigenvalue, which it does not exceed). The test is one-sided, but a damping
above the tolerance passes it (every pivot is at least :math:`\delta` for a PSD :math:`F`,
up to round-off), and a
singular factor without damping fails it in practice (tested). Such a factor, or one whose
factorisation fails, is inverted from its eigendecomposition instead (eigenvalues clipped
at 0, an error if :math:`\lambda + \delta` is not positive); so is a factor whose
eigendecomposition is already cached on the KFAC operator. The structured form
(:meth:`_BlockInverse.to_block_diagonal`) needs the eigendecompositions and computes them on
its first call.

NOTE [stale inverses]: an inverse is factorised from the factors of its KFAC/EKFAC operator
once, so it describes the parameters at which those factors were computed. It remembers their
parameter versions and, before every product, applies the operator's ``on_stale`` policy
(NOTE [stale factors] of :mod:`curvops.kronecker.staleness`): ``"raise"`` raises a
:class:`~curvops.kronecker.staleness.StaleFactorsError` (build a new inverse after
``compute_factors()``), ``"recompute"`` refreshes the operator's factors if needed and
factorises them again, ``"ignore"`` keeps the old inverse. Products with NaN or Inf entries
raise ``FloatingPointError`` (NOTE [non-finite values] of :mod:`curvops.risk.finite`).

NOTE [damping of fallback blocks]: a fallback block :math:`\operatorname{diag}(d)` has no
factors; it is damped with the coefficient of :math:`I` in the damped Kronecker product,
:math:`\operatorname{diag}(d) + c I` with :math:`c = \delta_A \delta_B` for factor-wise
damping and :math:`c = \delta` for exact and heuristic damping (where
:math:`\pi\sqrt\delta \cdot \sqrt\delta/\pi = \delta`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from math import sqrt
from numbers import Real

import torch
from torch import Tensor

from curvops._compilation import eager_region
from curvops.kronecker.blocks import RowDiagonalKroneckerLinearOperator, WeightBiasStacking
from curvops.kronecker.eigen import factor_eigh
from curvops.kronecker.ekfac import EKFACLinearOperator
from curvops.kronecker.factors import LayerFactors
from curvops.kronecker.kfac import KFACLinearOperator
from curvops.kronecker.product import (
    DiagonalBlock,
    EigenCore,
    FactoredBlocks,
    KroneckerCore,
    MatrixBlock,
)
from curvops.kronecker.staleness import OnStale, stale_error
from curvops.linear_operator import LinearOperator
from curvops.risk.concurrency import DATA_PASS_LOCK
from curvops.risk.finite import require_finite, require_finite_input
from curvops.structured import (
    BlockDiagonalLinearOperator,
    DiagonalLinearOperator,
    KroneckerEigenLinearOperator,
)

_Structured = Callable[[], tuple[LinearOperator, list[int]]]


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


def _symmetrised(M: Tensor) -> Tensor:
    """``(M + M^T) / 2``: exactly symmetric, so that products may use it untransposed."""
    return (M + M.T) / 2


def _eigen_inverse(Q: Tensor, inverse_eigenvalues: Tensor) -> Tensor:
    r""":math:`Q \operatorname{diag}(\mu) Q^\top` for ``inverse_eigenvalues`` :math:`\mu`."""
    return _symmetrised((Q * inverse_eigenvalues) @ Q.T)


def _cholesky_inverse(matrix: Tensor, damping: float) -> Tensor | None:
    r""":math:`(F + \delta I)^{-1}` from a Cholesky factorisation, or ``None`` if singular.

    ``None`` if the factorisation fails or a pivot proves the damped factor numerically
    singular (NOTE [Cholesky inverse factors]).
    """
    damped = matrix.clone()
    damped.diagonal().add_(damping)
    L, info = torch.linalg.cholesky_ex(damped)
    n = matrix.shape[-1]
    tol = n * torch.finfo(matrix.dtype).eps * damped.diagonal().max()
    # one synchronisation; a NaN pivot (failed factorisation, non-finite factor) compares False
    if not bool((info == 0) & (L.diagonal().square().min() > tol)):
        return None
    inverse = torch.cholesky_inverse(L)
    if inverse.device.type == "cpu":
        # LAPACK's potri computes one triangle, which torch mirrors into the other: exactly
        # symmetric (and column-major, so its transpose is the row-major copy for free)
        return inverse.T
    return _symmetrised(inverse)  # e.g. CUDA solves with the identity: not exactly symmetric


class _BlockInverse(LinearOperator):
    """Shared product of the inverse operators: a block-diagonal collection of blocks.

    Every block is kept as plain tensors for the products (:mod:`curvops.kronecker.product`)
    and as a recipe for its structured operator, built by the first call of
    :meth:`to_block_diagonal`.
    """

    is_self_adjoint = True
    is_psd = True

    def __init__(self, op: KFACLinearOperator):
        super().__init__(op.in_shapes, op.out_shapes, dtype=op.dtype, device=op.device)
        self._op = op
        self._reset()
        self._build()

    def _reset(self) -> None:
        """Forget all blocks (before a first or a new factorisation)."""
        self._structured: list[_Structured] = []
        self._product_blocks: list[MatrixBlock | DiagonalBlock] = []
        self._operator: BlockDiagonalLinearOperator | None = None

    def _build(self) -> None:
        """Factorise the operator's current factors into blocks (then :meth:`_finish`)."""
        raise NotImplementedError

    @eager_region  # NOTE [compiling products]: locks and refactorisation run eagerly
    def _refresh_if_stale(self) -> None:
        """Apply the operator's ``on_stale`` policy (NOTE [stale inverses]).

        Raises:
            StaleFactorsError: If a parameter changed and the policy is ``"raise"``.
        """
        changed = self._op._stale_parameters(self._versions)
        if not changed:
            return
        if self._op.on_stale == OnStale.RECOMPUTE:
            with DATA_PASS_LOCK:  # NOTE [threads]: one thread refactorises, the others reuse
                if self._op._stale_parameters(self._versions):
                    self._op._ensure_factors()  # recomputes the operator's factors if stale
                    self._reset()
                    self._build()
            return
        raise stale_error(
            type(self).__name__,
            changed,
            f"Call compute_factors() on the {type(self._op).__name__} and build a new inverse "
            "from it.",
        )

    def _weight_block(
        self, layer, f: LayerFactors, vals: Tensor, QA: Tensor | None, QB: Tensor
    ) -> tuple[LinearOperator, list[int]]:
        """The structured block of a layer's weight (with a joint bias) for eigenvalues ``vals``."""
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

    def _bias_block(self, layer, vals: Tensor, QB: Tensor) -> tuple[LinearOperator, list[int]]:
        """The structured block of a separate bias for eigenvalues ``vals`` in the basis ``QB``."""
        return KroneckerEigenLinearOperator([QB], vals, check_orthonormal=False), [layer.bias_index]

    def _add_weight_product(self, layer, f: LayerFactors, core) -> None:
        """Add the product block of a layer's weight (with a joint bias)."""
        w, b = layer.weight_index, layer.bias_index
        positions = (w, b) if f.joint else (w,)
        shapes = tuple(self._in_shapes[i] for i in positions)
        self._product_blocks.append(MatrixBlock(positions, shapes, core))

    def _add_bias_product(self, layer, core) -> None:
        """Add the product block of a separate bias."""
        b = layer.bias_index
        self._product_blocks.append(MatrixBlock((b,), (self._in_shapes[b],), core))

    def _add_eigen_weight_block(
        self, layer, f: LayerFactors, vals: Tensor, QA: Tensor | None, QB: Tensor
    ) -> None:
        """Add a layer's weight block with eigenvalues ``vals`` in the basis ``QB (x) QA``."""
        self._structured.append(lambda: self._weight_block(layer, f, vals, QA, QB))
        core = EigenCore(None, QB, vals) if f.diagonal_input else EigenCore(QB, QA, vals)
        self._add_weight_product(layer, f, core)

    def _add_eigen_bias_block(self, layer, vals: Tensor, QB: Tensor) -> None:
        """Add a separate bias block with eigenvalues ``vals`` in the basis ``QB``."""
        self._structured.append(lambda: self._bias_block(layer, vals, QB))
        self._add_bias_product(layer, EigenCore(QB, None, vals.unsqueeze(-1)))

    def _add_diagonal_block(self, index: int, vals: Tensor) -> None:
        self._structured.append(lambda: (DiagonalLinearOperator([vals]), [index]))
        self._product_blocks.append(DiagonalBlock((index,), vals))

    def _finish(self) -> None:
        """Assemble the product's blocks; remember the factors' parameter versions."""
        self._product = FactoredBlocks(
            self._product_blocks, self._in_shapes, dtype=self.dtype, device=self.device, psd=True
        )
        self._versions = self._op._factor_versions  # NOTE [stale inverses]

    def to_block_diagonal(self) -> BlockDiagonalLinearOperator:
        """The inverse as a block-diagonal composition of structured (eigenbasis) blocks.

        Built on the first call; for factor-wise and heuristic damping this computes the
        eigendecompositions of the factors (NOTE [Cholesky inverse factors]). A snapshot: it
        does not follow later changes of the parameters (NOTE [stale inverses]).
        """
        self._refresh_if_stale()
        if self._operator is None:
            blocks = [build() for build in self._structured]
            self._operator = BlockDiagonalLinearOperator(
                [op for op, _ in blocks], [positions for _, positions in blocks]
            )
        return self._operator

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        owner = type(self).__name__
        require_finite_input(X, owner=owner)
        self._refresh_if_stale()
        result = self._product._matmat(X)
        require_finite(result, owner=owner, what="the product")  # NOTE [non-finite values]
        return result

    def diagonal(self) -> Tensor:
        r"""Exact diagonal of the inverse, flat ``[D]``, from its factored blocks.

        :math:`\operatorname{diag}(L) \otimes \operatorname{diag}(R)` for a block
        :math:`L \otimes R` of inverse factors, :math:`(Q_L \odot Q_L) \Lambda^{-1}
        (Q_R \odot Q_R)^\top` for a block in an eigenbasis.
        """
        return self._product.diagonal()


class KFACInverseLinearOperator(_BlockInverse):
    r"""Damped inverse of a :class:`~curvops.kronecker.kfac.KFACLinearOperator`.

    The damped factors are factorised once at construction and every product costs a few
    small matrix products per layer: factor-wise and heuristic damping multiply with
    explicit inverse factors from Cholesky factorisations (NOTE [Cholesky inverse factors]),
    exact damping in the factors' eigenbases (cached on the KFAC operator). See the module
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
        self._K = K
        self._damping = damping
        self._delta, self._pair = delta, pair
        self._heuristic, self._exact = use_heuristic_damping, use_exact_damping
        self._min_damping = min_damping
        self._retry = retry_double_precision
        self._inverse_factors: dict[tuple[str, str, float], Tensor] = {}
        super().__init__(K)

    def _build(self) -> None:
        K, delta, pair = self._K, self._delta, self._pair
        for layer, f in K._layer_items():
            if self._exact:
                self._add_exactly_damped(layer, f, delta)
            else:
                self._add_factor_damped(layer, f, pair, delta)
        shift = delta if pair is None else pair[0] * pair[1]
        names = K.param_names
        for i, diag in K._fallback_items():
            self._add_diagonal_block(i, _inverted(diag + shift, f"diagonal block of '{names[i]}'"))
        self._inverse_factors = {}  # only shared between the blocks of one layer
        self._finish()

    # ------------------------------------------------------------ factorisations
    def _eigh(self, layer_name: str, f: LayerFactors, factor: str) -> tuple[Tensor, Tensor]:
        """Eigendecomposition of a factor of ``f``, cached on the KFAC operator.

        Computed without the cache if the operator's factors were replaced since
        construction (the inverse keeps the factors it was built from).
        """
        K = self._K
        if K._factors is not None and K._factors.get(layer_name) is f:
            return K.eigendecomposition(layer_name, factor, retry_double_precision=self._retry)
        matrix = f.input_factor if factor == "input" else f.gradient_factor
        return factor_eigh(
            matrix,
            what=f"{factor} factor of {f.module_type} '{layer_name}'",
            retry_double_precision=self._retry,
        )

    def _inverse_factor(self, layer_name: str, f: LayerFactors, factor: str, d: float) -> Tensor:
        r"""The damped inverse factor :math:`(F + d I)^{-1}` (NOTE [Cholesky inverse factors])."""
        key = (layer_name, factor, d)
        if key not in self._inverse_factors:
            matrix = f.input_factor if factor == "input" else f.gradient_factor
            inverse = None
            if (layer_name, factor) not in self._K._eigen_cache:
                inverse = _cholesky_inverse(matrix, d)
            if inverse is None:
                lam, Q = self._eigh(layer_name, f, factor)
                what = f"{factor} factor of {f.module_type} '{layer_name}'"
                inverse = _eigen_inverse(Q, _inverted(lam + d, what))
            self._inverse_factors[key] = inverse
        return self._inverse_factors[key]

    # ------------------------------------------------------------ damping schemes
    def _add_factor_damped(
        self, layer, f: LayerFactors, pair: tuple[float, float] | None, delta: float | None
    ) -> None:
        """Add the blocks of a layer with factor-wise (or heuristic) damping."""
        where = f"{f.module_type} '{layer.name}'"
        name = layer.name
        if f.input_factor is not None:
            A = f.input_factor
            trA = A.mean() if f.diagonal_input else A.diagonal().mean()
            dA, dB = pair or self._heuristic_pair(delta, trA, f.gradient_factor)
            B_inv = self._inverse_factor(name, f, "gradient", dB)
            if f.diagonal_input:
                A_inv = _inverted(A + dA, f"Kronecker block of {where}")
                core = KroneckerCore(A_inv, B_inv, symmetric=True)
            else:
                A_inv = self._inverse_factor(name, f, "input", dA)
                core = KroneckerCore(B_inv, A_inv, symmetric=True)
            self._add_weight_product(layer, f, core)
            self._structured.append(partial(self._damped_weight_block, layer, f, dA, dB))
        if f.bias_input_factor is not None:
            a_b = f.bias_input_factor
            dA, dB = pair or self._heuristic_pair(delta, a_b, f.gradient_factor)
            scale = _inverted(a_b + dA, f"bias block of {where}")
            B_inv = self._inverse_factor(name, f, "gradient", dB)
            self._add_bias_product(layer, KroneckerCore(B_inv * scale, None))
            self._structured.append(partial(self._damped_bias_block, layer, f, dA, dB))

    def _damped_weight_block(
        self, layer, f: LayerFactors, dA: float, dB: float
    ) -> tuple[LinearOperator, list[int]]:
        """Structured form of a factor-damped weight block (needs the eigendecompositions)."""
        lamB, QB = self._eigh(layer.name, f, "gradient")
        if f.diagonal_input:
            lamA, QA = f.input_factor, None
            denominator = torch.outer(lamA + dA, lamB + dB)
        else:
            lamA, QA = self._eigh(layer.name, f, "input")
            denominator = torch.outer(lamB + dB, lamA + dA)
        vals = _inverted(denominator, f"Kronecker block of {f.module_type} '{layer.name}'")
        return self._weight_block(layer, f, vals, QA, QB)

    def _damped_bias_block(
        self, layer, f: LayerFactors, dA: float, dB: float
    ) -> tuple[LinearOperator, list[int]]:
        """Structured form of a factor-damped separate bias block."""
        lamB, QB = self._eigh(layer.name, f, "gradient")
        denominator = (f.bias_input_factor + dA) * (lamB + dB)
        vals = _inverted(denominator, f"bias block of {f.module_type} '{layer.name}'")
        return self._bias_block(layer, vals, QB)

    def _add_exactly_damped(self, layer, f: LayerFactors, delta: float) -> None:
        """Add the blocks of a layer with exact damping, in the factors' eigenbases."""
        where = f"{f.module_type} '{layer.name}'"
        lamB, QB = self._eigh(layer.name, f, "gradient")
        if f.input_factor is not None:
            if f.diagonal_input:
                lamA, QA = f.input_factor, None
                outer = torch.outer(lamA, lamB)
            else:
                lamA, QA = self._eigh(layer.name, f, "input")
                outer = torch.outer(lamB, lamA)
            vals = _inverted(outer + delta, f"Kronecker block of {where}")
            self._add_eigen_weight_block(layer, f, vals, QA, QB)
        if f.bias_input_factor is not None:
            vals = _inverted(f.bias_input_factor * lamB + delta, f"bias block of {where}")
            self._add_eigen_bias_block(layer, vals, QB)

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
        self._damping = _nonnegative(damping, "damping")
        super().__init__(EK)

    def _build(self) -> None:
        EK, delta = self._op, self._damping
        corrections = EK.eigenvalue_corrections
        for layer, f in EK._layer_items():
            where = f"{f.module_type} '{layer.name}'"
            QA, QB = EK._bases(layer.name)
            lam = corrections[layer.name]
            if "weight" in lam:
                vals = _inverted(lam["weight"] + delta, f"EKFAC block of {where}")
                self._add_eigen_weight_block(layer, f, vals, QA, QB)
            if "bias" in lam:
                vals = _inverted(lam["bias"] + delta, f"EKFAC bias block of {where}")
                self._add_eigen_bias_block(layer, vals, QB)
        names = EK.param_names
        for i, diag in EK._fallback_items():
            self._add_diagonal_block(i, _inverted(diag + delta, f"diagonal block of '{names[i]}'"))
        self._finish()
