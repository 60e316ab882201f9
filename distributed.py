"""
torchrun and the devices: one process a GPU, each with its share of every global batch (nanoGPT's way), and the
little that takes: the process group, a download on the first process first, DDP, gradient accumulation, a mean
for the log line.
Alone (no torchrun), each function is a no-op or returns its input.
"""

import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def ddp_init(device):
    """(rank, world size, device) of this process: under torchrun one process a GPU (gloo on CPUs), each
    with its share of every global batch, as nanoGPT; (0, 1, device) otherwise. On CUDA, float32 matmuls in TF32."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


@contextlib.contextmanager
def rank0_first():
    """Run the block on the first process, then on the others: a download (data, weights) happens once, and
    the others find it done."""
    if dist.is_initialized() and dist.get_rank() > 0:
        dist.barrier()
    yield
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()


def ddp(module, device):
    """`module` as each training step calls it: under torchrun, in DistributedDataParallel, which averages its
    gradients over the processes, its BatchNorm (the segmentation head's) made SyncBatchNorm so that it normalises
    over the global batch -- on GPUs: torch's SyncBatchNorm has no CPU kernel, so on gloo each process keeps its own.
    Alone, `module` itself."""
    if not dist.is_initialized():
        return module
    if device.startswith("cuda"):
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place below the top: the same Parameters
    return DDP(module, device_ids=[device] if device.startswith("cuda") else None)


def unwrap(module):
    """The module itself, out of DistributedDataParallel (what evaluation calls, as the scripts built it)."""
    return module.module if isinstance(module, DDP) else module


def sync_gradients(module, now):
    """--grad_accum: let DDP average gradients only on a step's last micro-batch (nanoGPT's
    require_backward_grad_sync); the others add up locally. No-op without DDP."""
    if isinstance(module, DDP):
        module.require_backward_grad_sync = now


def ddp_mean(x, device):
    """A number summed on this process, averaged over torchrun's processes (a host sync: for log lines)."""
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def ddp_end():
    """The end of a torchrun run (alone: nothing to do): each process waits for the others, then leaves the process
    group. The pause between lets gloo's worker threads free the last collective's tensors, which takes the GIL:
    torch before 2.8 frees a gloo group (here, with the DDP reducer that holds it, as the script returns) while
    holding the GIL and waits for those threads (pytorch/pytorch#154976), which hung a process at exit now and
    then (seen on torch 2.4, about one run in three under load)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    time.sleep(0.2)  # releases the GIL: the worker threads finish, then wait idle for the group's end
    dist.destroy_process_group()
