"""The ``curvops`` entry point: help, usage errors, thread setting, ``python -m curvops``."""

import subprocess
import sys

import pytest
import torch

from curvops.cli.device import resolve_device
from curvops.cli.main import build_parser, main


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tour", "--help"])
    assert info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_unknown_command_is_a_one_line_error(capsys):
    assert main(["tuor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'tuor'" in err[0]
    assert err[0].startswith("curvops: error: ")


def test_bad_threads(capsys, tmp_path):
    threads = torch.get_num_threads()
    assert main(["tour", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be a positive integer, got 0" in capsys.readouterr().err
    assert torch.get_num_threads() == threads


def test_bad_integer_option(capsys):
    assert main(["tour", "--seed", "abc"]) == 2
    err = capsys.readouterr().err
    assert "curvops tour: error: argument --seed: invalid int value: 'abc'" in err


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_parser_knows_both_commands():
    parser = build_parser()
    args = parser.parse_args(["analyze", "--model", "m:f", "--data", "d:f"])
    assert (args.curvature, args.loss, args.what) == ("ggn", "ce", "top-eig,trace,diag,density")
    assert parser.parse_args(["tour"]).out == "curvops-tour"


def test_python_dash_m_reports_usage_errors_with_exit_code_2():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curvops",
            "analyze",
            "--model",
            "a:b",
            "--data",
            "c:d",
            "--curvature",
            "laplacian",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "curvops analyze: error: unknown curvature 'laplacian'; use one of "
        "hessian|ggn|ef|mc|kfac|ekfac."
    )
