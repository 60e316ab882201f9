"""
Benchmarks that print figures (never timed tests).

    python bench.py backbone --model vits14 --img_size 224 --batch_size 32
        forward + backward of our ViT, and of timm's DINOv2 ViT on the same config when timm is installed
        (pip install timm; it is not a requirement of this repo)
"""

import argparse
import time

import torch

from model import CONFIGS, ViT

TIMM_NAMES = {"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
              "vitl14": "vit_large_patch14_dinov2", "vitg14": "vit_giant_patch14_dinov2"}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fwd_bwd(net, x, dtype, device, iters, warmup):
    """ms per forward + backward of net on x, under autocast to dtype."""
    ctx = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    for i in range(warmup + iters):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with ctx:
            out = net(x)
        out.float().square().mean().backward()
    sync(device)
    return (time.perf_counter() - t0) / iters * 1000


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


def bench_backbone(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    nets = {"ours (model.py)": ViT.from_name(args.model)}
    try:
        nets["timm"] = timm_vit(args.model, args.img_size)
    except ImportError:
        print("timm is not installed: `pip install timm` to compare with it")
    print(f"{args.model} at {args.img_size}px, batch {args.batch_size}, {args.dtype}, on {device_name(device)}")
    results = {}
    for label, net in nets.items():
        net = net.to(device).train()
        if args.compile:
            net = torch.compile(net)
        ms = time_fwd_bwd(net, x, dtype, device, args.iters, args.warmup)
        results[label] = ms
        print(f"  {label:16s} forward+backward {ms:8.1f} ms/iter  {args.batch_size / ms * 1000:8.1f} img/s")
    if len(results) == 2:
        ours, theirs = results.values()
        print(f"  ours / timm time: {ours / theirs:.3f} (below 1: ours is faster)")


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backbone", help="forward+backward of the ViT alone, against timm's")
    b.add_argument("--model", default="vits14", choices=list(CONFIGS))
    b.add_argument("--img_size", type=int, default=224)
    b.add_argument("--batch_size", type=int, default=8)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--compile", action="store_true")
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    {"backbone": bench_backbone}[args.what](args)
