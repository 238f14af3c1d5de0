"""Several processes started by a launcher (``torchrun``, ``accelerate launch``): who does what.

memdec does not start processes or talk between them itself: a launcher starts them, and
Accelerate's ``PartialState`` joins the process group the launcher described in the environment
(gloo on CPUs, nccl with one GPU per rank). Launchers fail silently: ``torchrun`` without a
process group leaves every rank doing all the work, and ``accelerate launch --cpu
--num_processes 2`` starts one process (Accelerate launches several CPU processes only through
mpirun). So :func:`join` checks that the group has the size the launcher announced
(``WORLD_SIZE``) and, when given, the size the user expected (``--world-size`` /
``$MEMDEC_WORLD_SIZE``), and refuses the run in one line otherwise.

What is sharded: scoring windows for perplexity (every rank scores every N-th batch; the NLL
sums are reduced in float64), so a report is that of one process up to the rounding of the sums.
A datastore and kNN targets are built by all ranks together (``disk.shared_entry_lock``): each
computes every N-th batch of windows or shard of positions and writes it where one process would,
so the files are the same bytes. Training is data-parallel: each rank runs every N-th window of
each micro-batch, the gradients are summed (``sum_gradients``), every rank takes the same step,
and rank 0 writes the checkpoints — the global batch is the one of one process. Other work done
while holding a cache entry's lock (a search index) runs in whichever rank takes the lock, with
no collective inside: the other ranks wait for it and reuse the result.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from memdec_core.errors import ConfigError

#: The number of processes a run must have; a launcher that started another number is an error.
WORLD_SIZE_VARIABLE = "MEMDEC_WORLD_SIZE"
#: Set (memdec --fsdp) to shard full-parameter training's weights over the ranks with FSDP2.
FSDP_VARIABLE = "MEMDEC_FSDP"


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that prints results and progress and writes reports."""
        return self.rank == 0

    def owns(self, item: int) -> bool:
        """Whether item number ``item`` of a sharded sequence is this rank's."""
        return item % self.size == self.rank


_WORLD = [World()]
_ALONE = [0]  # depth of ``alone()`` blocks: inside one, nothing is sharded


def world() -> World:
    """The processes of this run (one, unless :func:`join` joined a launcher's group)."""
    return _WORLD[0]


def launched_size() -> int:
    """The number of processes the launcher announced (1 when there is none)."""
    return _positive_int(os.environ.get("WORLD_SIZE", "1"), "WORLD_SIZE")


def join(expected: int | None = None) -> World:
    """Join the launcher's process group, check its size and return this process's place in it.

    ``expected`` (else ``$MEMDEC_WORLD_SIZE``) is the number of processes the run must have.
    Calling it again returns the same world.
    """
    if expected is None and os.environ.get(WORLD_SIZE_VARIABLE, "").strip():
        expected = _positive_int(os.environ[WORLD_SIZE_VARIABLE], WORLD_SIZE_VARIABLE)
    if expected is not None and expected < 1:
        raise ConfigError(f"the world size must be at least 1, got {expected}")
    launched = launched_size()
    if launched > 1 and world().size == 1:
        _WORLD[0] = _join_group()
    current = world()
    if current.size != launched:
        raise ConfigError(f"the launcher announced {launched} processes (WORLD_SIZE) but {current.size} joined "
                          f"the process group; check the launcher's configuration")
    if expected is not None and current.size != expected:
        raise ConfigError(f"this run expects {expected} processes but has {current.size}: the launcher started "
                          f"{'one' if current.size == 1 else current.size} (on CPUs use `torchrun --standalone "
                          f"--nproc_per_node {expected} -m memdec_cli ...`: `accelerate launch` starts one CPU "
                          f"process whatever --num_processes says)")
    return current


def _join_group() -> World:
    import torch
    from accelerate import PartialState

    # Without cpu=True, Accelerate on a machine with no GPU ignores the group torchrun set up and
    # reports one process (the silent trap); with GPUs it gives each rank its own device.
    state = PartialState(cpu=not torch.cuda.is_available())
    return World(state.process_index, state.num_processes, state.local_process_index)


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number of processes") from None
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside, this rank works by itself: nothing is sharded and no collective runs (a cache
    entry's builder holds its lock, and the other ranks wait on the lock, not in a collective)."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def sharding() -> World:
    """The world work is sharded over here: one process inside :func:`alone`."""
    return World() if _ALONE[0] else world()


def barrier() -> None:
    """Wait until every rank of :func:`sharding` gets here (nothing for one process)."""
    if sharding().size > 1:
        import torch.distributed as dist

        dist.barrier()


def from_main(value):
    """Rank 0's ``value`` on every rank of :func:`sharding` (``value`` itself for one process)."""
    if sharding().size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(parameters: Sequence, extra: Sequence[float] = ()) -> list[float]:
    """Every parameter's gradient summed over the ranks of :func:`sharding`, in place, in one
    flat collective (a rank that had no work contributes zeros); returns ``extra`` summed too.

    What DDP does at the end of a step, without its forward wrapper: memdec's losses call a
    model's decoder and output layer separately, which DDP's wrapper would not see. DDP around a
    module whose forward computes the loss was measured against it (benchmarks/allreduce_bench.py):
    the same weights bit for bit, and no faster on 2 gloo ranks, where this sum is a few percent
    of a step (benchmarks/RESULTS.md).
    """
    if sharding().size == 1:
        return list(extra)
    import torch
    import torch.distributed as dist

    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    for parameter in trainable:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([parameter.grad.reshape(-1).float() for parameter in trainable]
                     + [torch.tensor(list(extra), dtype=torch.float32, device=trainable[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for parameter in trainable:
        count = parameter.numel()
        parameter.grad.copy_(flat[offset:offset + count].view_as(parameter.grad))
        offset += count
    return flat[offset:].cpu().tolist()


def sum_across(values: Sequence[float]) -> list[float]:
    """``values`` summed over the ranks of :func:`sharding` (in float64; as they are for one process)."""
    if sharding().size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    total = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return total.cpu().tolist()


__all__ = ["World", "world", "join", "launched_size", "alone", "sharding", "barrier", "from_main", "sum_gradients",
           "sum_across", "WORLD_SIZE_VARIABLE"]


def fsdp_requested() -> bool:
    """Whether the run asked for FSDP2 (``memdec --fsdp`` or ``$MEMDEC_FSDP``)."""
    return os.environ.get(FSDP_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def is_fully_sharded(model) -> bool:
    """Whether FSDP2 shards ``model``'s weights: then every rank must run every forward pass of
    it together (each pass gathers the weights from all ranks)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
