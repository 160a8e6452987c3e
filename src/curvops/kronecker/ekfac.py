r"""Eigenvalue-corrected KFAC (EKFAC) as a linear operator.

George, T., Laurent, C., Bouthillier, X., Ballas, N., Vincent, P. (2018). Fast approximate
natural gradient descent in a Kronecker-factored eigenbasis.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvops.kronecker.blocks import RowDiagonalKroneckerLinearOperator, WeightBiasStacking
from curvops.kronecker.collection import statistics_pass
from curvops.kronecker.kfac import KFACLinearOperator
from curvops.kronecker.options import FisherType, parse_enum
from curvops.kronecker.product import DiagonalBlock, EigenCore, FactoredBlocks, MatrixBlock
from curvops.kronecker.tied import correction_accumulator
from curvops.linear_operator import LinearOperator
from curvops.risk.concurrency import DATA_PASS_LOCK
from curvops.risk.finite import require_finite
from curvops.structured import DiagonalLinearOperator, KroneckerEigenLinearOperator


class EKFACLinearOperator(KFACLinearOperator):
    r"""KFAC with eigenvalues corrected to the exact diagonal in the Kronecker eigenbasis.

    Each layer's block is :math:`(Q_B \otimes Q_A) \operatorname{diag}(\Lambda^\star)
    (Q_B \otimes Q_A)^\top` with the eigenvectors of the KFAC factors and the corrected
    eigenvalues of :mod:`curvops.kronecker.corrections`, computed with a second pass over the
    data (through the same data loop and output factors as the factors; the MC generator is
    re-seeded, NOTE [MC seeding across ranks], so both passes see the same would-be labels).
    A separate bias block uses :math:`Q_B` alone; an embedding's input basis is the identity
    (its :math:`A` is diagonal). Fallback parameters keep their exact diagonal.

    Takes the arguments of :class:`~curvops.kronecker.kfac.KFACLinearOperator` except
    ``fisher_type="forward-only"``, which computes no gradients to correct with.

    Raises:
        ValueError: For ``fisher_type="forward-only"`` (and everything
            :class:`~curvops.kronecker.kfac.KFACLinearOperator` raises).
    """

    def __init__(self, model_func, loss_func, params, data, **kwargs: Any):
        fisher_type = parse_enum(
            kwargs.get("fisher_type", FisherType.MC), FisherType, "fisher_type"
        )
        if fisher_type == FisherType.FORWARD_ONLY:
            raise ValueError(
                "EKFACLinearOperator needs per-datum gradients for its eigenvalue correction; "
                "fisher_type='forward-only' computes none. Use KFACLinearOperator, or another "
                "fisher_type."
            )
        self._corrections: dict[str, dict[str, Tensor]] | None = None
        super().__init__(model_func, loss_func, params, data, **kwargs)

    @property
    def eigenvalue_corrections(self) -> dict[str, dict[str, Tensor]]:
        r"""The corrected eigenvalues :math:`\Lambda^\star` per layer.

        Keys are module names; values map ``"weight"`` to ``[d_out, d_in(+1)]`` (indexed like
        the eigenvectors of :math:`B` and :math:`A`; ``[num_embeddings, dim]`` for an
        embedding) and ``"bias"`` to ``[d_out]`` for a separate bias block.
        """
        self._ensure_factors()
        return {k: dict(v) for k, v in self._corrections.items()}

    def _set_factors(self, factors, diagonals) -> None:
        # first: no thread may pair the new factors with the old corrections (NOTE [threads])
        self._corrections = None
        super()._set_factors(factors, diagonals)

    def _ensure_factors(self) -> None:
        """Compute factors and corrections if missing, or apply ``on_stale`` if stale."""
        self._ensure_kronecker_factors()
        if self._corrections is None:
            with DATA_PASS_LOCK:  # NOTE [threads]: one thread computes, the others reuse
                if self._corrections is None:
                    self._compute_corrections()

    def compute_factors(self) -> None:
        """Compute the KFAC factors (one pass) and the eigenvalue corrections (a second pass)."""
        super().compute_factors()
        self._compute_corrections()

    def _bases(self, name: str) -> tuple[Tensor | None, Tensor]:
        f = self._factors[name]
        QB = self.eigendecomposition(name, "gradient")[1]
        QA = None
        if f.input_factor is not None and not f.diagonal_input:
            QA = self.eigendecomposition(name, "input")[1]
        return QA, QB

    def _compute_corrections(self) -> None:
        accumulators = []
        for layer in self._layers:
            QA, QB = self._bases(layer.name)
            accumulators.append(correction_accumulator(layer, self._factors[layer.name], QA, QB))

        def consume(stats) -> None:
            for acc, inputs, grad in zip(accumulators, stats.inputs, stats.grad_outputs):
                if grad is not None:
                    acc.add(inputs, grad, stats.batch.weight)

        sums = [t for acc in accumulators for t in acc.tensors()]
        with self._risk.partial_sums(sums, what="EKFAC eigenvalue correction"):
            statistics_pass(
                self._risk,
                self._layers,
                consume,
                fisher_type=self._fisher_type,
                mc_samples=self._mc_samples,
                seed=self._seed,
                split_positions=self._squares_per_position,
                desc="EKFAC eigenvalue correction",
            )
        corrections = {}
        for layer, acc in zip(self._layers, accumulators):
            entry = {}
            if acc.weight_sum is not None:
                entry["weight"] = acc.weight_sum
            if acc.bias_sum is not None:
                entry["bias"] = acc.bias_sum
            corrections[layer.name] = entry
        self._set_corrections(corrections)

    def _set_corrections(self, corrections: dict[str, dict[str, Tensor]]) -> None:
        """Store the corrected eigenvalues, refusing NaN or Inf (NOTE [non-finite values])."""
        for name, entry in corrections.items():
            what = f"the eigenvalue corrections of layer '{name}'"
            require_finite(entry.values(), owner=type(self).__name__, what=what)
        self._corrections = corrections

    # ---------------------------------------------------------------- product
    def _build_blocks(self) -> list[tuple[LinearOperator, list[int]]]:
        self._ensure_factors()
        blocks = []
        for layer, f in self._layer_items():
            w, b = layer.weight_index, layer.bias_index
            QA, QB = self._bases(layer.name)
            lam = self._corrections[layer.name]
            if f.input_factor is not None:
                if f.diagonal_input:
                    blocks.append((RowDiagonalKroneckerLinearOperator(QB, lam["weight"]), [w]))
                elif f.joint:
                    glue = WeightBiasStacking(
                        self._in_shapes[w], dtype=self.dtype, device=self.device
                    )
                    eig = KroneckerEigenLinearOperator(
                        [QB, QA], lam["weight"], check_orthonormal=False
                    )
                    blocks.append((glue.adjoint() @ eig @ glue, [w, b]))
                else:
                    eig = KroneckerEigenLinearOperator(
                        [QB, QA], lam["weight"], shape=self._in_shapes[w], check_orthonormal=False
                    )
                    blocks.append((eig, [w]))
            if f.bias_input_factor is not None:
                eig = KroneckerEigenLinearOperator([QB], lam["bias"], check_orthonormal=False)
                blocks.append((eig, [b]))
        for i, diag in self._fallback_items():
            blocks.append((DiagonalLinearOperator([diag]), [i]))
        return blocks

    def _build_product(self) -> FactoredBlocks:
        """The blocks of the product as plain tensors (see :mod:`curvops.kronecker.product`)."""
        self._ensure_factors()
        blocks: list[MatrixBlock | DiagonalBlock] = []
        shapes = self._in_shapes
        for layer, f in self._layer_items():
            w, b = layer.weight_index, layer.bias_index
            QA, QB = self._bases(layer.name)
            lam = self._corrections[layer.name]
            if f.input_factor is not None:
                # an embedding's input basis is the identity on its rows [E, D]
                core = (
                    EigenCore(None, QB, lam["weight"])
                    if f.diagonal_input
                    else EigenCore(QB, QA, lam["weight"])
                )
                positions = (w, b) if f.joint else (w,)
                blocks.append(MatrixBlock(positions, tuple(shapes[i] for i in positions), core))
            if f.bias_input_factor is not None:
                core = EigenCore(QB, None, lam["bias"].unsqueeze(-1))
                blocks.append(MatrixBlock((b,), (shapes[b],), core))
        for i, diag in self._fallback_items():
            blocks.append(DiagonalBlock((i,), diag))
        return FactoredBlocks(blocks, shapes, dtype=self.dtype, device=self.device, psd=True)

    # ---------------------------------------------------------------- closed forms
    def _block_eigenvalues(self) -> list[Tensor]:
        self._ensure_factors()
        out = [lam for entry in self._corrections.values() for lam in entry.values()]
        out.extend(d for _, d in self._fallback_items())
        return out

    def trace(self) -> Tensor:
        r"""Exact trace, :math:`\sum \Lambda^\star` (+ fallback diagonals)."""
        return torch.stack([lam.sum() for lam in self._block_eigenvalues()]).sum()

    def frobenius_norm(self) -> Tensor:
        r"""Exact Frobenius norm, :math:`\|\Lambda^\star\|_F` over all blocks."""
        return torch.stack([lam.square().sum() for lam in self._block_eigenvalues()]).sum().sqrt()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The KFAC state plus the eigenvectors and corrected eigenvalues.

        The eigenvectors are stored so that a loaded operator uses exactly the basis the
        corrections were computed in (eigenvectors of repeated eigenvalues are not unique).

        Returns:
            A dict suitable for ``torch.save``.
        """
        state = super().state_dict()
        bases = {}
        for layer in self._layers:
            QA, QB = self._bases(layer.name)
            bases[layer.name] = {"gradient": QB} | ({} if QA is None else {"input": QA})
        state["eigenvectors"] = bases
        state["eigenvalue_corrections"] = self.eigenvalue_corrections
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set factors, eigenvectors and corrections from :meth:`state_dict` output.

        Args:
            state: The state of an operator of the same type, options and layers.

        Raises:
            ValueError: If anything does not match (see
                :meth:`KFACLinearOperator.load_state_dict`).
        """
        super().load_state_dict(state)
        corrections, cache = {}, {}
        for layer in self._layers:
            f = self._factors[layer.name]
            d_out = f.gradient_factor.shape[0]
            expected_lam, expected_Q = {}, {"gradient": (d_out, d_out)}
            if f.input_factor is not None:
                n = f.input_factor.shape[0]
                expected_lam["weight"] = (
                    tuple(layer.weight_shape) if f.diagonal_input else (d_out, n)
                )
                if not f.diagonal_input:
                    expected_Q["input"] = (n, n)
            if f.bias_input_factor is not None:
                expected_lam["bias"] = (d_out,)
            for key, expected, stored in [
                ("eigenvalue_corrections", expected_lam, state["eigenvalue_corrections"]),
                ("eigenvectors", expected_Q, state["eigenvectors"]),
            ]:
                got = stored.get(layer.name, {})
                shapes = {k: tuple(v.shape) for k, v in got.items()}
                if shapes != expected:
                    raise ValueError(
                        f"Layer '{layer.name}': the state's {key} have shapes {shapes}, but "
                        f"the layer needs {expected}."
                    )
            corrections[layer.name] = {
                k: v.to(self.device, self.dtype)
                for k, v in state["eigenvalue_corrections"][layer.name].items()
            }
            for which, Q in state["eigenvectors"][layer.name].items():
                matrix = f.gradient_factor if which == "gradient" else f.input_factor
                Q = Q.to(self.device, self.dtype).contiguous()
                cache[(layer.name, which)] = ((Q.T @ matrix @ Q).diagonal().clamp(min=0), Q)
        self._eigen_cache = cache
        self._set_corrections(corrections)
