"""The README's quick start runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python code block"
    namespace: dict = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exec(compile(blocks[0], str(README), "exec"), namespace)
    # the snippet's results are consistent with each other
    G, v, Gv = namespace["G"], namespace["v"], namespace["Gv"]
    torch.testing.assert_close(Gv, G @ v)
    # error bars: an error for the trace, entrywise ones for the diagonal
    assert namespace["trace_err"] > 0 and namespace["err_adaptive"] > 0
    result = namespace["result"]
    assert result.num_matvecs <= 600 and result.target_reached == (result.relative_error <= 0.02)
    assert namespace["diag_err"].shape == namespace["diag_H"].shape == (G.shape[1],)
    evals = torch.as_tensor(namespace["evals"])
    torch.testing.assert_close(
        evals.sort().values,
        torch.as_tensor(namespace["scipy_evals"]).sort().values,
        rtol=1e-3,
        atol=1e-5,
    )
