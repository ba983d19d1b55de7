"""Distributed runs: ``torchrun`` environment, process group, synchronised BatchNorm.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` then joins the process group with NCCL on CUDA
devices and gloo on the CPU. Without those variables (or with ``WORLD_SIZE=1``) the run
is a single process and nothing is initialised.

**SyncBatchNorm**: PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors. On the CPU, BatchNorm
layers are replaced by :class:`CPUSyncBatchNorm`, which computes the batch statistics over
all ranks with a differentiable all-reduce (:class:`_AllReduceSum`: the sum over ranks
forward, the sum of the ranks' gradients backward): first the per-channel sum and count,
then the sum of squared deviations from the global mean, so the statistics are those of the global batch (the same two-pass formula a single
process would use, up to the summation order). On CUDA, PyTorch's own ``SyncBatchNorm``.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "convert_sync_batchnorm", "CPUSyncBatchNorm", "all_reduce_sum",
           "has_batchnorm", "barrier", "shutdown_distributed"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the torchrun process group (if any); returns this process's place in it."""
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        # A process group still alive when the interpreter shuts down can abort the
        # process (gloo's worker threads: "terminate called without an active
        # exception"), so the group this function made is destroyed at exit at the latest.
        atexit.register(shutdown_distributed)
    return DistInfo(rank, world, local_rank, local_world, backend)


def shutdown_distributed() -> None:
    """Destroys the default process group, if one exists (safe to call more than once).

    Call it when a distributed run is over; ``fastvis train`` does, and the group that
    :func:`init_distributed` created is otherwise destroyed at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        # Objects kept alive only by reference cycles (a trainer, its DDP wrapper and
        # reducer, autograd graphs holding pending work) would otherwise be freed during
        # interpreter finalisation, after this handler, and release their process-group
        # state then; collect them while the interpreter is still whole.
        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of t over the ranks (t itself in a single process)."""
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks: y = sum_r x_r on every rank. Every rank's loss
    depends on y, so the gradient reaching x on one rank is the sum of all ranks' dL/dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batches of all ranks (gloo, CPU)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local_n = x.numel() // x.shape[1]
        stats = torch.cat([xf.sum(dims), xf.new_full((1,), float(local_n))])
        stats = all_reduce(stats)
        count = stats[-1]
        mean = stats[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(count)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1.0, 1.0)) * m)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers -> synchronised ones (PyTorch's on CUDA, :class:`CPUSyncBatchNorm`
    on the CPU), keeping parameters and running statistics."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
