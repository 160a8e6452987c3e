r"""curvops as a curvature backend of laplace-torch.

Daxberger, E., Kristiadi, A., Immer, A., Eschenhagen, R., Bauer, M., Hennig, P. (2021).
Laplace redux -- effortless Bayesian deep learning. MacKay, D. J. C. (1992). A practical
Bayesian framework for backpropagation networks.

Pass a class of this module as ``backend`` to ``laplace.Laplace``::

    from laplace import Laplace
    from curvops.integrations.laplace import CurvopsGGN

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="kron", backend=CurvopsGGN)
    la.fit(train_loader)

laplace-torch calls a backend once per batch of its data loader and adds the results: a
loss and a curvature matrix of that batch (a ``laplace.utils.Kron`` for ``"kron"``, a
:math:`P \times P` matrix for ``"full"``, a length-:math:`P` vector for ``"diag"``).

NOTE [laplace-torch scaling]: laplace-torch works with the negative log-likelihood summed
over the data, :math:`\sum_n -\log p(y_n \mid f_n)`. Its backends evaluate the torch loss
with ``reduction="sum"`` and multiply loss and curvature by the backend's ``factor``:
:math:`\frac{1}{2}` for regression (``MSELoss`` is twice the negative log-likelihood of
:math:`\mathcal{N}(f, 1)` up to a constant) and :math:`1` for classification
(``CrossEntropyLoss``). The curvature of a batch is therefore ``factor`` times the curvops
operator of the sum-reduced loss over that batch; for ``"kron"`` each batch contributes its
additive share of the data set's factors
(:meth:`~curvops.kronecker.KFACLinearOperator.factors_as_share_of` with the data set's size),
and the scalar ``factor`` is split evenly over the two factors of a block, as
``laplace.utils.Kron`` does when multiplied by a scalar.

Structures and operators:

* ``"full"``: the dense matrix of :class:`~curvops.curvature.GGNLinearOperator`
  (:class:`~curvops.curvature.FisherMCLinearOperator` with ``stochastic=True``),
  :class:`~curvops.curvature.EFLinearOperator` or
  :class:`~curvops.curvature.HessianLinearOperator`; for a subnetwork only its columns
  (:class:`~curvops.linalg.SubmatrixLinearOperator`).
* ``"diag"``: the exact diagonal of the same operator (NOTE [diagonal path]).
* ``"kron"``: :class:`~curvops.kronecker.KFACLinearOperator` with ``fisher_type``
  ``"type-2"`` (``"mc"`` with ``stochastic=True``) or ``"empirical"``, one block per
  parameter (weight and bias apart), as laplace-torch expects. Options of laplace's
  ``asdl_fisher_kwargs`` (e.g. ``mc_samples``, ``kfac_approx``) are passed on to it.

Last-layer Laplace evaluates the operators on the last layer and its input features (one
forward pass through the network per batch) unless laplace-torch reduces the features
(``feature_reduction``), where the whole network is evaluated with the last layer's
parameters. Jacobians for the predictive come from laplace-torch's own ``torch.func``
implementation, which does not depend on the backend.

NOTE [one forward pass per batch]: laplace-torch wants each batch's loss next to its
curvature. For ``"kron"`` over the whole network the loss is computed from the output of
KFAC's own forward pass (caught by a forward hook on the model while the factors are
computed, removed afterwards) instead of a second forward pass; the loss itself is evaluated
without autograd (:func:`curvops.losses.cross_entropy.loss_value`). Both matter
for small networks, where a KFAC pass over a batch takes about a millisecond.

NOTE [diagonal path]: ``"diag"`` takes the operator's exact ``diagonal()`` where it has
one (computed from per-datum quantities, without forming the matrix), and otherwise the
diagonal of its dense matrix (:math:`P` matrix-vector products, batched), which gives the
same numbers more slowly. :class:`CurvopsHessian` always takes the dense path: the Hessian
has no cheap exact diagonal.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from math import sqrt
from typing import Any

import torch
from torch import Tensor, nn

from curvops.curvature import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from curvops.kronecker import KFACLinearOperator
from curvops.linalg import SubmatrixLinearOperator
from curvops.linear_operator import LinearOperator
from curvops.losses.cross_entropy import loss_value


def _import_laplace() -> tuple[type, type, type, type]:
    """laplace-torch's interface classes and ``Kron``, or an ImportError saying how to fix."""
    try:
        from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
        from laplace.utils import Kron
    except (ImportError, RuntimeError) as e:
        if "torchvision" in str(e) or "nms" in str(e):
            hint = (
                "An installed torchvision does not match torch (torchmetrics, which "
                "laplace-torch imports, imports torchvision whenever it is installed). "
                "Install torch and torchvision as a matching pair, or uninstall torchvision "
                "(laplace-torch does not need it; see curvops' docs, 'laplace-torch')."
            )
        else:
            hint = 'Install it with `pip install "curvops[laplace]"` (see the docs).'
        raise ImportError(
            f"curvops.integrations.laplace needs laplace-torch, whose import failed: {e}. {hint}"
        ) from e
    return CurvatureInterface, GGNInterface, EFInterface, Kron


