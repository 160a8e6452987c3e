"""Smoke test of the benchmark suite on tiny problems, and its input errors."""

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.problems import make_problem, problem_names
from benchmarks.report import markdown, verdict
from benchmarks.runner import run_suite
from benchmarks.tasks import TASKS_BY_NAME, setup
from benchmarks.timing import time_task


def test_suite_measures_time_and_memory_on_a_tiny_problem():
    results = run_suite(
        ["mlp"],
        ["gradient", "ggn_mvp", "kfac_mvp"],
        quick=True,
        repeats=2,
        warmup=1,
        compare=False,
        threads=1,
        clock="cpu",
    )
    grad = results.get("mlp", "gradient", "curvops")
    ggn = results.get("mlp", "ggn_mvp", "curvops")
    assert grad.error is None and ggn.error is None, (grad.error, ggn.error)
    assert grad.memory == pytest.approx(1.0)
    assert ggn.time > 0 and ggn.memory_bytes is not None and ggn.memory_bytes >= 0
    assert results.config["memory_method"] in ("VmHWM", "ru_maxrss")
    text = markdown(results, ["extra note"])
    assert "| GGN @ v |" in text and "extra note" in text and "torch_threads" not in text


def test_diagonal_tasks_and_the_dense_reference_only_on_small_problems():
    results = run_suite(
        ["mlp-small", "mlp"],
        ["gradient", "mc_diag", "ggn_dense"],
        quick=True,
        repeats=1,
        warmup=0,
        memory=False,
        compare=False,
        threads=1,
        clock="cpu",
    )
    measured = [("mlp-small", "mc_diag"), ("mlp-small", "ggn_dense"), ("mlp", "mc_diag")]
    for problem, task in measured:
        m = results.get(problem, task, "curvops")
        assert m.error is None and m.time > 0, (problem, task, m.error)
    assert results.problems["mlp-small"]["num_params"] == 2410
    assert results.get("mlp", "ggn_dense", "curvops") is None  # D too large: skipped
    problem = make_problem("mlp-small")
    for task in ("ggn_diag", "ef_diag"):
        assert setup(task, problem, "curvops")().shape == (2410,)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "gpt"])
def test_every_cpu_problem_and_its_closures_run(name):
    problem = make_problem(name, quick=True)
    for task in ("gradient", "ggn_mvp", "hessian_mvp"):
        result = setup(task, problem, "curvops")()
        assert all(torch.isfinite(torch.as_tensor(r)).all() for r in result)


def test_cli_writes_report_json_and_plot(tmp_path):
    out = tmp_path / "RESULTS.md"
    code = main(
        ["--quick", "--problems", "mlp", "--tasks", "gradient,ef_mvp", "--no-memory"]
        + ["--no-compare", "--threads", "1", "--out", str(out)]
    )
    assert code == 0
    assert "EF @ v" in out.read_text()
    assert (tmp_path / "RESULTS.json").exists() and (tmp_path / "results_cpu.png").exists()
    again = tmp_path / "again" / "RESULTS.md"
    again.parent.mkdir()
    (again.parent / "NOTES.md").write_text("a note on the results")
    assert main(["--from-json", str(tmp_path / "RESULTS.json"), "--out", str(again)]) == 0
    text = again.read_text()
    assert "EF @ v" in text and "a note on the results" in text


def test_input_errors():
    with pytest.raises(KeyError, match="Unknown problem 'vgg'"):
        make_problem("vgg")
    with pytest.raises(ValueError, match="sized for a GPU"):
        make_problem("resnet50", "cpu")
    problem = make_problem("mlp", quick=True)
    with pytest.raises(KeyError, match="Unknown task 'svd'"):
        setup("svd", problem, "curvops")
    with pytest.raises(KeyError, match="Unknown implementation 'jax'"):
        setup("ggn_mvp", problem, "jax")
    fn = setup("gradient", problem, "curvops")
    with pytest.raises(ValueError, match="Unknown clock 'sundial'"):
        time_task(fn, fn, None, device=torch.device("cpu"), repeats=1, warmup=0, clock="sundial")
    with pytest.raises(SystemExit, match="Unknown problems"):
        main(["--problems", "vgg"])
    with pytest.raises(SystemExit, match="use --device cuda"):
        main(["--problems", "gpt124m"])
    assert set(problem_names()) >= {"mlp", "cnn", "resnet", "gpt", "resnet50", "gpt124m"}


def test_verdict():
    task = TASKS_BY_NAME["ggn_mvp"]

    class M:
        error, time, memory, vs_curvlinops = None, 1.5, 1.2, 0.5

    assert verdict(task, M(), compare=True) == "met"
    M.time = 1.7
    assert verdict(task, M(), compare=True) == "missed: time 1.70>1.6"
