r"""Data parallelism: summing the data loop's partial results across processes.

NOTE [data parallelism]: when ``torch.distributed`` is initialised, every process (rank)
passes its own shard :math:`\mathbb{D}_r` of the data set
:math:`\mathbb{D} = \bigcup_r \mathbb{D}_r`. The empirical risk is a sum over data, so every
quantity linear in the batch losses splits into per-rank partial sums,

.. math::
    \mathcal{L}_\mathbb{D} = \sum_r \sum_{\mathbb{B} \subset \mathbb{D}_r}
    \frac{R_\mathbb{D}}{R_\mathbb{B}} \mathcal{L}_\mathbb{B},
    \qquad
    A v = \sum_r \sum_{\mathbb{B} \subset \mathbb{D}_r}
    \frac{R_\mathbb{D}}{R_\mathbb{B}} A_\mathbb{B} v,

with the *global* normalisation :math:`R_\mathbb{D} = 1 / N`, :math:`N = \sum_r
|\mathbb{D}_r|` for ``reduction="mean"`` (Dangel et al. (2025). Position: Curvature Matrices
Should Be Democratized via Linear Operators, eq. (7)). Each rank sums its batches locally,
then one all-reduce (a sum) gives every rank the product with the whole data set's matrix.

The protocol that keeps the ranks in step (no rank may wait forever in a collective while
another has raised):

1. *Set-up*: every rank computes a summary of its shard (number of data, parameter shapes,
   dtype, loss) and the ranks exchange them with ``all_gather_object`` *before* any
   collective with tensor payloads (:meth:`ProcessGroupHandle.gather_objects`). A rank that
   fails, an empty shard, or differing shapes raise an error on *every* rank.
2. *Every reduction* first all-reduces a small status table: one row per rank with a failure
   flag and a fingerprint (number of columns, sum, sums of absolute values and of squares) of
   the vectors being multiplied (:meth:`ProcessGroupHandle.partial_sums`). If any rank
   failed during its local pass, all ranks raise (the failing rank its own error, the
   others :class:`DistributedRankError` quoting it); if the ranks multiply different vectors
   (e.g. an estimator drawing from unsynchronised generators), all ranks raise a
   ``ValueError``. Only then is the payload reduced, in one collective per dtype.
3. *Checks that judge results* (the determinism check) evaluate each rank's own share
   without communication (:meth:`ProcessGroupHandle.local`), then exchange one flag per rank,
   so every rank reaches the same verdict and the error names the offending rank(s).

NOTE [MC seeding across ranks]: Monte-Carlo passes seed a private generator with
:meth:`ProcessGroupHandle.rank_seed`, ``seed + 7919 * rank``: reproducible per rank, different
between ranks (the would-be labels of different shards are independent draws). Random
*vectors* fed to an operator must instead be identical on every rank: draw them from
:func:`synchronized_generator`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

_SEED_STRIDE = 7919  # NOTE [MC seeding across ranks]
_FINGERPRINT_SIZE = 4  # see ProcessGroupHandle.fingerprint
_FINGERPRINT_RTOL = 1e-6  # relative tolerance on input fingerprints (see partial_sums)


_NOT_A_MEMBER = (
    "This process is not a member of the given process_group (torch.distributed.new_group "
    "returns a placeholder on ranks it does not list). Pass a group containing this rank, or "
    "process_group=False on the processes outside the group."
)


def per_rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's private Monte-Carlo generator (NOTE [MC seeding across ranks]).

    Args:
        seed: The user's seed.
        rank: The process's rank in its group (0 without distribution).

    Returns:
        ``seed + 7919 * rank``: the seed itself on rank 0 and without distribution.
    """
    return int(seed) + _SEED_STRIDE * int(rank)


class DistributedRankError(RuntimeError):
    """Raised on the ranks that did not fail when another rank failed during a collective step.

    The failing rank raises its own error; the others raise this one, quoting it, so that no
    process waits forever in a collective operation.
    """