CurvatureInterface, GGNInterface, EFInterface, Kron = _import_laplace()


def _without_hooks(layer: nn.Module) -> nn.Module:
    """An ``nn.Linear`` holding ``layer``'s own parameters but not its forward hooks.

    NOTE [last layer without laplace's hook]: laplace-torch keeps a forward hook on the last
    layer (it records the layer's input, the features). The operators get the features as
    data, so the hook has nothing to do there, and a hooked model is not a row-wise model
    (NOTE [row-wise models] of :mod:`curvops.curvature.diagonal_linear`): the exact diagonal
    would run its per-datum safeguards. The twin shares the parameter tensors (gradients and
    values are the layer's); other layer types are returned as they are.
    """
    if type(layer) is not nn.Linear or not (layer._forward_hooks or layer._forward_pre_hooks):
        return layer
    twin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(twin)
    twin.in_features, twin.out_features = layer.in_features, layer.out_features
    twin.weight = layer.weight
    twin.bias = layer.bias
    twin.train(layer.training)
    return twin


class CurvopsInterface(CurvatureInterface):
    """What the curvops backends share: binding a batch, the loss, ``full`` and ``diag``.

    Takes laplace-torch's backend arguments (``model``, ``likelihood``, ``last_layer``,
    ``subnetwork_indices``, ``dict_key_x``, ``dict_key_y``).
    """

    _operator_class: type[LinearOperator]

    def __init__(self, model: nn.Module, likelihood: Any, **kwargs: Any):
        super().__init__(model, likelihood, **kwargs)

    # ---------------------------------------------------------------- binding
    def _batch_size_fn(self, x: Any) -> Callable[[Any], int] | None:
        if isinstance(x, MutableMapping):
            key = self.dict_key_x
            return lambda X: X[key].shape[0]
        return None

    def _bind(
        self, x: Any, y: Tensor, *, output: bool = True
    ) -> tuple[nn.Module, Any, list, dict[str, Any], Tensor | None]:
        """Model, parameters, data and options of the operators for one batch, and the output.

        For last-layer Laplace without feature reduction: the last layer on its input
        features (and the output, from the same forward pass), else the model with
        laplace-torch's parameters (only those requiring gradients, in laplace's order) and,
        if ``output``, the output of a forward pass.
        """
        options = {"check_deterministic": False, "batch_size_fn": self._batch_size_fn(x)}
        with torch.no_grad():
            if self.last_layer and getattr(self.model, "feature_reduction", None) is None:
                f, features = self.model.forward_with_features(x)
                layer = _without_hooks(self.model.last_layer)
                return layer, self.params_dict, [(features, y)], {"check_deterministic": False}, f
            f = self.model(x) if output else None
        params = self.params if self.last_layer else self.params_dict
        return self.model, params, [(x, y)], options, f

    def _loss(self, f: Tensor, y: Tensor) -> Tensor:
        """laplace-torch's batch loss, ``factor`` times the sum-reduced loss."""
        return self.factor * loss_value(self.lossfunc, f, y)

    def _curvature_operator(
        self, x: Any, y: Tensor, **kwargs: Any
    ) -> tuple[LinearOperator, Tensor]:
        """The curvature operator of one batch's sum-reduced loss, and laplace's batch loss."""
        model, params, data, options, f = self._bind(x, y)
        operator = self._operator_class(model, self.lossfunc, params, data, **options, **kwargs)
        return operator, self._loss(f, y)

    # ---------------------------------------------------------------- structures
    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Loss and dense curvature of one batch (``factor`` times the sum-loss operator).

        Args:
            x: The batch's inputs.
            y: The batch's targets.
            **kwargs: ``N`` (unused) and options of the operator.

        Returns:
            The loss and the :math:`P \\times P` matrix (:math:`|S| \\times |S|` for a
            subnetwork :math:`S`).
        """
        kwargs.pop("N", None)
        operator, loss = self._curvature_operator(x, y, **kwargs)
        if self.subnetwork_indices is not None:
            operator = SubmatrixLinearOperator(
                operator, self.subnetwork_indices, self.subnetwork_indices
            )
        return loss, self.factor * operator.to_dense()

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Loss and exact diagonal of the curvature of one batch (NOTE [diagonal path]).

        Args:
            x: The batch's inputs.
            y: The batch's targets.
            **kwargs: ``N`` (unused) and options of the operator.

        Returns:
            The loss and the diagonal, length :math:`P` (:math:`|S|` for a subnetwork).
        """
        kwargs.pop("N", None)
        operator, loss = self._curvature_operator(x, y, **kwargs)
        diagonal = self._diagonal(operator)
        if self.subnetwork_indices is not None:
            diagonal = diagonal[self.subnetwork_indices]
        return loss, self.factor * diagonal

    def _diagonal(self, operator: LinearOperator) -> Tensor:
        """The operator's exact diagonal, flat (NOTE [diagonal path])."""
        diagonal = getattr(operator, "diagonal", None)
        if callable(diagonal):
            return diagonal()
        return operator.to_dense().diagonal()

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Any]:
        """Loss and KFAC of one batch as its share of ``N`` data (NOTE [laplace-torch scaling]).

        Args:
            x: The batch's inputs.
            y: The batch's targets.
            N: Number of data of the whole data set.
            **kwargs: Options of :class:`~curvops.kronecker.KFACLinearOperator` (e.g.
                ``mc_samples``, ``kfac_approx``).

        Returns:
            The loss and a ``laplace.utils.Kron`` with one entry per parameter, in
            laplace-torch's order: ``[B, A]`` for a weight (``[diag(A), B]`` for an
            embedding), ``[a_b B]`` for a bias.

        Raises:
            ValueError: For a subnetwork (laplace-torch has no Kronecker subnetwork Laplace).
        """
        if self.subnetwork_indices is not None:
            raise ValueError(
                "hessian_structure='kron' has no subnetwork version in laplace-torch; use "
                "'full' or 'diag' with subset_of_weights='subnetwork'."
            )
        # NOTE [one forward pass per batch]
        model, params, data, options, f = self._bind(x, y, output=False)
        options = self._kron_options() | options | kwargs
        K = KFACLinearOperator(
            model,
            self.lossfunc,
            params,
            data,
            fisher_type=self._kron_fisher_type,
            separate_weight_and_bias=True,
            **options,
        )
        outputs: list[Tensor] = []
        hook = None
        if f is None:
            hook = model.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
        try:
            kron = Kron(self._kron_factors(K, N))
        finally:
            if hook is not None:
                hook.remove()
        if f is None:
            f = outputs[-1] if outputs else self._bind(x, y)[-1]
        return self._loss(f, y), kron

    def _kron_factors(self, K: KFACLinearOperator, N: int) -> list[list[Tensor]]:
        r"""The per-parameter entries of laplace's ``Kron``, in the operator's parameter order.

        A weight's entry is its two factors' shares of ``N`` data; laplace adds them over the
        batches factor by factor. A bias' entry is one matrix, :math:`a_b B`, which laplace
        adds as a whole, so it takes the share of :math:`B` times the batch's own
        :math:`a_b` (the average of :math:`1^2`, the same in every batch). ``factor`` is
        split as :math:`\sqrt{\text{factor}}` per factor of a weight's entry.
        """
        c = sqrt(self.factor)
        own = K.factors
        entries: dict[str, list[Tensor]] = {}
        for name, share in K.factors_as_share_of(N).items():
            f = share if c == 1 else share.scaled(input_scale=c, gradient_scale=c)
            B = f.gradient_factor
            if f.weight_name is not None:
                if f.diagonal_input:
                    entries[f.weight_name] = [torch.diag(f.input_factor), B]
                else:
                    entries[f.weight_name] = [B, f.input_factor]
            if f.bias_name is not None:
                entries[f.bias_name] = [c * own[name].bias_input_factor * B]
        return [entries[name] for name in K.param_names]

    def _kron_options(self) -> dict[str, Any]:
        return {}

    @property
    def _kron_fisher_type(self) -> str:
        raise NotImplementedError


