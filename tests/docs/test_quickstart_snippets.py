"""The Python snippets of ``docs/quickstart.md`` run, in order, in one namespace."""

import re
from pathlib import Path

import torch

QUICKSTART = Path(__file__).parents[2] / "docs" / "quickstart.md"


def test_quickstart_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", QUICKSTART.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    namespace: dict = {}
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for block in blocks:
                exec(compile(block, str(QUICKSTART), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert 0.0 <= float(namespace["overlap"]) <= 1.0
    assert namespace["trace"].ndim == 0 and namespace["rho"].shape == (namespace["H"].shape[1],)
