"""Running under `torchrun`: one process per GPU (or per share of a CPU machine's cores).

    torchrun --nproc-per-node 8 extract_features.py ...            # one machine
    srun torchrun --nnodes $SLURM_NNODES --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 extract_features.py ...

Nothing here schedules anything: torchrun starts the processes, sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, and tears the whole job down when
one process fails. `join` forms the process group from that environment (gloo for host
tensors, NCCL for CUDA ones) and keeps the rendezvous key-value store, which carries what is not
a collective: a job-wide progress counter and each rank's summary.

Without torchrun (no MASTER_ADDR), a process is alone: `Group.single`. RANK/WORLD_SIZE set by
hand (independent jobs that each take a share of a store, possibly at different times) are
honoured by stage 1 without any coordination: see `pipeline.extract`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import QuickFixError, SetupError, first_line, ref

T = TypeVar("T")

# Ranks wait for each other at start-up (rank 0 creates the store while the others have
# scanned the same tree) and in stage 2's collectives; a slow shared file system can take a
# while, a dead peer is torchrun's to detect (it stops the job).
TIMEOUT = _dt.timedelta(minutes=60)


def launched() -> bool:
    """Started by torchrun (or anything that sets its rendezvous variables) with peers."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and bool(os.environ.get("MASTER_ADDR"))
            and bool(os.environ.get("MASTER_PORT")))


class RankFailed(QuickFixError):
    """Another rank stopped on a user error; this one stops with the same message (and `kind`,
    the name of that error's class)."""


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    store: Any = None  # the rendezvous store under torchrun (a PrefixStore), else None

    @classmethod
    def single(cls) -> Group:
        return cls()

    @property
    def collective(self) -> bool:
        """Several processes joined in a process group (collectives work)."""
        return self.store is not None and self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, fn: Callable[[], T], *, only_rank0: bool = False) -> T | None:
        """Run `fn` (on every rank, or on rank 0 only) and stop every rank with the same one-line
        error if it failed on any: a user error on one rank never leaves the others waiting."""
        value, error = None, None
        if not only_rank0 or self.main:
            try:
                value = fn()
            except QuickFixError as exc:
                error = exc
        if not self.collective:
            if error is not None:
                raise error
            return value
        errors: list = [None] * self.world
        # the message as raised: each rank's command renders the settings it names
        dist.all_gather_object(errors, None if error is None else (type(error).__name__,
                                                                   error.raw))
        failed = [(rank, *e) for rank, e in enumerate(errors) if e is not None]
        if not failed:
            return value
        # one line for the job, from rank 0; the other ranks stop with the same exit code
        rank, kind, message = failed[0]
        first = error if error is not None and self.main else RankFailed(
            f"rank {rank}: {message}" if rank else message)
        first.silent = not self.main
        first.kind = kind  # the class of the first error, the same on every rank
        raise first

    def share(self, fn: Callable[[], T]) -> T:
        """`fn`'s value, computed on rank 0 (errors agreed as in `agree`), given to every rank."""
        value = self.agree(fn, only_rank0=True)
        if not self.collective:
            return value  # type: ignore[return-value]
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # --- the key-value store: counters and records that need no collective ------------------

    def add(self, key: str, n: int) -> int:
        """Add to a job-wide counter (under torchrun); returns its new value."""
        return int(self.store.add(key, n))

    def post(self, key: str, record: dict) -> None:
        if self.store is not None:
            self.store.set(key, json.dumps(record))

    def read(self, key: str) -> dict:
        return json.loads(self.store.get(key))


def join(backend: str = "gloo") -> Group:
    """The process group of this torchrun job, formed once (`Group.single()` when alone).

    backend: "gloo" (host tensors only: stage 1's coordination, stage 2 on the CPU) or "cuda"
    (NCCL for CUDA tensors, gloo for host ones: stage 2 on GPUs)."""
    if not launched():
        return Group.single()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend == "cuda":
        if not dist.is_nccl_available():
            raise SetupError("this torch build has no NCCL: run stage 2 under torchrun with "
                             f"{ref('device', 'cpu')}, or install a CUDA build of torch")
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
            store.set_timeout(TIMEOUT)
            dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store),
                                    rank=rank, world_size=world, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise SetupError(f"cannot join the torchrun job at {addr}: {first_line(exc)}") from exc
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _joined.append(dist.PrefixStore(f"quickfix/{restart}", store))
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, local_world, _joined[-1])


_joined: list = []


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _joined.clear()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks in place (nothing when alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def local_cores() -> int:
    """CPU cores for this process: the machine's (its affinity mask), shared by the local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1
    return max(1, cores // max(local_world, 1))