def _is_non_member_placeholder(group: Any) -> bool:
    """Whether ``group`` is what ``new_group`` returns on the ranks it does not list."""
    placeholder = dist.GroupMember.NON_GROUP_MEMBER
    return type(group) is type(placeholder) and group == placeholder


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class ProcessGroupHandle:
    """The process group an operator sums over (or none), and the protocol that keeps ranks in step.

    See NOTE [data parallelism].

    Args:
        process_group: ``None`` (default) uses the world group when ``torch.distributed`` is
            initialised and no group otherwise; ``True`` requires the world group; ``False``
            opts out (the local data is everything); any other value must be a
            ``torch.distributed`` process group this process belongs to.

    Raises:
        RuntimeError: If ``True`` or a group is given but ``torch.distributed`` is not
            initialised.
        TypeError: If ``process_group`` is of another type.
        ValueError: If this process is not a member of the given group.
    """

    def __init__(self, process_group: Any = None):
        initialized = dist.is_available() and dist.is_initialized()
        self._local_depth = 0
        if process_group is False:
            self.active, self.group = False, None
            return
        if process_group is None:
            self.active, self.group = initialized, None
            return
        if initialized and _is_non_member_placeholder(process_group):
            raise ValueError(_NOT_A_MEMBER)
        if process_group is not True and not (
            dist.is_available() and isinstance(process_group, dist.ProcessGroup)
        ):
            raise TypeError(
                "process_group must be None (world group if torch.distributed is initialised), "
                "True (world group, required), False (no communication) or a "
                f"torch.distributed.ProcessGroup; got {type(process_group).__name__}."
            )
        if not initialized:
            raise RuntimeError(
                "A process_group was given but torch.distributed is not initialised. Call "
                "torch.distributed.init_process_group first (e.g. under torchrun), or pass "
                "process_group=False for a single process."
            )
        group = None if process_group is True else process_group
        if group is not None and dist.get_rank(group) < 0:
            raise ValueError(_NOT_A_MEMBER)
        self.active, self.group = True, group

    # ---------------------------------------------------------------- identity
    @property
    def rank(self) -> int:
        """This process's rank in the group (0 when not distributed)."""
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        """Number of processes in the group (1 when not distributed)."""
        return dist.get_world_size(self.group) if self.active else 1

    @property
    def communicating(self) -> bool:
        """Whether reductions currently communicate (active and not inside :meth:`local`)."""
        return self.active and self._local_depth == 0

    def rank_seed(self, seed: int) -> int:
        """Seed of this rank's private Monte-Carlo generator, :func:`per_rank_seed`.

        Args:
            seed: The user's seed.

        Returns:
            ``seed + 7919 * rank``: the seed itself on rank 0 and without distribution.
        """
        return per_rank_seed(seed, self.rank)

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Context in which reductions do not communicate (results stay this rank's share).

        Used by checks that judge each rank's own computation before agreeing on a verdict.
        """
        self._local_depth += 1
        try:
            yield
        finally:
            self._local_depth -= 1

    # ---------------------------------------------------------------- devices
    def _comm_device(self, device: torch.device | None = None) -> torch.device:
        """Device for tensors handed to collectives: CUDA for NCCL, else the CPU."""
        backend = str(dist.get_backend(self.group))
        if backend == "nccl":
            if device is not None and device.type == "cuda":
                return device
            return torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend and device is not None:  # e.g. "cpu:gloo,cuda:nccl"
            return device
        return torch.device("cpu")

    # ---------------------------------------------------------------- agreement
    def gather_objects(self, compute: Callable[[], T], *, what: str) -> list[T]:
        """Run ``compute`` on every rank and give every rank all ranks' results.

        Uses ``all_gather_object`` (no tensor payloads), so it is the safe first collective
        of a set-up: if ``compute`` raises on any rank, every rank raises.

        Args:
            compute: Local computation returning a picklable result.
            what: What is being done, for error messages (e.g. "setting up the data").

        Returns:
            The results of all ranks, indexed by rank (a one-element list without
            distribution).

        Raises:
            DistributedRankError: On the ranks that succeeded, if another rank failed (the
                failing rank raises its own error).
        """
        if not self.communicating:
            return [compute()]
        error: Exception | None = None
        result: Any = None
        try:
            result = compute()
        except Exception as e:  # re-raised below, on this and on all other ranks
            error = e
        gathered: list[Any] = [None] * self.world_size
        entry = ("error", _describe(error)) if error is not None else ("ok", result)
        dist.all_gather_object(gathered, entry, group=self.group)
        failed = [r for r, (status, _) in enumerate(gathered) if status == "error"]
        if failed:
            self._raise_failure(error, failed, [m for _, m in gathered], what)
        return [value for _, value in gathered]

    def exchange_status(
        self, error: Exception | None, values: Tensor | None = None, *, what: str
    ) -> Tensor:
        """Agree on success and share a few numbers per rank (one small all-reduce).

        Every rank must call this at the same point with ``values`` of the same length.

        Args:
            error: The exception this rank raised during its local computation, or ``None``.
            values: A 1-D tensor of numbers to share (e.g. a fingerprint or a flag).
            what: What was being done, for error messages.

        Returns:
            A ``[world_size, len(values)]`` float64 CPU table of every rank's ``values``.

        Raises:
            Exception: This rank's ``error``, re-raised, if it is not ``None``.
            DistributedRankError: If another rank failed.
        """
        values = torch.zeros(0) if values is None else values.detach().reshape(-1)
        n = values.numel()
        if not self.communicating:
            if error is not None:
                raise error
            return values.to("cpu", torch.float64).reshape(1, n)
        device = self._comm_device(values.device)
        status = torch.zeros(self.world_size, 1 + n, dtype=torch.float64, device=device)
        status[self.rank, 0] = float(error is not None)
        if error is None:
            status[self.rank, 1:] = values.to(device, torch.float64)
        dist.all_reduce(status, op=dist.ReduceOp.SUM, group=self.group)
        status = status.cpu()
        failed = [r for r in range(self.world_size) if status[r, 0] != 0]
        if failed:
            messages: list[Any] = [None] * self.world_size
            own = None if error is None else _describe(error)
            dist.all_gather_object(messages, own, group=self.group)
            self._raise_failure(error, failed, messages, what)
        return status[:, 1:]

    def _raise_failure(
        self, error: Exception | None, failed: list[int], messages: list[Any], what: str
    ) -> None:
        if error is not None:
            raise error
        quoted = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise DistributedRankError(
            f"{what} failed on rank(s) {failed} ({quoted}). This rank (rank {self.rank}) "
            "stops too, so that no process waits forever in a collective operation; see the "
            "failing rank's traceback."
        )

    # ---------------------------------------------------------------- reductions
    @staticmethod
    def fingerprint(inputs: Sequence[Tensor]) -> Tensor:
        """A cheap summary of tensors that identical inputs share on every rank.

        Args:
            inputs: Tensor list with a trailing column axis (the vectors being multiplied).

        Returns:
            ``[number of columns, sum, sum of absolute values, sum of squares]`` in float64.
        """
        x = torch.cat([t.reshape(-1).to(torch.float64) for t in inputs])
        columns = torch.tensor(float(inputs[0].shape[-1]), dtype=torch.float64, device=x.device)
        return torch.stack([columns, x.sum(), x.abs().sum(), x.square().sum()])

    def _check_fingerprints(self, table: Tensor, what: str) -> None:
        columns, sums, abs_sums, squares = table.unbind(dim=1)
        tol_sum = _FINGERPRINT_RTOL * abs_sums.max()
        agree = (
            bool((columns == columns[0]).all())
            and bool(((sums - sums[0]).abs() <= tol_sum).all())
            and bool(((abs_sums - abs_sums[0]).abs() <= tol_sum).all())
            and bool(((squares - squares[0]).abs() <= _FINGERPRINT_RTOL * squares.max()).all())
        )
        if agree:
            return
        rows = ", ".join(
            f"rank {r}: {int(k)} column(s), sum {s:.6g}, sum of squares {q:.6g}"
            for r, (k, s, _, q) in enumerate(table.tolist())
        )
        raise ValueError(
            f"{what}: the ranks multiplied different vectors ({rows}). A distributed operator "
            "multiplies the whole data set's matrix with one vector that every rank must pass "
            "identically. Draw random vectors from curvops.risk.distributed."
            "synchronized_generator(seed) (the same on every rank), or compute them identically "
            "on every rank."
        )

    def all_reduce_(
        self,
        tensors: list[Tensor],
        *,
        inputs: Sequence[Tensor] | None = None,
        what: str = "A reduction across processes",
    ) -> list[Tensor]:
        """Sum tensors across the group in place (no-op when not distributed).

        First exchanges a status table (and the fingerprints of ``inputs``), then reduces the
        payload with one collective per dtype.

        Args:
            tensors: This rank's partial sums (same shapes on every rank).
            inputs: Tensors every rank must hold identically (e.g. the vectors multiplied);
                compared through :meth:`fingerprint`.
            what: What is being summed, for error messages.

        Returns:
            The same tensors, now holding the sums over all ranks.

        Raises:
            ValueError: On every rank, if ``inputs`` differ between ranks.
        """
        if not self.communicating:
            return tensors
        values = None if inputs is None else self.fingerprint(inputs)
        table = self.exchange_status(None, values, what=what)
        if inputs is not None:
            self._check_fingerprints(table, what)
        self._reduce_payload(tensors)
        return tensors

    def _reduce_payload(self, tensors: list[Tensor]) -> None:
        buckets: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            buckets.setdefault(t.dtype, []).append(t)
        for bucket in buckets.values():
            device = self._comm_device(bucket[0].device)
            single = len(bucket) == 1 and bucket[0].is_contiguous()
            if single and bucket[0].device == device:
                dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=self.group)
                continue
            flat = torch.cat([t.reshape(-1).to(device) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            for t, chunk in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(chunk.view(t.shape))

    @contextlib.contextmanager
    def partial_sums(
        self,
        tensors: list[Tensor],
        *,
        inputs: Sequence[Tensor] | None = None,
        what: str = "A reduction across processes",
    ) -> Iterator[list[Tensor]]:
        """Context whose body accumulates this rank's partial sums; summed across ranks on exit.

        If the body raises on any rank, every rank raises on exit (the failing rank its own
        error, the others :class:`DistributedRankError`) instead of leaving the others
        waiting in the reduction. Without distribution (or inside :meth:`local`) this is a
        plain block.

        Args:
            tensors: Zero-initialised accumulators, same shapes on every rank.
            inputs: Tensors every rank must hold identically (see :meth:`all_reduce_`).
            what: What is being summed, for error messages.

        Yields:
            ``tensors``.
        """
        if not self.communicating:
            yield tensors
            return
        try:
            yield tensors
        except Exception as error:
            n = 0 if inputs is None else _FINGERPRINT_SIZE
            self.exchange_status(error, torch.zeros(n, dtype=torch.float64), what=what)
            raise  # exchange_status re-raises this rank's error; kept for clarity
        self.all_reduce_(tensors, inputs=inputs, what=what)


def check_rank_summaries(summaries: list[dict[str, Any]], labels: dict[str, str]) -> None:
    """Check that the ranks' set-up summaries agree and that no shard is empty.

    A pure function of data every rank holds (the gathered summaries), so every rank reaches
    the same verdict.

    Args:
        summaries: One dict per rank; key ``"num_data"`` is the shard size, every other key
            must hold equal values on all ranks.
        labels: Human-readable name of every key other than ``"num_data"``.

    Raises:
        ValueError: If a shard is empty or a summarised property differs between ranks.
    """
    for key, label in labels.items():
        values = [s[key] for s in summaries]
        if any(v != values[0] for v in values[1:]):
            per_rank = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(
                f"The {label} differ between ranks ({per_rank}). Every process must build "
                "the same model and pass the same parameters, dtype and loss; only the data "
                "is sharded."
            )
    counts = [int(s["num_data"]) for s in summaries]
    empty = [r for r, c in enumerate(counts) if c <= 0]
    if empty:
        raise ValueError(
            f"The data shards of rank(s) {empty} are empty (data per rank: {counts}). Give "
            "every process at least one datum (e.g. shard with data[rank::world_size] and "
            "use at most as many processes as there are data), or pass process_group=False "
            "on processes without data and leave them out of the group."
        )


def synchronized_generator(
    seed: int | None = None,
    *,
    process_group: Any = None,
    device: torch.device | str = "cpu",
) -> torch.Generator:
    """A random generator seeded identically on every rank.

    Randomized methods (trace and diagonal estimators, eigensolvers with random starts,
    spectral densities) must draw the *same* vectors on every rank: a distributed operator
    multiplies the whole data set's matrix with one vector, and the ranks must make the same
    sequence of products. A generator seeded with the same integer on every rank does so; this
    helper also covers ``seed=None`` by broadcasting a fresh seed drawn on rank 0 (the global
    RNG is not touched). Without distribution it simply returns a seeded generator.

    Args:
        seed: Seed, the same on every rank; ``None`` draws a fresh one on rank 0 and shares
            it.
        process_group: The group to synchronise over (see :class:`ProcessGroupHandle`).
        device: Device of the generator (the device the random vectors are drawn on).

    Returns:
        A ``torch.Generator`` on ``device``, identically seeded on all ranks.

    Raises:
        TypeError: If ``seed`` is not an integer or ``None``.
        ValueError: On every rank, if the ranks passed different seeds, or a negative seed.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    group = ProcessGroupHandle(process_group)
    fresh = torch.Generator().seed() if seed is None and group.rank == 0 else None
    entries = group.gather_objects(lambda: (seed, fresh), what="synchronized_generator")
    given = [s for s, _ in entries]
    if any(s != given[0] for s in given[1:]):
        per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(given))
        raise ValueError(
            f"synchronized_generator received different seeds on different ranks ({per_rank}). "
            "Pass the same seed on every rank, or seed=None on every rank to share a fresh "
            "seed from rank 0."
        )
    final = given[0] if given[0] is not None else entries[0][1]
    return torch.Generator(device=device).manual_seed(final)
