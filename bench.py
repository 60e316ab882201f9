"""
Benchmarks that print figures (speed is never a timed test). Like nanoGPT's bench.py: the training step of
the scripts, stripped of everything but the timing.

    python bench.py step --method slad --teacher vitb14 --student vits14 --img_size 518 --batch_size 32
        one method's training step: ms/step, img/s, MFU, peak memory. Methods: slad (train_slad.py), the
        two-step stage 1 by teacher adaptation -- probe, finetune, lora -- and distill (stage 2, a LoRA
        student and a frozen teacher). Random tensors by default; --dataset times real batches instead.
    python bench.py schedule --teacher vitb14 --student vits14 --img_size 518 --batch_size 32
        every step above, then the wall-clock of whole schedules on each dataset: SLAD (30 epochs) against
        two-step (30 + 30; 30 + 80 after a probed teacher), as a ratio (the paper: SLAD 2x faster)
    python bench.py data --dataset dtd --img_size 518 --num_workers 8
        the input pipeline alone (decode, resize, augment), img/s: it should outrun the step it feeds
    python bench.py backbone --model vits14 --img_size 224
        forward + backward of our ViT, and of timm's DINOv2 ViT on the same config if timm is installed
    python bench.py latency --model vits14 --img_size 518 --batch_size 1
        a deployed classifier's CPU latency: ONNX Runtime (the file export_onnx.py writes) against torch

MFU counts model FLOPs analytically (ViT.flops: matmuls, 2 per multiply-add, as nanoGPT's estimate_mfu):
a forward pass is F; a backward pass costs F more to propagate gradients through an encoder that has
anything trainable in or below it (LoRA adapters, or everything), and F more again for the weight gradients
of a fully trained encoder. So per image: slad 2 F_t + 2 F_s, probe F_t, lora 2 F_t, finetune 3 F_t, distill
F_t + 2 F_s. Heads and LoRA's own matmuls (< 2 %) and recomputation under --grad_checkpointing are not
counted. The peak is the device's dense bf16 figure (--peak_tflops to set it).
"""

import argparse
import itertools
import resource
import time

import torch

from data import (CLASSIFICATION, SEG_BASE_RATIO, SEGMENTATION, SegTrainTransform, load_splits, make_loader, normalize,
                  train_transform)
from experiment import peak_flops
from kd import distill_loss, slad_loss, task_loss
from lora import add_lora, share_lora, trainable_parameters
from model import CONFIGS, Classifier, ViT
from train_slad import TeacherStudent
from train_twostep import adapt

METHODS = ("slad", "probe", "finetune", "lora", "distill")
# training images per epoch (train split; CUB and Cityscapes after holding out 10 % for validation)
TRAIN_SIZES = {"dtd": 1880, "aircraft": 3334, "cub": 5395}
TIMM_NAMES = {"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
              "vitl14": "vit_large_patch14_dinov2", "vitg14": "vit_giant_patch14_dinov2"}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"


def device_peak(args):
    return args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(args.device)


def build(method, args, num_classes=100):
    """The models of a method's training step, as the scripts set them up: (forward, loss_fn, params, F/image)."""
    teacher = Classifier(ViT.from_name(args.teacher), num_classes)
    student = Classifier(ViT.from_name(args.student), num_classes)
    for m in (teacher, student):
        m.vit.grad_checkpointing = args.grad_checkpointing
    F_t, F_s = teacher.vit.flops(args.img_size), student.vit.flops(args.img_size)
    if method == "slad":
        add_lora(teacher.vit, rank=args.rank)
        share_lora(student.vit, teacher.vit, "even")
        both = TeacherStudent(teacher, student)

        def step(x, y):
            teacher_logits, student_logits = both(x)
            return slad_loss(student_logits, teacher_logits, y)  # eq. 4
        return both, step, trainable_parameters(both), 2 * F_t + 2 * F_s
    if method in ("probe", "finetune", "lora"):
        adapt(teacher, method, args.rank)
        flops = {"probe": F_t, "lora": 2 * F_t, "finetune": 3 * F_t}[method]
        return teacher, lambda x, y: task_loss(teacher(x), y), trainable_parameters(teacher), flops
    adapt(student, "lora", args.rank)  # distill: stage 2 with a frozen teacher (eval mode, no grad)
    teacher.eval().requires_grad_(False)

    def step(x, y):
        with torch.no_grad():
            t = teacher(x)
        return distill_loss(student(x), t, y)  # eq. 2
    return torch.nn.ModuleList([teacher, student]), step, trainable_parameters(student), F_t + 2 * F_s


