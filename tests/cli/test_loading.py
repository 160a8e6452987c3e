import pytest

from curvops.cli.errors import CLIError
from curvops.cli.loading import call_factory, load_factory


def test_load_dotted_attribute_from_module():
    factory = load_factory("curvops.cli.models:make_digits_mlp", "model")
    assert factory(hidden=2).fc1.out_features == 2
    nested = load_factory("pathlib:Path.cwd", "data")
    assert callable(nested)


def test_load_from_file_twice_gives_fresh_modules(factories):
    a = load_factory(f"{factories}:model", "model")
    b = load_factory(f"{factories}:model", "model")
    assert a is not b or a.__module__ == b.__module__


def test_call_factory_wraps_exceptions():
    def broken():
        raise KeyError("x")

    with pytest.raises(CLIError, match="'spec': calling the factory raised KeyError"):
        call_factory(broken, "spec")


def test_module_raising_non_import_error(tmp_path, monkeypatch):
    (tmp_path / "curvops_test_badmod.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CLIError, match="importing 'curvops_test_badmod' raised ZeroDivisionError"):
        load_factory("curvops_test_badmod:f", "model")
