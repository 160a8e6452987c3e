"""Smoke test of ``benchmarks/kfoc_cost.py`` on the tiny MLP."""

from benchmarks.kfoc_cost import main


def test_kfoc_cost_runs_and_reports_iterations(capsys):
    argv = ["--quick", "--repeats", "1", "--warmup", "0", "--fisher-types", "mc"]
    rows = main([*argv, "--iterations", "1,2", "--uncached-iterations", "1"])
    assert [(r["operator"], r["iterations"], r["statistics"]) for r in rows[:4]] == [
        ("KFAC", "-", "-"),
        ("KFOC", "1", "cached"),
        ("KFOC", "2", "cached"),
        ("KFOC", "1", "passes"),
    ]
    assert all(r["gradients"] > 0 for r in rows)
    default = rows[-1]
    assert default["operator"] == "KFOC (defaults)"
    assert all(int(c) >= 2 for c in default["iterations"].split("/"))  # one per layer: 3 layers
    assert len(default["iterations"].split("/")) == 3
    assert "| mc | KFOC | 2 | cached |" in capsys.readouterr().out
