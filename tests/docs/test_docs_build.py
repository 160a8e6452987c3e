"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing objects)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "mkdocstrings", "material")),
    reason="mkdocs, mkdocstrings or mkdocs-material is not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (site / "index.html").is_file()
    api = (site / "api" / "curvature" / "index.html").read_text()
    assert "GGNLinearOperator" in api and "HessianLinearOperator" in api
    # the examples pages include the scripts themselves
    page = (site / "examples" / "obs_pruning" / "index.html").read_text()
    assert "hutchinson_diag" in page
    for figure in ("curvature_matrices.png", "estimator_accuracy.png"):
        assert (site / "assets" / "tour" / figure).is_file()
    shutil.rmtree(site)
