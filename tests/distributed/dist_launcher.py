"""Launch the SPMD worker ``dist_worker.py`` on several local processes (gloo, CPU).

No external services: the processes rendezvous through a file in a temporary directory
(``init_method=file://...``) and talk over 127.0.0.1. Every process gets a wall-clock limit;
a hang becomes a test failure carrying the workers' output instead of a stuck suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")
TESTS = Path(__file__).resolve().parents[1]


class SessionFailed(RuntimeError):
    """A worker crashed or did not finish in time."""


def run_session(
    world_size: int, *, timeout: float = 240.0, gloo_timeout: float = 60.0
) -> list[dict]:
    """Run every check of ``dist_worker.py`` for ``world_size`` ranks; return per-rank results.

    Args:
        world_size: Number of processes.
        timeout: Wall-clock limit of the whole session in seconds.
        gloo_timeout: Timeout of each collective operation in seconds (a desynchronised
            collective fails after this time instead of hanging).

    Returns:
        One dict per rank mapping check name -> {"status": ..., "message": ..., "seconds": ...}.

    Raises:
        SessionFailed: If a worker exits with an error or the session times out.
    """
    with tempfile.TemporaryDirectory(prefix="curvops-dist-") as tmp:
        tmp_path = Path(tmp)
        # tests/ on the path for the case registry (as tests/conftest.py arranges for pytest)
        path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs, logs = [], []
        for rank in range(world_size):
            log = open(tmp_path / f"rank{rank}.log", "w")  # closed below
            logs.append(log)
            cmd = [
                sys.executable,
                str(WORKER),
                "--rank",
                str(rank),
                "--world-size",
                str(world_size),
                "--init-method",
                f"file://{tmp_path / 'rendezvous'}",
                "--out",
                str(tmp_path / f"rank{rank}.json"),
                "--gloo-timeout",
                str(gloo_timeout),
            ]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        timed_out = False
        try:
            for p in procs:
                p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        outputs = {
            rank: (tmp_path / f"rank{rank}.log").read_text()[-4000:] for rank in range(world_size)
        }
        if timed_out or any(p.returncode != 0 for p in procs):
            codes = [p.returncode for p in procs]
            detail = "\n".join(f"--- rank {r} ---\n{out}" for r, out in outputs.items())
            reason = f"timed out after {timeout} s" if timed_out else f"exit codes {codes}"
            raise SessionFailed(f"{world_size}-process session {reason}:\n{detail}")
        return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
