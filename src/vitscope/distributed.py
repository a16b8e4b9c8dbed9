"""Training across processes and machines under torchrun: which process this is, and the few collective operations
the training loop needs. torchrun names each process in its environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_RUN_ID); without it, or with
one process, this is one process and every operation here is the identity.

Collectives go through gloo for CPU tensors and NCCL for CUDA tensors (one process group serves both), so the run
directory's bytes (CPU) and the gradients (wherever the model is) each take their backend.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Distributed:
    """This process's place in a run: its rank among `world_size` processes, and on its machine among
    `local_world_size`; under torchrun also the worker group's restart count and the run's id."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1,
                 restart: int = 0, run_id: str | None = None):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.restart, self.run_id = restart, run_id  # torchrun's restart count of the worker group, its run's id
        self.backend = None

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Distributed":
        """This process as torchrun describes it; the process group is joined where there are several."""
        def number(name: str, default: int) -> int:
            return int(environ.get(name) or default)

        world = cls(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0),
                    number("LOCAL_WORLD_SIZE", 1), number("TORCHELASTIC_RESTART_COUNT", 0),
                    environ.get("TORCHELASTIC_RUN_ID"))
        if world.world_size > 1:
            if torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
                torch.cuda.set_device(world.local_rank)  # "cuda" is then this process's own GPU
            world.backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            # The store torchrun's agent keeps (MASTER_ADDR, MASTER_PORT) outlives a restart of the worker group,
            # and with it the addresses the dead processes published: the new ones would connect to those and fail
            # (torch 2.13). Each attempt of the group gets keys of its own.
            store, rank, world_size = next(dist.rendezvous("env://"))
            dist.init_process_group(world.backend, store=dist.PrefixStore(f"vitscope/attempt-{world.restart}", store),
                                    rank=rank, world_size=world_size)
        return world

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and the log."""
        return self.rank == 0

    def describe(self) -> dict:
        """For config.json."""
        info = {"world_size": self.world_size}
        if self.backend:
            info["backend"] = self.backend
        if self.run_id is not None:
            info["torchrun_run_id"] = self.run_id
        return info

    def threads_per_process(self) -> int | None:
        """torch threads for each of this machine's training processes: its cores shared out, so that they do not
        fight over them (torchrun's own default is 1 thread each). None for a lone process: torch's default."""
        if self.local_world_size <= 1:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.local_world_size)

    def share(self, total: int) -> slice:
        """This process's contiguous share of `total` items: shares differ by at most one, and together they are
        every item once (the test set: no padded duplicates)."""
        return slice(self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model under DistributedDataParallel, which averages the gradients across processes during the
        backward pass; the model itself where there is one process."""
        if self.world_size == 1:
            return model
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # -- collectives; with one process each is the identity --
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over processes, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def agree(self, *values: int) -> list[int]:
        """Each value's maximum over processes: what one process saw (a signal, a checkpoint due by its clock),
        all act on at the same step."""
        if self.world_size == 1:
            return list(values)
        flags = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(flags, dist.ReduceOp.MAX)
        return flags.tolist()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (CPU, the same shape everywhere), stacked in rank order: (world_size, ...)."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every process (the others pass None): what rank 0 read from the run directory, which
        another machine may not have."""
        if self.world_size == 1:
            return data
        size = torch.tensor([len(data) if self.is_main else 0], dtype=torch.int64)
        dist.broadcast(size, 0)
        if size.item() == 0:
            return b""
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main
                  else torch.empty(size.item(), dtype=torch.uint8))
        dist.broadcast(buffer, 0)
        return buffer.numpy().tobytes()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
