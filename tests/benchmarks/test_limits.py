"""The suite under limits: per-task time limit, rows kept by a killed run, ``--resume``."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.report import markdown
from benchmarks.runner import Results, is_timeout, run_suite

ROOT = Path(__file__).resolve().parents[2]
QUICK = dict(quick=True, repeats=1, warmup=0, memory=False, compare=False, threads=1)


def test_a_task_over_its_time_limit_is_recorded_as_timeout_and_the_run_goes_on():
    seen = []
    start = time.monotonic()
    results = run_suite(
        ["mlp"],
        ["gradient", "ef_mvp", "sleep"],
        clock="cpu",
        task_timeout=15,
        on_update=lambda r: seen.append(len(r.measurements)),
        **QUICK,
    )
    assert time.monotonic() - start < 120  # the sleeping task (30 s per call) was cut
    assert results.config["task_timeout"] == 15
    for task in ("gradient", "ef_mvp"):
        m = results.get("mlp", task, "curvops")
        assert m.error is None and m.time > 0 and m.gradient_seconds > 0, (task, m.error)
    slow = results.get("mlp", "sleep", "curvops")
    assert is_timeout(slow) and slow.error == "timeout (> 15 s)" and slow.time is None
    assert seen == [1, 2, 3]  # the rows were handed over after every task
    assert multiprocessing.active_children() == []  # the child was killed and reaped
    text = markdown(results)
    row = next(line for line in text.splitlines() if line.startswith("| sleep"))
    assert "| timeout |" in row and "timeout (> 15 s)" in row
    assert "time limit per task: 15 s" in text


def _rows(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {(m["problem"], m["task"]): m for m in data["measurements"]}


def test_a_run_killed_midway_keeps_its_rows_and_resume_skips_them(tmp_path):
    out = tmp_path / "RESULTS.md"
    saved = tmp_path / "RESULTS.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--problems", "mlp"]
    command += ["--no-memory", "--no-compare", "--threads", "1", "--clock", "cpu"]
    command += ["--task-timeout", "0", "--out", str(out), "--tasks", "gradient,ef_mvp,sleep"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while ("mlp", "ef_mvp") not in (_rows(saved) if saved.exists() else {}):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no rows written within 240 s"
            time.sleep(0.2)
    finally:
        proc.kill()  # in the 'sleep' task: the run is cut like a job at its time limit
        proc.wait()
    rows = _rows(saved)
    assert set(rows) == {("mlp", "gradient"), ("mlp", "ef_mvp")}
    assert rows[("mlp", "ef_mvp")]["time"] > 0
    assert "| EF @ v |" in out.read_text()
    assert not (tmp_path / "results_cpu.png").exists()  # the plot only comes at the end

    code = main(
        ["--quick", "--problems", "mlp", "--tasks", "gradient,ef_mvp", "--no-memory"]
        + ["--no-compare", "--threads", "1", "--task-timeout", "0", "--resume"]
        + ["--out", str(out)]
    )
    assert code == 0
    again = Results.from_dict(json.loads(saved.read_text()))
    assert again.config["resumed_from"] is not None
    assert _rows(saved) == rows  # nothing measured again: the same numbers
    assert "| EF @ v |" in out.read_text() and (tmp_path / "results_cpu.png").exists()


def test_resume_needs_a_saved_run(tmp_path):
    with pytest.raises(SystemExit, match="no .*RESULTS.json to resume from"):
        main(["--resume", "--problems", "mlp", "--out", str(tmp_path / "RESULTS.md")])
