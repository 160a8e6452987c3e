"""The statistics passes on 2 local processes (gloo): rank seeds, and failing together.

The KFAC factor pass and EKFAC's correction pass sum their statistics with
``EmpiricalRisk.partial_sums``: a failure on one rank raises on every rank (the failing rank
its own error, the other a ``DistributedRankError``) instead of leaving the other rank
waiting in the reduction. Each rank seeds its MC generator with ``rank_seed``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two local processes, ~20 s on 2 idle cores

WORKER = Path(__file__).with_name("kfac_dist_worker.py")


@pytest.fixture(scope="module")
def results() -> list[dict]:
    world = 2
    with tempfile.TemporaryDirectory(prefix="curvops-kfac-dist-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "--rank",
                    str(rank),
                    "--world-size",
                    str(world),
                    "--init-method",
                    f"file://{tmp}/rendezvous",
                    "--out",
                    f"{tmp}/rank{rank}.json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )
            for rank in range(world)
        ]
        outputs = []
        try:
            for p in procs:
                outputs.append(p.communicate(timeout=300)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        codes = [p.returncode for p in procs]
        assert codes == [0, 0], "\n".join(f"--- rank {r} ---\n{o}" for r, o in enumerate(outputs))
        return [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]


def test_mc_factors_use_per_rank_seeds(results):
    assert [r["mc_rank_seeds"] for r in results] == ["ok", "ok"]


@pytest.mark.parametrize("check", ["kfac_failure", "ekfac_failure"])
def test_a_failing_rank_makes_every_rank_raise(results, check):
    assert results[1][check] == "RuntimeError: simulated I/O failure in the statistics pass"
    assert results[0][check].startswith("DistributedRankError: ")
    assert "failed on rank(s) [1]" in results[0][check]
    assert "simulated I/O failure" in results[0][check]


def test_ranks_stay_in_step_after_failures(results):
    assert [r["still_in_step"] for r in results] == ["ok", "ok"]
