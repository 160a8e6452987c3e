r"""Kronecker-factored approximate curvature (KFAC) as a linear operator.

Martens, J., Grosse, R. (2015). Optimizing neural networks with Kronecker-factored
approximate curvature. Grosse, R., Martens, J. (2016). A Kronecker-factored approximate Fisher
matrix for convolution layers. Botev, A., Ritter, H., Barber, D. (2017). Practical
Gauss-Newton optimisation for deep learning. Eschenhagen, R., Immer, A., Turner, R. E.,
Schneider, F., Hennig, P. (2023). Kronecker-factored approximate curvature for modern neural
network architectures.

NOTE [forward-only scaling]: ``fisher_type="forward-only"`` backpropagates nothing and sets
every gradient factor to the identity, :math:`B = I_{d_\text{out}}`, keeping the input factor
:math:`A` exactly as for the other types (NOTE [KFAC scaling] of
:mod:`curvops.kronecker.factors`). The operator is then :math:`I \otimes A` per layer, the
input covariance used by FOOF (Benzing, F. (2022). Gradient descent on neurons and its link
to approximate second-order optimization) and ISAAC (Petersen, F., Sutter, T., Borgelt, C.,
Huh, D., Kuehne, H., Sun, Y., Deussen, O. (2023). ISAAC Newton: Input-based approximate
curvature for Newton's method). It does not depend on the loss or the labels; multiply it by
a scalar to match a loss's scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvops._compilation import eager_region
from curvops._integer_options import check_positive_int, check_seed
from curvops.kronecker.blocks import EmbeddingKroneckerLinearOperator, WeightBiasStacking
from curvops.kronecker.collection import statistics_pass
from curvops.kronecker.discovery import discover_layers
from curvops.kronecker.eigen import factor_eigh
from curvops.kronecker.factors import LayerFactors
from curvops.kronecker.layers import KFACLayer
from curvops.kronecker.options import FallbackType, FisherType, KFACType, parse_enum
from curvops.kronecker.product import DiagonalBlock, FactoredBlocks, KroneckerCore, MatrixBlock
from curvops.kronecker.staleness import (
    OnStale,
    ParameterVersions,
    changed_parameters,
    parameter_versions,
    stale_error,
)
from curvops.kronecker.state import (
    STATE_VERSION,
    check_state_header,
    factors_from_state,
    fallback_diagonals_from_state,
)
from curvops.kronecker.tied import factor_accumulator
from curvops.linear_operator import LinearOperator
from curvops.risk import EmpiricalRisk
from curvops.risk.concurrency import DATA_PASS_LOCK
from curvops.risk.determinism import check_deterministic, loss_and_gradient_probe
from curvops.risk.finite import all_finite, require_finite, require_finite_input
from curvops.structured import (
    BlockDiagonalLinearOperator,
    DiagonalLinearOperator,
    KroneckerProductLinearOperator,
)


class KFACLinearOperator(LinearOperator):
    r"""Block-diagonal Kronecker-factored approximation of the GGN or a Fisher.

    Every layer gets the block

    .. math::
        C^{(l)} \approx B^{(l)} \otimes A^{(l)}

    on its row-major weight matrix (NOTE [Kronecker order] of
    :mod:`curvops.structured.kronecker`), with the input factor :math:`A` from the layer
    inputs (unfolded patches for convolutions; token counts, a diagonal, for embeddings) and
    the gradient factor :math:`B` from backpropagated output factors of the loss, scaled as
    in NOTE [KFAC scaling] of :mod:`curvops.kronecker.factors`. The statistics of all layers
    come from ONE pass over the data with one batched backward per batch
    (:mod:`curvops.kronecker.collection`).

    A layer is a parameter used as the weight (or bias) of ``F.linear`` (inputs with any
    number of leading axes), ``F.conv1d/2d/3d`` (``groups=1``) or ``F.embedding``: the calls
    of ``nn.Linear``, ``nn.Conv*d`` and ``nn.Embedding``, and the same calls in any module or
    in a callable ``model_func(params, X)``, found by identity of the tensors passed in
    (NOTE [weight uses] of :mod:`curvops.kronecker.uses`). A weight used by several calls
    (tied weights, a layer applied twice or once per position) is one block: calls of one
    kind act as extra shared positions of ``expand``/``reduce`` (NOTE [weight sharing] of
    :mod:`curvops.kronecker.layers`; Eschenhagen et al., 2023), and an embedding tied to a
    linear output layer (GPT-2) gets the Kronecker product nearest to the sum of both kinds'
    blocks (NOTE [tied embedding and output layer] of :mod:`curvops.kronecker.tied`). A
    weight and a bias share a block if every call uses them together. Parameters used in any
    other way (``x @ W.T``, ``F.layer_norm``, ...) use ``fallback``, or an error names them
    and the function.

    The factors are computed on first use (a product, :attr:`factors`, a closed form) or by
    :meth:`compute_factors`; :meth:`load_state_dict` sets them without a data pass. They
    describe the parameters *at that time*: after an in-place change of a parameter (an
    optimiser step, ``load_state_dict`` of the model) a product raises
    :class:`~curvops.kronecker.staleness.StaleFactorsError` unless ``on_stale`` says
    otherwise (NOTE [stale factors] of :mod:`curvops.kronecker.staleness`); call
    :meth:`compute_factors` to refresh them. Factors, eigenvalue corrections and products
    with NaN or Inf entries raise ``FloatingPointError`` (NOTE [non-finite values] of
    :mod:`curvops.risk.finite`). Products after the factors are computed need no data and may
    run in several threads at once; the pass computing the factors holds the lock of NOTE
    [threads] in :mod:`curvops.risk.concurrency`.

    Args:
        model_func: The model, an ``nn.Module`` or a callable ``(params, X) -> output``
            (``params`` as passed: a list or a dict). The layers are found from its calls
            of the layer functions; a module made only of ``nn.Linear``, ``nn.Conv*d`` and
            ``nn.Embedding`` parameters needs no forward pass for that, otherwise one
            forward pass on the first batch finds them (NOTE [layers of standard modules]
            of :mod:`curvops.kronecker.discovery`).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` (also with ``ignore_index`` padding and
            ``label_smoothing``, not with class weights) or ``BCEWithLogitsLoss`` (reduction
            ``"mean"`` or ``"sum"``).
        params: The parameters (a list of the model's tensors, any order, or a dict).
        data: A re-iterable of ``(X, y)`` batches.
        fisher_type: :class:`~curvops.kronecker.options.FisherType`: ``"type-2"`` (the
            GGN), ``"mc"``, ``"empirical"`` (the empirical Fisher per loss term for
            ``"expand"``, per datum for ``"reduce"``) or ``"forward-only"`` (NOTE
            [forward-only scaling]). ``"type-2"`` backpropagates one column per class *and
            output position* (``C · T`` columns for cross-entropy on ``[N, C, T]``, in
            memory-bounded chunks; NOTE [KFAC scaling]), which makes it the exact limit of
            ``"mc"`` but costs ``C · T`` backward columns per batch: for large vocabularies
            or long sequences use ``"mc"``.
        mc_samples: Number of would-be labels per datum (``"mc"`` only).
        kfac_approx: :class:`~curvops.kronecker.options.KFACType`, ``"expand"`` or
            ``"reduce"``, for layers with shared positions.
        separate_weight_and_bias: Whether weight and bias of a layer get separate blocks
            (``True``) or one joint block (``False``).
        num_per_example_loss_terms: Fixed number :math:`T` of loss terms per datum for the
            ``expand`` normalisation of the input factors (default: each layer's number of
            shared positions), see NOTE [KFAC scaling].
        seed: Seed of the private generator for ``"mc"`` (NOTE [MC seeding across ranks] of
            :mod:`curvops.risk.distributed`).
        progressbar: Show progress bars over the batches.
        check_deterministic: Evaluate loss and gradient twice at construction and raise
            :class:`~curvops.curvature.NonDeterministicError` if they differ.
        num_data: Total number of data (counted if ``None``).
        batch_size_fn: Maps ``X`` to its batch size (required for mapping inputs).
        fallback: :class:`~curvops.kronecker.options.FallbackType` for parameters without
            Kronecker structure: ``None`` (raise an error naming them) or ``"diagonal"`` (the
            exact diagonal of the same curvature for those parameters, see
            :mod:`curvops.kronecker.fallback`).
        process_group: See :class:`curvops.risk.EmpiricalRisk`.
        on_stale: :class:`~curvops.kronecker.staleness.OnStale`, what products and closed
            forms do if a parameter changed in place since the factors were computed:
            ``"raise"`` (default) a :class:`~curvops.kronecker.staleness.StaleFactorsError`,
            ``"recompute"`` the factors, or ``"ignore"`` the change and use the old factors.

    Raises:
        ValueError: For unknown options, ``mc_samples != 1`` with a non-MC type,
            parameters without Kronecker structure (naming them and the function using
            them) and no fallback, BatchNorm in training mode.
        TypeError: If an integer option is not an integer.
        NotImplementedError: For a loss without likelihood interpretation, or an unsupported
            configuration of a layer call (grouped convolutions, embeddings with
            ``max_norm``, a tied embedding with ``kfac_approx="reduce"``).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
        >>> K = KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data,
        ...                        fisher_type="type-2")
        >>> K.shape, sorted(K.factors)
        ((14, 14), ['0', '2'])
    """

    is_self_adjoint = True
    is_psd = True

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: list[Tensor] | dict[str, Tensor],
        data: Iterable,
        *,
        fisher_type: str | FisherType = FisherType.MC,
        mc_samples: int = 1,
        kfac_approx: str | KFACType = KFACType.EXPAND,
        separate_weight_and_bias: bool = True,
        num_per_example_loss_terms: int | None = None,
        seed: int = 2147483647,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        fallback: str | FallbackType | None = None,
        process_group: Any = None,
        on_stale: str | OnStale = OnStale.RAISE,
    ):
        name = type(self).__name__
        self._on_stale = parse_enum(on_stale, OnStale, "on_stale")
        self._fisher_type = parse_enum(fisher_type, FisherType, "fisher_type")
        self._kfac_approx = parse_enum(kfac_approx, KFACType, "kfac_approx")
        self._fallback = (
            None if fallback is None else parse_enum(fallback, FallbackType, "fallback")
        )
        mc_samples = check_positive_int(mc_samples, "mc_samples")
        if mc_samples != 1 and self._fisher_type != FisherType.MC:
            raise ValueError(
                f"mc_samples={mc_samples} only applies to fisher_type='mc', but fisher_type="
                f"'{self._fisher_type.value}'. Leave mc_samples=1 or use fisher_type='mc'."
            )
        if num_per_example_loss_terms is not None:
            num_per_example_loss_terms = check_positive_int(
                num_per_example_loss_terms, "num_per_example_loss_terms"
            )
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError(
                f"separate_weight_and_bias must be a bool, got {separate_weight_and_bias!r}."
            )
        if self._fisher_type == FisherType.FORWARD_ONLY and self._fallback is not None:
            raise ValueError(
                "fallback='diagonal' needs backpropagated gradients, which "
                "fisher_type='forward-only' does not compute. Use another fisher_type, or "
                "remove the parameters of unsupported layers from `params`."
            )
        if loss_func is None:
            raise ValueError(f"{name} needs a loss function; got loss_func=None.")
        self._mc_samples = mc_samples
        self._separate_weight_and_bias = separate_weight_and_bias
        self._num_per_example_loss_terms = num_per_example_loss_terms
        self._seed = check_seed(seed)
        self._risk = EmpiricalRisk(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
            owner=name,
        )
        shapes = self._risk.in_shapes
        super().__init__(shapes, shapes, dtype=self._risk.dtype, device=self._risk.device)
        if self._fisher_type != FisherType.FORWARD_ONLY:
            self._risk.loss.require_fisher(name)
        self._layers, self._fallback_indices = discover_layers(
            self._risk, kfac_approx=self._kfac_approx.value, fallback=self._fallback, what=name
        )
        self._factors: dict[str, LayerFactors] | None = None
        self._fallback_diagonals: dict[str, Tensor] | None = None
        self._operator: BlockDiagonalLinearOperator | None = None
        self._product: FactoredBlocks | None = None
        self._eigen_cache: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._factor_versions: ParameterVersions | None = None  # NOTE [stale factors]
        if check_deterministic:
            self._check_deterministic()

    # ---------------------------------------------------------------- options
    @property
    def fisher_type(self) -> FisherType:
        """The curvature type the factors approximate."""
        return self._fisher_type

    @property
    def kfac_approx(self) -> KFACType:
        """The approximation used for layers with shared positions."""
        return self._kfac_approx

    @property
    def on_stale(self) -> OnStale:
        """What happens when the parameters change after the factors were computed."""
        return self._on_stale

    @property
    def params(self) -> list[Tensor]:
        """The parameters, in the operator's order."""
        return list(self._risk.params)

    @property
    def param_names(self) -> list[str]:
        """Names of the parameters in the model, in the operator's order."""
        return list(self._risk.param_names)

    @property
    def num_data(self) -> int:
        """Total number of data the operator is defined over."""
        return self._risk.num_data

    def gradient_and_loss(self) -> tuple[list[Tensor], Tensor]:
        """Gradient and value of the empirical risk over the operator's data.

        As :meth:`curvops.curvature.CurvatureLinearOperator.gradient_and_loss`: one pass
        over the data, separate from the factors' pass.

        Returns:
            The gradient as a tensor list shaped like the parameters, and the risk. Uses the
            same scaling as the operator (the loss' reduction over all data); does not touch
            ``.grad``.
        """
        loss, grads = self._risk.loss_and_gradient()
        return grads, loss

    # ---------------------------------------------------------------- factors
    @property
    def factors(self) -> dict[str, LayerFactors]:
        """The Kronecker factors per supported layer, keyed by the layer's module name."""
        self._ensure_factors()
        return dict(self._factors)

    def factors_as_share_of(self, num_data: int) -> dict[str, LayerFactors]:
        r"""The factors of this operator's data as their additive share of ``num_data`` data.

        For an operator over a part :math:`\mathbb{S}` (:math:`N_\mathbb{S}` =
        :attr:`num_data` data) of a data set of :math:`N` = ``num_data`` data, returns
        :attr:`factors` with :math:`A` averaged over the rows of :math:`N` data instead of
        :math:`N_\mathbb{S}` (times :math:`N_\mathbb{S}/N`, :math:`a_b` likewise) and
        :math:`B` normalised by the data set's loss reduction factor (times
        :math:`N_\mathbb{S}/N` for ``reduction="mean"``, unchanged for ``"sum"``; NOTE
        [KFAC scaling] of :mod:`curvops.kronecker.factors`). Adding the shares of the parts
        of a data set factor by factor gives the factors of an operator over the whole data
        set (given the same number of rows and loss terms per datum, as in NOTE [batch
        weights] of :mod:`curvops.risk.empirical_risk`). This is how laplace-torch
        accumulates Kronecker factors over the batches of a data loader
        (:mod:`curvops.integrations.laplace`).

        Args:
            num_data: Number of data :math:`N \ge N_\mathbb{S}` of the whole data set.

        Returns:
            The shares, keyed like :attr:`factors` (fresh tensors).

        Raises:
            ValueError: If ``num_data`` is smaller than this operator's number of data, or
                for ``fisher_type="forward-only"`` (its :math:`B = I` is no sum over data).
        """
        if isinstance(num_data, bool) or int(num_data) != num_data or num_data < self.num_data:
            raise ValueError(
                f"num_data must be the size of a data set containing this operator's "
                f"{self.num_data} data (an integer >= {self.num_data}), got {num_data!r}."
            )
        if self._fisher_type == FisherType.FORWARD_ONLY:
            raise ValueError(
                "fisher_type='forward-only' sets the gradient factors to the identity, which "
                "is not a sum over data, so they have no share. Scale the input factors with "
                "LayerFactors.scaled(input_scale=...) instead."
            )
        fraction = self.num_data / num_data
        mean = self._risk.loss.reduction == "mean"
        return {
            name: f.scaled(input_scale=fraction, gradient_scale=fraction if mean else 1.0)
            for name, f in self.factors.items()
        }

    @property
    def fallback_diagonals(self) -> dict[str, Tensor]:
        """The diagonal blocks of fallback parameters, keyed by parameter name."""
        self._ensure_factors()
        return dict(self._fallback_diagonals)

    def _ensure_factors(self) -> None:
        """Compute the factors if missing, or apply :attr:`on_stale` if they are stale."""
        self._ensure_kronecker_factors()

    def _ensure_kronecker_factors(self) -> None:
        """:meth:`_ensure_factors` for the Kronecker factors only (EKFAC adds corrections)."""
        if self._factors is not None and not self._stale_parameters(self._factor_versions):
            return
        with DATA_PASS_LOCK:  # NOTE [threads]: one thread computes, the others then reuse
            if self._factors is None:
                self.compute_factors()
            else:
                self._refresh_if_stale()

    def _stale_parameters(self, versions: ParameterVersions | None) -> list[str]:
        """Names of the parameters changed since ``versions`` (NOTE [stale factors])."""
        if versions is None or self._on_stale == OnStale.IGNORE:
            return []
        return changed_parameters(versions, self._risk.params, self._risk.param_names)

    def _refresh_if_stale(self) -> None:
        """Apply :attr:`on_stale` if a parameter changed since the factors were computed.

        Raises:
            StaleFactorsError: If a parameter changed and ``on_stale="raise"``.
        """
        changed = self._stale_parameters(self._factor_versions)
        if not changed:
            return
        if self._on_stale == OnStale.RECOMPUTE:
            self.compute_factors()
            return
        raise stale_error(
            type(self).__name__,
            changed,
            "Call compute_factors() to recompute them at the current parameters (and build "
            "inverses anew), or build a new operator.",
        )

    @property
    def _squares_per_position(self) -> bool:
        """Whether squared per-datum gradients come from output factors split per position.

        Used by the fallback diagonal and EKFAC's correction (NOTE [KFAC scaling]).
        """
        if self._fisher_type == FisherType.TYPE2:
            return True
        return self._fisher_type == FisherType.EMPIRICAL and self._kfac_approx == KFACType.EXPAND

    def compute_factors(self) -> None:
        """Compute the factors with one pass over the data (replacing existing ones)."""
        layers, risk = self._layers, self._risk
        backward = self._fisher_type != FisherType.FORWARD_ONLY
        accumulators = [
            factor_accumulator(
                layer, self._kfac_approx.value, self._num_per_example_loss_terms, backward
            )
            for layer in layers
        ]
        diagonals = [
            torch.zeros(risk.params[i].shape, dtype=self.dtype, device=self.device)
            for i in self._fallback_indices
        ]
        sums = [t for acc in accumulators for t in acc.tensors()] + diagonals

        def consume(stats) -> None:
            w = stats.batch.weight
            for acc, inputs, grad in zip(accumulators, stats.inputs, stats.grad_outputs):
                acc.add(inputs, grad, w, with_inputs=stats.new_batch, term_mask=stats.term_mask)
            for diag, g in zip(diagonals, stats.fallback_grads):
                diag.add_(g.square().sum(dim=(0, 1)), alpha=w)

        with risk.partial_sums(sums, what=f"{type(self).__name__} factors"):
            statistics_pass(
                risk,
                layers,
                consume,
                fisher_type=self._fisher_type,
                mc_samples=self._mc_samples,
                seed=self._seed,
                fallback_indices=self._fallback_indices,
                split_positions=self._fisher_type == FisherType.TYPE2,
                fallback_split_positions=self._squares_per_position,
                desc=f"{type(self).__name__} factors",
            )
            for acc in accumulators:
                acc.flush_counts()
        names = dict(enumerate(risk.param_names))
        self._set_factors(
            {
                layer.name: acc.finalize(self._separate_weight_and_bias, names)
                for layer, acc in zip(layers, accumulators)
            },
            {names[i]: d for i, d in zip(self._fallback_indices, diagonals)},
        )

    def _set_factors(self, factors: dict[str, LayerFactors], diagonals: dict[str, Tensor]) -> None:
        owner = type(self).__name__
        everything = [t for f in factors.values() for t in f.tensors().values()]
        if not all_finite([*everything, *diagonals.values()]):  # NOTE [non-finite values]
            # one check for all (one synchronisation); the culprit is looked up only here
            for name, f in factors.items():
                what = f"the factors of {f.module_type} '{name}'"
                require_finite(f.tensors().values(), owner=owner, what=what)
            for name, d in diagonals.items():
                require_finite([d], owner=owner, what=f"the fallback diagonal of '{name}'")
        self._operator = None
        self._product = None
        self._eigen_cache = {}
        self._factors, self._fallback_diagonals = factors, diagonals
        # last: a thread that sees fresh versions sees the new factors (NOTE [threads])
        self._factor_versions = parameter_versions(self._risk.params)  # NOTE [stale factors]

    def _layer_items(self) -> list[tuple[KFACLayer, LayerFactors]]:
        self._ensure_factors()
        return [(layer, self._factors[layer.name]) for layer in self._layers]

    def _fallback_items(self) -> list[tuple[int, Tensor]]:
        self._ensure_factors()
        names = self._risk.param_names
        return [(i, self._fallback_diagonals[names[i]]) for i in self._fallback_indices]

    def eigendecomposition(
        self, layer_name: str, factor: str, *, retry_double_precision: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Eigendecomposition of one factor of a layer (computed once, then cached).

        Args:
            layer_name: The layer's module name (a key of :attr:`factors`).
            factor: ``"input"`` or ``"gradient"``.
            retry_double_precision: Retry in float64 if the decomposition fails.

        Returns:
            Eigenvalues (ascending, clipped at 0) and eigenvectors (columns).

        Raises:
            KeyError: For an unknown layer.
        """
        key = (layer_name, factor)
        self._ensure_kronecker_factors()
        if key not in self._eigen_cache:
            if layer_name not in self._factors:
                raise KeyError(f"No layer '{layer_name}'; the layers are {sorted(self._factors)}.")
            f = self._factors[layer_name]
            matrix = f.input_factor if factor == "input" else f.gradient_factor
            self._eigen_cache[key] = factor_eigh(
                matrix,
                what=f"{factor} factor of {f.module_type} '{layer_name}'",
                retry_double_precision=retry_double_precision,
            )
        return self._eigen_cache[key]

    # ---------------------------------------------------------------- product
    def _build_blocks(self) -> list[tuple[LinearOperator, list[int]]]:
        blocks = []
        for layer, f in self._layer_items():
            w, b = layer.weight_index, layer.bias_index
            B = f.gradient_factor
            if f.input_factor is not None:
                if f.diagonal_input:
                    blocks.append((EmbeddingKroneckerLinearOperator(f.input_factor, B), [w]))
                elif f.joint:
                    glue = WeightBiasStacking(
                        self._in_shapes[w], dtype=self.dtype, device=self.device
                    )
                    kron = KroneckerProductLinearOperator(
                        B, f.input_factor, symmetric=True, psd=True
                    )
                    blocks.append((glue.adjoint() @ kron @ glue, [w, b]))
                else:
                    kron = KroneckerProductLinearOperator(
                        B, f.input_factor, in_shape=self._in_shapes[w], symmetric=True, psd=True
                    )
                    blocks.append((kron, [w]))
            if f.bias_input_factor is not None:
                bias_op = KroneckerProductLinearOperator(
                    f.bias_input_factor * B, symmetric=True, psd=True
                )
                blocks.append((bias_op, [b]))
        for i, diag in self._fallback_items():
            blocks.append((DiagonalLinearOperator([diag]), [i]))
        return blocks

    def to_block_diagonal(self) -> BlockDiagonalLinearOperator:
        """The operator as a block-diagonal composition of structured blocks (built once).

        The result is a snapshot of the current factors; it does not follow later changes of
        the parameters (NOTE [stale factors]).
        """
        self._ensure_factors()
        if self._operator is None:
            blocks = self._build_blocks()
            self._operator = BlockDiagonalLinearOperator(
                [op for op, _ in blocks], [positions for _, positions in blocks]
            )
        return self._operator

    def _build_product(self) -> FactoredBlocks:
        """The blocks of the product as plain tensors (see :mod:`curvops.kronecker.product`)."""
        blocks: list[MatrixBlock | DiagonalBlock] = []
        shapes = self._in_shapes
        for layer, f in self._layer_items():
            w, b = layer.weight_index, layer.bias_index
            B = f.gradient_factor
            if f.input_factor is not None:
                if f.diagonal_input:  # embedding weight [E, D]: diag(a) (x) B
                    core = KroneckerCore(f.input_factor, B, symmetric=True)
                else:  # B (x) A on [W_mat] or [W_mat | b]
                    core = KroneckerCore(B, f.input_factor, symmetric=True)
                positions = (w, b) if f.joint else (w,)
                blocks.append(MatrixBlock(positions, tuple(shapes[i] for i in positions), core))
            if f.bias_input_factor is not None:
                core = KroneckerCore(f.bias_input_factor * B, None)
                blocks.append(MatrixBlock((b,), (shapes[b],), core))
        for i, diag in self._fallback_items():
            blocks.append(DiagonalBlock((i,), diag))
        return FactoredBlocks(blocks, shapes, dtype=self.dtype, device=self.device, psd=True)

    @eager_region  # NOTE [compiling products]: locks, factors and blocks built eagerly
    def _factored_blocks(self) -> FactoredBlocks:
        """The product's blocks, built on first use (computing the factors if needed)."""
        # under the lock (NOTE [threads]): factors, corrections and the product built from
        # them are replaced together, so no thread combines parts of two states
        with DATA_PASS_LOCK:
            self._ensure_factors()  # NOTE [stale factors]
            product = self._product
            if product is None:
                product = self._product = self._build_product()
        return product

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        owner = type(self).__name__
        require_finite_input(X, owner=owner)
        result = self._factored_blocks()._matmat(X)
        require_finite(result, owner=owner, what="the product")  # NOTE [non-finite values]
        return result

    # ---------------------------------------------------------------- closed forms
    def _block_eigenvalues(self) -> list[Tensor]:
        """Eigenvalues of every block, as one tensor per block (for the closed forms)."""
        out = []
        for layer, f in self._layer_items():
            lam_B = self.eigendecomposition(layer.name, "gradient")[0]
            if f.input_factor is not None:
                lam_A = (
                    f.input_factor
                    if f.diagonal_input
                    else self.eigendecomposition(layer.name, "input")[0]
                )
                out.append(torch.outer(lam_B, lam_A))
            if f.bias_input_factor is not None:
                out.append(f.bias_input_factor * lam_B)
        out.extend(d for _, d in self._fallback_items())
        return out

    def trace(self) -> Tensor:
        r"""Exact trace, :math:`\sum_l \operatorname{tr}(B^{(l)}) \operatorname{tr}(A^{(l)})`.

        Plus the sum of the fallback diagonals.

        Returns:
            The trace as a 0-dim tensor.
        """
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for _, f in self._layer_items():
            trB = f.gradient_factor.diagonal().sum()
            if f.input_factor is not None:
                A = f.input_factor
                total = total + trB * (A.sum() if f.diagonal_input else A.diagonal().sum())
            if f.bias_input_factor is not None:
                total = total + trB * f.bias_input_factor
        for _, d in self._fallback_items():
            total = total + d.sum()
        return total

    def diagonal(self) -> Tensor:
        r"""Exact diagonal, flat ``[D]``, from the factors' diagonals.

        :math:`\operatorname{diag}(B) \otimes \operatorname{diag}(A)` per block (EKFAC:
        :math:`(Q_B \odot Q_B) \Lambda^\star (Q_A \odot Q_A)^\top`), the fallback blocks'
        diagonals as they are.

        Returns:
            The diagonal of the KFAC matrix (not of the curvature it approximates; for that,
            see :meth:`curvops.GGNLinearOperator.diagonal`).
        """
        return self._factored_blocks().diagonal()

    def frobenius_norm(self) -> Tensor:
        r"""Exact Frobenius norm, from :math:`\|B \otimes A\|_F = \|B\|_F \|A\|_F` per block."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for _, f in self._layer_items():
            nB2 = f.gradient_factor.square().sum()
            if f.input_factor is not None:
                total = total + nB2 * f.input_factor.square().sum()
            if f.bias_input_factor is not None:
                total = total + nB2 * f.bias_input_factor.square()
        for _, d in self._fallback_items():
            total = total + d.square().sum()
        return total.sqrt()

    def logdet(self) -> Tensor:
        r"""Exact log-determinant from the factors' eigenvalues.

        For a block :math:`B \otimes A` with :math:`B \in \mathbb{R}^{m \times m}`,
        :math:`A \in \mathbb{R}^{n \times n}`: :math:`n \log\det B + m \log\det A`. The operator
        is PSD by construction; a singular block (an eigenvalue :math:`\le 0` after round-off)
        gives :math:`-\infty`.

        Returns:
            :math:`\log\det` as a 0-dim tensor.
        """
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for lam in self._block_eigenvalues():
            if bool((lam <= 0).any()):
                return torch.full_like(total, float("-inf"))
            total = total + lam.log().sum()
        return total

    def det(self) -> Tensor:
        """Exact determinant, :math:`\\exp(\\log\\det)` (may over- or underflow for large D)."""
        return self.logdet().exp()

    # ---------------------------------------------------------------- safeguards
    def _check_deterministic(self) -> None:
        """Evaluate loss and gradient twice and raise if they differ (on any rank).

        See :func:`curvops.risk.determinism.check_deterministic`.

        Raises:
            NonDeterministicError: If the two evaluations differ.
        """
        check_deterministic(
            self._risk,
            lambda: loss_and_gradient_probe(self._risk),
            owner=type(self).__name__,
            what="loss and gradient (the factors would not be reproducible)",
        )

    # ---------------------------------------------------------------- state
    def _config(self) -> dict[str, Any]:
        return {
            "fisher_type": self._fisher_type.value,
            "kfac_approx": self._kfac_approx.value,
            "separate_weight_and_bias": self._separate_weight_and_bias,
            "num_per_example_loss_terms": self._num_per_example_loss_terms,
            "mc_samples": self._mc_samples,
            "param_names": list(self._risk.param_names),
            "param_shapes": [tuple(s) for s in self._in_shapes],
        }

    def state_dict(self) -> dict[str, Any]:
        """The factors and the options they were computed with (computes them if needed).

        Returns:
            A dict of plain Python objects and tensors, suitable for ``torch.save``.
        """
        self._ensure_factors()
        return {
            "version": STATE_VERSION,
            "type": type(self).__name__,
            "config": self._config(),
            "factors": {name: f.tensors() for name, f in self._factors.items()},
            "fallback_diagonals": dict(self._fallback_diagonals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the factors from :meth:`state_dict` output, without a pass over the data.

        Args:
            state: The state, from an operator of the same type with the same options,
                parameters and layers.

        Raises:
            ValueError: If the state's type, options, layers or tensor shapes do not match.
        """
        check_state_header(state, type(self).__name__, self._config())
        names = self._risk.param_names
        factors = factors_from_state(
            state,
            self._layers,
            names,
            separate_weight_and_bias=self._separate_weight_and_bias,
            dtype=self.dtype,
            device=self.device,
        )
        diagonals = fallback_diagonals_from_state(
            state,
            {names[i]: self._in_shapes[i] for i in self._fallback_indices},
            dtype=self.dtype,
            device=self.device,
        )
        self._set_factors(factors, diagonals)
