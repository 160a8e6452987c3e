"""Entry point of the ``curvops`` command (``python -m curvops`` does the same)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from curvops.cli.errors import EXIT_USAGE, CLIError


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become one-line :class:`CLIError` messages."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        raise CLIError(f"{message} (see `{self.prog} --help`)", prog=self.prog)


def _add_common(parser: argparse.ArgumentParser, *, threads: int | None, threads_help: str) -> None:
    parser.add_argument(
        "--device",
        default=None,
        help="device to compute on, e.g. cpu or cuda (default: cuda if available, else cpu)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (on stderr)"
    )


def build_parser() -> argparse.ArgumentParser:
    """Create the parser of the ``curvops`` command and its sub-commands.

    Returns:
        The parser.
    """
    parser = _Parser(
        prog="curvops",
        description="Curvature matrices of neural nets as linear operators: a visual tour and "
        "an analysis tool.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    tour = sub.add_parser(
        "tour",
        help="train a small CNN on the 8x8 digits and render its curvature matrices",
        description="Train a small CNN (three convolutions, one dense layer) on scikit-learn's "
        "8x8 digits and render heatmaps of its Hessian, GGN, Fishers, KFAC and EKFAC, "
        "spectral densities, estimator accuracy curves and a Markdown report.",
    )
    tour.add_argument("--out", default="curvops-tour", help="output folder (default: %(default)s)")
    tour.add_argument(
        "--quick",
        action="store_true",
        help="a smaller net, less data and fewer estimator runs (well under a minute)",
    )
    _add_common(
        tour,
        threads=1,
        threads_help="number of CPU threads for PyTorch (default: %(default)s; the tour's "
        "matrices are small, and on a shared machine more threads wait for each other)",
    )

    analyze = sub.add_parser(
        "analyze",
        help="analyse the curvature of your own model and data",
        description="Import your model and data factories, load trained weights, and analyse "
        "a curvature matrix: top eigenvalues, trace, diagonal, spectral density.",
        epilog="Trained weights: save them with torch.save(model.state_dict(), 'weights.pt') and "
        "pass --model MODULE:FACTORY --weights weights.pt; they are read with "
        "torch.load(weights_only=True), which loads only tensors and cannot run code from the "
        "file. A whole model saved with torch.save(model, 'model.pt') can be passed as --model "
        "model.pt, but loading it unpickles arbitrary objects (weights_only=False), which can "
        "run any code in the file: it needs --trust-pickle, for files you made or trust.",
    )
    analyze.add_argument(
        "--model",
        required=True,
        help="MODULE:FACTORY or FILE.py:FACTORY of a function returning an nn.Module, or a "
        "whole model saved with torch.save(model, FILE.pt) (needs --trust-pickle)",
    )
    analyze.add_argument(
        "--weights",
        default=None,
        help="a state dict saved with torch.save(model.state_dict(), FILE.pt) (or a checkpoint "
        "dictionary holding one) to load into the model; read safely (weights_only=True)",
    )
    analyze.add_argument(
        "--weights-key",
        default=None,
        help="entry of the --weights checkpoint dictionary that holds the state dict "
        "(default: the file itself, or its 'state_dict', 'model_state_dict' or 'model' entry)",
    )
    analyze.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --model FILE.pt, a whole pickled model: unpickling can run arbitrary code, "
        "use only for files you made or trust",
    )
    analyze.add_argument(
        "--data",
        required=True,
        help="MODULE:FACTORY or FILE.py:FACTORY of a function returning a re-iterable of (X, y) "
        "batches (a list or a DataLoader without shuffling)",
    )
    analyze.add_argument("--loss", default="ce", help="mse|ce|bce (default: %(default)s)")
    analyze.add_argument(
        "--curvature",
        default="ggn",
        help="hessian|ggn|ef|mc|kfac|ekfac (default: %(default)s)",
    )
    analyze.add_argument(
        "--what",
        default="top-eig,trace,diag,density",
        help="comma-separated analyses out of top-eig,trace,diag,density (default: all)",
    )
    analyze.add_argument(
        "--out", default="curvops-analysis", help="output folder (default: %(default)s)"
    )
    analyze.add_argument(
        "--num-matvecs",
        type=int,
        default=60,
        help="matrix-vector products per estimate (trace, diagonal) (default: %(default)s)",
    )
    analyze.add_argument(
        "--top-k", type=int, default=5, help="number of top eigenvalues (default: %(default)s)"
    )
    analyze.add_argument(
        "--lanczos-steps",
        type=int,
        default=40,
        help="Lanczos steps of the spectral density (default: %(default)s)",
    )
    analyze.add_argument(
        "--dtype",
        default="float64",
        help="float32|float64: model and data are cast to it (default: %(default)s)",
    )
    _add_common(
        analyze,
        threads=None,
        threads_help="number of CPU threads for PyTorch (default: PyTorch's choice; 1 is "
        "fastest on a busy machine)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvops`` command.

    Args:
        argv: Command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for usage errors (one line on stderr).
    """
    parser = build_parser()
    args = None
    threads_before = torch.get_num_threads()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.threads is not None:
            if args.threads < 1:
                raise CLIError(f"--threads must be a positive integer, got {args.threads}.")
            torch.set_num_threads(args.threads)
        if args.command == "tour":
            from curvops.cli.tour import run_tour

            run_tour(args)
        else:
            from curvops.cli.analyze import run_analyze

            run_analyze(args)
    except CLIError as e:
        if e.prog is not None:
            prog = e.prog
        elif args is None or args.command is None:
            prog = "curvops"
        else:
            prog = f"curvops {args.command}"
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
