"""A tensor-parallel group: which rank this process is, of how many, and the three collectives the model needs.

The group is a bare torch process group (gloo on CPU, NCCL on CUDA) built on a TCP store that rank 0 hosts, not
torch.distributed's global default group: a process may hold several engines, and nothing global is set. Every
collective carries the group's timeout, so a rank that stops answering fails the step instead of hanging it; a
rank whose process dies fails it at once (gloo sees the connection close; on NCCL rank 0's monitor aborts the
group, engine/parallel/ranks.py).

Model modules learn their rank while they are built (`building(group)`, read with `current()`), the way the
Megatron-LM and vLLM layers read a global parallel state; outside `building` every module is whole (one rank).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist


class RankFailedError(RuntimeError):
    """A rank of a tensor-parallel engine died, timed out or fell out of step: the engine cannot go on."""


class TPGroup:
    """Rank `rank` of `size`; `pg` is None for one rank, or for a group that only describes shapes (meta builds)."""

    def __init__(self, rank: int = 0, size: int = 1, pg: dist.ProcessGroup | None = None,
                 device: torch.device | None = None) -> None:
        assert 0 <= rank < size, f"rank {rank} outside a group of {size}"
        self.rank, self.size, self.pg = rank, size, pg
        self.device = device or torch.device("cpu")

    def __repr__(self) -> str:
        return f"TPGroup(rank={self.rank}, size={self.size})"

    def _live(self) -> dist.ProcessGroup:
        if self.pg is None:
            raise RuntimeError(f"{self!r} has no process group (built for shapes only)")
        return self.pg

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; every rank ends with the same bits."""
        if self.size > 1:
            self._live().allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[size, *x.shape]: every rank's `x`, in rank order."""
        if self.size == 1:
            return x.unsqueeze(0)
        x = x.contiguous()
        out = x.new_empty(self.size * x.shape[0], *x.shape[1:])
        self._live()._allgather_base(out, x).wait()
        return out.view(self.size, *x.shape)

    def broadcast(self, x: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Rank `root`'s `x` into every rank's `x`, in place."""
        if self.size > 1:
            self._live().broadcast(x, root).wait()
        return x

    def abort(self) -> None:
        """Make collectives in flight fail (NCCL); gloo's already fail when a peer's connection closes."""
        backend = self.pg
        for name in ("abort", "_abort"):
            fn = getattr(backend, name, None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
                return


SINGLE = TPGroup()


def connect(rank: int, size: int, port: int, backend: str, timeout_s: float, device: torch.device,
            store: dist.Store | None = None) -> TPGroup:
    """Join the group whose TCP store listens on 127.0.0.1:`port` (rank 0 passes the store it hosts). Blocks until
    every rank has joined (gloo) or, on NCCL, until the first collective."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=timeout, wait_for_workers=False)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        torch.cuda.set_device(device)
        pg = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # ranks share one host
        pg = dist.ProcessGroupGloo(store, rank, size, opts)
    return TPGroup(rank, size, pg, device)


def host_store(size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free loopback port (`.port`): the other ranks find each other through it."""
    return dist.TCPStore("127.0.0.1", 0, size, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def backend_for(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after rank 0's (rank 0 uses the engine's device), or the CPU."""
    if device.type != "cuda":
        return device
    base = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", base + rank)


_BUILDING: contextvars.ContextVar[TPGroup] = contextvars.ContextVar("tp_group_building", default=SINGLE)


@contextlib.contextmanager
def building(group: TPGroup) -> Iterator[TPGroup]:
    """Modules constructed inside take `group`'s rank and size (their shard) and talk through it."""
    token = _BUILDING.set(group)
    try:
        yield group
    finally:
        _BUILDING.reset(token)


def current() -> TPGroup:
    """The group of the model being built (one rank outside `building`)."""
    return _BUILDING.get()
