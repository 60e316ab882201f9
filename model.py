"""
A self-contained Vision Transformer that is numerically the official DINOv2 (github.com/facebookresearch/dinov2)
or DINOv3 (github.com/facebookresearch/dinov3), by its config, plus the prediction heads of SLAD (App. C.1).

Parameter names equal the official checkpoints' keys, so
    vit.load_state_dict(torch.load("dinov2_vitb14_pretrain.pth", weights_only=True), strict=True)
works as is, for both families; weights.from_pretrained finds, downloads and checks those files, and deploy.py saves
and loads a trained model. In order: the configs, the layers, the ViT, DINOv3's differences in one section, the
heads. DINOv3 differs from DINOv2 by a few config fields: 16-px patches, RoPE on q and k in place of a learned
position embedding, 4 storage tokens (DINOv2's registers, renamed), LayerNorm eps 1e-5, a qkv bias masked on the k
rows, SwiGLU's two input matrices unfused. What we leave out of the official code: xformers, nested tensors, FSDP
block chunking, drop-path, the DINO training heads and the crops of pretraining.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# configs: the DINOv2 backbones by their torch.hub names, with and without registers, and the DINOv3 ones


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (DINOv2's ViT-g; DINOv3's plus models and 7B)
    num_register_tokens: int = 0  # DINOv3 calls them storage tokens
    patch_size: int = 14
    img_size: int = 518  # DINOv2: the pos-embed grid of the checkpoints, 37 x 37 patches (DINOv3 has no grid)
    mlp_ratio: float = 4.0
    init_values: float = 1.0  # LayerScale init, as DINOv2's hub models
    # pos-embed resampling: DINOv2's hub models use offset 0.1 without antialiasing, the *_reg ones 0 with it
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    # "dinov3": RoPE, storage tokens, LayerNorm eps 1e-5, the k-masked qkv bias, SwiGLU as w1, w2, w3
    family: str = "dinov2"
    qkv_bias: bool = True  # DINOv3's 7B has none
    local_cls_norm: bool = False  # DINOv3's 7B and SAT ViT-L hold a norm for their pretraining's local crops, unused
    # in train mode the DINOv3 hub models scale RoPE's coordinates by a log-uniform factor in [1/r, r] drawn per
    # block; off (0) here: a teacher and a student that share adapters should see their patches at the same places
    rope_rescale: float = 0.0


CONFIGS = {
    "vits14": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl14": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": ViTConfig(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
CONFIGS.update({f"{k}_reg": replace(c, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
                for k, c in list(CONFIGS.items())})
# DINOv3 (dinov3/hub/backbones.py): S, B, L distilled from the 7B, as DINOv2's from ViT-g (the SAT-493M ViT-L from
# the SAT-493M 7B, loaded as dinov3_vit7b16); heads 64 wide up to H+, so Fig. 4's head-aligned slicing carries over.
# The 7B's heads are 128 wide: it cannot be the SLAD teacher of a student with 64-wide heads (half a teacher head).
DINOV3 = ViTConfig(family="dinov3", patch_size=16, num_register_tokens=4, init_values=1e-5)
CONFIGS.update({
    "dinov3_vits16": replace(DINOV3, embed_dim=384, depth=12, num_heads=6),
    "dinov3_vits16plus": replace(DINOV3, embed_dim=384, depth=12, num_heads=6, ffn="swiglu", mlp_ratio=6.0),
    "dinov3_vitb16": replace(DINOV3, embed_dim=768, depth=12, num_heads=12),
    "dinov3_vitl16": replace(DINOV3, embed_dim=1024, depth=24, num_heads=16),
    "dinov3_vitl16_sat493m": replace(DINOV3, embed_dim=1024, depth=24, num_heads=16, local_cls_norm=True),  # SAT-493M
    "dinov3_vitl16plus": replace(DINOV3, embed_dim=1024, depth=24, num_heads=16, ffn="swiglu", mlp_ratio=6.0),
    "dinov3_vith16plus": replace(DINOV3, embed_dim=1280, depth=32, num_heads=20, ffn="swiglu", mlp_ratio=6.0),
    "dinov3_vit7b16": replace(DINOV3, embed_dim=4096, depth=40, num_heads=32, ffn="swiglu", mlp_ratio=3.0,
                              qkv_bias=False, local_cls_norm=True),
})
# the toy family (toys.py), for tests and the offline runs, shaped as DINOv2's: widths in ViT-S/B/L's ratios
# (384 : 768 : 1024 = 48 : 96 : 128), one head width for all (16 here, 64 in DINOv2) so that heads line up
# (Fig. 4), toy-s and toy-b of one depth and toy-l twice it (12, 12, 24 in DINOv2)
CONFIGS["toy-s"] = ViTConfig(embed_dim=48, depth=3, num_heads=3, img_size=224)
CONFIGS["toy-b"] = ViTConfig(embed_dim=96, depth=3, num_heads=6, img_size=224)
CONFIGS["toy-l"] = ViTConfig(embed_dim=128, depth=6, num_heads=8, img_size=224)
NORM_EPS = {"dinov2": 1e-6, "dinov3": 1e-5}


# -----------------------------------------------------------------------------
# the layers, named as in DINOv2 and DINOv3 so the checkpoints load without remapping


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, D), patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, bias=True, mask_k_bias=False):
        super().__init__()
        self.num_heads = num_heads
        # fused q, k, v: rows [0:D] are q, [D:2D] k, [2D:3D] v
        self.qkv = KMaskedLinear(dim, 3 * dim) if bias and mask_k_bias else nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:  # DINOv3
            q, k = rotate(q, *rope), rotate(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim); flash / mem-efficient on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden(hidden):
    """SwiGLU's hidden width: the MLP's shrunk by 2/3 and rounded up to 8 (6144 -> 4096 for ViT-g; the 7B rounds to
    64, 8192 either way)."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """w3(silu(w1 x) * w2 x), its hidden width swiglu_hidden's. DINOv2 stores w1 and w2 fused, as w12; DINOv3 as
    they are."""

    def __init__(self, dim, hidden, fused):
        super().__init__()
        hidden = swiglu_hidden(hidden)
        if fused:
            self.w12 = nn.Linear(dim, 2 * hidden)
        else:
            self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1) if hasattr(self, "w12") else (self.w1(x), self.w2(x))
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):  # gamma in x's dtype: under autocast the residual stream stays bf16, half the bytes
        return x * self.gamma.to(x.dtype)


class Block(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        D, eps, v3 = c.embed_dim, NORM_EPS[c.family], c.family == "dinov3"
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.attn = Attention(D, c.num_heads, bias=c.qkv_bias, mask_k_bias=v3)
        self.ls1 = LayerScale(D, c.init_values)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        hidden = int(D * c.mlp_ratio)
        self.mlp = SwiGLUFFN(D, hidden, fused=not v3) if c.ffn == "swiglu" else Mlp(D, hidden)
        self.ls2 = LayerScale(D, c.init_values)

    def forward(self, x, rope=None):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


# -----------------------------------------------------------------------------
# the Vision Transformer


class ViT(nn.Module):
    # learned tokens, not matrices (DINOv3's storage tokens too)
    NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "register_tokens", "storage_tokens", "mask_token")

    def __init__(self, config: ViTConfig, name=None):
        super().__init__()
        if config.ffn not in ("mlp", "swiglu") or config.family not in NORM_EPS:
            raise ValueError(f"unknown ffn {config.ffn!r} or family {config.family!r}: 'mlp' or 'swiglu', "
                             f"'dinov2' or 'dinov3'")
        self.config, self.name = config, name
        c, D, R = config, config.embed_dim, config.num_register_tokens
        self.patch_embed = PatchEmbed(c.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        if c.family == "dinov2":  # a learned position embedding for grid x grid patches; registers
            self.grid = c.img_size // c.patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, D))
            if R:  # absent from the state dict when there are none, as in DINOv2
                self.register_tokens = nn.Parameter(torch.zeros(1, R, D))
        else:  # DINOv3: RoPE in every block; the registers are called storage tokens
            self.rope_embed = RoPE(D // c.num_heads, c.rope_rescale)
            if R:
                self.storage_tokens = nn.Parameter(torch.zeros(1, R, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # unused (iBOT masking); kept so checkpoints load strictly
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(D, eps=NORM_EPS[c.family])
        if c.local_cls_norm:
            self.local_cls_norm = nn.LayerNorm(D, eps=NORM_EPS[c.family])  # in the 7B's and SAT ViT-L's, never used
        self.grad_checkpointing = False  # recompute each block in backward: memory for ViT-L/g at 518
        self.init_weights()

    @property
    def embed_dim(self):
        return self.config.embed_dim

    def init_weights(self):  # the official inits, for --init random: DINOv2's, and DINOv3's where it differs
        c = self.config
        token_std = 1e-6 if c.family == "dinov2" else 0.02
        if c.family == "dinov2":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=token_std)
        if c.num_register_tokens:
            nn.init.normal_(self.register_tokens if c.family == "dinov2" else self.storage_tokens, std=token_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_name(cls, name, **overrides):
        """A randomly initialised ViT of a CONFIGS name; overrides change config fields."""
        if name not in CONFIGS:
            raise ValueError(f"unknown model {name!r}; one of: {', '.join(CONFIGS)}")
        return cls(replace(CONFIGS[name], **overrides), name=name)
    def interpolate_pos_embed(self, h, w):
        """DINOv2: position embeddings for an h x w patch grid, resampled from the checkpoint's grid x grid."""
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
        """(B, 1 + R + N, D): CLS, the R registers (storage tokens), the N patches."""
        B, _, H, W = x.shape
        c, p = self.config, self.config.patch_size
        if H % p or W % p:
            raise ValueError(
                f"input of {H}x{W} pixels: both sides must be multiples of the patch size {p} "
                f"(e.g. {max(p, H // p * p)}x{max(p, W // p * p)})"
            )
        x = self.patch_embed(x)
        if c.family == "dinov3":  # CLS, storage tokens, patches; no position added: RoPE turns q and k in each block
            extra = [self.storage_tokens.expand(B, -1, -1).to(x.dtype)] if c.num_register_tokens else []
            return torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), *extra, x], dim=1)
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_embed(H // p, W // p).to(x.dtype)
        if c.num_register_tokens:  # registers go after CLS and carry no position
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    def forward_blocks(self, x, blocks, norm=True):
        """The outputs of the chosen blocks (indices, negatives count from the end), each after the final
        LayerNorm (norm=False: before it): a list of (B, 1 + R + N, D), CLS first, then registers, then patches.
        Blocks after the last chosen one are not run."""
        idx = [b % self.config.depth for b in blocks]
        grid = (x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size)
        x = self.prepare_tokens(x)
        out = {}
        for i, blk in enumerate(self.blocks[: max(idx) + 1]):
            rope = self.rope_embed(*grid) if self.config.family == "dinov3" else None  # per block, as the official
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
            if i in idx:
                out[i] = self.norm(x) if norm else x
        return [out[i] for i in idx]

    def forward_features(self, x):
        """The tokens after the final LayerNorm, (B, 1 + R + N, D): the official x_norm_clstoken,
        x_norm_regtokens (DINOv3: x_storage_tokens) and x_norm_patchtokens, concatenated."""
        return self.forward_blocks(x, [-1])[0]

    forward = forward_features

    def flops(self, img_size):
        """Matmul FLOPs of one forward pass on one img_size x img_size image (2 per multiply-add), as
        nanoGPT's estimate_mfu counts them: the linear layers, the attention products and the patch
        embedding; norms, activations and RoPE's rotations (elementwise, as the norms) are left out."""
        c = self.config
        n = 1 + c.num_register_tokens + (img_size // c.patch_size) ** 2
        D = c.embed_dim
        hidden = int(D * c.mlp_ratio)
        ffn = 3 * D * swiglu_hidden(hidden) if c.ffn == "swiglu" else 2 * D * hidden
        per_block = 2 * n * (3 * D * D + D * D + ffn) + 2 * 2 * n * n * D  # qkv, proj, FFN; q k^T and attn v
        return c.depth * per_block + 2 * (n - 1 - c.num_register_tokens) * 3 * c.patch_size**2 * D


# -----------------------------------------------------------------------------
# the optimizer and its schedule (nanoGPT's configure_optimizers)


def adamw(groups, weight_decay, device):
    """AdamW over groups of (named parameters, peak lr): matrices decay; biases, norms, LayerScale and the ViT's
    learned tokens and position embeddings (ViT.NO_WEIGHT_DECAY, as timm and DINOv2) do not. Each group keeps
    its peak as "peak_lr", which get_lr scales."""
    param_groups = []
    for named, lr in groups:
        for decay in (True, False):
            ps = [p for n, p in named if (p.ndim >= 2 and n.rsplit(".", 1)[-1] not in ViT.NO_WEIGHT_DECAY) == decay]
            if ps:
                param_groups.append(dict(params=ps, lr=lr, peak_lr=lr, weight_decay=weight_decay if decay else 0.0))
    return torch.optim.AdamW(param_groups, fused=device.startswith("cuda"))


def get_lr(it, total):
    """The learning rate of step `it` of `total`, as a fraction of the peak: a linear warm-up over the first
    5 % of the steps, then a cosine to zero."""
    warmup = max(1, round(0.05 * total))
    if it < warmup:
        return (it + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


# -----------------------------------------------------------------------------
# DINOv3's differences: RoPE in place of a learned position embedding, a qkv bias masked on the k rows


class RoPE(nn.Module):
    """DINOv3's axial rotary position embedding: in each head, each pair of dimensions (i, i + head_dim / 2) turns
    by an angle, the first head_dim / 4 pairs by the patch's row, the others by its column, at head_dim / 4
    periods. The periods are a buffer of the checkpoint, loaded rather than recomputed (the released ones are
    rounded as they were trained)."""

    def __init__(self, head_dim, rescale=0.0):
        super().__init__()
        self.rescale = rescale
        exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("periods", 100.0 ** exponents)  # base 100, as the hub models

    def forward(self, h, w):
        """(sin, cos) of an h x w patch grid in row-major order: two (h * w, head_dim), float32 (float64 in a
        float64 model), whatever the autocast dtype or a half-precision model's."""
        dd = dict(dtype=torch.promote_types(self.periods.dtype, torch.float32), device=self.periods.device)
        # patch centres, each axis normalised to [-1, 1] on its own (the official "separate")
        rows = 2 * (torch.arange(0.5, h, **dd) / h) - 1
        cols = 2 * (torch.arange(0.5, w, **dd) / w) - 1
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)  # (h * w, 2)
        if self.training and self.rescale:  # off by default (ViTConfig.rope_rescale)
            log_r = math.log(self.rescale)
            coords = coords * torch.empty(1, **dd).uniform_(-log_r, log_r).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(coords.dtype)  # (h * w, 2, head_dim / 4)
        angles = angles.flatten(1).tile(2)  # (h * w, head_dim): rows, columns, rows, columns
        return angles.sin(), angles.cos()


def rotate(x, sin, cos):
    """RoPE on the last len(sin) tokens of x (B, heads, N, head_dim), the patches, in sin's dtype (float32) whatever
    x's (bfloat16 under autocast); the CLS and storage tokens before them keep their values."""
    n = sin.shape[0]
    patches = x[:, :, -n:].to(sin.dtype)
    first, second = patches.chunk(2, dim=-1)
    patches = patches * cos + torch.cat((-second, first), dim=-1) * sin  # each pair (i, i + head_dim / 2) turned
    return torch.cat((x[:, :, :-n], patches.to(x.dtype)), dim=2)


class KMaskedLinear(nn.Linear):
    """DINOv3's qkv: its bias is multiplied by the buffer bias_mask, 1 on the q and v rows and 0 on the k rows, so
    the k rows carry no bias. LoRA changes the weight alone, so the mask holds for adapters, shared and merged."""

    def __init__(self, dim_in, dim_out):
        super().__init__(dim_in, dim_out)
        self.register_buffer("bias_mask", torch.ones(dim_out))
        self.bias_mask[dim_out // 3: 2 * dim_out // 3] = 0

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


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
        out = dict(zip(needed, self.vit.forward_blocks(x, needed, norm=False)))
        norm = self.vit.norm  # per token: the head's CLS tokens alone, TED's blocks whole
        logits = self.head(torch.cat([norm(out[b][:, 0]) for b in head_blocks], dim=-1))
        return (logits, [norm(out[b]) for b in chosen]) if chosen else logits


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
        # unflatten, not a reshape by len(tokens): exporters keep the batch size free (export_onnx.py)
        logits = self.head(patches.transpose(1, 2).unflatten(2, (H // p, W // p)))
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)


class TeacherStudent(nn.Module):
    """Both models in one module: one forward for SLAD's step (train_slad.py, bench.py),
    and DDP sees each shared adapter once."""

    def __init__(self, teacher, student):
        super().__init__()
        self.teacher, self.student = teacher, student

    def forward(self, x):
        return self.teacher(x), self.student(x)


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
