"""Data parallelism: summing the data loop's partial results across processes.

Each process passes its own shard of the data; every product is the product of the whole data
set's curvature. The data loop sums per-batch results locally, then once across processes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class ProcessGroupHandle:
    """The process group an operator sums over (or none).

    Args:
        process_group: ``None`` uses the world group when ``torch.distributed`` is initialised
            (and no group otherwise); ``False`` opts out (the local data is everything); any
            other value is a ``torch.distributed`` process group.

    Raises:
        RuntimeError: If a group is given but ``torch.distributed`` is not initialised.
    """

    def __init__(self, process_group: Any = None):
        initialized = dist.is_available() and dist.is_initialized()
        if process_group is False:
            self.active, self.group = False, None
        elif process_group is None:
            self.active, self.group = initialized, None
        else:
            if not initialized:
                raise RuntimeError(
                    "A process_group was given but torch.distributed is not initialised. Call "
                    "torch.distributed.init_process_group first (e.g. under torchrun)."
                )
            self.active, self.group = True, process_group

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 when not distributed)."""
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        """Number of processes in the group (1 when not distributed)."""
        return dist.get_world_size(self.group) if self.active else 1

    def _comm_device(self, device: torch.device) -> torch.device:
        backend = dist.get_backend(self.group)
        return device if backend == "nccl" else torch.device("cpu")

    def all_reduce_(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum tensors across the group in place (no-op when not distributed)."""
        if not self.active:
            return tensors
        for t in tensors:
            comm = t.to(self._comm_device(t.device))
            dist.all_reduce(comm, op=dist.ReduceOp.SUM, group=self.group)
            if comm is not t:
                t.copy_(comm)
        return tensors

    def global_num_data(self, local: int) -> int:
        """Total number of data over all processes; checks that every shard is non-empty."""
        if not self.active:
            return local
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([local], dtype=torch.long), group=self.group)
        counts = [int(c) for c in counts]
        empty = [r for r, c in enumerate(counts) if c == 0]
        if empty:
            raise ValueError(
                f"The data shards of rank(s) {empty} are empty (data per rank: {counts}). Give "
                "every process at least one batch."
            )
        return sum(counts)
