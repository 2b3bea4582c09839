"""The one object that owns devices, the process group and every collective.

The loops never call ``torch.distributed`` themselves: they ask the strategy
to wrap the model, shard the data, gather metrics or agree on a decision.
With no process group (or a world of one) every collective is a no-op, so
the same loops run in a notebook and on 64 GPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _distributed_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Strategy:
    """Single process, or DDP when a process group of more than one rank exists.

    The process group is created by whoever runs the runtime (a test's
    ``mp.spawn``, Ray Train's TorchTrainer); the strategy only uses it.
    """

    def __init__(self, accelerator: str = "cpu", find_unused_parameters: bool = False):
        self.global_rank, self.world_size = _distributed_world()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.world_size > 1 else 0
        self.accelerator = accelerator
        self.find_unused_parameters = find_unused_parameters
        if accelerator == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "use_gpu/accelerator='gpu' was requested but torch.cuda.is_available() is False on this "
                    "worker; install a CUDA build of torch on the workers or run with use_gpu=False"
                )
            index = self.local_rank % torch.cuda.device_count()
            self.root_device = torch.device("cuda", index)
            torch.cuda.set_device(self.root_device)
        else:
            self.root_device = torch.device("cpu")
        self._ddp: nn.Module | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    # ------------------------------------------------------------- model
    def wrap(self, step_module: nn.Module) -> nn.Module:
        """Wrap the step dispatcher in DDP when distributed (gradients are averaged in backward)."""
        if not self.is_distributed:
            return step_module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        self._ddp = DistributedDataParallel(
            step_module, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters
        )
        return self._ddp

    def prepare_for_backward(self, loss: Tensor) -> None:
        """Arm DDP's gradient reducer for a backward pass from ``loss``.

        DDP arms it once per forward, for one backward. Manual optimization may run several backward passes
        after one ``training_step`` (a GAN: the discriminator's, then the generator's), so each is armed
        here; with ``find_unused_parameters`` the reducer walks this loss's graph to find the parameters that
        will get no gradient (the other network's, frozen by ``toggle_optimizer``) instead of waiting on them.
        """
        ddp = self._ddp
        if ddp is None or not torch.is_grad_enabled() or not ddp.require_backward_grad_sync:
            return  # single process, no_grad, or an accumulating batch under no_sync
        reducer = ddp.reducer
        reducer._rebuild_buckets()  # a pending bucket rebuild must happen now, not inside the backward
        reducer.prepare_for_backward([loss] if ddp.find_unused_parameters and not ddp.static_graph else [])

    def no_backward_sync(self, enabled: bool):
        """Skip DDP's gradient all-reduce on batches that only accumulate."""
        if enabled and self._ddp is not None:
            return self._ddp.no_sync()
        return nullcontext()

    # ------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU ones.
        return self.root_device if dist.get_backend() == "nccl" else torch.device("cpu")

    def gather_packed(self, packed: Tensor) -> Tensor:
        """All-gather a 1-D tensor from every rank: returns ``[world_size, len]`` on the CPU."""
        if not self.is_distributed:
            return packed.unsqueeze(0)
        local = packed.to(self._comm_device())
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return torch.stack(out).cpu()

    def all_gather(self, data: Any, sync_grads: bool = False) -> Any:
        """Gather tensors (or collections of them) from every rank along a new first dimension.

        A world of one adds no dimension: each tensor comes back with its own shape, as in Lightning, so
        code written for one process does not have to special-case it.
        """
        if isinstance(data, dict):
            return {k: self.all_gather(v, sync_grads) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return type(data)(self.all_gather(v, sync_grads) for v in data)
        tensor = data if isinstance(data, Tensor) else torch.tensor(data)
        if not self.is_distributed:
            return tensor
        local = tensor.to(self._comm_device()).contiguous()
        if sync_grads:
            import torch.distributed.nn.functional as dist_fn

            return torch.stack(dist_fn.all_gather(local))
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return torch.stack(out).to(tensor.device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Send a picklable object from rank ``src`` to every rank."""
        if not self.is_distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src, device=self._comm_device())
        return holder[0]

    def broadcast_tensor(self, tensor: Tensor, src: int = 0) -> Tensor:
        """``tensor`` as rank ``src`` has it, on every rank (a copy on the tensor's device)."""
        if not self.is_distributed:
            return tensor
        local = tensor.to(self._comm_device()).clone()
        dist.broadcast(local, src=src)
        return local.to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """True when every rank (``all=True``) or any rank (``all=False``) decided True."""
        if not self.is_distributed:
            return bool(decision)
        flag = torch.tensor(int(bool(decision)), device=self._comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return bool(flag.item() == self.world_size) if all else bool(flag.item() > 0)

    def reduce_sum(self, value: Tensor) -> Tensor:
        if not self.is_distributed:
            return value
        local = value.to(self._comm_device()).clone()
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        return local.to(value.device)

    @contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. prepare_data writes files), then the others."""
        if self.is_global_zero:
            yield
            self.barrier()
        else:
            self.barrier()
            yield
