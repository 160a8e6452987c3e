"""``curvops tour``: the paper's visual tour of curvature matrices on a small CNN.

Trains the CNN of :func:`curvops.cli.models.make_digits_cnn` (paper Fig. 2: three
convolutions and a dense layer with ReLU and sigmoid activations) briefly on scikit-learn's
8x8 digits, then materialises its Hessian, GGN, empirical Fisher, MC Fisher, KFAC and EKFAC,
their damped inverses, spectral densities (Papyan (2020)) and the accuracy of randomized trace
and diagonal estimators (paper Fig. 4), and writes PNGs, ``report.md`` and ``results.json``.

Dangel, F., Eschenhagen, R., Ormaniec, W., Fernandez, A., Tatzel, L., Kristiadi, A. (2025).
Position: Curvature Matrices Should Be Democratized via Linear Operators.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvops.cli.curvatures import TITLES, Curvature, build_curvature
from curvops.cli.data import load_digits_tensors, make_batches
from curvops.cli.device import resolve_device
from curvops.cli.exact import dense_matrix, exact_trace, has_own_to_dense
from curvops.cli.models import layer_sizes, make_digits_cnn
from curvops.cli.progress import CountedOperator, StepBar
from curvops.cli.timing import timed
from curvops.cli.training import train
from curvops.linear_operator import LinearOperator


@dataclass(frozen=True)
class TourConfig:
    """Sizes of one tour run.

    Attributes:
        channels: Channels of the CNN's convolutions (``5`` gives :math:`D = 720`).
        num_train: Number of training images (the rest of the 1797 is the test set).
        epochs: Training epochs (Adam).
        lr: Adam's learning rate.
        batch_size: Training batch size.
        num_curvature_data: Training images the curvature matrices are defined on.
        curvature_batch_size: Batch size of the operators' data loop.
        dense_chunk: Columns of the identity per product when materialising an operator
            (the progress bar moves after each block; the default makes four blocks).
        damping: Damping :math:`\\delta` of the inverses.
        top_k: Number of top eigenvalues in the report.
        lanczos_steps: Lanczos iterations per spectral density estimate.
        lanczos_runs: Random start vectors averaged per spectral density.
        estimator_matvecs: Budgets (numbers of matrix-vector products) of the estimator curves.
        estimator_runs: Independent runs per budget.
        power_law_dim: Dimension of the power-law test matrices.
        power_law_exponents: Decay exponents of the power-law test matrices.
        trace_matvecs: Products of the trace estimates in the report.
    """

    channels: int
    num_train: int
    epochs: int
    lr: float
    batch_size: int
    num_curvature_data: int
    curvature_batch_size: int
    dense_chunk: int
    damping: float
    top_k: int
    lanczos_steps: int
    lanczos_runs: int
    estimator_matvecs: tuple[int, ...]
    estimator_runs: int
    power_law_dim: int
    power_law_exponents: tuple[float, ...]
    trace_matvecs: int


QUICK = TourConfig(
    channels=3,
    num_train=512,
    epochs=15,
    lr=0.05,
    batch_size=128,
    num_curvature_data=64,
    curvature_batch_size=64,
    dense_chunk=82,
    damping=1e-3,
    top_k=5,
    lanczos_steps=30,
    lanczos_runs=1,
    estimator_matvecs=(6, 12, 24, 48, 96),
    estimator_runs=10,
    power_law_dim=300,
    power_law_exponents=(2.0,),
    trace_matvecs=30,
)
FULL = TourConfig(
    channels=5,
    num_train=1500,
    epochs=40,
    lr=0.02,
    batch_size=64,
    num_curvature_data=256,
    curvature_batch_size=128,
    dense_chunk=180,
    damping=1e-3,
    top_k=10,
    lanczos_steps=60,
    lanczos_runs=2,
    estimator_matvecs=(6, 12, 24, 48, 96, 192),
    estimator_runs=30,
    power_law_dim=500,
    power_law_exponents=(1.0, 2.0),
    trace_matvecs=90,
)
DTYPE = torch.float64
EXACT = (Curvature.HESSIAN, Curvature.GGN, Curvature.EF, Curvature.MC)
KRONECKER = (Curvature.KFAC, Curvature.EKFAC)
DENSITY_MATRICES = (Curvature.HESSIAN, Curvature.GGN)
NUM_ESTIMATORS = 5  # Hutchinson, Hutch++, XTrace traces; Hutchinson, XDiag diagonals


def materialize(A: LinearOperator, chunk: int) -> Tensor:
    """Dense matrix of an operator, multiplying onto ``chunk`` columns of the identity at once.

    Args:
        A: The operator.
        chunk: Columns per product (bounds the memory of vectorised products).

    Returns:
        The dense ``[D_out, D_in]`` matrix.
    """
    return dense_matrix(A, chunk)


def num_params(config: TourConfig) -> int:
    """Number of parameters :math:`D` of the tour's CNN for a configuration.

    Args:
        config: The configuration.

    Returns:
        :math:`D`.
    """
    return sum(p.numel() for p in make_digits_cnn(channels=config.channels).parameters())


def count_steps(config: TourConfig) -> dict[str, int]:
    """Steps of each stage of a tour run, as counted by its progress bar.

    NOTE [command-line progress] in :mod:`curvops.cli.progress`: one step is one epoch, one
    block of columns of a dense matrix, one estimate or one figure.

    Args:
        config: The configuration.

    Returns:
        Stage name -> number of steps.
    """
    D = num_params(config)
    dense_blocks = -(-D // config.dense_chunk)
    return {
        "train": config.epochs,
        # per exact operator: set-up and timed products, then the dense blocks; per
        # Kronecker operator one step; then gradient timing and the heatmaps
        "operators": len(EXACT) * (1 + dense_blocks) + len(KRONECKER) + 1,
        "inverses": 1,
        # every matrix's eigenvalues and trace estimate, eigsh on Hessian and GGN
        "eigenvalues": len(EXACT) + len(KRONECKER) + len(DENSITY_MATRICES),
        "densities": 2 * len(DENSITY_MATRICES) + 1,
        "estimators": (1 + len(config.power_law_exponents)) * NUM_ESTIMATORS + 1,
    }


@dataclass
class _Tour:
    """State shared by the stages of one tour run."""

    out: Path
    config: TourConfig
    seed: int
    device: torch.device
    gen: torch.Generator
    bar: StepBar | None = None
    results: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = None
    loss_func: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    data: list = field(default_factory=list)
    operators: dict[Curvature, LinearOperator] = field(default_factory=dict)
    counted: dict[Curvature, list[CountedOperator]] = field(default_factory=dict)
    dense: dict[Curvature, Tensor] = field(default_factory=dict)
    eigenvalues: dict[Curvature, Tensor] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def label(self, text: str, *, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.label(text, force=force)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.step(n)

    def count_products(self, c: Curvature, what: str) -> CountedOperator:
        """The operator of ``c``, counting its products and showing them in the label."""
        stage_columns = 0

        def show(k: int) -> None:
            nonlocal stage_columns
            stage_columns += k
            self.label(f"{what} ({stage_columns} products)")

        counted = CountedOperator(self.operators[c], show)
        self.counted.setdefault(c, []).append(counted)
        return counted

    def products(self) -> dict[str, int]:
        """Columns multiplied with each operator so far."""
        return {c.value: sum(op.columns for op in ops) for c, ops in self.counted.items()}


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).double().mean())


def _train_stage(t: _Tour) -> None:
    """Train the CNN; keep the curvature data and save the trained state."""
    cfg = t.config
    X, y = load_digits_tensors(dtype=DTYPE, device=t.device, generator=t.gen)
    Xtr, ytr = X[: cfg.num_train], y[: cfg.num_train]
    Xte, yte = X[cfg.num_train :], y[cfg.num_train :]
    # train in float32 (PyTorch's float64 convolutions are several times slower on CPUs),
    # then analyse the trained net in float64 for accurate dense references
    model = make_digits_cnn(channels=cfg.channels, seed=t.seed, dtype=torch.float32)
    model = model.to(t.device)
    batches = make_batches(Xtr.float(), ytr, cfg.batch_size)

    def on_epoch(epoch: int, loss: float) -> None:
        t.label(f"train: epoch {epoch}/{cfg.epochs}, loss {loss:.3f}")
        t.step()

    history, seconds = timed(
        train,
        t.device,
        model,
        t.loss_func,
        batches,
        epochs=cfg.epochs,
        lr=cfg.lr,
        on_epoch=on_epoch,
    )
    t.model = model.to(DTYPE).eval()
    t.results["training"] = {
        "num_params": t.dim,
        "layers": layer_sizes(t.model),
        "final_train_loss": history[-1] if history else None,
        "train_accuracy": _accuracy(t.model, Xtr, ytr),
        "test_accuracy": _accuracy(t.model, Xte, yte),
        "seconds": seconds,
    }
    Xc, yc = Xtr[: cfg.num_curvature_data], ytr[: cfg.num_curvature_data]
    t.data = make_batches(Xc, yc, cfg.curvature_batch_size)
    state = {"state_dict": t.model.state_dict(), "X": Xc.cpu(), "y": yc.cpu()}
    torch.save({**state, "channels": cfg.channels}, t.out / "tour_state.pt")
    t.files["state"] = "tour_state.pt"


def _operators_stage(t: _Tour) -> None:
    """Create every operator, time its products, materialise it and plot the heatmaps."""
    from curvops.cli import plots

    params = list(t.model.parameters())
    probe = torch.randn(t.dim, generator=t.gen, dtype=DTYPE).to(t.device)
    timings: dict[str, dict[str, float]] = {}
    dense_blocks = -(-t.dim // t.config.dense_chunk)
    for c in EXACT + KRONECKER:
        t.label(f"operators: {TITLES[c]} set-up", force=True)
        op, t_build = timed(
            build_curvature,
            t.device,
            c,
            t.model,
            t.loss_func,
            params,
            t.data,
            check_deterministic=False,
            seed=t.seed,
        )
        t.operators[c] = op
        counted = t.count_products(c, f"operators: {TITLES[c]} products")
        _, t_first = timed(counted.__matmul__, t.device, probe)  # includes lazy set-up
        _, t_matvec = timed(counted.__matmul__, t.device, probe)
        planned = dense_blocks if c in EXACT else 0
        if c in EXACT:
            t.step()
        done = 0

        def on_block(i: int, total: int, c: Curvature = c, planned: int = planned) -> None:
            nonlocal done
            t.label(f"operators: {TITLES[c]} dense {i}/{total}", force=True)
            target = planned * i // total
            t.step(target - done)
            done = target

        # an operator whose class materialises itself (structured operators, or a faster
        # to_dense() of its own) does so in one step, outside the product count
        own = has_own_to_dense(op)
        chunk = t.config.dense_chunk if c in EXACT else t.dim
        t.dense[c], t_dense = timed(dense_matrix, t.device, op if own else counted, chunk, on_block)
        if c in KRONECKER:
            t.step()
        timings[c.value] = {
            "construct_s": t_build,
            "first_matvec_s": t_first,
            "matvec_s": t_matvec,
            "dense_s": t_dense,
            "dense_method": "to_dense()" if own else f"blocks of {min(chunk, t.dim)} columns",
        }
    t.label("operators: gradient and heatmaps", force=True)
    for _ in range(2):  # the second call is the warm one
        _, t_grad = timed(t.operators[Curvature.GGN].gradient_and_loss, t.device)
    t.results["timings"] = {"gradient_s": t_grad, "operators": timings}
    t.files["curvature_matrices"] = plots.plot_heatmaps(
        {TITLES[c]: t.dense[c] for c in EXACT + KRONECKER},
        layer_sizes(t.model),
        t.out / "curvature_matrices.png",
        suptitle=f"Curvature matrices of a CNN on digits (D={t.dim}, "
        f"N={t.config.num_curvature_data})",
    ).name
    t.step()


def _inverses_stage(t: _Tour) -> None:
    """Damped inverses: dense solves of GGN and EF, structured inverses of KFAC and EKFAC."""
    from curvops.cli import plots
    from curvops.kronecker import EKFACInverseLinearOperator, KFACInverseLinearOperator

    delta = t.config.damping
    t.label("inverses: damped inverses", force=True)
    eye = torch.eye(t.dim, dtype=DTYPE, device=t.device)
    inverses = {
        Curvature.GGN: torch.linalg.inv(t.dense[Curvature.GGN] + delta * eye),
        Curvature.EF: torch.linalg.inv(t.dense[Curvature.EF] + delta * eye),
        Curvature.KFAC: KFACInverseLinearOperator(
            t.operators[Curvature.KFAC], damping=delta, use_exact_damping=True
        ).to_dense(),
        Curvature.EKFAC: EKFACInverseLinearOperator(
            t.operators[Curvature.EKFAC], damping=delta
        ).to_dense(),
    }
    names = {c: f"({TITLES[c]} + {delta:g} I)^-1" for c in inverses}
    t.files["inverse_matrices"] = plots.plot_heatmaps(
        {names[c]: M for c, M in inverses.items()},
        layer_sizes(t.model),
        t.out / "inverse_matrices.png",
        suptitle=f"Damped inverses (damping {delta:g})",
        ncols=2,
    ).name
    t.results["inverses"] = {
        names[c]: {
            "relative_residual": float(
                torch.linalg.matrix_norm(M @ (t.dense[c] + delta * eye) - eye)
                / torch.linalg.matrix_norm(eye)
            )
        }
        for c, M in inverses.items()
    }
    t.step()


def _spectra_stage(t: _Tour) -> None:
    """Exact eigenvalues and traces, Lanczos top eigenvalues, Hutch++ trace estimates."""
    from curvops.linalg import eigsh, hutchpp_trace

    cfg = t.config
    spectra: dict[str, Any] = {}
    estimates: dict[str, Any] = {}
    for c, M in t.dense.items():
        t.label(f"eigenvalues: {TITLES[c]} eigh", force=True)
        t.eigenvalues[c] = torch.linalg.eigvalsh(M)
        exact_trace_value = float(M.trace())
        entry = {
            "exact_trace": exact_trace_value,
            "exact_top_eigenvalues": t.eigenvalues[c].flip(0)[: cfg.top_k].tolist(),
            "min_eigenvalue": float(t.eigenvalues[c][0]),
        }
        # the operator's own trace (KFAC, EKFAC: closed forms), where it offers one
        own = exact_trace(t.operators[c])
        if own is not None:
            entry["operator_trace"] = float(own)
        if c in DENSITY_MATRICES:
            A = t.count_products(c, f"eigenvalues: {TITLES[c]} eigsh")
            (evals, _), seconds = timed(
                eigsh, t.device, A, k=cfg.top_k, which="LA", generator=t.gen
            )
            entry["eigsh_top_eigenvalues"] = evals.flip(0).tolist()
            entry["eigsh_s"] = seconds
            entry["eigsh_products"] = A.columns
            t.step()
        spectra[c.value] = entry
        A = t.count_products(c, f"eigenvalues: {TITLES[c]} Hutch++")
        (estimate, error), seconds = timed(
            hutchpp_trace,
            t.device,
            A,
            cfg.trace_matvecs,
            generator=t.gen,
            return_error=True,
        )
        estimates[c.value] = {
            "estimate": float(estimate),
            "standard_error": float(error),
            "relative_error": abs(float(estimate) - exact_trace_value) / abs(exact_trace_value),
            "num_matvecs": cfg.trace_matvecs,
            "seconds": seconds,
        }
        t.step()
    t.results["spectra"] = spectra
    t.results["trace_estimates"] = estimates


def _densities_stage(t: _Tour) -> None:
    """Spectral densities of Hessian and GGN by stochastic Lanczos quadrature (Papyan, 2020)."""
    from curvops.cli import plots
    from curvops.linalg import lanczos_approximate_log_spectrum, lanczos_approximate_spectrum

    epsilon = 1e-5
    ncv = min(t.config.lanczos_steps, t.dim)
    # kernel width = 8 grid spacings = 1/64 of the interval, about one histogram bin
    kwargs = {
        "ncv": ncv,
        "num_repeats": t.config.lanczos_runs,
        "generator": t.gen,
        "num_points": 512,
        "kappa": 8.0,
    }
    panels, seconds = {}, {}
    for c in DENSITY_MATRICES:
        op = t.count_products(c, f"densities: {TITLES[c]} Lanczos")
        (grid, density), t_density = timed(lanczos_approximate_spectrum, t.device, op, **kwargs)
        t.step()
        op = t.count_products(c, f"densities: {TITLES[c]} log-spectrum Lanczos")
        (log_grid, log_density), t_log = timed(
            lanczos_approximate_log_spectrum, t.device, op, epsilon=epsilon, **kwargs
        )
        t.step()
        exact = t.eigenvalues[c]
        panels[f"{TITLES[c]}: spectral density"] = plots.DensityPanel(grid, density, exact)
        panels[f"{TITLES[c]}: log-spectral density"] = plots.DensityPanel(
            log_grid,
            log_density,
            torch.log(exact.abs() + epsilon),
            xlabel=r"$\nu = \log(|\lambda| + 10^{-5})$",
        )
        seconds[c.value] = {"density_s": t_density, "log_density_s": t_log}
    t.label("densities: figure", force=True)
    t.files["spectral_densities"] = plots.plot_densities(
        panels, t.out / "spectral_densities.png"
    ).name
    t.step()
    t.results["densities"] = {
        "lanczos_steps": ncv,
        "runs": t.config.lanczos_runs,
        "timings": seconds,
    }


def _estimators_stage(t: _Tour) -> None:
    """Accuracy of trace and diagonal estimators on the GGN and power-law matrices."""
    from curvops.cli import plots
    from curvops.cli.estimator_accuracy import diagonal_errors, power_law_matrix, trace_errors
    from curvops.structured import TensorLinearOperator

    cfg = t.config
    G = t.dense[Curvature.GGN]
    matrices = {f"GGN of the CNN (D={t.dim})": (G + G.T) / 2}
    for p in cfg.power_law_exponents:
        matrices[f"power law $i^{{-{p:g}}}$ (D={cfg.power_law_dim})"] = power_law_matrix(
            cfg.power_law_dim, p, generator=t.gen, dtype=DTYPE, device=t.device
        )
    budgets, runs = cfg.estimator_matvecs, cfg.estimator_runs
    trace, diagonal = {}, {}
    for i, (name, M) in enumerate(matrices.items()):
        what = f"estimators: matrix {i + 1}/{len(matrices)}"

        def on_step(estimator: str, what: str = what, kind: str = "trace") -> None:
            t.label(f"{what}, {kind} {estimator} done", force=True)
            t.step()

        # the matrices are symmetric by construction: one operator for all estimator runs
        A = TensorLinearOperator(M, symmetric=True)
        t.label(f"{what}, traces", force=True)
        trace[name] = trace_errors(
            A, float(M.trace()), budgets, runs, generator=t.gen, on_step=on_step
        )
        t.label(f"{what}, diagonals", force=True)
        diagonal[name] = diagonal_errors(
            A,
            M.diagonal(),
            budgets,
            runs,
            generator=t.gen,
            on_step=lambda e, what=what: on_step(e, what, "diagonal"),
        )
    panels = {
        f"trace: {name}": plots.ErrorPanel(curves, r"$|\hat t - t| / |t|$")
        for name, curves in trace.items()
    }
    diagonal_label = r"$\max_i |a_i - \hat a_i| / \max_j |a_j|$"
    for name, curves in diagonal.items():
        panels[f"diagonal: {name}"] = plots.ErrorPanel(curves, diagonal_label)
    t.label("estimators: figure", force=True)
    t.files["estimator_accuracy"] = plots.plot_error_curves(
        panels, t.out / "estimator_accuracy.png", ncols=len(matrices)
    ).name
    t.step()

    def medians(curves_by_matrix):
        return {
            matrix: {e: np.median(errors, axis=1).tolist() for e, (_, errors) in curves.items()}
            for matrix, curves in curves_by_matrix.items()
        }

    t.results["estimators"] = {
        "budgets": list(budgets),
        "runs": runs,
        "median_trace_error": medians(trace),
        "median_diagonal_error": medians(diagonal),
    }


_STAGES = (
    ("train", _train_stage),
    ("operators", _operators_stage),
    ("inverses", _inverses_stage),
    ("eigenvalues", _spectra_stage),
    ("densities", _densities_stage),
    ("estimators", _estimators_stage),
)


def run_tour_pipeline(
    out: Path,
    *,
    config: TourConfig,
    seed: int,
    device: torch.device,
    progressbar: bool = True,
) -> dict[str, Any]:
    """Run the whole tour and write its files into ``out``.

    Args:
        out: Output folder (created if needed).
        config: Sizes of the run (:data:`QUICK` or :data:`FULL`).
        seed: Seed of data split, initialisation and every estimator (a private CPU
            generator; the global RNG is not touched).
        device: Device to compute on.
        progressbar: Show one progress bar over the steps of all stages (NOTE
            [command-line progress] in :mod:`curvops.cli.progress`).

    Returns:
        The results also written to ``results.json``.
    """
    from curvops.cli import report

    out.mkdir(parents=True, exist_ok=True)
    tour = _Tour(out, config, seed, device, torch.Generator().manual_seed(seed))
    tour.results.update({"config": asdict(config), "seed": seed, "device": str(device)})
    seconds: dict[str, float] = {}
    steps = count_steps(config)
    with StepBar(sum(steps.values()), "curvops tour", enabled=progressbar) as bar:
        tour.bar = bar
        for name, stage in _STAGES:
            _, seconds[name] = timed(stage, device, tour)
    tour.results["files"] = tour.files
    tour.results["stage_seconds"] = seconds
    tour.results["steps"] = steps
    tour.results["products"] = tour.products()
    (out / "results.json").write_text(json.dumps(tour.results, indent=2))
    (out / "report.md").write_text(report.tour_report(tour.results))
    return tour.results


def run_tour(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``curvops tour`` from parsed arguments.

    Args:
        args: Parsed arguments (``out``, ``quick``, ``seed``, ``device``, ``no_progress``).

    Returns:
        The results (see :func:`run_tour_pipeline`).
    """
    device = resolve_device(args.device)
    out = Path(args.out)
    start = time.perf_counter()
    results = run_tour_pipeline(
        out,
        config=QUICK if args.quick else FULL,
        seed=args.seed,
        device=device,
        progressbar=not args.no_progress,
    )
    figures = sorted(f for f in results["files"].values() if f.endswith(".png"))
    print(
        f"curvops tour: wrote {', '.join(figures)}, report.md, results.json and "
        f"tour_state.pt to {out}/ in {time.perf_counter() - start:.1f} s"
    )
    return results
