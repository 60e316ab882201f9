"""
A self-contained DINOv2 Vision Transformer, numerically the official one
(github.com/facebookresearch/dinov2), plus the prediction heads of SLAD (App. C.1).

Parameter names equal the official checkpoints' keys, so
    vit.load_state_dict(torch.load("dinov2_vitb14_pretrain.pth", weights_only=True), strict=True)
works as is. What we leave out of the official code: xformers, nested tensors, FSDP block
chunking, drop-path and the DINO training heads.
"""

import math
import os
import urllib.error
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# configs: the four DINOv2 backbones by their torch.hub names, with and without registers


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (ViT-g)
    num_register_tokens: int = 0
    patch_size: int = 14
    img_size: int = 518  # the pos-embed grid of the checkpoints: 37 x 37 patches
    mlp_ratio: float = 4.0
    init_values: float = 1.0  # LayerScale init, as DINOv2's hub models
    # pos-embed resampling: DINOv2's hub models use offset 0.1 without antialiasing, the *_reg ones 0 with it
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False


CONFIGS = {
    "vits14": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl14": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": ViTConfig(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
CONFIGS.update({f"{k}_reg": replace(c, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
                for k, c in list(CONFIGS.items())})
# the toy family (toys.py), for tests and the offline runs, shaped as DINOv2's: widths in ViT-S/B/L's ratios
# (384 : 768 : 1024 = 48 : 96 : 128), one head width for all (16 here, 64 in DINOv2) so that heads line up
# (Fig. 4), toy-s and toy-b of one depth and toy-l twice it (12, 12, 24 in DINOv2)
CONFIGS["toy-s"] = ViTConfig(embed_dim=48, depth=3, num_heads=3, img_size=224)
CONFIGS["toy-b"] = ViTConfig(embed_dim=96, depth=3, num_heads=6, img_size=224)
CONFIGS["toy-l"] = ViTConfig(embed_dim=128, depth=6, num_heads=8, img_size=224)

# _DINOV2_BASE_URL in facebookresearch/dinov2's dinov2/hub/utils.py; checkpoint_url follows its hub/backbones.py
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
TOY_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # toys.py writes them


def checkpoint_url(name):
    """The URL DINOv2's torch.hub entry point downloads for `name`, e.g. .../dinov2_vitb14_reg4_pretrain.pth."""
    arch = name.removesuffix("_reg")
    reg = "_reg4" if name.endswith("_reg") else ""
    return f"{DINOV2_URL}/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"


def describe(name):
    c = CONFIGS[name]
    reg = f", {c.num_register_tokens} registers" if c.num_register_tokens else ""
    return f"{name} ({c.embed_dim} wide, {c.depth} blocks, {c.num_heads} heads, {c.ffn} FFN{reg})"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be had or read; the message says what was expected and where."""


def load_error(e):
    """torch.load's reason, in one line, without its advice to trust the file: weights_only=False or
    add_safe_globals would run or allow what a weights file should never hold."""
    lines = [line.strip().removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
             for line in str(e).splitlines()]
    advice = ("weights_only", "Weights only", "trust", "safe_globals", "documentation")
    return next((line for line in lines if line and not any(a in line for a in advice)), "")[:200]


def config_of(state_dict):
    """The CONFIGS name a DINOv2 state dict fits, from its width, depth, registers and FFN; None if none does."""
    try:
        blocks = [int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")]
        found = (state_dict["cls_token"].shape[-1], 1 + max(blocks),
                 state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0,
                 "swiglu" if any(".mlp.w12." in k for k in state_dict) else "mlp")
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        return None
    return next((n for n, c in CONFIGS.items() if (c.embed_dim, c.depth, c.num_register_tokens, c.ffn) == found), None)


def first_difference(expected, found):
    """The first missing key, unexpected key or shape mismatch of state dict `found`, in words; None if none."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and getattr(found[k], "shape", None) != expected[k].shape]
    if missing:
        return f"{len(missing)} key(s) missing, the first {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} unexpected key(s), the first {unexpected[0]}"
    if shapes:
        k = shapes[0]
        return f"{k} is {tuple(getattr(found[k], 'shape', ()))}, not {tuple(expected[k].shape)}"
    return None


# -----------------------------------------------------------------------------
# the layers, named as in DINOv2 so the checkpoints load without remapping


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, D), patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v: rows [0:D] are q, [D:2D] k, [2D:3D] v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim); flash / mem-efficient on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """ViT-g's FFN: w12 holds the two input projections fused, the hidden width shrunk by 2/3 and rounded to 8."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # 6144 -> 4096 for ViT-g
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        D = c.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = Attention(D, c.num_heads)
        self.ls1 = LayerScale(D, c.init_values)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = (SwiGLUFFN if c.ffn == "swiglu" else Mlp)(D, int(D * c.mlp_ratio))
        self.ls2 = LayerScale(D, c.init_values)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# -----------------------------------------------------------------------------
# the Vision Transformer


class ViT(nn.Module):
    def __init__(self, config: ViTConfig, name=None):
        super().__init__()
        if config.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"unknown ffn {config.ffn!r}: 'mlp' or 'swiglu'")
        self.config, self.name = config, name
        c, D = config, config.embed_dim
        self.grid = c.img_size // c.patch_size  # pos_embed holds grid x grid patch positions
        self.patch_embed = PatchEmbed(c.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, D))
        if c.num_register_tokens:  # absent from the state dict when there are none, as in DINOv2
            self.register_tokens = nn.Parameter(torch.zeros(1, c.num_register_tokens, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # unused here (iBOT masking); kept so checkpoints load strictly
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.grad_checkpointing = False  # recompute each block in backward: memory for ViT-L/g at 518
        self.init_weights()

    @property
    def embed_dim(self):
        return self.config.embed_dim

    def init_weights(self):  # DINOv2's init, for --init random
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.config.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_name(cls, name, **overrides):
        """A randomly initialised ViT of a CONFIGS name; overrides change config fields."""
        if name not in CONFIGS:
            raise ValueError(f"unknown model {name!r}; one of: {', '.join(CONFIGS)}")
        return cls(replace(CONFIGS[name], **overrides), name=name)

    @classmethod
    def from_pretrained(cls, name, path=None, progress=True):
        """The official DINOv2 weights of `name`: from `path` if given, else from torch.hub's cache,
        downloading them there first (as torch.hub.load('facebookresearch/dinov2', ...) does). A toy name
        loads the pretrained toy family from weights/ (float16, read into float32)."""
        model = cls.from_name(name)
        if name.startswith("toy"):  # the toy family is shipped in the repo, made by toys.py
            path = path or os.path.join(TOY_WEIGHTS, f"{name}.pt")
            if not os.path.exists(path):
                raise CheckpointError(f"no file {path}: the pretrained {describe(name)}; rebuild the toy family "
                                      f"with `python toys.py` (~20 min on a 2-core CPU), or use --init random")
        url = checkpoint_url(name)
        cached = path is None
        if cached:
            path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:  # writes to a temporary file, then renames: an interrupted download leaves nothing behind
                    torch.hub.download_url_to_file(url, path, progress=progress)
                except (urllib.error.URLError, OSError) as e:
                    raise CheckpointError(
                        f"could not download the DINOv2 weights of {describe(name)} from {url} ({e}). "
                        f"Without network, fetch that file elsewhere and put it at {path}"
                    ) from None
        again = "delete it and run again to download it again" if cached else f"use the file from {url}"
        if not os.path.isfile(path):
            raise CheckpointError(f"no file {path}: expected the DINOv2 weights of {describe(name)} from {url}")
        if os.path.getsize(path) == 0:  # what an interrupted download or copy leaves
            raise CheckpointError(f"{path} is empty (0 bytes; an interrupted download?): {again}")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip, another format, pickled Python objects
            raise CheckpointError(f"{path} is not a valid checkpoint of {describe(name)}: it cannot be read as "
                                  f"tensors ({type(e).__name__}: {load_error(e)}), truncated or not a weights file; "
                                  f"{again}") from None
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path} is not a valid checkpoint of {describe(name)}: it holds a "
                                  f"{type(state_dict).__name__}, not a state dict; {again}")
        difference = first_difference(model.state_dict(), state_dict)
        if difference:
            like = config_of(state_dict)
            like = f"it looks like {describe(like)}" if like else "it fits none of the DINOv2 configs"
            raise CheckpointError(f"{path} is not a valid checkpoint of {describe(name)}: {difference}; {like}; "
                                  f"{again}")
        model.load_state_dict(state_dict, strict=True)
        return model

    def interpolate_pos_embed(self, h, w):
        """Position embeddings for an h x w patch grid, resampled from the checkpoint's grid x grid."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        c = self.config
        pos = self.pos_embed.float()  # resampled in float32 whatever the autocast dtype, as DINOv2
        patch_pos = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        if c.interpolate_offset:
            # DINOv2 asks for a scale factor of (n + 0.1) / grid rather than a size: the output size is the
            # same, but bicubic sampling positions follow the scale factor, so we keep it for identical outputs
            size = dict(scale_factor=((h + c.interpolate_offset) / self.grid, (w + c.interpolate_offset) / self.grid))
        else:
            size = dict(size=(h, w))
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=c.interpolate_antialias, **size)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(
                f"input of {H}x{W} pixels: both sides must be multiples of the patch size {p} "
                f"(e.g. {max(p, H // p * p)}x{max(p, W // p * p)})"
            )
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_embed(H // p, W // p).to(x.dtype)
        if self.config.num_register_tokens:  # registers go after CLS and carry no position
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    def forward_blocks(self, x, blocks):
        """The outputs of the chosen blocks (indices, negatives count from the end), each after the final
        LayerNorm: a list of (B, 1 + R + N, D), CLS first, then registers, then patches. Blocks after the
        last chosen one are not run."""
        idx = [b % self.config.depth for b in blocks]
        x = self.prepare_tokens(x)
        out = {}
        for i, blk in enumerate(self.blocks[: max(idx) + 1]):
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
            if i in idx:
                out[i] = self.norm(x)
        return [out[i] for i in idx]

    def forward_features(self, x):
        """The tokens after the final LayerNorm, (B, 1 + R + N, D): DINOv2's x_norm_clstoken,
        x_norm_regtokens and x_norm_patchtokens, concatenated."""
        return self.forward_blocks(x, [-1])[0]

    forward = forward_features

    def flops(self, img_size):
        """Matmul FLOPs of one forward pass on one img_size x img_size image (2 per multiply-add), as
        nanoGPT's estimate_mfu counts them: the linear layers, the attention products and the patch
        embedding; norms and activations are left out."""
        c = self.config
        n = 1 + c.num_register_tokens + (img_size // c.patch_size) ** 2
        D = c.embed_dim
        hidden = int(D * c.mlp_ratio)
        ffn = 3 * D * ((int(hidden * 2 / 3) + 7) // 8 * 8) if c.ffn == "swiglu" else 2 * D * hidden
        per_block = 2 * n * (3 * D * D + D * D + ffn) + 2 * 2 * n * n * D  # qkv, proj, FFN; q k^T and attn v
        return c.depth * per_block + 2 * (n - 1 - c.num_register_tokens) * 3 * c.patch_size**2 * D


# -----------------------------------------------------------------------------
# prediction heads (App. C.1)


class Classifier(nn.Module):
    """A ViT and its classification head (App. C.1, after Marrie et al.): a two-layer MLP on the CLS
    tokens of the last three blocks, concatenated."""

    n_blocks = 3

    def __init__(self, vit, num_classes):
        super().__init__()
        self.vit, self.num_classes = vit, num_classes
        n_in = self.n_blocks * vit.embed_dim
        # n_hidden = n_in for ViT-S (and narrower), sqrt(n_in * n_out) for ViT-B/L (and wider)
        n_hidden = n_in if vit.embed_dim <= 384 else round(math.sqrt(n_in * num_classes))
        self.head = nn.Sequential(nn.Linear(n_in, n_hidden), nn.GELU(), nn.Linear(n_hidden, num_classes))

    def forward(self, x, blocks=()):
        """Logits (B, num_classes) of images (B, 3, H, W); with `blocks`, also those blocks' outputs (TED's
        filters read them), from the same pass: every block is computed once."""
        depth = self.vit.config.depth
        head_blocks, chosen = [b % depth for b in range(-self.n_blocks, 0)], [b % depth for b in blocks]
        needed = sorted(set(head_blocks + chosen))
        out = dict(zip(needed, self.vit.forward_blocks(x, needed)))
        logits = self.head(torch.cat([out[b][:, 0] for b in head_blocks], dim=-1))
        return (logits, [out[b] for b in chosen]) if chosen else logits


class Segmenter(nn.Module):
    """A ViT and the linear segmentation head of App. C.1 (after Marrie et al. and DINOv2's linear
    evaluation): BatchNorm and a 1x1 convolution on the final block's patch tokens, the logits upsampled
    bilinearly to the input's size."""

    def __init__(self, vit, num_classes):
        super().__init__()
        self.vit, self.num_classes = vit, num_classes
        self.head = nn.Sequential(nn.BatchNorm2d(vit.embed_dim), nn.Conv2d(vit.embed_dim, num_classes, 1))

    def forward(self, x, blocks=()):
        """Logits (B, num_classes, H, W) of images (B, 3, H, W); with `blocks`, also those blocks' outputs,
        from the same pass."""
        depth = self.vit.config.depth
        chosen = [b % depth for b in blocks]
        needed = sorted(set([depth - 1] + chosen))
        out = dict(zip(needed, self.vit.forward_blocks(x, needed)))
        logits = self.decode(out[depth - 1], x.shape[-2:])
        return (logits, [out[b] for b in chosen]) if chosen else logits

    def decode(self, tokens, size):
        """Logits (B, num_classes, H, W) of an H x W image from its final tokens (B, 1 + R + N, D)."""
        (H, W), p = size, self.vit.config.patch_size
        patches = tokens[:, 1 + self.vit.config.num_register_tokens:]
        logits = self.head(patches.transpose(1, 2).reshape(len(tokens), -1, H // p, W // p))
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)


def slide_inference(model, x, window, stride):
    """Segmentation logits of a whole image from window x window crops taken every `stride` pixels (the
    last one flush with the border), averaged where they overlap (App. C.2: 560, stride 280). An image
    smaller than the window is padded and the padding cropped away."""
    B, _, H, W = x.shape
    ph, pw = max(window - H, 0), max(window - W, 0)
    x = F.pad(x, (0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    starts = lambda n: sorted(set(list(range(0, n - window + 1, stride)) + [n - window]))
    total, count = None, torch.zeros(1, 1, Hp, Wp, device=x.device)
    for top in starts(Hp):
        for left in starts(Wp):
            logits = model(x[:, :, top:top + window, left:left + window]).float()
            if total is None:
                total = torch.zeros(B, logits.shape[1], Hp, Wp, device=x.device)
            total[:, :, top:top + window, left:left + window] += logits
            count[:, :, top:top + window, left:left + window] += 1
    return (total / count)[:, :, :H, :W]


def initial_backbone(name, role, init, seed):
    """A run's encoder before adaptation: the official weights, or a random init that depends on (seed, role)
    alone -- 'teacher' or 'student' -- so that cka.py, or anyone, can rebuild it."""
    if init == "dinov2":
        return ViT.from_pretrained(name)
    torch.manual_seed(2 * seed + (role == "student"))
    return ViT.from_name(name)


def save_model(path, model, **extra):
    """A deployable Classifier or Segmenter: its backbone's official-layout state dict and config, its head, and
    model.meta if it has one (what prediction needs: the task, class names, the image size it trained at, the
    preprocessing; experiment.deploy_meta)."""
    vit = model.vit
    torch.save({"kind": type(model).__name__, "config": asdict(vit.config), "name": vit.name, "vit": vit.state_dict(),
                "head": model.head.state_dict(), "num_classes": model.num_classes, "meta": getattr(model, "meta", {}),
                **extra}, path)


def load_model(path):
    """A Classifier or Segmenter from a file written by save_model, e.g. the student a training script exports, in
    eval mode (a Segmenter's BatchNorm then uses its running statistics, as evaluated), its meta in model.meta ({}
    in files written before meta was saved)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        kind = {"Classifier": Classifier, "Segmenter": Segmenter}[ckpt["kind"]]
        model = kind(ViT(ViTConfig(**ckpt["config"]), name=ckpt["name"]), ckpt["num_classes"])
        model.vit.load_state_dict(ckpt["vit"])
        model.head.load_state_dict(ckpt["head"])
        model.meta = ckpt.get("meta", {})
    except Exception as e:
        raise CheckpointError(f"{path} is not a model written by save_model "
                              f"({type(e).__name__}: {str(e).strip()[:300]})") from None
    return model.eval()
