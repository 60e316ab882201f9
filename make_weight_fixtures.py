"""
Remakes fixtures/layouts/: tiny DINOv2 and DINOv3 models built by timm's and transformers' own classes, with random
weights, saved as those libraries save them for the Hugging Face Hub (a folder: config.json and model.safetensors),
and their own outputs on one image each. test_slad.py loads each folder with weights.from_pretrained, which converts
the layout to the official one, and checks that model.py's ViT gives the same tokens -- offline, with neither library
installed: they are not dependencies of this repo, and this one-off script is the only file that imports them.

Made with timm 1.0.31, transformers 5.25.0 (its save_pretrained writes the Hub's keys, those of 4.x), safetensors
0.8.0 and torch 2.14.1, on the CPU, in a virtual environment of its own:

    python3 -m venv /tmp/fixvenv && /tmp/fixvenv/bin/pip install torch timm==1.0.31 transformers==5.25.0 safetensors
    /tmp/fixvenv/bin/python make_weight_fixtures.py      # writes fixtures/layouts/, prints each parity

Each model is 32 wide, 2 blocks of 2 heads, 2-px patches (the real 14 or 16 would make the patch embedding most of
the file), run on an 8 x 8 image (DINOv2: its position grid) or 8 x 12 (DINOv3); every parameter is drawn from
N(0, 0.1^2) and rounded to float16, the dtype the files hold, so the stored outputs (float32) are those of the
weights as loaded. What each fixture covers of its layout:

    timm_dinov2          vit_giant_patch14_reg4_dinov2: registers (reg_token), no CLS position (no_embed_class),
                         the fused SwiGLU as fc1 | fc2
    timm_dinov3          vit_small_plus_patch16_dinov3_qkvb: storage tokens (reg_token), gamma_1 / gamma_2,
                         q_bias / v_bias, SwiGLU as fc1_g, fc1_x, fc2
    timm_dinov3_noqkvb   vit_small_patch16_dinov3: no qkv bias at all (the models without _qkvb), the plain MLP
    hf_dinov2            Dinov2WithRegistersModel, use_swiglu_ffn: q, k, v apart, registers, weights_in / weights_out
    hf_dinov3            DINOv3ViTModel: q, k, v apart with no k bias, storage tokens (register_tokens), up / down_proj
    hf_dinov3_7b         DINOv3ViTModel as the 7B: no q or v bias, the gated MLP (gate, up and down_proj)
"""

import json
import os
import shutil
from dataclasses import asdict, replace

import numpy as np
import timm
import torch
from timm.models._hub import save_for_hf
from transformers import DINOv3ViTConfig, DINOv3ViTModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

import weights
from model import CONFIGS, DINOV3, ViT, ViTConfig

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "layouts")
D, DEPTH, HEADS, PATCH, SIZE = 32, 2, 2, 2, 8
TINY = dict(embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=PATCH)
DINOV2_REG = ViTConfig(img_size=SIZE, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True, **TINY)


def timm_model(arch, **kwargs):
    return timm.create_model(arch, pretrained=False, num_classes=0, img_size=SIZE, **TINY, **kwargs)


def hf_dinov3(**kwargs):
    return DINOv3ViTModel(DINOv3ViTConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                          patch_size=PATCH, image_size=SIZE, num_register_tokens=4, **kwargs))


# name: (the library's model, our config of it, the image size it is run at)
FIXTURES = {
    "timm_dinov2": (lambda: timm_model("vit_giant_patch14_reg4_dinov2", mlp_ratio=1.0),  # SwiGLUPacked: fc1 32 wide
                    replace(DINOV2_REG, ffn="swiglu", mlp_ratio=0.5), (8, 8)),  # swiglu_hidden(16) = 16
    "timm_dinov3": (lambda: timm_model("vit_small_plus_patch16_dinov3_qkvb", mlp_ratio=0.5),  # fc1_g 16 wide
                    replace(DINOV3, ffn="swiglu", mlp_ratio=0.5, **TINY), (8, 12)),
    "timm_dinov3_noqkvb": (lambda: timm_model("vit_small_patch16_dinov3", mlp_ratio=0.5),
                           replace(DINOV3, mlp_ratio=0.5, **TINY), (8, 12)),
    "hf_dinov2": (lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
                      hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, patch_size=PATCH,
                      image_size=SIZE, mlp_ratio=1, use_swiglu_ffn=True, num_register_tokens=4)),  # SwiGLU 24 wide
                  replace(DINOV2_REG, ffn="swiglu", mlp_ratio=1.0), (8, 8)),
    "hf_dinov3": (lambda: hf_dinov3(intermediate_size=16), replace(DINOV3, mlp_ratio=0.5, **TINY), (8, 12)),
    "hf_dinov3_7b": (lambda: hf_dinov3(intermediate_size=16, use_gated_mlp=True, hidden_act="silu", query_bias=False,
                                       value_bias=False),  # SwiGLU: SiLU, as the 7B's config says
                     replace(DINOV3, ffn="swiglu", mlp_ratio=0.5, qkv_bias=False, local_cls_norm=True, **TINY),
                     (8, 12)),
}


def tokens(model, x):
    """The library's normed tokens: CLS, registers / storage tokens, patches."""
    if hasattr(model, "forward_features"):  # timm
        return model.forward_features(x)
    return model(pixel_values=x).last_hidden_state  # transformers


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    outputs, rng = {}, np.random.default_rng(2026)
    for k, (name, (build, config, (h, w))) in enumerate(FIXTURES.items()):
        torch.manual_seed(k)
        model = build().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((0.1 * torch.randn(p.shape)).half().float())  # the weights as the float16 file holds them
        folder = os.path.join(OUT, name)
        model.half()
        if name.startswith("timm"):
            save_for_hf(model, folder, safe_serialization=True)
        else:
            model.save_pretrained(folder)
        model.float()
        image = torch.from_numpy(rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8))
        with torch.no_grad():
            want = tokens(model, image.float() / 255)
        outputs[name] = {"config": asdict(config), "image": image, "tokens": want}
        report(name, config, folder, image, want)
    torch.save(outputs, os.path.join(OUT, "outputs.pt"))
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs]
    print(f"wrote {OUT}: {sum(sizes) / 1024:.0f} KB in {len(sizes)} files")


def report(name, config, folder, image, want):
    """Our ViT on the folder, as the tests load it: its largest difference from the library's tokens, with the
    periods from_pretrained restores (the official files', rounded to bfloat16) and with float32 ones."""
    CONFIGS["fixture"] = config
    vit = weights.from_pretrained("fixture", path=folder).eval()
    x = image.float() / 255
    with torch.no_grad():
        got = (vit(x) - want).abs().max().item()
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        line = f"{name} ({saved.get('architecture') or saved['architectures'][0]}): max |ours - theirs| {got:.2e}"
        if config.family == "dinov3":
            vit.rope_embed.periods.copy_(ViT(config).rope_embed.periods)  # float32, as timm and transformers
            line += f" (float32 periods: {(vit(x) - want).abs().max().item():.2e})"
    print(line)


if __name__ == "__main__":
    main()
