r"""Kronecker-factored optimal curvature (KFOC): the nearest Kronecker product per layer.

Van Loan, C. F., Pitsianis, N. (1993). Approximation with Kronecker products. Koroko, A.,
Anciaux-Sedrakian, A., Ben Gharbia, I., Garès, V., Haddou, M., Tran, Q. H. (2023). Efficient
approximations of the Fisher matrix in neural networks using Kronecker product singular
value decomposition.

NOTE [KFOC passes and cache]: the power iteration (NOTE [KFOC power iteration] of
:mod:`curvops.kronecker.power_iteration`) multiplies every layer's rearranged block once per
iteration, which needs every datum's gradients (NOTE [rearranged block] of
:mod:`curvops.kronecker.rearrangement`). The first iteration runs the statistics pass of
:mod:`curvops.kronecker.collection` (one forward and one batched backward of the :math:`K`
output factors per batch, as KFAC) and keeps each batch's per-datum statistics in memory
while their total stays within ``max_cache_bytes``; later iterations then loop over the cache
without touching the model (a few matrix products per batch and layer). If the statistics do
not fit, the cache is dropped and every iteration is another statistics pass, over the layers
that have not converged yet. The cost is therefore one KFAC pass plus, per iteration, either
the cached products or one more pass. Each iteration's products are summed across processes
(:meth:`curvops.risk.EmpiricalRisk.partial_sums`), so every rank takes the same steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvops._integer_options import check_positive_int
from curvops.curvature.fisher import GradientOf
from curvops.kronecker.collection import BatchStatistics, statistics_pass
from curvops.kronecker.factors import LayerFactors
from curvops.kronecker.gram import add_gram_upper_, mirror_upper_
from curvops.kronecker.kfac import KFACLinearOperator
from curvops.kronecker.layers import KFACLayer
from curvops.kronecker.options import FallbackType, FisherType, parse_enum
from curvops.kronecker.power_iteration import NearestKroneckerIteration
from curvops.kronecker.rearrangement import (
    MatrixGradients,
    RowGradients,
    TokenGradients,
    choose_layout,
)
from curvops.kronecker.staleness import OnStale
from curvops.kronecker.tied import TiedEmbeddingLinearLayer
from curvops.risk.finite import require_finite

_Statistics = RowGradients | MatrixGradients | TokenGradients


@dataclass(frozen=True)
class BlockConvergence:
    """How the power iteration of one layer's weight block ended.

    Attributes:
        iterations: Number of products with the rearranged block.
        residual: The last relative residual (NOTE [KFOC power iteration]).
        converged: Whether the residual reached the tolerance (or the block is zero).
    """

    iterations: int
    residual: float
    converged: bool


class KFOCLinearOperator(KFACLinearOperator):
    r"""Per layer, the Kronecker product nearest in Frobenius norm to the exact curvature block.

    For every supported layer (``nn.Linear`` with any number of leading axes,
    ``nn.Conv1d/2d/3d`` with ``groups=1``, ``nn.Embedding``) the weight block (or the joint
    weight-bias block) is

    .. math::
        B^\star \otimes A^\star = \operatorname*{arg\,min}_{B, A}
        \|C^{(l)} - B \otimes A\|_F

    on the row-major weight matrix (NOTE [Kronecker order] of
    :mod:`curvops.structured.kronecker`), where :math:`C^{(l)}` is the layer's *exact* block
    of the GGN (``fisher_type="type-2"``, the default), the MC Fisher (``"mc"``, with the same
    seeded would-be labels in every pass; :class:`~curvops.FisherMCLinearOperator`) or the
    empirical Fisher (``"empirical"``; :class:`~curvops.EFLinearOperator` with the same
    ``gradient_of``). It is
    the top singular pair of the rearranged block (Van Loan & Pitsianis (1993); the KFOC of
    Koroko et al. (2023)), found matrix-free by a power iteration with batched per-datum
    products (NOTE [rearranged block] of :mod:`curvops.kronecker.rearrangement`, NOTE [KFOC
    power iteration] of :mod:`curvops.kronecker.power_iteration`, NOTE [KFOC passes and
    cache] of :mod:`curvops.kronecker.kfoc`). Unlike KFAC it needs no ``expand``/``reduce``
    choice for shared positions (sequences, convolutions): the target is the exact block,
    whose per-datum gradients :math:`\sum_t g_t x_t^\top` do not factor. It is never worse
    than KFAC in Frobenius norm on any block, and equals the block where that is a Kronecker
    product (e.g. where KFAC is exact).

    Both factors are symmetric positive semi-definite with :math:`\|B\|_F = \|A\|_F`
    (a balanced split; factor-wise damping in :class:`KFACInverseLinearOperator` depends on
    the split, exact and heuristic damping do not). An embedding's input factor is
    restricted to a diagonal, as in KFAC (NOTE [rearranged embedding block]). With
    ``separate_weight_and_bias=True`` a bias gets its own block, which is its exact block
    :math:`B_b \otimes [1]` (a Kronecker product already); it is stored in :attr:`factors` under
    the key ``"<module>.bias"`` (``"bias"`` for a root module) with ``bias_input_factor`` 1,
    and the weight's block under ``"<module>"``. Parameters of other layers use
    ``fallback``.

    The operator shares KFAC's products, closed forms (trace, log-determinant, Frobenius
    norm), ``state_dict`` and damped inverses (:class:`KFACInverseLinearOperator` accepts it).

    Args:
        model_func: The model, an ``nn.Module`` (forward hooks read the layer inputs).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` (reduction
            ``"mean"`` or ``"sum"``).
        params: The parameters (a list of the model's tensors, any order, or a dict).
        data: A re-iterable of ``(X, y)`` batches.
        fisher_type: ``"type-2"`` (the GGN), ``"mc"`` or ``"empirical"``: the curvature
            whose blocks are approximated. ``"type-2"`` backpropagates one column per class
            *and output position* (``C · T`` columns for cross-entropy on ``[N, C, T]``, as
            the exact block has no cross-position terms): use ``"mc"`` for long sequences and
            large vocabularies.
        mc_samples: Number of would-be labels per datum (``"mc"`` only).
        gradient_of: ``"empirical"`` only: ``"loss-term"`` (default; one gradient per
            output position) or ``"datum"`` (the gradient of a datum's summed loss), as for
            :class:`~curvops.EFLinearOperator`.
        separate_weight_and_bias: Whether weight and bias of a layer get separate blocks.
        max_iterations: Maximum number of power iterations; each multiplies every
            unconverged block once with its rearrangement (the first one is a pass over the
            data, the others passes over the cached statistics or over the data).
        tolerance: Relative residual at which a block's iteration stops.
        max_cache_bytes: Memory budget for the per-datum statistics kept between
            iterations (``0``: never cache, every iteration passes over the data).
        seed: Seed of the private generator for ``"mc"``.
        progressbar: Show progress bars over the batches and the cached iterations.
        check_deterministic: Evaluate loss and gradient twice at construction and raise
            :class:`~curvops.curvature.NonDeterministicError` if they differ.
        num_data: Total number of data (counted if ``None``).
        batch_size_fn: Maps ``X`` to its batch size (required for mapping inputs).
        fallback: ``None`` (raise for parameters of unsupported layers) or ``"diagonal"``
            (the exact diagonal of the same curvature for them).
        process_group: See :class:`curvops.risk.EmpiricalRisk`.
        on_stale: What products do after a parameter changed in place, as for
            :class:`~curvops.kronecker.kfac.KFACLinearOperator`.

    Raises:
        ValueError: For ``fisher_type="forward-only"`` (it has no curvature block to
            approximate), ``gradient_of`` with another type than ``"empirical"``, bad
            iteration options, and everything
            :class:`~curvops.kronecker.kfac.KFACLinearOperator` raises.
        TypeError: If ``max_iterations`` or ``max_cache_bytes`` is not an integer.
        NotImplementedError: For a weight tied between an embedding and a linear layer
            (KFAC's layers otherwise: tied weights, layers applied several times and
            callables as in :class:`~curvops.kronecker.kfac.KFACLinearOperator`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
        >>> K = KFOCLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
        >>> K.shape, sorted(K.factors)
        ((14, 14), ['0', '0.bias', '2', '2.bias'])
        >>> all(c.converged for c in K.convergence.values())
        True
    """

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: list[Tensor] | dict[str, Tensor],
        data: Iterable,
        *,
        fisher_type: str | FisherType = FisherType.TYPE2,
        mc_samples: int = 1,
        gradient_of: str | GradientOf | None = None,
        separate_weight_and_bias: bool = True,
        max_iterations: int = 20,
        tolerance: float = 1e-3,
        max_cache_bytes: int = 2**30,
        seed: int = 2147483647,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        fallback: str | FallbackType | None = None,
        process_group: Any = None,
        on_stale: str | OnStale = OnStale.RAISE,
    ):
        fisher_type = parse_enum(fisher_type, FisherType, "fisher_type")
        if fisher_type == FisherType.FORWARD_ONLY:
            raise ValueError(
                "KFOCLinearOperator approximates an exact curvature block, which "
                "fisher_type='forward-only' does not define (it computes no gradients). Use "
                "'type-2', 'mc' or 'empirical', or KFACLinearOperator for forward-only KFAC."
            )
        if gradient_of is not None and fisher_type != FisherType.EMPIRICAL:
            raise ValueError(
                f"gradient_of={gradient_of!r} only applies to fisher_type='empirical', but "
                f"fisher_type='{fisher_type.value}'. Leave gradient_of unset."
            )
        self._gradient_of = parse_enum(gradient_of or "loss-term", GradientOf, "gradient_of")
        self._max_iterations = check_positive_int(max_iterations, "max_iterations")
        if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not tolerance > 0:
            raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}.")
        self._tolerance = float(tolerance)
        self._max_cache_bytes = check_positive_int(max_cache_bytes, "max_cache_bytes", minimum=0)
        self._convergence: dict[str, BlockConvergence] = {}
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            kfac_approx="expand",
            separate_weight_and_bias=separate_weight_and_bias,
            seed=seed,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            fallback=fallback,
            process_group=process_group,
            on_stale=on_stale,
        )
        # the statistics come from the model's layers; the blocks (the KFAC machinery's
        # "layers") split a layer's separate bias into a block of its own
        self._stat_layers = self._layers
        for layer in self._stat_layers:
            if isinstance(layer, TiedEmbeddingLinearLayer):
                raise NotImplementedError(
                    f"{layer.type_name} '{layer.name}': KFOC does not support a weight tied "
                    "between an embedding and a linear layer (its two kinds of calls have no "
                    "common rows; NOTE [tied embedding and output layer]). Use "
                    "KFACLinearOperator or EKFACLinearOperator, or remove it from `params`."
                )
        self._layers = [block for layer in self._stat_layers for block in self._blocks_of(layer)]

    def _joint(self, layer: KFACLayer) -> bool:
        return (
            layer.weight_index is not None
            and layer.bias_index is not None
            and not self._separate_weight_and_bias
        )

    def _blocks_of(self, layer: KFACLayer) -> list[KFACLayer]:
        """The blocks of a layer: its weight (with a joint bias) and a separate bias."""
        blocks = []
        if layer.weight_index is not None:
            bias = layer.bias_index if self._joint(layer) else None
            blocks.append(layer.block(layer.name, layer.weight_index, bias))
        if layer.bias_index is not None and not self._joint(layer):
            blocks.append(layer.block(_bias_key(layer.name), None, layer.bias_index))
        return blocks

    # ---------------------------------------------------------------- options
    @property
    def convergence(self) -> dict[str, BlockConvergence]:
        """How the power iteration ended for each weight block, keyed like :attr:`factors`.

        Empty after :meth:`load_state_dict` (the state holds the factors only).
        """
        self._ensure_factors()
        return dict(self._convergence)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the factors from :meth:`state_dict` output, without a pass over the data.

        Args:
            state: The state, from a KFOC operator with the same options, parameters and
                layers.

        Raises:
            ValueError: If the state's type, options, layers or tensor shapes do not match.
        """
        super().load_state_dict(state)
        self._convergence = {}

    @property
    def gradient_of(self) -> GradientOf | None:
        """Whose gradients the empirical Fisher sums (``None`` for the other types)."""
        return self._gradient_of if self._fisher_type == FisherType.EMPIRICAL else None

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        del config["kfac_approx"], config["num_per_example_loss_terms"]
        if self._fisher_type == FisherType.EMPIRICAL:
            config["gradient_of"] = self._gradient_of.value
        return config

    @property
    def _squares_per_position(self) -> bool:
        """Whether the per-datum gradients come from output factors split per position.

        The exact blocks of the GGN and of the loss-term empirical Fisher have no
        cross-position terms (NOTE [output factors] of :mod:`curvops.losses.likelihood`).
        """
        if self._fisher_type == FisherType.TYPE2:
            return True
        return (
            self._fisher_type == FisherType.EMPIRICAL and self._gradient_of == GradientOf.LOSS_TERM
        )

    # ---------------------------------------------------------------- factors
    def compute_factors(self) -> None:
        """Compute the factors: one pass over the data, then the power iterations.

        See NOTE [KFOC passes and cache]. Warns if a block's iteration does not reach the
        tolerance within ``max_iterations``.
        """
        layers = self._stat_layers
        names = dict(enumerate(self._risk.param_names))
        iterations = {
            layer.name: self._iteration(layer) for layer in layers if layer.weight_index is not None
        }
        bias_sums, diagonals, cache = self._first_pass(iterations)
        for step in range(2, self._max_iterations + 1):
            active = [n for n, it in iterations.items() if not it.converged(self._tolerance)]
            if not active:
                break
            products = {name: iterations[name].zeros_for_product() for name in active}
            what = f"{type(self).__name__} factors"
            with self._risk.partial_sums(list(products.values()), what=what):
                if cache is not None:
                    self._cached_products(cache, iterations, products, f"{what} ({step})")
                else:
                    self._pass_products(iterations, products, f"{what} ({step})")
            self._update(iterations, products)
        del cache

        factors = {}
        for layer in layers:
            if layer.weight_index is not None:
                B, A = iterations[layer.name].balanced_factors()
                factors[layer.name] = self._factors_of(layer, names, B, A)
            if layer.name in bias_sums:
                factors[_bias_key(layer.name)] = LayerFactors(
                    module_name=layer.name,
                    module_type=layer.type_name,
                    weight_name=None,
                    bias_name=names.get(layer.bias_index),
                    joint=False,
                    input_factor=None,
                    gradient_factor=mirror_upper_(bias_sums[layer.name]),
                    bias_input_factor=torch.ones((), dtype=self.dtype, device=self.device),
                )
        self._convergence = {
            name: BlockConvergence(it.iterations, it.residual, it.converged(self._tolerance))
            for name, it in iterations.items()
        }
        self._warn_not_converged()
        self._set_factors(factors, {names[i]: d for i, d in zip(self._fallback_indices, diagonals)})

    def _first_pass(
        self, iterations: dict[str, NearestKroneckerIteration]
    ) -> tuple[dict[str, Tensor], list[Tensor], dict[str, list[_Statistics]] | None]:
        r"""The first iteration: a statistics pass that also fills the cache.

        Besides the first product of every weight block, it sums the exact blocks of separate
        biases (:math:`\sum_i w_i (\sum_t g_{i,t})(\sum_t g_{i,t})^\top`, upper triangles)
        and the fallback diagonals.

        Returns:
            The bias sums by layer name, the fallback diagonals, and the cached statistics
            by layer name (``None`` if they exceeded ``max_cache_bytes``).
        """
        risk, layers = self._risk, self._stat_layers
        like = {"dtype": self.dtype, "device": self.device}
        bias_sums = {
            layer.name: torch.zeros(*[layer.weight_matrix_shape[0]] * 2, **like)
            for layer in layers
            if layer.bias_index is not None and not self._joint(layer)
        }
        diagonals = [torch.zeros(risk.params[i].shape, **like) for i in self._fallback_indices]
        cache: dict[str, list[_Statistics]] | None = None
        if self._max_cache_bytes > 0:
            cache = {name: [] for name in iterations}
        cached_bytes = 0
        products = {name: it.zeros_for_product() for name, it in iterations.items()}
        rows: dict[str, Tensor] = {}

        def consume(stats: BatchStatistics) -> None:
            nonlocal cache, cached_bytes
            w = stats.batch.weight
            for layer, inputs, grad in zip(layers, stats.inputs, stats.grad_outputs):
                if grad is None:  # a chunk with fallback gradients only
                    continue
                g = layer.grad_rows(grad)  # [K, N, T, m]
                if layer.name in bias_sums:
                    add_gram_upper_(bias_sums[layer.name], g.sum(dim=2), alpha=w)
                if layer.weight_index is None:
                    continue
                st = self._statistics(layer, inputs, g, w, rows, stats.new_batch)
                products[layer.name].add_(_apply(st, iterations[layer.name]))
                if cache is not None:
                    cached_bytes += st.nbytes
                    if isinstance(st, RowGradients) and not stats.new_batch:
                        cached_bytes -= st.inputs.numel() * st.inputs.element_size()  # shared
                    cache[layer.name].append(st)
                    if cached_bytes > self._max_cache_bytes:
                        cache = None  # NOTE [KFOC passes and cache]: fall back to passes
            for diag, gf in zip(diagonals, stats.fallback_grads):
                diag.add_(gf.square().sum(dim=(0, 1)), alpha=w)

        what = f"{type(self).__name__} factors"
        sums = [*products.values(), *bias_sums.values(), *diagonals]
        with risk.partial_sums(sums, what=what):
            self._statistics_pass(layers, consume, fallback=True, desc=f"{what} (1)")
        self._update(iterations, products)
        return bias_sums, diagonals, cache

    def _update(
        self, iterations: dict[str, NearestKroneckerIteration], products: dict[str, Tensor]
    ) -> None:
        """Hand the summed products to their iterations, refusing NaN or Inf at once."""
        for name, product in products.items():
            what = f"the factors of {self._layer_type(name)} '{name}' (power iteration)"
            require_finite([product], owner=type(self).__name__, what=what)
            iterations[name].update(product)

    def _layer_type(self, name: str) -> str:
        return next(layer.type_name for layer in self._stat_layers if layer.name == name)

    def _statistics_pass(self, layers, consume, *, fallback: bool, desc: str) -> None:
        statistics_pass(
            self._risk,
            layers,
            consume,
            fisher_type=self._fisher_type,
            mc_samples=self._mc_samples,
            seed=self._seed,
            fallback_indices=self._fallback_indices if fallback else None,
            split_positions=self._squares_per_position,
            desc=desc,
        )

    def _statistics(
        self,
        layer: KFACLayer,
        inputs: tuple,
        g: Tensor,
        weight: float,
        rows: dict[str, Tensor],
        new_batch: bool,
    ) -> _Statistics:
        """One batch's per-datum statistics of a layer's weight block, in the cheaper layout."""
        if layer.diagonal_input:
            ids = layer.input_rows(inputs)
            return TokenGradients.from_ids(ids, g, layer.num_embeddings, layer.padding_idx, weight)
        if new_batch or layer.name not in rows:  # input rows are shared by a batch's chunks
            x = layer.input_rows(inputs)
            if self._joint(layer):
                x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1)
            rows[layer.name] = x
        x = rows[layer.name]
        K, _, T, m = g.shape
        if choose_layout(K, T, m, x.shape[-1]) == "rows":
            return RowGradients.from_rows(x, g, weight)
        return MatrixGradients.from_rows(x, g, weight)

    def _iteration(self, layer: KFACLayer) -> NearestKroneckerIteration:
        """A layer's power iteration, started at :math:`A_0 = I` (all ones for an embedding)."""
        m, n = layer.weight_matrix_shape
        n += int(self._joint(layer))
        return NearestKroneckerIteration.from_identity(
            n, (m, m), diagonal=layer.diagonal_input, dtype=self.dtype, device=self.device
        )

    def _cached_products(self, cache, iterations, products, desc: str) -> None:
        """Add the products of the cached statistics to ``products``."""
        for name in tqdm(
            list(products), desc=desc, disable=not self._risk.progressbar, leave=False
        ):
            for st in cache[name]:
                products[name].add_(_apply(st, iterations[name]))

    def _pass_products(self, iterations, products, desc: str) -> None:
        """Add the products to ``products`` with one more statistics pass over the data."""
        layers = [layer for layer in self._stat_layers if layer.name in products]
        rows: dict[str, Tensor] = {}

        def consume(stats: BatchStatistics) -> None:
            for layer, inputs, grad in zip(layers, stats.inputs, stats.grad_outputs):
                if grad is None:
                    continue
                g = layer.grad_rows(grad)
                st = self._statistics(layer, inputs, g, stats.batch.weight, rows, stats.new_batch)
                products[layer.name].add_(_apply(st, iterations[layer.name]))

        self._statistics_pass(layers, consume, fallback=False, desc=desc)

    def _factors_of(
        self, layer: KFACLayer, names: dict[int, str], B: Tensor, A: Tensor
    ) -> LayerFactors:
        joint = self._joint(layer)
        return LayerFactors(
            module_name=layer.name,
            module_type=layer.type_name,
            weight_name=names.get(layer.weight_index),
            bias_name=names.get(layer.bias_index) if joint else None,
            joint=joint,
            input_factor=A,
            gradient_factor=B,
            bias_input_factor=None,
        )

    def _warn_not_converged(self) -> None:
        left = {n: c for n, c in self._convergence.items() if not c.converged}
        if not left:
            return
        listed = ", ".join(f"'{n}' (residual {c.residual:.2g})" for n, c in left.items())
        warnings.warn(
            f"KFOCLinearOperator: the power iteration did not reach tolerance="
            f"{self._tolerance:g} within max_iterations={self._max_iterations} for "
            f"{len(left)} of {len(self._convergence)} blocks: {listed}. The factors are the "
            f"best Kronecker product for the last iterate, not the nearest one. Increase "
            f"max_iterations (or the tolerance); see `convergence`.",
            RuntimeWarning,
            stacklevel=3,
        )


def _bias_key(name: str) -> str:
    """Key of a separate bias block in :attr:`KFOCLinearOperator.factors`."""
    return f"{name}.bias" if name else "bias"


def _apply(st: _Statistics, it: NearestKroneckerIteration) -> Tensor:
    """The product of a batch's rearranged block with the iteration's current vector."""
    if it.identity_scale is not None:  # the first product, with the start c I
        return st.rearranged_identity(it.identity_scale)
    return st.rearranged(it.current) if it.input_side else st.rearranged_adjoint(it.current)
