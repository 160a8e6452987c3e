r"""Losses that are negative log-likelihoods: the output factors of Fisher-type matrices.

Per loss term (NOTE [loss terms and positions] of :mod:`curvops.losses.base`) the supported
losses are :math:`\ell = -\log q(y \mid f)` up to constants, with a likelihood :math:`q`
per position. Their loss Hessian does not depend on the label, so the type-II Fisher (paper,
Appendix B) equals the type-I Fisher and the GGN; it is block-diagonal over positions.

NOTE [output factors]: :meth:`LikelihoodLossSpec.shared_output_factors` returns *shared*
columns :math:`s_k` (``[K, *output.shape]``) that hold, at every position :math:`p` of every
datum :math:`n`, a factor :math:`s_k[n, p] \in \mathbb{R}^F` with

.. math::
    \sum_k s_k[n, p]\, s_k[n, p]^\top = c_{n,p} R_\mathbb{B} \cdot
    \begin{cases}
    \nabla_{f_{n,p}}^2 \ell_{n,p} & \text{type-2 } (K = F) \\
    \frac{1}{S}\sum_{s} \hat g_{n,p,s} \hat g_{n,p,s}^\top & \text{mc } (K = S) \\
    \nabla_{f_{n,p}} \ell_{n,p} \nabla_{f_{n,p}} \ell_{n,p}^\top & \text{empirical } (K = 1)
    \end{cases}

with :math:`c_{n,p} \in \{0, 1\}` zero at ignored targets and would-be gradients
:math:`\hat g_{n,p,s} = -\nabla_f \log q(\hat y \mid f_{n,p})`,
:math:`\hat y \sim q(\cdot \mid f_{n,p})` drawn independently per position (paper eqs.
(4)-(6)). Backpropagating a column through the net gives per-datum (would-be) gradients: the
pseudo-loss trick of the paper's §2.1.

A shared column couples the positions of a datum: :math:`\sum_k s_k[n] s_k[n]^\top` has the
blocks :math:`s_k[n,p] s_k[n,p']^\top` for :math:`p \neq p'`. For ``mc`` they vanish in
expectation (independent draws), and the empirical Fisher *per datum* wants them (the
gradient of the datum's summed loss). Everything that must equal the matrix *per position*
(the type-2 GGN, the empirical Fisher per loss term) splits each shared column into one column
per position, :meth:`LikelihoodLossSpec.factor_columns` with ``split_positions=True``: then
:math:`F \cdot P` columns for type-2 (``C · T`` for cross-entropy on ``[N, C, T]``), produced
in memory-bounded chunks, never all at once. :meth:`LikelihoodLossSpec.output_factors`
returns all columns of the per-datum matrices at once: split for type-2 (so that their outer
products are each datum's loss Hessian), shared (per datum) for mc and empirical.
"""

from __future__ import annotations

from math import prod, sqrt

import torch
from torch import Tensor

from curvops.losses.base import FactorKind, LossSpec