class CurvopsGGN(CurvopsInterface, GGNInterface):
    """The generalized Gauss-Newton (or, with ``stochastic=True``, a Monte-Carlo Fisher).

    Args:
        model: The model (laplace-torch passes it).
        likelihood: ``"classification"`` or ``"regression"``.
        stochastic: Use the Monte-Carlo Fisher (would-be labels drawn from the model's
            predictive) instead of the GGN.
        num_samples: Would-be labels per datum for ``stochastic=True``.
        seed: Seed of the Monte-Carlo draws; the :math:`k`-th call (batch) uses
            ``seed + k``. The global random state is not touched.
        **kwargs: laplace-torch's backend arguments (``last_layer``,
            ``subnetwork_indices``, ``dict_key_x``, ``dict_key_y``).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        stochastic: bool = False,
        num_samples: int = 1,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(model, likelihood, **kwargs)
        self.stochastic = stochastic
        self.num_samples = num_samples
        self.seed = int(seed)
        self._calls = 0

    def _next_seed(self) -> int:
        self._calls += 1
        return self.seed + self._calls - 1

    @property
    def _operator_class(self) -> type[LinearOperator]:
        return FisherMCLinearOperator if self.stochastic else GGNLinearOperator

    def _curvature_operator(self, x: Any, y: Tensor, **kwargs: Any):
        if self.stochastic:
            kwargs = {"mc_samples": self.num_samples, "seed": self._next_seed()} | kwargs
        return super()._curvature_operator(x, y, **kwargs)

    def _kron_options(self) -> dict[str, Any]:
        if self.stochastic:
            return {"mc_samples": self.num_samples, "seed": self._next_seed()}
        return {}

    @property
    def _kron_fisher_type(self) -> str:
        return "mc" if self.stochastic else "type-2"


class CurvopsEF(CurvopsInterface, EFInterface):
    """Empirical Fisher: ``factor`` times :math:`\\sum_n g_n g_n^\\top` (per-datum gradients)."""

    _operator_class = EFLinearOperator

    @property
    def _kron_fisher_type(self) -> str:
        return "empirical"


class CurvopsHessian(CurvopsInterface):
    """The Hessian of the loss, for ``"full"`` and ``"diag"``.

    ``"diag"`` takes the diagonal of the dense Hessian (:math:`P` Hessian-vector products;
    the Hessian has no cheaper exact diagonal). ``"kron"`` is not defined for the Hessian.
    """

    _operator_class = HessianLinearOperator

    def _diagonal(self, operator: LinearOperator) -> Tensor:
        """The diagonal of the dense Hessian (exact, :math:`P` Hessian-vector products)."""
        return operator.to_dense().diagonal()

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any):
        """Not defined: KFAC approximates the GGN or a Fisher.

        Raises:
            ValueError: Always, naming the backends that have ``"kron"``.
        """
        raise ValueError(
            "hessian_structure='kron' approximates the GGN or a Fisher, not the Hessian. Use "
            "backend=CurvopsGGN (or CurvopsEF), or hessian_structure='full' or 'diag'."
        )


__all__ = ["CurvopsEF", "CurvopsGGN", "CurvopsHessian", "CurvopsInterface"]
