"""
MFU, as nanoGPT's estimate_mfu: the matmul FLOPs a training step makes per image (step_flops, from the ViT's
ViT.flops; torch.utils.flop_counter counts the same, tested), over the devices' dense bf16 peak (peak_flops). The
training scripts' log lines and bench.py print it.
"""

import torch
import torch.distributed as dist


def step_flops(vit, img_size, how):
    """Matmul FLOPs per image of a training step through encoder `vit`, as the step trains it (`how`): "frozen" or
    "probe" (no gradient in it), "lora" (lora.add_lora's adapters on every block's qkv), "finetune" (all of it).
    MFU's numerator; torch.utils.flop_counter counts the same (tested), but for LoRA's fold of its weight
    (2 out r in a layer a step, not an image: < 0.01 % at batch 32). Heads and recomputation under
    --grad_checkpointing are not counted."""
    if how not in ("frozen", "probe", "lora", "finetune"):
        raise ValueError(f"unknown how {how!r}: frozen, probe, lora or finetune")
    c, forward = vit.config, vit.flops(img_size)
    if how in ("frozen", "probe"):
        return forward
    patches, D = (img_size // c.patch_size) ** 2, c.embed_dim
    n = 1 + c.num_register_tokens + patches
    attention, patch_embed = c.depth * 2 * 2 * n * n * D, 2 * patches * 3 * c.patch_size**2 * D
    # the backward: each matmul's input gradient but the patch embedding's (the image's), and attention's backward
    # is two of its forwards (dQ and dK from dP; dP and dV from the output's gradient)
    backward = forward - patch_embed + attention
    if how == "finetune":  # and every weight's gradient, the patch embedding's too (attention has no weights)
        return forward + backward + forward - attention
    # LoRA: nothing below block 0's qkv trains, so its input gradient is never formed; each adapter's backward
    # (lora.FoldedLoRA) is four rank-r products: x A^T again, dB, dy B and dA; its forward is in W0's matmul
    A, B = vit.blocks[0].attn.qkv.sliced()  # A (r, D), or (3 r, D) with an adapter each for q, k, v; B (3 D, r)
    adapters = c.depth * 2 * n * 2 * (A.shape[0] * D + B.shape[0] * B.shape[1])
    return forward + backward - 2 * n * 3 * D * D + adapters


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
