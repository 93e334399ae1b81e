"""The processes of a run: this one's rank among how many, and what they share over torch.distributed.

A single process is rank 0 of 1 and every call here is then a no-op. In a distributed run (`ktq gpu --nproc N` or
torchrun, started by launch.py) each rank calibrates on its share of the calibration samples; each layer's
statistics are summed over the ranks and the GPTQ problems shared out, every result broadcast. Only rank 0 prints,
shows progress and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ktq.errors import KtqError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """A member of a torch.distributed process group (even of one process, with --nproc 1)."""
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, tensors: list) -> None:
        """Sum calibration statistics over the ranks (each saw its share of the samples), in place."""
        if self.distributed:
            import torch.distributed as dist

            for tensor in tensors:
                dist.all_reduce(tensor)

    def share(self, owner: int, tensors: list) -> None:
        """Broadcast what rank `owner` computed to every rank, in place."""
        if self.distributed:
            import torch.distributed as dist

            for tensor in tensors:
                dist.broadcast(tensor, src=owner)

    def open_output(self, make):
        """`make()` reads what the output folder holds on every rank, before rank 0 changes it."""
        output = make()
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return output

    def share_of(self, dataset):
        """This rank's contiguous share of the calibration set: every rank builds the same set (deterministic
        choice of samples), so the shares are disjoint and cover it."""
        start = len(dataset) * self.rank // self.size
        end = len(dataset) * (self.rank + 1) // self.size
        if start == end:
            raise KtqError(f"{len(dataset)} calibration samples cannot be shared between {self.size} processes; "
                           f"use at least {self.size} samples or fewer processes")
        return dataset.select(range(start, end))

    def gather(self, value) -> list:
        """`value` of every rank, on every rank (the report shows each rank's stage times side by side)."""
        import torch.distributed as dist

        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered


def join(force_cpu: bool) -> World:
    """Join the process group of the torchrun job this process belongs to (RANK, WORLD_SIZE and LOCAL_RANK set)."""
    import torch
    import torch.distributed as dist

    # imported before the group exists: its functions take the default group as a default argument, bound when the
    # module is first imported (transformers imports it during a run), which would keep the group alive past
    # destroy_process_group into the interpreter's shutdown, where gloo's teardown aborts now and then on a busy
    # machine ("terminate called without an active exception", the rank's exit code -6)
    import torch.distributed.nn  # noqa: F401

    rank, size, local_rank = (int(os.environ[v]) for v in TORCHRUN_VARIABLES)
    if torch.cuda.is_available() and not force_cpu:
        torch.cuda.set_device(0)  # the only GPU this rank sees (launch.show_own_gpu)
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo")
    return World(rank=rank, size=size, local_rank=local_rank)


def leave() -> None:
    """Destroy the process group, however the run ended: a group still alive when the interpreter shuts down is torn
    down there, where gloo may abort (see join)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