def bench_step(method, args, batches=None):
    """Time one method's training step: warm-up steps (compilation), then args.iters timed ones."""
    device = args.device
    model, loss_fn, params, flops_per_image = build(method, args)
    model.to(device)
    if args.compile:
        loss_fn = torch.compile(loss_fn)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    if batches is None:  # random tensors, made once: the step alone
        x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
        y = torch.randint(0, 100, (args.batch_size,), device=device)
        batches = itertools.repeat((x, y))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y = next(batches)
        x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with autocast:
            loss = loss_fn(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    dt = (time.perf_counter() - t0) / args.iters
    peak = device_peak(args)
    mem = (torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda")
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    out = dict(method=method, ms=dt * 1000, img_s=args.batch_size / dt, tflops=flops_per_image * args.batch_size / dt / 1e12,
               mfu=flops_per_image * args.batch_size / dt / peak if peak else None, mem_gib=mem)
    del model, optimizer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def print_step(r, device):
    mfu = f"{100 * r['mfu']:5.1f} %" if r["mfu"] is not None else "  n/a"
    mem = "peak mem" if device.startswith("cuda") else "peak RSS"
    print(f"  {r['method']:9s} {r['ms']:9.1f} ms/step {r['img_s']:9.1f} img/s {r['tflops']:8.2f} TFLOP/s  MFU {mfu}"
          f"  {mem} {r['mem_gib']:.2f} GiB", flush=True)


def header(args, what):
    peak = device_peak(args)
    print(f"{what}: teacher {args.teacher}, student {args.student}, {args.img_size}px, batch {args.batch_size}, "
          f"{args.dtype}{', compiled' if args.compile else ''}{', grad checkpointing' if args.grad_checkpointing else ''}, "
          f"on {device_name(args.device)}; MFU against {f'{peak / 1e12:.0f} TFLOP/s (bf16 dense)' if peak else 'no known peak (--peak_tflops)'}")
    if args.device.startswith("cuda"):
        print(f"  attention: {flash_attention(args)}")


def flash_attention(args):
    """Whether our attention's q, k, v (dtype, head width, layout) run on the FlashAttention kernel: a forward
    with every other SDPA backend switched off raises if not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    vit = ViT.from_name(args.student).to(args.device)
    x = torch.randn(1, 3, args.img_size, args.img_size, device=args.device)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=getattr(torch, args.dtype)), torch.no_grad():
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


def cmd_schedule(args):
    header(args, "whole schedules from measured steps")
    r = {}
    for m in METHODS:
        r[m] = bench_step(m, args)
        print_step(r[m], args.device)
    print(f"\n  wall-clock of the training steps (no evaluation, no data stalls), {args.batch_size} images a step:")
    print(f"  {'dataset':9s} {'SLAD 30':>9s} {'LoRA 30+30':>11s} {'FT 30+30':>9s} {'probe 30+80':>12s}   SLAD / two-step")
    t = {m: r[m]["ms"] / 1000 for m in METHODS}
    for name, n in TRAIN_SIZES.items():
        steps = n // args.batch_size
        slad = 30 * steps * t["slad"]
        two = {"lora": 30 * steps * (t["lora"] + t["distill"]), "finetune": 30 * steps * (t["finetune"] + t["distill"]),
               "probe": steps * (30 * t["probe"] + 80 * t["distill"])}
        print(f"  {name:9s} {hours(slad):>9s} {hours(two['lora']):>11s} {hours(two['finetune']):>9s} {hours(two['probe']):>12s}   "
              + "  ".join(f"{k} {slad / v:.2f}" for k, v in two.items()))


def cmd_data(args):
    splits, _ = load_splits(args.dataset, args.data_dir)
    transform = (SegTrainTransform(args.img_size, round(args.img_size * SEG_BASE_RATIO)) if args.dataset in SEGMENTATION
                 else train_transform(args.img_size))  # what the training scripts use
    loader = make_loader(splits["train"], transform, args.batch_size, train=True,
                         num_workers=args.num_workers, device=args.device)
    n, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == args.warmup:  # after the workers have started and filled their queues
            t0, n = time.perf_counter(), 0
        n += len(x)
        if i >= args.warmup + args.iters:
            break
    dt = time.perf_counter() - t0
    print(f"input pipeline: {args.dataset} train, {args.img_size}px (decode, resize, crop, jitter, flip, to uint8), "
          f"{args.num_workers} workers, batch {args.batch_size}: {n / dt:.1f} img/s ({1000 * dt / n * max(args.num_workers, 1):.1f} ms an image a worker)")


def cmd_backbone(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    nets = {"ours (model.py)": ViT.from_name(args.model)}
    try:
        nets["timm"] = timm_vit(args.model, args.img_size)
    except ImportError:
        print("timm is not installed: `pip install timm` to compare with it")
    print(f"{args.model} at {args.img_size}px, batch {args.batch_size}, {args.dtype}, on {device_name(device)}")
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
        print(f"  {label:16s} forward+backward {ms:8.1f} ms/iter  {args.batch_size / ms * 1000:8.1f} img/s")
    if len(results) == 2:
        ours, theirs = results.values()
        print(f"  ours / timm time: {ours / theirs:.3f} (below 1: ours is faster)")


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
    return VisionTransformer(img_size=img_size, patch_size=14, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                             init_values=1.0, num_classes=0, reg_tokens=c.num_register_tokens, **kw)


def cmd_latency(args):
    """A deployed classifier's forward pass on the CPU: torch (the model as model.load_model gives it, as predict.py
    runs it) against ONNX Runtime (the graph export_onnx.py writes), at the same number of threads. Random weights:
    the time does not depend on them."""
    import copy

    import onnxruntime as ort

    from export_onnx import fix_size, to_onnx
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
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    cuda = torch.cuda.is_available()
    common = dict(device=("cuda" if cuda else "cpu"), dtype=("bfloat16" if cuda else "float32"))
    parsers = {name: sub.add_parser(name) for name in ("step", "schedule", "data", "backbone")}
    for name, s in parsers.items():
        s.add_argument("--img_size", type=int, default=224)
        s.add_argument("--batch_size", type=int, default=32 if cuda else 8)
        s.add_argument("--device", default=common["device"])
        s.add_argument("--iters", type=int, default=10)
        s.add_argument("--warmup", type=int, default=3)
        if name != "data":
            s.add_argument("--dtype", default=common["dtype"], choices=["float32", "bfloat16", "float16"])
            s.add_argument("--compile", action="store_true")
        if name in ("step", "schedule"):
            s.add_argument("--teacher", default="vitb14", choices=list(CONFIGS))
            s.add_argument("--student", default="vits14", choices=list(CONFIGS))
            s.add_argument("--rank", type=int, default=16)
            s.add_argument("--grad_checkpointing", action="store_true")
            s.add_argument("--peak_tflops", type=float, default=None, help="the device's peak, if not in experiment.PEAK_FLOPS")
        if name in ("step", "data"):
            s.add_argument("--dataset", default=None if name == "step" else "synthetic",
                           choices=CLASSIFICATION if name == "step" else CLASSIFICATION + SEGMENTATION,
                           help="real batches from this dataset (default for step: random tensors)")
            s.add_argument("--data_dir", default="./data")
            s.add_argument("--num_workers", type=int, default=8 if cuda else 0)
    parsers["step"].add_argument("--method", default="slad", choices=METHODS)
    parsers["backbone"].add_argument("--model", default="vits14", choices=list(CONFIGS))
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
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    {"step": cmd_step, "schedule": cmd_schedule, "data": cmd_data, "backbone": cmd_backbone,
     "latency": cmd_latency}[args.what](args)


if __name__ == "__main__":
    main()
