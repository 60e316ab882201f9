"""
Benchmarks that print figures (speed is never a timed test). Like nanoGPT's bench.py: the training step of
the scripts, stripped of everything but the timing.

    python bench.py step --method slad --teacher vitb14 --student vits14 --img_size 518 --batch_size 32
        one method's training step: ms/step, img/s, MFU, peak memory. Methods: slad (train_slad.py), the
        two-step stage 1 by teacher adaptation -- probe, finetune, lora -- and distill (stage 2, a LoRA
        student and a frozen teacher). Random tensors by default; --dataset times real batches instead;
        --profile N then splits a step's time by kind of op (matmul, attention, LayerNorm, ..., Inductor's fused
        kernels under --compile) and lists the N ops that take most, with their input shapes.
    python bench.py schedule --teacher vitb14 --student vits14 --img_size 518 --batch_size 32
        every step above, then the wall-clock of whole schedules on each dataset: SLAD (30 epochs) against
        two-step (30 + 30; 30 + 80 after a probed teacher), as a ratio (the paper: SLAD 2x faster)
    python bench.py memory --img_size 518 --batch_size 32
        the peak memory of every method's step, with and without --grad_checkpointing, and the largest batch
        that fits 24, 40 or 80 GiB: measured on a GPU, traced on fake tensors without one (a laptop will do)
    python bench.py fit --method slad --teacher vitl14 --student vitb14 --img_size 518
        the largest batch that fits this GPU, found by doubling the batch until CUDA runs out of memory
    python bench.py data --img_size 518 --num_workers 8
        the input pipeline alone (decode, resize, augment), img/s a worker, next to the img/s a step at 40 % MFU
        on an H100 eats, and the /dev/shm the workers need; real-size JPEGs in DTD's layout unless --dataset
    python bench.py backbone --model vits14 --img_size 224
        forward + backward of our ViT, and of timm's DINOv2 ViT on the same config if timm is installed;
        --lora: both with LoRA on qkv, ours (lora.py) against PEFT's
    python bench.py latency --model vits14 --img_size 518 --batch_size 1
        a deployed classifier's CPU latency: ONNX Runtime (the file export_onnx.py writes) against torch
    python bench.py proof
        the GPU checks of issue 24 in one command: every training script on real-size fake data, the steps,
        memory, the largest batches, the input pipeline, each with a time cap; one markdown table (out/proof.md)

MFU counts model FLOPs analytically, as the training scripts' log lines do (mfu.step_flops: a step's matmuls,
2 per multiply-add, as nanoGPT's estimate_mfu, exactly as torch.utils.flop_counter counts them). The peak is the
device's dense bf16 figure (--peak_tflops to set it).
"""

import argparse
import gc
import importlib.util
import itertools
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from data import (CLASSIFICATION, SEG_BASE_RATIO, SEGMENTATION, SegTrainTransform, load_splits, make_loader,
                  normalize, train_transform)
from kd import distill_loss, slad_loss, task_loss
from lora import adapt, add_lora, share_lora, trainable_parameters
from mfu import PEAK_FLOPS, peak_flops, step_flops
from model import CONFIGS, Classifier, TeacherStudent, ViT

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("slad", "probe", "finetune", "lora", "distill")
# how each method's step trains the teacher and the student (mfu.step_flops' `how`; None: not in the step)
TRAINS = {"slad": ("lora", "lora"), "probe": ("probe", None), "lora": ("lora", None), "finetune": ("finetune", None),
          "distill": ("frozen", "lora")}
PAIRS = (("vitb14", "vits14"), ("vitl14", "vitb14"))  # the paper's teacher -> student pairs that bench.py reports
TARGET_MFU = 0.4  # issue 24's goal for a SLAD step on an H100
PREFETCH = 4  # batches each DataLoader worker keeps ready (data.make_loader)
# training images per epoch (train split; CUB and Cityscapes after holding out 10 % for validation)
TRAIN_SIZES = {"dtd": 1880, "aircraft": 3334, "cub": 5395}
VAL_SIZES = {"dtd": 1880, "aircraft": 3333, "cub": 599}  # validated every epoch
TIMM_NAMES = {"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
              "vitl14": "vit_large_patch14_dinov2", "vitg14": "vit_giant_patch14_dinov2"}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def device_peak(args):
    return args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(args.device)


def planned_flops(method, teacher, student, img_size, rank=16):
    """A method's FLOPs per image for a pair by name, as build() counts them: the models made on the meta device,
    the configs' arithmetic, no weights."""
    args = argparse.Namespace(teacher=teacher, student=student, img_size=img_size, rank=rank, grad_checkpointing=False)
    with torch.device("meta"):
        return build(method, args)[3]


def build(method, args, num_classes=100):
    """The models of a method's training step, as the scripts set them up: (forward, loss_fn, params, F/image)."""
    teacher = Classifier(ViT.from_name(args.teacher), num_classes)
    student = Classifier(ViT.from_name(args.student), num_classes)
    for m in (teacher, student):
        m.vit.grad_checkpointing = args.grad_checkpointing
    if method == "slad":
        add_lora(teacher.vit, rank=args.rank)
        share_lora(student.vit, teacher.vit, "even")
    elif method in ("probe", "finetune", "lora"):
        adapt(teacher, method, args.rank)
    else:  # distill: stage 2 with a frozen teacher (eval mode, no grad)
        adapt(student, "lora", args.rank)
        teacher.eval().requires_grad_(False)
    how_teacher, how_student = TRAINS[method]  # MFU's numerator, per image, of the models as adapted
    flops = step_flops(teacher.vit, args.img_size, how_teacher) + (
        step_flops(student.vit, args.img_size, how_student) if how_student else 0)
    if method == "slad":
        both = TeacherStudent(teacher, student)

        def step(x, y):
            teacher_logits, student_logits = both(x)
            return slad_loss(student_logits, teacher_logits, y)  # eq. 4
        return both, step, trainable_parameters(both), flops
    if method in ("probe", "finetune", "lora"):
        return teacher, lambda x, y: task_loss(teacher(x), y), trainable_parameters(teacher), flops

    def step(x, y):
        with torch.no_grad():
            t = teacher(x)
        return distill_loss(student(x), t, y)  # eq. 2
    return torch.nn.ModuleList([teacher, student]), step, trainable_parameters(student), flops


