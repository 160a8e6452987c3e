r"""Pure per-batch curvature products built with ``torch.func``.

Each function takes a function of the parameters (the model output or the batch loss on one
batch), the parameter values, and a matrix ``V`` as a tensor list with a *leading* column axis
(``[K, *shape]`` per parameter), and returns the batch's product in the same format. The
``K`` columns are processed in one vectorised pass (``torch.func.vmap``), never ``K`` passes.
Operators only bind model, loss, parameters and data to these functions (DESIGN layer 4).

References:
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian.
    Schraudolph, N. N. (2002). Fast curvature matrix-vector products for second-order
    gradient descent.
    Dagréou, M., Ablin, P., Vaiter, S., Moreau, T. (2024). How to compute Hessian-vector
    products? ICLR Blogposts.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

ParamFn = Callable[..., Tensor]


def jacobian_matmat(f: ParamFn, params: list[Tensor], V: list[Tensor]) -> Tensor:
    r"""Jacobian-matrix product :math:`J V` by forward-mode autodiff.

    Args:
        f: Maps the parameters (as positional arguments) to the output.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.

    Returns:
        ``[K, *output_shape]``.
    """
    return vmap(lambda *v: jvp(f, tuple(params), v)[1])(*V)


def jacobian_t_matmat(f: ParamFn, params: list[Tensor], U: Tensor) -> list[Tensor]:
    r"""Transposed-Jacobian-matrix product :math:`J^\top U` by reverse-mode autodiff.

    Args:
        f: Maps the parameters (as positional arguments) to the output.
        params: Parameter values.
        U: ``[K, *output_shape]``.

    Returns:
        Tensor list ``[K, *param_shape]``.
    """
    _, vjp_fn = vjp(f, *params)
    return list(vmap(vjp_fn)(U))


def hessian_matmat(loss: ParamFn, params: list[Tensor], V: list[Tensor]) -> list[Tensor]:
    r"""Hessian-matrix product :math:`\nabla^2_\theta \mathcal{L} V` (Pearlmutter, 1994).

    Args:
        loss: Maps the parameters (as positional arguments) to a scalar loss.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.

    Returns:
        Tensor list ``[K, *param_shape]``.
    """
    # Reverse-over-reverse (the Hessian is symmetric, so its VJP is its product). Forward-
    # over-reverse hits a PyTorch bug for mse_loss ("ZeroTensors are immutable", torch 2.13).
    argnums = tuple(range(len(params)))
    _, hvp_fn = vjp(grad(loss, argnums=argnums), *params)
    return list(vmap(hvp_fn)(tuple(V)))


def ggn_matmat(
    f: ParamFn,
    loss_of_output: Callable[[Tensor], Tensor],
    params: list[Tensor],
    V: list[Tensor],
) -> list[Tensor]:
    r"""GGN-matrix product :math:`J^\top (\nabla_f^2 \ell) J V` (Schraudolph, 2002).

    Forward mode gives :math:`JV`, a Hessian-vector product in output space applies the
    loss Hessian (cheap: outputs are small), and one reverse pass gives :math:`J^\top(\cdot)`.

    Args:
        f: Maps the parameters (as positional arguments) to the model output.
        loss_of_output: Maps the model output to the scalar batch loss.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.

    Returns:
        Tensor list ``[K, *param_shape]``.
    """
    out, vjp_fn = vjp(f, *params)
    JV = jacobian_matmat(f, params, V)
    _, loss_hvp = vjp(grad(loss_of_output), out.detach())  # symmetric: VJP = HVP
    HJV = vmap(lambda u: loss_hvp(u)[0])(JV)
    return list(vmap(vjp_fn)(HJV))


def factor_ggn_matmat(
    f: ParamFn,
    factors_of_output: Callable[[Tensor], Tensor],
    params: list[Tensor],
    V: list[Tensor],
) -> list[Tensor]:
    r"""Product with :math:`J^\top (\sum_k s_k s_k^\top) J` where the factors are per datum.

    With ``factors`` from :meth:`curvops.losses.LossSpec.output_factors` this is the
    empirical Fisher (true gradients) or the Monte-Carlo Fisher (sampled gradients): the
    GGN of the pseudo-loss :math:`\tilde\ell_n = \frac{1}{2}\sum_k (s_k[n]^\top f_n)^2`
    (paper §2.1, "FVPs via GGNVPs").

    Args:
        f: Maps the parameters (as positional arguments) to the model output ``[N, ...]``.
        factors_of_output: Maps the (detached) model output ``[N, ...]`` to the per-datum
            output-space factors ``[J, N, ...]``.
        params: Parameter values.
        V: Tensor list ``[K, *param_shape]``.

    Returns:
        Tensor list ``[K, *param_shape]``.
    """
    out, vjp_fn = vjp(f, *params)
    factors = factors_of_output(out.detach())
    JV = jacobian_matmat(f, params, V)  # [K, N, ...]
    N = factors.shape[1]
    S = factors.reshape(factors.shape[0], N, -1)  # [J, N, M]
    coeff = (S.unsqueeze(0) * JV.reshape(JV.shape[0], 1, N, -1)).sum(-1)  # [K, J, N]
    out_space = (coeff.unsqueeze(-1) * S.unsqueeze(0)).sum(1)  # [K, N, M]
    return list(vmap(vjp_fn)(out_space.reshape(JV.shape)))
