"""
torchrun and the devices: one process a GPU, each with its share of every global batch (nanoGPT's way), and the
little that takes: the process group, a download on the first process first, DDP, each process's share of the
samples (EpochSampler), gradient accumulation, a mean for the log line; and the devices' peaks, MFU's denominator.
Alone (no torchrun), each function is a no-op or returns its input.
"""

import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Sampler


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


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) for one epoch: a shuffled order (train) or the natural one (eval),
    every world-th item from rank on (rank r of a world of w processes; together they make the batches one
    process would). With `batch` (a training step's images over all processes), the order is cut to whole
    steps first, so every process takes the same number of steps. Call set_epoch(e) before each epoch."""

    def __init__(self, n, seed=0, shuffle=True, rank=0, world=1, batch=None):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.epoch = n, seed, shuffle, rank, world, 0
        self.used = n // batch * batch if batch else n  # the incomplete last step is dropped, on every process

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(range(self.rank, self.used, self.world))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        for i in order[:self.used][self.rank::self.world].tolist():
            yield i, int(seeds[i])


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


# -----------------------------------------------------------------------------
# MFU's denominator: the devices' peaks (nanoGPT's estimate_mfu)


# dense bf16 peaks, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10": 125e12, "V100": 125e12, "4090": 165e12}


def peak_flops(device):
    """The device's dense bf16 peak in FLOP/s, None where none is known (a CPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(flops_per_s, device):
    """Model FLOPs utilisation as the log line shows it: the FLOP/s achieved over the dense bf16 peak of every
    torchrun process's device; "n/a" where no peak is known."""
    peak = peak_flops(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return f"{100 * flops_per_s / (peak * world):.1f}%" if peak else "n/a"