def bench_step(method, args, batches=None):
    """Time one method's training step: warm-up steps (compilation), then args.iters timed ones."""
    device = args.device
    with torch.device(device):  # made and initialised where they run: seconds less for ViT-L on a GPU
        model, loss_fn, params, flops_per_image = build(method, args)
    if args.compile:
        if getattr(args, "profile", 0):  # Inductor's CPU kernels then mark themselves for the profiler
            from torch._inductor import config as inductor
            inductor.cpp.enable_kernel_profile = True
        loss_fn = torch.compile(loss_fn)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    if batches is None:  # random tensors, made once: the step alone
        x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
        y = torch.randint(0, 100, (args.batch_size,), device=device)
        batches = itertools.repeat((x, y))

    def one_step():
        x, y = next(batches)
        x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with autocast:
            loss = loss_fn(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        one_step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.iters
    if getattr(args, "profile", 0):
        profile_steps(one_step, device, args.profile)
    peak = device_peak(args)
    mem = (torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda")
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    flops = flops_per_image * args.batch_size / dt
    out = dict(method=method, ms=dt * 1000, img_s=args.batch_size / dt, tflops=flops / 1e12,
               mfu=flops / peak if peak else None, mem_gib=mem)
    del model
    optimizer = one_step = None  # freed (the step holds the optimizer) before the cache is emptied
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# where a step's time goes, by kind of op: torch.profiler's aten ops and, under --compile, Inductor's generated
# kernels (cpp_fused_... on a CPU, graph_N_ before it; triton_... on a GPU), by their own (self) time on the device
INDUCTOR = r"^(graph_\d+_)?(cpp|triton)_"
OP_KINDS = (("fused (Inductor)", INDUCTOR),  # first: their names hold the ops they fuse (layer_norm, gelu, ...)
            ("matmul, conv", r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$|convolution"),
            ("attention", r"attention|^aten::_?(efficient|flash|cudnn)"),
            ("layer norm", r"layer_norm"), ("gelu / silu", r"gelu|silu"),
            ("optimizer", r"adam|_foreach"), ("copies", r"copy_|^aten::(to|_to_copy|clone|contiguous)$"))


def profile_steps(one_step, device, rows):
    """Profile 3 steps (after the timed ones): the time each kind of op takes (OP_KINDS; the rest: elementwise
    and reductions), then the `rows` ops that take most, with their input shapes. On CUDA the ops' kernel time,
    else their CPU time. Inductor's CPU kernels show only if compiled with its kernel profiling on (bench_step
    does) and record no shapes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 record_shapes=True) as prof:
        for _ in range(3):
            one_step()
        sync(device)
    own = {}  # (op, input shapes) -> ms a step; the host-side events alone: a GPU kernel counts in the op launching it
    for e in prof.events():
        if e.device_type == DeviceType.CPU and (e.name.startswith("aten::") or re.search(INDUCTOR, e.name)):
            key = (e.name, ", ".join("x".join(map(str, s)) for s in e.input_shapes or () if s))
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            own[key] = own.get(key, 0.0) + us / 3e3  # us over 3 steps -> ms a step
    total = sum(own.values()) or 1.0
    kinds = {}
    for (name, _), ms in own.items():
        kind = next((k for k, pattern in OP_KINDS if re.search(pattern, name)), "elementwise, other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    print(f"  profile, {'device' if cuda else 'CPU'} time of aten ops and Inductor kernels a step ({total:.1f} ms):")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:18s} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
    for (name, shapes), ms in sorted(own.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"      {ms:8.2f} ms  {name}" + (f"  ({shapes})" if shapes else ""))  # Inductor's names run long


def print_step(r, device):
    mfu = f"{100 * r['mfu']:5.1f} %" if r["mfu"] is not None else "  n/a"
    mem = "peak mem" if device.startswith("cuda") else "peak RSS"
    print(f"  {r['method']:9s} {r['ms']:9.1f} ms/step {r['img_s']:9.1f} img/s {r['tflops']:8.2f} TFLOP/s  MFU {mfu}"
          f"  {mem} {r['mem_gib']:.2f} GiB", flush=True)


def header(args, what):
    peak = device_peak(args)
    print(f"{what}: teacher {args.teacher}, student {args.student}, {args.img_size}px, batch {args.batch_size}, "
          f"{args.dtype}{', compiled' if args.compile else ''}"
          f"{', grad checkpointing' if args.grad_checkpointing else ''}, on {device_name(args.device)}; MFU against "
          f"{f'{peak / 1e12:.0f} TFLOP/s (bf16 dense)' if peak else 'no known peak (--peak_tflops)'}")
    if args.device.startswith("cuda"):
        print(f"  attention: {flash_attention(args)}")


def flash_attention(args):
    """Whether our attention's q, k, v (dtype, head width, layout) run on the FlashAttention kernel: a forward
    with every other SDPA backend switched off raises if not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    vit = ViT.from_name(args.student).to(args.device)
    x = torch.randn(1, 3, args.img_size, args.img_size, device=args.device)
    autocast = torch.autocast("cuda", dtype=getattr(torch, args.dtype))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast, torch.no_grad():
            vit(x)
        return "FlashAttention kernel"
    except RuntimeError as e:
        return f"not FlashAttention ({str(e).splitlines()[0][:120]})"


def cmd_step(args):
    batches = None
    if args.dataset:  # real batches through the real input pipeline
        splits, _ = load_splits(args.dataset, args.data_dir)
        loader = make_loader(splits["train"], train_transform(args.img_size), args.batch_size, train=True,
                             num_workers=args.num_workers, device=args.device)
        batches = forever(loader)
    header(args, "training step")
    print_step(bench_step(args.method, args, batches), args.device)


def bench_eval(args):
    """Time a validation batch: the teacher's and the student's forward (evaluation.evaluate), seconds a batch."""
    device = args.device
    with torch.device(device):
        models = [Classifier(ViT.from_name(name), 100).eval() for name in (args.teacher, args.student)]
    x = normalize(torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8,
                                device=device))
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                sync(device)
                t0 = time.perf_counter()
            for m in models:
                m(x).argmax(-1)
    sync(device)
    return (time.perf_counter() - t0) / args.iters


def cmd_schedule(args):
    header(args, "whole schedules from measured steps")
    r = {}
    for m in METHODS:
        r[m] = bench_step(m, args)
        print_step(r[m], args.device)
    val = bench_eval(args)
    print(f"  {'validate':9s} {1000 * val:9.1f} ms/batch of teacher + student forward passes")
    print(f"\n  wall-clock of the training steps (no evaluation, no data stalls), {args.batch_size} images a step:")
    print(f"  {'dataset':9s} {'SLAD 30':>9s} {'LoRA 30+30':>11s} {'FT 30+30':>9s} {'probe 30+80':>12s}   "
          "SLAD / two-step")
    t = {m: r[m]["ms"] / 1000 for m in METHODS}
    for name, n in TRAIN_SIZES.items():
        steps = n // args.batch_size
        slad = 30 * steps * t["slad"]
        two = {"lora": 30 * steps * (t["lora"] + t["distill"]), "finetune": 30 * steps * (t["finetune"] + t["distill"]),
               "probe": steps * (30 * t["probe"] + 80 * t["distill"])}
        print(f"  {name:9s} {hours(slad):>9s} {hours(two['lora']):>11s} {hours(two['finetune']):>9s} "
              f"{hours(two['probe']):>12s}   " + "  ".join(f"{k} {slad / v:.2f}" for k, v in two.items()))
    print("\n  SLAD's 30 epochs with both models validated every epoch (no data stalls):")
    for name, n in TRAIN_SIZES.items():
        validation = 30 * math.ceil(VAL_SIZES[name] / args.batch_size) * val
        print(f"  {name:9s} SLAD 30 epochs + validation: {hours(30 * (n // args.batch_size) * t['slad'] + validation)}"
              f" ({hours(validation)} of it validation, {VAL_SIZES[name]} images an epoch)")


# -----------------------------------------------------------------------------
# memory: a step's peak, measured on a GPU, or traced on fake tensors without one


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors alive, and their peak, as torch.cuda.max_memory_allocated counts them:
    each storage an op makes adds its size, rounded up to the CUDA caching allocator's 512-byte blocks, until a
    weakref callback sees it freed; views and in-place results make no storage. Like max_memory_allocated it
    leaves out the CUDA context (~0.5 GiB a process) and what the allocator caches or fragments (nvidia-smi shows
    both); unlike it, the workspaces kernels allocate inside themselves (cuBLAS's, FlashAttention's backward
    accumulators), which a trace never sees. With block=1 this is the count of PyTorch's MemTracker (torch >= 2.5),
    which we cannot use: it refuses frozen parameters, i.e. every method but fine-tuning."""

    def __init__(self, block=512):
        super().__init__()
        self.block, self.live, self.now, self.peak = block, set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self.live:
                    size = -(-storage.nbytes() // self.block) * self.block
                    self.live.add(id(storage))
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self.free, id(storage), size)
        return out

    def free(self, key, size):
        self.live.discard(key)
        self.now -= size


def traced_peak(method, args, batch_size):
    """Peak bytes of two training steps of `method` (the second holds AdamW's state), traced on fake tensors: the
    real ops, autograd and fused AdamW run on shapes and dtypes alone, with no memory and no arithmetic, so ViT-L
    at 518 px traces in seconds on a laptop. Fake CPU tensors, not fake CUDA ones: without a GPU, SDPA on fake CUDA
    tensors cannot pick FlashAttention and falls back to the math kernel, which keeps every N x N attention matrix
    in fp32 (2.7 GiB a block of ViT-B at batch 32), and autograd will not run their backward (torch 2.4 aborts).
    On the CPU, SDPA's fused kernel keeps for backward what FlashAttention keeps (q, k, v, the output, a
    logsumexp), and autocast puts the same ops in bf16 as CUDA's (matmuls, convolutions, attention) but the first
    LayerNorm, which CUDA's runs in fp32: one B x N x D bf16 tensor more a model there."""
    tracker = LiveBytes()
    dtype = getattr(torch, args.dtype)
    # fake tensors hold no values: skip DINOv2's init (newer torch's trunc_normal_ reads them)
    with FakeTensorMode(), tracker, mock.patch.object(ViT, "init_weights", lambda self: None):
        model, loss_fn, params, _ = build(method, args)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        x = torch.randn(batch_size, 3, args.img_size, args.img_size)  # a batch as normalize() leaves it
        y = torch.randint(0, 100, (batch_size,))
        for _ in range(2):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_fn(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak


def measured_peak(method, args, batch_size):
    """torch.cuda.max_memory_allocated over two training steps on this GPU, in bytes; None if they do not fit."""
    run = argparse.Namespace(**{**vars(args), "batch_size": batch_size, "warmup": 1, "iters": 1})
    try:
        peak = bench_step(method, run)["mem_gib"] * 2**30
    except torch.cuda.OutOfMemoryError:
        peak = None
    gc.collect()  # what the failed step held, before the next one starts
    torch.cuda.empty_cache()
    return peak


def largest_batch(peak_full, peak_half, batch_size, gib):
    """The largest batch whose peak stays within 90 % of `gib` (the rest: the CUDA context, the allocator's cache
    and fragmentation), by peak = fixed + batch x per-image, fitted at batch_size and batch_size // 2."""
    if peak_full is None or peak_half is None:
        return "OOM"
    per_image = (peak_full - peak_half) / (batch_size - batch_size // 2)
    fixed = peak_full - batch_size * per_image  # weights, gradients, AdamW's state, bf16 weight copies
    return max(0, math.floor((0.9 * gib * 2**30 - fixed) / per_image))


def gib(nbytes):
    if nbytes is None:
        return "OOM"
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def cmd_memory(args):
    measured = args.device.startswith("cuda") and not args.fake
    peak_of = measured_peak if measured else traced_peak
    b, half = args.batch_size, args.batch_size // 2
    sizes = " / ".join(f"{g:g}" for g in args.gpu_gib)
    print(f"peak memory of two training steps (AdamW), {args.img_size} px, batch {b}, {args.dtype}")
    print(f"measured on {device_name(args.device)} (torch.cuda.max_memory_allocated)" if measured else
          "traced on fake tensors, no GPU used (live tensor bytes, as max_memory_allocated counts them)")
    print(f"largest batch: peak = fixed + batch x per-image, fitted at batch {half} and {b}, within 90 % of "
          f"{sizes} GiB\n")
    print(f"| teacher -> student | method | peak | with --grad_checkpointing | largest batch in {sizes} GiB "
          f"| with --grad_checkpointing |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for teacher, student in args.pairs:
        for method in args.methods:
            peaks, fits = [], []
            for checkpointing in (False, True):
                run = argparse.Namespace(**{**vars(args), "teacher": teacher, "student": student,
                                            "grad_checkpointing": checkpointing, "compile": False, "peak_tflops": None})
                full, small = peak_of(method, run, b), peak_of(method, run, half)
                peaks.append(gib(full))
                fits.append(" / ".join(str(largest_batch(full, small, b, g)) for g in args.gpu_gib))
            print(f"| {teacher} -> {student} | {method} | {' | '.join(peaks + fits)} |", flush=True)


def cmd_fit(args):
    if not args.device.startswith("cuda"):
        sys.exit("bench.py fit: needs a CUDA device (running out of its memory is the measurement); "
                 "`python bench.py memory` estimates the largest batch without one")
    header(args, "largest batch, doubling from --batch_size until out of memory")
    batch, fits, too_many = args.batch_size, None, None
    while batch <= 2**14 and too_many is None:
        peak = measured_peak(args.method, args, batch)
        if peak is None:
            too_many = batch
        else:
            fits, batch = (batch, peak), 2 * batch
    total = torch.cuda.get_device_properties(args.device).total_memory
    print(f"  {args.method}: largest batch that fits: " + (f"{fits[0]} (peak {gib(fits[1])} of {gib(total)})"
          if fits else f"none from {args.batch_size} up") + (f"; batch {too_many}: out of memory" if too_many else ""))


# -----------------------------------------------------------------------------
# the input pipeline, and fake real-size datasets to time it on


def texture(rng, size):
    """A smooth random colour field with grain, (w, h): it compresses and decodes like a photo, noise would not."""
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8))
    grain = rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(coarse.resize(size, Image.Resampling.BICUBIC)) + grain, 0, 255)
                           .astype(np.uint8))


def write_fake_dtd(root, per_split, classes=4, size=(640, 480)):
    """DTD's layout (data.read_dtd) with per_split = (train, val, test) JPEGs of DTD's size, 640 x 480: decoding
    and resizing them costs what it costs on DTD, with no download."""
    base, rng = os.path.join(root, "dtd", "dtd"), np.random.default_rng(0)
    os.makedirs(os.path.join(base, "labels"), exist_ok=True)
    for split, n in zip(("train", "val", "test"), per_split):
        names = [f"class{k % classes}/{split}_{k}.jpg" for k in range(n)]
        for name in names:
            os.makedirs(os.path.dirname(os.path.join(base, "images", name)), exist_ok=True)
            texture(rng, size).save(os.path.join(base, "images", name), quality=90)
        with open(os.path.join(base, "labels", f"{split}1.txt"), "w") as f:
            f.write("\n".join(names) + "\n")


def write_fake_cityscapes(root, per_split, size=(2048, 1024)):
    """Cityscapes' layout (data.Cityscapes) with per_split = (train, val) PNGs of its size, 2048 x 1024, and label
    maps of road, building, vegetation, sky and car blocks."""
    base, rng = os.path.join(root, "cityscapes"), np.random.default_rng(0)
    w, h = size
    for split, n in zip(("train", "val"), per_split):
        for k in range(n):
            city = ("aachen", "bochum")[k % 2]
            labels = rng.choice(np.array([7, 11, 21, 23, 26], dtype=np.uint8), (max(1, h // 64), max(1, w // 64)))
            labels = Image.fromarray(labels).resize(size, Image.Resampling.NEAREST)
            for folder, kind, img in (("leftImg8bit", "leftImg8bit", texture(rng, size)),
                                      ("gtFine", "gtFine_labelIds", labels)):
                os.makedirs(os.path.join(base, folder, split, city), exist_ok=True)
                img.save(os.path.join(base, folder, split, city, f"{city}_{k:06d}_000019_{kind}.png"), compress_level=1)


def cmd_data(args):
    with tempfile.TemporaryDirectory() as tmp:
        what = args.dataset
        if args.dataset is None:  # 32 real-size JPEGs in DTD's layout, in a temporary folder
            write_fake_dtd(tmp, per_split=(32, 4, 4))
            args.dataset, args.data_dir, what = "dtd", tmp, "fake DTD (640 x 480 JPEGs)"
        splits, _ = load_splits(args.dataset, args.data_dir)
        transform = (SegTrainTransform(args.img_size, round(args.img_size * SEG_BASE_RATIO))
                     if args.dataset in SEGMENTATION else train_transform(args.img_size))  # what the scripts use
        workers = args.num_workers
        warmup, iters = max(args.warmup, workers), max(args.iters, 3 * workers)  # every worker busy, then timed
        # an epoch long enough that no worker idles at its end: the same images again, decoded again
        repeats = math.ceil((warmup + iters + workers * PREFETCH) * args.batch_size / len(splits["train"]))
        train = torch.utils.data.ConcatDataset([splits["train"]] * repeats)
        loader = make_loader(train, transform, args.batch_size, train=True, num_workers=workers, device=args.device)
        batches = iter(loader)
        for i in range(warmup + iters):
            if i == warmup:
                t0 = time.perf_counter()
            next(batches)
        img_s = iters * args.batch_size / (time.perf_counter() - t0)
        del batches, loader
    per_worker = img_s / max(workers, 1)
    print(f"input pipeline: {what} train, {args.img_size}px (decode, resize, crop, jitter, flip, to uint8), "
          f"{workers} worker{'s' * (workers != 1)}, batch {args.batch_size}: {img_s:.1f} img/s, "
          f"{per_worker:.1f} img/s a worker ({1000 / per_worker:.1f} ms an image)")

    peak = TARGET_MFU * PEAK_FLOPS["H100"]
    print(f"\nwhat a training step at {TARGET_MFU:.0%} MFU on an H100 ({PEAK_FLOPS['H100'] / 1e12:.0f} TFLOP/s bf16 "
          f"dense) eats at {args.img_size} px, and the workers that keep up at {per_worker:.0f} img/s each:\n")
    print("| teacher -> student | method | TFLOP an image | img/s | workers (2x to spare) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for teacher, student in args.pairs:
        for method in METHODS:
            flops = planned_flops(method, teacher, student, args.img_size)
            need = peak / flops
            print(f"| {teacher} -> {student} | {method} | {flops / 1e12:.2f} | {need:,.0f} | "
                  f"{math.ceil(need / per_worker)} ({math.ceil(2 * need / per_worker)}) |")

    # workers hand their batches to the training process in shared memory, PREFETCH of them each in flight
    batch_bytes = args.batch_size * 3 * args.img_size**2  # uint8 images; the labels are negligible
    shm = {w: w * PREFETCH * batch_bytes for w in sorted({max(workers, 1), 8, 16})}
    print(f"\n/dev/shm a process: workers x {PREFETCH} batches x {args.batch_size} x 3 x {args.img_size} x "
          f"{args.img_size} bytes = " + ", ".join(f"{n / 1e6:,.0f} MB with {w} workers" for w, n in shm.items()))
    print(f"  (under torchrun, a node's processes hold workers a process x {PREFETCH} x the global batch together)")
    advice = 2 ** max(0, math.ceil(math.log2(2 * shm[16] / 1e9)))  # GB, twice what 16 workers need
    print(f"  Docker gives 64 MB unless told: docker run --shm-size {advice}g (twice 16 workers' need) or --ipc=host")


def cmd_backbone(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    nets = {"ours (model.py)": ViT.from_name(args.model)}
    try:
        nets["timm"] = timm_vit(args.model, args.img_size)
    except ImportError:
        print("timm is not installed: `pip install timm` to compare with it")
    if args.lora:  # stage 1 of the LoRA two-step: LoRA on qkv, rank --rank, the rest frozen
        nets = {"ours + lora.py": add_lora(nets.pop("ours (model.py)"), rank=args.rank), **nets}
        if "timm" in nets:
            try:
                import peft  # optional: only for this comparison
                config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=["qkv"])
                nets["timm + PEFT"] = peft.get_peft_model(nets.pop("timm"), config)
            except ImportError:
                print("peft is not installed: `pip install peft` to compare with its LoRA")
                del nets["timm"]
    print(f"{args.model}{' with LoRA' if args.lora else ''} at {args.img_size}px, batch {args.batch_size}, "
          f"{args.dtype}, on {device_name(device)}")
    results = {}
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    for label, net in nets.items():
        net = net.to(device).train()
        net = torch.compile(net) if args.compile else net
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                sync(device)
                t0 = time.perf_counter()
            with autocast:
                out = net(x)
            out.float().square().mean().backward()
        sync(device)
        results[label] = ms = (time.perf_counter() - t0) / args.iters * 1000
        trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
        print(f"  {label:16s} forward+backward {ms:8.1f} ms/iter  {args.batch_size / ms * 1000:8.1f} img/s  "
              f"({trained / 1e6:.3f}M trainable parameters)")
    if len(results) == 2:
        (_, ours), (theirs_label, theirs) = results.items()
        print(f"  ours / {theirs_label} time: {ours / theirs:.3f} (below 1: ours is faster)")


def timm_vit(name, img_size):
    import timm  # optional: only for this comparison
    from timm.layers import SwiGLUPacked
    c = CONFIGS[name]
    base = name.removesuffix("_reg")
    if base in TIMM_NAMES:
        tname = TIMM_NAMES[base].replace("_dinov2", "_reg4_dinov2") if c.num_register_tokens else TIMM_NAMES[base]
        return timm.create_model(tname, pretrained=False, img_size=img_size, num_classes=0)
    from timm.models.vision_transformer import VisionTransformer  # toy configs: the same layers, our sizes
    kw = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.66667 * 2) if c.ffn == "swiglu" else {}
    return VisionTransformer(img_size=img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                             num_heads=c.num_heads, init_values=1.0, num_classes=0, reg_tokens=c.num_register_tokens,
                             **kw)


def cmd_latency(args):
    """A deployed classifier's forward pass on the CPU: torch (the model as deploy.load_model gives it, as predict.py
    runs it) against ONNX Runtime (the graph export_onnx.py writes), at the same number of threads. Random weights:
    the time does not depend on them."""
    import copy

    import onnxruntime as ort

    from deploy import fix_size
    from export_onnx import to_onnx
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Classifier(ViT.from_name(args.model), args.num_classes).eval()
    fixed = copy.deepcopy(model)
    fix_size(fixed.vit, args.img_size)
    onnx_bytes = to_onnx(fixed, torch.randn(2, 3, args.img_size, args.img_size), 18).SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    runs = {"torch": lambda: model(x), "ONNX Runtime": lambda: session.run(None, {"images": x.numpy()})}
    print(f"{args.model} classifier ({args.num_classes} classes) at {args.img_size}px, batch {args.batch_size}, "
          f"float32, on {device_name('cpu')}; ONNX Runtime {ort.__version__}")
    ms = {}
    with torch.no_grad():
        for label, run in runs.items():
            for i in range(args.warmup + args.iters):
                if i == args.warmup:
                    t0 = time.perf_counter()
                run()
            ms[label] = (time.perf_counter() - t0) / args.iters * 1000
            img_s = args.batch_size / ms[label] * 1000
            print(f"  {label:12s} {ms[label]:9.1f} ms/batch {img_s:8.1f} img/s", flush=True)
    print(f"  ONNX Runtime / torch time: {ms['ONNX Runtime'] / ms['torch']:.2f} (below 1: ONNX Runtime is faster)")


def forever(loader):
    while True:
        yield from loader


def hours(seconds):
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


# -----------------------------------------------------------------------------
# proof: issue 24's GPU checks as one command, each in its own process with its own time cap, one table


TRAIN_FIGURE = r"epoch \d+/\d+ step .*?(\d+ ms/step.*mfu \S+)"  # a training log line: its speed


def proof_steps(tiny, cuda, dtd, cityscapes, runs):
    """[(name, argv, time cap in s, regex of the output lines that carry the figure, why skipped or None)], in the
    order that loses the least if the --budget runs out: the training scripts, the steps and the goals' figures
    (schedule, MFU, LoRA against PEFT), the input pipeline, memory, then the rest of compilation."""
    py, cpu = [sys.executable], [] if cuda else ["--device", "cpu"]
    pair, big = ["--teacher", "vitb14", "--student", "vits14"], ["--teacher", "vitl14", "--student", "vitb14"]
    sizes, seg_sizes = [], []  # the scripts' defaults: 518 px, batch 32 (DTD); 560 px, batch 8 (Cityscapes)
    step = ["--img_size", "518", "--batch_size", "32", "--dtype", "bfloat16"]
    data, memory, cap = ["--num_workers", "16", "--batch_size", "32"], [], 1
    if tiny:  # the toy family at toy sizes, one thread a process: the same commands, a minute on a CPU
        pair, big = ["--teacher", "toy-b", "--student", "toy-s"], ["--teacher", "toy-l", "--student", "toy-b"]
        sizes, seg_sizes = ["--img_size", "56", "--batch_size", "8"], ["--img_size", "56", "--batch_size", "4"]
        step = ["--img_size", "56", "--batch_size", "4", "--warmup", "1", "--iters", "2", *cpu]
        data = ["--num_workers", "2", "--batch_size", "8", "--warmup", "1", "--iters", "2", *cpu]
        memory, cap = ["--pairs", "toy-b:toy-s", "--methods", "slad", "--img_size", "56", "--batch_size", "4"], 2
    train = ["--dataset", "dtd", "--data_dir", dtd, "--init", "random", "--epochs", "1", "--log_every",
             "1" if tiny else "4", *pair, *sizes, *cpu]
    seg = ["--dataset", "cityscapes", "--data_dir", cityscapes, "--init", "random", "--epochs", "1", "--log_every",
           "1" if tiny else "2", *pair, *seg_sizes, *cpu]
    out = lambda name: ["--out_dir", os.path.join(runs, name)]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    no_gpu = None if cuda else "needs a CUDA device (running out of its memory is the measurement)"
    slow = "--tiny on a CPU: inductor takes over a minute to compile the toys here" if tiny and not cuda else None
    missing = [m for m in ("timm", "peft") if importlib.util.find_spec(m) is None]
    no_peft = f"{' and '.join(missing)} not installed (pip install timm peft)" if missing else None
    speed, memory_rows = r"slad\s+(.*)|attention: (.*)", r"^((?:measured|traced) on.*)|^(\|.*\| slad \|.*)"
    schedule = r"^\s+(slad\s+.*)|^\s+(validate\s+.*)|^\s+((?:dtd|aircraft) +SLAD 30 epochs.*)"
    compiled = lambda p: (f"step --compile, {p[1]} -> {p[3]}", py + ["bench.py", "step", "--method", "slad", *p,
                          *step, "--compile"], 240 * cap, speed, slow)  # inductor took > 120 s on an H200
    return [
        ("SLAD, the defaults", py + ["train_slad.py", *train, *out("slad")], 60 * cap, TRAIN_FIGURE, None),
        ("SLAD under torchrun, 1 process", py + torchrun + ["train_slad.py", *train, *out("slad-torchrun")],
         60 * cap, TRAIN_FIGURE, None),
        *[(f"two-step, {how} teacher", py + ["train_twostep.py", *train, "--teacher_adapt", how,
           *out(f"twostep-{how}")], 60 * cap, TRAIN_FIGURE, None) for how in ("probe", "lora", "finetune")],
        ("segmentation, SLAD", py + ["train_slad.py", *seg, *out("seg")], 60 * cap, TRAIN_FIGURE, None),
        (f"schedule, {pair[1]} -> {pair[3]}", py + ["bench.py", "schedule", *pair, *step], 90 * cap, schedule, None),
        (f"step, {big[1]} -> {big[3]}", py + ["bench.py", "step", "--method", "slad", *big, *step], 45 * cap, speed,
         None),
        ("LoRA step: ours against timm + PEFT", py + ["bench.py", "backbone", "--lora", "--model", pair[1], *step],
         60 * cap, r"(.* ms/iter.*)|ours / .* time: (.*)", no_peft),
        compiled(big),  # the 40 % MFU goal
        ("input pipeline", py + ["bench.py", "data", "--dataset", "dtd", "--data_dir", dtd, "--img_size", "518",
         *data], 45 * cap, r"(\d+ workers?, batch .* a worker)", None),
        ("memory", py + ["bench.py", "memory", *memory, *cpu], 150 * cap, memory_rows, None),
        *[(f"largest batch, {p[1]} -> {p[3]}", py + ["bench.py", "fit", "--method", "slad", *p, *step], 45 * cap,
           r"largest batch that fits: (.*)", no_gpu) for p in (pair, big)],
        ("SLAD --compile", py + ["train_slad.py", *train, "--compile", *out("slad-compile")], 240 * cap,
         TRAIN_FIGURE, slow),
        compiled(pair),
    ]


def run_capped(argv, cap, log_path, env=None):
    """Run argv (in the repo) with its output in log_path: ("ok" | "failed: <its last line>" | "timed out after
    N s", seconds). A process past its cap is killed with its whole group (torchrun's workers, loader workers)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {cap:.0f} s", time.perf_counter() - t0
    if code == 0:
        return "ok", time.perf_counter() - t0
    lines = [line.strip() for line in open(log_path, errors="replace") if line.strip()]
    return f"failed: {lines[-1][:200] if lines else f'exit code {code}'}", time.perf_counter() - t0


def figure(text, pattern):
    """A step's figures for its table cell: what the pattern (or its group) picks from each line of the output;
    of a training log ("slad epoch 1/1 step 8/8 | loss ... | 123 ms/step | ..."), the last line of each stage."""
    picked = {}
    for i, line in enumerate(text.splitlines()):
        m = re.search(pattern, line)
        if m:
            stage = line.split()[0] if pattern == TRAIN_FIGURE else i
            picked[stage] = (f"{stage}: " if pattern == TRAIN_FIGURE else "") + m.group(m.lastindex or 0)
    return "; ".join(" ".join(p.split()).strip(" |").replace(" | ", ", ") for p in picked.values()).replace("|", "/")


def machine():
    """The device row: GPU, its memory, CPUs, /dev/shm, and the versions."""
    cpus = f"{os.cpu_count()} CPUs"
    if os.path.isdir("/dev/shm"):
        cpus += f", /dev/shm {shutil.disk_usage('/dev/shm').total / 1e9:.1f} GB"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
    else:
        gpu = "no CUDA device"
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                f"python {sys.version.split()[0]}")
    return f"{gpu}; {cpus}", versions


def cmd_proof(args):
    cuda = torch.cuda.is_available()
    work = os.path.abspath(os.path.splitext(args.out)[0])  # out/proof.md -> out/proof/: data, runs, a log a step
    data_dir, runs = os.path.join(work, "data"), os.path.join(work, "runs")
    for folder in (data_dir, runs):  # the proof's own folders, made afresh: the scripts refuse to overwrite a run
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(runs)
    gpu, versions = machine()
    rows = [("device", "", gpu, "ok", 0), ("versions", "", versions, "ok", 0)]

    t0 = time.perf_counter()
    dtd, cityscapes = os.path.join(data_dir, "dtd-like"), os.path.join(data_dir, "cityscapes-like")
    dtd_sizes, city_sizes = ((16, 8, 8), (10, 2)) if args.tiny else ((256, 32, 32), (20, 2))
    write_fake_dtd(dtd, dtd_sizes)
    write_fake_cityscapes(cityscapes, city_sizes, size=(256, 128) if args.tiny else (2048, 1024))
    rows.append(("fake data", "", f"DTD layout: {'/'.join(map(str, dtd_sizes))} train/val/test JPEGs of 640 x 480; "
                 f"Cityscapes layout: {'/'.join(map(str, city_sizes))} train/val PNGs of "
                 f"{'256 x 128' if args.tiny else '2048 x 1024'}", "ok", time.perf_counter() - t0))

    env = dict(os.environ, OMP_NUM_THREADS="1") if args.tiny else None  # toys: 1 thread is fastest, busy CPU or not
    deadline = time.perf_counter() + args.budget
    for i, (name, argv, cap, pattern, skip) in enumerate(proof_steps(args.tiny, cuda, dtd, cityscapes, runs), 1):
        command = " ".join(argv).replace(sys.executable, "python").replace(work, os.path.splitext(args.out)[0])
        left = deadline - time.perf_counter()
        if args.only and not re.search(args.only, name):
            skip = f"not in --only {args.only}"
        if skip or left < 10:
            rows.append((name, command, "", f"skipped: {skip or f'the --budget of {args.budget} s is spent'}", 0))
            continue
        log = os.path.join(work, f"{i:02d}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log")
        print(f"[{i}] {name}: {command}", flush=True)
        status, seconds = run_capped(argv, min(cap, left), log, env)
        rows.append((name, command, figure(open(log, errors="replace").read(), pattern), status, seconds))
        print(f"    {status}, {seconds:.0f} s", flush=True)

    table = [f"# bench.py proof{' --tiny' if args.tiny else ''}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Logs: {os.path.splitext(args.out)[0]}/NN-step.log.", "",
             "| step | command | figure | status | s |", "| --- | --- | --- | --- | ---: |"]
    table += [f"| {name} | {f'`{cmd}`' if cmd else ''} | {fig} | {status} | {s:.0f} |"
              for name, cmd, fig, status, s in rows]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    if any(status.startswith(("failed", "timed out")) for *_, status, _ in rows):
        sys.exit(1)


# -----------------------------------------------------------------------------


def pair(text):
    """'vitb14:vits14' -> ('vitb14', 'vits14')."""
    teacher, _, student = text.partition(":")
    if teacher not in CONFIGS or student not in CONFIGS:
        raise argparse.ArgumentTypeError(f"{text!r}: want TEACHER:STUDENT, both of {', '.join(CONFIGS)}")
    return teacher, student


def regex(text):
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({e})")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    parsers = {name: sub.add_parser(name) for name in ("step", "schedule", "fit", "memory", "data", "backbone")}
    for name, s in parsers.items():
        gpu_figure = name in ("memory", "data")  # figures about a GPU run: its sizes, wherever they are computed
        s.add_argument("--img_size", type=int, default=518 if gpu_figure else 224)
        s.add_argument("--batch_size", type=int, default=32 if cuda or gpu_figure else 8)
        s.add_argument("--device", default="cuda" if cuda else "cpu")
        if name != "memory":
            s.add_argument("--iters", type=int, default=10)
            s.add_argument("--warmup", type=int, default=3)
        if name in ("step", "schedule", "fit", "backbone"):
            s.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])
            s.add_argument("--compile", action="store_true")
        if name in ("step", "schedule", "fit", "memory", "backbone"):
            s.add_argument("--rank", type=int, default=16)
        if name in ("step", "schedule", "fit"):
            s.add_argument("--teacher", default="vitb14", choices=list(CONFIGS))
            s.add_argument("--student", default="vits14", choices=list(CONFIGS))
            s.add_argument("--grad_checkpointing", action="store_true")
            s.add_argument("--peak_tflops", type=float, default=None,
                           help="the device's peak, if not in mfu.PEAK_FLOPS")
        if name in ("memory", "data"):
            s.add_argument("--pairs", type=pair, nargs="+", default=list(PAIRS), metavar="TEACHER:STUDENT")
        if name in ("step", "data"):
            s.add_argument("--dataset", default=None, choices=CLASSIFICATION if name == "step" else CLASSIFICATION +
                           SEGMENTATION, help="real batches from this dataset (default: step, random tensors; "
                           "data, real-size JPEGs in DTD's layout, made in a temporary folder)")
            s.add_argument("--data_dir", default="./data")
            s.add_argument("--num_workers", type=int, default=8 if cuda else 0)
    parsers["step"].add_argument("--method", default="slad", choices=METHODS)
    parsers["step"].add_argument("--profile", type=int, default=0, metavar="N",
                                 help="then profile 3 steps: time by kind of op, and the N ops that take most")
    parsers["fit"].add_argument("--method", default="slad", choices=METHODS)
    parsers["memory"].add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parsers["memory"].add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parsers["memory"].add_argument("--gpu_gib", type=float, nargs="+", default=[24, 40, 80])
    parsers["memory"].add_argument("--fake", action="store_true", help="trace on fake tensors even on a GPU")
    parsers["backbone"].add_argument("--model", default="vits14", choices=list(CONFIGS))
    parsers["backbone"].add_argument("--lora", action="store_true", help="LoRA on qkv: ours against PEFT's on timm")
    proof = sub.add_parser("proof")
    proof.add_argument("--tiny", action="store_true", help="the toy family at toy sizes: tests the proof on a CPU")
    proof.add_argument("--out", default="out/proof.md", help="the table; logs, data and runs go in out/proof/")
    proof.add_argument("--budget", type=float, default=900, help="seconds for all steps: later ones are skipped")
    proof.add_argument("--only", type=regex, default=None, help="a regex: run only the steps whose name it matches")
    latency = sub.add_parser("latency")  # the CPU alone, float32: its own flags
    latency.set_defaults(device="cpu")
    latency.add_argument("--model", default="vits14", choices=list(CONFIGS))
    latency.add_argument("--img_size", type=int, default=518)
    latency.add_argument("--batch_size", type=int, default=1)
    latency.add_argument("--num_classes", type=int, default=100)
    latency.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's)")
    latency.add_argument("--iters", type=int, default=10)
    latency.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv), p


def main(argv=None):
    args, _ = parse_args(argv)
    torch.manual_seed(0)
    if getattr(args, "device", "").startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    {"step": cmd_step, "schedule": cmd_schedule, "fit": cmd_fit, "memory": cmd_memory, "data": cmd_data,
     "backbone": cmd_backbone, "latency": cmd_latency, "proof": cmd_proof}[args.what](args)


if __name__ == "__main__":
    main()
