"""The worked example of ``docs/cli.md`` runs as written: factories, training, analyses."""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from curvops.cli.main import main

CLI_PAGE = Path(__file__).parents[2] / "docs" / "cli.md"


def _python_file(text: str, name: str) -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith(name)]
    return block


def test_train_save_analyze(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    text = CLI_PAGE.read_text()
    for name in ("setup.py", "train.py"):
        (tmp_path / name).write_text(_python_file(text, f"# {name}"))
    commands = re.findall(r"^(curvops analyze --model setup.py.*)$", text, re.M)
    assert len(commands) == 3  # untrained Hessian, trained GGN, trained KFAC
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "setup", raising=False)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        exec(compile((tmp_path / "train.py").read_text(), "train.py", "exec"), {})
    assert torch.get_num_threads() == threads
    for command in commands:
        assert main([*shlex.split(command)[1:], "--no-progress"]) == 0, command
    ggn = json.loads((tmp_path / "ggn" / "results.json").read_text())
    kfac = json.loads((tmp_path / "kfac" / "results.json").read_text())
    assert ggn["weights"] == "weights.pt" and ggn["num_params"] == 2410
    assert kfac["analyses"]["trace"]["exact"]
    for result in (ggn, kfac):  # an error bar exactly where the number is an estimate
        trace = result["analyses"]["trace"]
        assert (trace["standard_error"] is None) == trace["exact"]
    # the trained weights were used: the GGN differs from the untrained net's Hessian run
    hessian = json.loads((tmp_path / "hessian" / "results.json").read_text())
    assert hessian["weights"] is None
    top_trained = ggn["analyses"]["top-eig"]["eigenvalues"][0]
    assert top_trained != pytest.approx(hessian["analyses"]["top-eig"]["eigenvalues"][0])
    capsys.readouterr()

    # two of the documented error messages, verbatim
    documented = re.findall(r"^(curvops analyze: error: .*)$", text, re.M)
    assert main(["analyze", "--model", "setup.py:modle", "--data", "setup.py:data"]) == 2
    assert capsys.readouterr().err.strip() in documented
    from torch import nn

    narrow = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    torch.save(narrow.state_dict(), "weights.pt")
    args = ["--model", "setup.py:model", "--weights", "weights.pt", "--data", "setup.py:data"]
    assert main(["analyze", *args]) == 2
    assert capsys.readouterr().err.strip() in documented
