"""``curvops analyze`` on trained weights: state-dict files (safe) and pickled models (opt-in)."""

import json
import sys

import pytest
import torch
from torch import nn

from curvops.cli.checkpoints import is_model_file
from curvops.cli.main import main
from curvops.testing import dense_ggn


def _tiny(factories):
    sys.path.insert(0, str(factories.parent))
    try:
        import tiny_factories
    finally:
        sys.path.remove(str(factories.parent))
    return tiny_factories


def _trained(tiny):
    """The tiny model with other weights than its factory's (as if trained)."""
    model = tiny.model()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.3 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + i).reshape(p.shape))
    return model


def _analyze(factories, tmp_path, model_args, *extra):
    out = tmp_path / "out"
    code = main(
        [
            "analyze",
            *model_args,
            "--data",
            f"{factories}:classification_data",
            "--what",
            "top-eig,trace",
            "--num-matvecs",
            "69",  # D = 23: Hutch++ sketches every direction, the trace is exact
            "--top-k",
            "2",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    return code, out


def _assert_matches_ggn_of(out, model, tiny):
    G = dense_ggn(
        model, nn.CrossEntropyLoss(), list(model.parameters()), tiny.classification_data()
    )
    a = json.loads((out / "results.json").read_text())["analyses"]
    assert a["trace"]["estimate"] == pytest.approx(float(G.trace()), rel=1e-8)
    torch.testing.assert_close(
        torch.tensor(a["top-eig"]["eigenvalues"], dtype=torch.float64),
        torch.linalg.eigvalsh(G).flip(0)[:2],
        rtol=1e-8,
        atol=1e-10,
    )


def test_state_dict_file_is_loaded_into_the_factory_model(factories, tmp_path):
    tiny = _tiny(factories)
    trained = _trained(tiny)
    path = tmp_path / "weights.pt"
    torch.save({k: v.float() for k, v in trained.state_dict().items()}, path)  # float32 file
    code, out = _analyze(
        factories, tmp_path, ["--model", f"{factories}:model"], "--weights", str(path)
    )
    assert code == 0
    _assert_matches_ggn_of(out, trained, tiny)
    assert json.loads((out / "results.json").read_text())["weights"] == str(path)
    # without the weights the numbers differ (the factory's initial weights)
    initial = tiny.model()
    G0 = dense_ggn(
        initial, nn.CrossEntropyLoss(), list(initial.parameters()), tiny.classification_data()
    )
    trace = json.loads((out / "results.json").read_text())["analyses"]["trace"]["estimate"]
    assert abs(trace - float(G0.trace())) > 1e-3 * abs(trace)


@pytest.mark.parametrize("key", [None, "model_state_dict", "weights"])
def test_checkpoint_dictionary(factories, tmp_path, key):
    tiny = _tiny(factories)
    trained = _trained(tiny)
    path = tmp_path / "checkpoint.pt"
    entry = "model_state_dict" if key is None else key
    torch.save({"epoch": 7, entry: trained.state_dict(), "optimizer": {"lr": 0.1}}, path)
    extra = ["--weights", str(path)] + ([] if key is None else ["--weights-key", key])
    code, out = _analyze(factories, tmp_path, ["--model", f"{factories}:model"], *extra)
    assert code == 0
    _assert_matches_ggn_of(out, trained, tiny)


def test_pickled_model_needs_trust_pickle(factories, tmp_path, capsys):
    tiny = _tiny(factories)
    trained = _trained(tiny)
    path = tmp_path / "model.pt"
    torch.save(trained, path)
    code, _ = _analyze(factories, tmp_path, ["--model", str(path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "unpickles arbitrary Python objects (torch.load(weights_only=False))" in err
    assert "Pass --trust-pickle if you made the file yourself or trust it" in err
    code, out = _analyze(factories, tmp_path, ["--model", str(path), "--trust-pickle"])
    assert code == 0
    _assert_matches_ggn_of(out, trained, tiny)


def _error(capsys, factories, tmp_path, model_args, *extra):
    code, out = _analyze(factories, tmp_path, model_args, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_weights_errors(factories, tmp_path, capsys):
    tiny = _tiny(factories)
    model_args = ["--model", f"{factories}:model"]

    err = _error(capsys, factories, tmp_path, model_args, "--weights", str(tmp_path / "no.pt"))
    assert "--weights" in err and "file does not exist" in err

    full = tmp_path / "full.pt"
    torch.save(tiny.model(), full)
    err = _error(capsys, factories, tmp_path, model_args, "--weights", str(full))
    assert "safe loading (weights_only=True) refuses" in err
    assert "torch.save(model.state_dict(), path)" in err

    other = tmp_path / "other.pt"
    torch.save(nn.Linear(4, 2).state_dict(), other)
    err = _error(capsys, factories, tmp_path, model_args, "--weights", str(other))
    assert "do not fit the model: missing 0.weight, 0.bias, 2.weight, 2.bias" in err

    wrapped = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in tiny.model().state_dict().items()}, wrapped)
    err = _error(capsys, factories, tmp_path, model_args, "--weights", str(wrapped))
    assert "save model.module.state_dict() instead" in err

    shapes = tmp_path / "shapes.pt"
    bad = dict(tiny.model().state_dict(), **{"0.bias": torch.zeros(5, dtype=torch.float64)})
    torch.save(bad, shapes)
    err = _error(capsys, factories, tmp_path, model_args, "--weights", str(shapes))
    assert "'0.bias' has shape (5,) in the file but (3,) in the model" in err

    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "net": tiny.model().state_dict()}, checkpoint)
    err = _error(capsys, factories, tmp_path, model_args, "--weights", str(checkpoint))
    assert "without a state dict among its entries (epoch, net)" in err and "--weights-key" in err
    err = _error(
        capsys,
        factories,
        tmp_path,
        model_args,
        "--weights",
        str(checkpoint),
        "--weights-key",
        "opt",
    )
    assert "--weights-key 'opt' is not an entry of" in err

    err = _error(capsys, factories, tmp_path, model_args, "--weights-key", "net")
    assert "--weights-key needs --weights" in err

    state = tmp_path / "state.pt"
    torch.save(tiny.model().state_dict(), state)
    err = _error(capsys, factories, tmp_path, ["--model", str(state), "--trust-pickle"])
    assert "holds a state dict (tensors only), not a whole model: pass it as --weights" in err
    torch.save([1, 2], state)
    err = _error(capsys, factories, tmp_path, ["--model", str(state), "--trust-pickle"])
    assert "holds a list, not a torch.nn.Module" in err


def test_is_model_file():
    assert is_model_file("runs/model.pt") and is_model_file("net.PTH") and is_model_file("m.ckpt")
    assert not is_model_file("setup.py:model") and not is_model_file("pkg.models:build")
    assert not is_model_file("weights.pt:factory")


def test_pickled_model_whose_class_cannot_be_imported(factories, tmp_path, capsys, monkeypatch):
    module = tmp_path / "my_net_module.py"
    module.write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_net_module

    path = tmp_path / "net.pt"
    torch.save(my_net_module.Net().double(), path)
    monkeypatch.delitem(sys.modules, "my_net_module")
    module.unlink()
    err = _error(capsys, factories, tmp_path, ["--model", str(path), "--trust-pickle"])
    assert "the pickled model refers to code that cannot be imported here" in err
    assert "No module named 'my_net_module'" in err