class FactorColumns:
    """The columns of output factors, produced in chunks (NOTE [output factors]).

    Args:
        spec: The loss specification (knows the positions of the output).
        factors: Shared columns ``[K, *output.shape]``.
        split_positions: Whether every shared column is split into one column per position
            (positions where every datum's factor is zero are left out).
    """

    def __init__(self, spec: LikelihoodLossSpec, factors: Tensor, split_positions: bool):
        self.factors = factors
        self.output_shape = tuple(factors.shape[1:])
        self._spec = spec
        K = factors.shape[0]
        self._split = split_positions and spec.num_positions(self.output_shape) > 1
        if self._split:
            self._terms = spec.to_terms(factors, lead=1)  # [K, N, P, F]
            active = self._terms.ne(0).any(dim=3).any(dim=1).any(dim=0)
            self._positions = active.nonzero().reshape(-1)
            self.num_columns = K * self._positions.numel()
        else:
            self.num_columns = K

    @property
    def column_numel(self) -> int:
        """Entries of one column (the size of the output)."""
        return prod(self.output_shape)

    def __call__(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop``, ``[stop - start, *output.shape]``.

        Split columns are ordered by position, then by shared column.
        """
        if not self._split:
            return self.factors[start:stop]
        terms = self._terms
        K = terms.shape[0]
        index = torch.arange(start, stop, device=terms.device)
        k, p = index % K, self._positions[index // K]
        columns = torch.zeros(
            stop - start, *terms.shape[1:], dtype=terms.dtype, device=terms.device
        )
        rows = torch.arange(stop - start, device=terms.device)
        columns[rows, :, p, :] = terms[k, :, p, :]
        return self._spec.from_terms(columns, self.output_shape, lead=1)

    def chunks(self, step: int):
        """Iterate over ``(first_chunk, last_chunk, columns)`` with at most ``step`` columns.

        Args:
            step: Largest number of columns per chunk (at least 1 is used).

        Yields:
            Whether the chunk is the first and the last one, and its columns.
        """
        step = max(1, step)
        for start in range(0, self.num_columns, step):
            stop = min(start + step, self.num_columns)
            yield start == 0, stop == self.num_columns, self(start, stop)


class LikelihoodLossSpec(LossSpec):
    """Base of the losses with a likelihood interpretation (MSE, cross-entropy, BCE-with-logits).

    Subclasses define the feature axis and, per position, the gradient, sampled gradients and
    a square root of the loss Hessian w.r.t. the output.
    """

    knows_normaliser = True

    def __init__(self, loss_func, reduction: str, fisher_refusal: str = ""):
        super().__init__(loss_func, reduction, fisher_refusal)
        self.supports_fisher = not fisher_refusal

    # ---------------------------------------------------------------- positions
    def feature_axis(self, output_ndim: int) -> int | None:
        """Axis of the output holding one loss term's features, ``None`` for scalar data."""
        raise NotImplementedError

    def num_positions(self, output_shape: tuple[int, ...]) -> int:
        """Number of positions :math:`P` per datum (NOTE [loss terms and positions])."""
        axis = self.feature_axis(len(output_shape))
        if axis is None:
            return 1
        return prod(output_shape[1:]) // output_shape[axis]

    def to_terms(self, t: Tensor, lead: int = 0) -> Tensor:
        """View ``[*lead, N, *out]`` as ``[*lead, N, P, F]`` (positions, then features).

        Args:
            t: A tensor with ``lead`` leading axes before an output-shaped part.
            lead: Number of leading axes.

        Returns:
            The tensor in terms layout (a copy if the features are not last).
        """
        shape = t.shape[lead:]
        axis = self.feature_axis(len(shape))
        head = t.shape[:lead]
        if axis is None:
            return t.reshape(*head, shape[0], 1, 1)
        moved = t.movedim(lead + axis, -1) if axis != len(shape) - 1 else t
        return moved.reshape(*head, shape[0], -1, shape[axis])

    def from_terms(self, t: Tensor, output_shape: tuple[int, ...], lead: int = 0) -> Tensor:
        """Undo :meth:`to_terms`: ``[*lead, N, P, F]`` back to ``[*lead, *output_shape]``."""
        head = t.shape[:lead]
        axis = self.feature_axis(len(output_shape))
        if axis is None or axis == len(output_shape) - 1:
            return t.reshape(*head, *output_shape)
        moved_shape = list(output_shape)
        moved_shape.append(moved_shape.pop(axis))
        return t.reshape(*head, *moved_shape).movedim(-1, lead + axis)

    def output_term_weights(self, output: Tensor, y: Tensor) -> Tensor | None:
        """The term mask broadcast against the output (``None`` if every term counts)."""
        mask = self.term_mask(y)
        if mask is None:
            return None
        axis = self.feature_axis(output.ndim)
        return mask.unsqueeze(axis).to(output.dtype)

    # ---------------------------------------------------------------- factors
    def check_target(self, output: Tensor, y: Tensor) -> None:
        """Raise a clear error for targets the likelihood cannot read."""
        if output.shape != y.shape:
            raise ValueError(
                f"{self.name}: output shape {tuple(output.shape)} and target shape "
                f"{tuple(y.shape)} differ."
            )

    def shared_output_factors(
        self,
        output: Tensor,
        y: Tensor,
        kind: str | FactorKind,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Shared output factor columns of a curvature matrix (NOTE [output factors]).

        Args:
            output: Model output of the batch, ``[N, ...]``.
            y: Targets of the batch.
            kind: ``"type-2"``, ``"mc"`` or ``"empirical"``.
            mc_samples: Number of Monte-Carlo samples (``"mc"`` only).
            generator: Random generator for the samples (``"mc"`` only).

        Returns:
            The shared columns, ``[K, *output.shape]``, including
            :math:`\sqrt{R_\mathbb{B}}`; zero at ignored positions.

        Raises:
            ValueError: For an unknown ``kind``.
        """
        self.require_fisher(f"output_factors(kind={kind!r})")
        kind = FactorKind(kind)
        self.check_target(output, y)
        output = output.detach()
        R = self.reduction_factor(y, output.shape[0] if output.ndim else 1)
        if kind == FactorKind.EMPIRICAL:
            S = sqrt(R) * self.term_gradients(output, y).unsqueeze(0)
        elif kind == FactorKind.MC:
            S = sqrt(R / mc_samples) * self.sampled_gradients(output, y, mc_samples, generator)
        else:
            S = sqrt(R) * self.hessian_sqrt_columns(output)
        weights = self.output_term_weights(output, y)
        return S if weights is None else S * weights

    def output_factors(
        self,
        output: Tensor,
        y: Tensor,
        kind: str | FactorKind,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Per-datum factors :math:`s_k` of an output-space curvature matrix, all at once.

        Returns ``S`` of shape ``[K, *output.shape]`` such that, for every datum ``n``,

        .. math::
            \sum_k s_k[n] s_k[n]^\top = R_\mathbb{B} \cdot
            \begin{cases}
            \nabla_f^2 \ell_n & \text{type-2 (the block-diagonal loss Hessian)} \\
            \frac{1}{S}\sum_{s} \hat g_{n,s} \hat g_{n,s}^\top & \text{mc} \\
            \nabla_f \ell_n \nabla_f \ell_n^\top & \text{empirical}
            \end{cases}

        with ignored targets left out (paper eqs. (4)-(6)). For type-2 these are the
        :math:`F \cdot P` split columns (``C · T`` for cross-entropy on ``[N, C, T]``); use
        :meth:`shared_output_factors` and :meth:`factor_columns` to form them in chunks.

        Args:
            output: Model output of the batch, ``[N, ...]``.
            y: Targets of the batch.
            kind: ``"type-2"``, ``"mc"`` or ``"empirical"``.
            mc_samples: Number of Monte-Carlo samples (``"mc"`` only).
            generator: Random generator for the samples (``"mc"`` only).

        Returns:
            The factors, ``[K, *output.shape]``.
        """
        S = self.shared_output_factors(output, y, kind, mc_samples=mc_samples, generator=generator)
        columns = self.factor_columns(S, split_positions=FactorKind(kind) == FactorKind.TYPE2)
        return columns(0, columns.num_columns)

    def factor_columns(self, factors: Tensor, *, split_positions: bool) -> FactorColumns:
        """The columns to backpropagate, optionally one per position (NOTE [output factors]).

        Args:
            factors: Shared columns from :meth:`shared_output_factors`.
            split_positions: Split every column into one column per position.

        Returns:
            The columns, produced in chunks on demand.
        """
        return FactorColumns(self, factors, split_positions)

    def term_gradients(self, output: Tensor, y: Tensor) -> Tensor:
        r""":math:`\nabla_f \ell_{n,p}` at every position, stacked like ``output``."""
        raise NotImplementedError

    def sampled_gradients(
        self, output: Tensor, y: Tensor, mc_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Would-be gradients of ``mc_samples`` draws per position, ``[S, *output.shape]``.

        The targets only tell which positions are ignored (no draws there, zero gradients).
        The draws are taken datum by datum (NOTE [MC draw order]): the random numbers of
        :meth:`mc_noise` turned into gradients by :meth:`gradients_from_noise`.
        """
        noise = self.mc_noise(y, mc_samples, generator, output.dtype, output.device)
        return self.gradients_from_noise(output, y, noise)

    def mc_noise(
        self,
        y: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """The random numbers of the would-be labels, drawn from the targets' shape alone.

        NOTE [MC noise before the forward pass]: the numbers depend on the targets (their
        shape, and which positions are ignored) but not on the model output, so they can be
        drawn before the forward pass; :meth:`gradients_from_noise` turns them into would-be
        gradients with plain tensor operations (no generator, no data-dependent shapes),
        which is what a compiled product traces (NOTE [compiled products] of
        :mod:`curvops.curvature.compiled`).

        Args:
            y: The batch's targets.
            mc_samples: Number of samples :math:`S` per position.
            generator: Random generator (consumed in the order of NOTE [MC draw order]).
            dtype: Floating dtype of the model output.
            device: Device of the model output.

        Returns:
            The numbers, in the layout :meth:`gradients_from_noise` reads.
        """
        raise NotImplementedError

    def gradients_from_noise(self, output: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Would-be gradients ``[S, *output.shape]`` from the numbers of :meth:`mc_noise`."""
        raise NotImplementedError

    def hessian_sqrt_columns(self, output: Tensor) -> Tensor:
        """``F`` columns of a square root of each position's loss Hessian, ``[F, *output.shape]``.

        Column ``k`` holds the ``k``-th column of every position's square root (shared).
        """
        raise NotImplementedError


def identity_columns(output: Tensor, axis: int | None) -> Tensor:
    """``F`` shared columns ``[F, *output.shape]`` holding unit vectors along ``axis``."""
    if axis is None:
        return torch.ones(1, *output.shape, dtype=output.dtype, device=output.device)
    F = output.shape[axis]
    eye = torch.eye(F, dtype=output.dtype, device=output.device)
    shape = [F] + [1] * output.ndim
    shape[1 + axis] = F
    return eye.reshape(shape).expand(F, *output.shape)


def datum_major_uniform(
    shape: tuple[int, ...],
    mc_samples: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
    draws: int = 1,
) -> Tensor:
    r"""Uniform numbers in :math:`[0, 1)` for ``mc_samples`` draws per output entry.

    NOTE [MC draw order]: the Monte-Carlo factors draw their random numbers datum by datum
    (datum, then entry, then sample, then the ``draws`` numbers one sample needs), consuming
    the generator in that order. A CPU generator hands out uniform numbers one after the
    other, so with this order the would-be labels of a datum do not depend on how the data
    are cut into batches: the same seed gives the same MC matrix for every batching (on CPU;
    CUDA generators offset their streams per call). Normal numbers are formed from uniform
    ones by the Box-Muller transform for that reason (``torch.randn`` fills tensors of 16 or
    more entries in interleaved blocks, so its numbers depend on the tensor's size).

    Args:
        shape: Shape of the batch's entries, ``(N, ...)``.
        mc_samples: Number of samples :math:`S` per entry.
        generator: Random generator.
        dtype: Floating dtype of the numbers.
        device: Device of the numbers.
        draws: Numbers per sample.

    Returns:
        ``[S, *shape, draws]``.
    """
    u = torch.rand((*shape, mc_samples, draws), generator=generator, dtype=dtype, device=device)
    return u.movedim(-2, 0)


def datum_major_normal(
    shape: tuple[int, ...],
    mc_samples: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    r"""Standard normal numbers ``[S, *shape]`` in the order of NOTE [MC draw order].

    Box-Muller: :math:`\varepsilon = \sqrt{-2 \log(1 - u_1)} \cos(2 \pi u_2)` with
    :math:`u_1, u_2 \sim U[0, 1)` (so the logarithm's argument lies in :math:`(0, 1]`).
    """
    u = datum_major_uniform(shape, mc_samples, generator, dtype, device, draws=2)
    radius = (-2.0 * torch.log1p(-u[..., 0])).sqrt()
    return radius * torch.cos((2.0 * torch.pi) * u[..., 1])
