"""
Tests for the SLAD repo, grouped by concept: a section a module, in the order below. All offline, CPU, toy sizes:
`pytest test_slad.py`; one concept with -k, e.g. `pytest test_slad.py -k "lora or sharing"`, `-k taid`, `-k cka`,
`-k report`, `-k miniature`, `-k dinov3`, `-k predict`.

    builders                        fake copies of each dataset's layout, your own folders, fake runs and results,
                                    the scripts run in-process, the fixtures
    model.py, weights.py            the ViT is DINOv2 and DINOv3 (golden outputs of the official code), official
                                    shapes, weights files and their one-line errors, the heads, FLOPs, checkpointing
    lora.py                         LoRA (eq. 3), merge, SLAD's sharing (Fig. 4), what adapt trains
    data.py, images.py,             the datasets on tiny fake copies of their layouts, Cityscapes, your own folders,
    own_data.py, synthetic.py       the synthetic sets, image files (EXIF, 16 bits), transforms, samplers, loaders
    kd.py                           the losses (eq. 1, 2, 4), TAID and TED
    flags.py, run_folder.py,        flags and one-line refusals, run folders, --resume, atomic writes, the lock,
    evaluation.py, distributed.py   AdamW's groups, mIoU, torchrun's processes
    train_slad.py, train_twostep.py the scripts end to end: the demo, each teacher adaptation, resume, AMP, compile,
                                    segmentation, TAID and TED, torchrun, DINOv3 pairs
    report.py                       the results table
    cka.py                          linear CKA, its minibatch estimate, the layer-pair matrices and Figure 3
    bench.py                        the step, memory, the input pipeline, the proof
    toys.py                         the pretrained toy family
    miniature.py                    the paper in miniature: its plan, convergence and ablation rules
    deploy.py, predict.py,          your own folders end to end: per-class figures, predictions, ONNX
    export_onnx.py
    README.md and docs/             their commands parse, their links exist
"""

import argparse
import csv
import glob
import importlib
import itertools
import json
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import cka
import data
import deploy
import distributed
import evaluation
import export_onnx
import flags
import images
import kd
import lora
import mfu
import miniature
import model
import own_data
import predict
import report
import run_folder
import toys
import train_slad
import train_twostep
import weights
from data import (SEGMENTATION, EpochSampler, SegEvalTransform, SegTrainTransform, Transformed, eval_transform,
                  load_splits, make_loader, normalize, train_transform)
from deploy import load_model
from images import DataError
from lora import LoRALinear, add_lora, layer_mapping, merge_lora, share_lora, trainable_parameters
from model import CONFIGS, Classifier, Segmenter, ViT, ViTConfig, slide_inference
from run_folder import RunError
from synthetic import SyntheticFine, SyntheticShapes, SyntheticTextures
from weights import CheckpointError, from_pretrained

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# builders: tensors and models; fake copies of the datasets and your own folders; the scripts run in-process,
# fake runs and results; the fixtures


def randomize_(module, std=0.05, seed=0):
    """Fill every parameter with noise, so that a zero-init or identity never hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def hash_noise(shape, seed):
    """Noise in [-0.5, 0.5) from exact integer arithmetic, so the same on every torch and machine (torch.randn's
    stream may change between versions): the weights and images of the golden DINOv3 models."""
    M = 2**31 - 1
    x = (torch.arange(math.prod(shape), dtype=torch.int64) + 7919 * seed + 1) * 48271 % M
    for c in (12345, 67890):  # x^2 + c mod M, twice: < 2^62, no overflow
        x = (x * x + c) % M
    return (x.double() / M - 0.5).float().reshape(shape)


def write_jpg(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)


def fake_dtd(root, classes=("banded", "dotted", "striped"), per_split=2, folder=("dtd", "dtd")):
    base = os.path.join(root, *folder)  # torchvision's layout by default
    for split in ("train", "val", "test"):
        lines = []
        for c in classes:
            for k in range(per_split):
                name = f"{c}_{split}_{k}.jpg"
                write_jpg(os.path.join(base, "images", c, name), hash((c, split, k)) % 1000)
                lines.append(f"{c}/{name}")
        os.makedirs(os.path.join(base, "labels"), exist_ok=True)
        open(os.path.join(base, "labels", f"{split}1.txt"), "w").write("\n".join(lines) + "\n")


def fake_aircraft(root, variants=("707-320", "A320", "Cessna 172"), per_split=2):
    base = os.path.join(root, "fgvc-aircraft-2013b", "data")
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    open(os.path.join(base, "variants.txt"), "w").write("\n".join(variants) + "\n")
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for v in variants:
            for k in range(per_split):
                n += 1
                write_jpg(os.path.join(base, "images", f"{1000000 + n}.jpg"), n)
                lines.append(f"{1000000 + n} {v}")
        open(os.path.join(base, f"images_variant_{split}.txt"), "w").write("\n".join(lines) + "\n")


def fake_cub(root, n_classes=4, per_class=10):
    base = os.path.join(root, "CUB_200_2011")
    images, split, labels, i = [], [], [], 0
    for c in range(1, n_classes + 1):
        for k in range(per_class):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            write_jpg(os.path.join(base, "images", rel), i)
            images.append(f"{i} {rel}")
            split.append(f"{i} {int(k < 7)}")  # 7 train, 3 test per class
            labels.append(f"{i} {c}")
    for f, lines in (("images.txt", images), ("train_test_split.txt", split), ("image_class_labels.txt", labels)):
        open(os.path.join(base, f), "w").write("\n".join(lines) + "\n")


def fake_cityscapes(root, per_split=(10, 2)):
    base = os.path.join(root, "cityscapes")
    for split, n in zip(("train", "val"), per_split):
        for k in range(n):
            city = "aachen" if k % 2 else "bochum"
            stem = f"{city}_{k:06d}_000019"
            label_ids = np.zeros((28, 56), dtype=np.uint8)  # 0: unlabeled -> 255
            label_ids[:, 10:30] = 7  # road -> 0
            label_ids[10:20, 30:50] = 26  # car -> 13
            img = np.full((28, 56, 3), 20, dtype=np.uint8)
            img[label_ids == 26] = (230, 20, 20)  # cars are red: the geometry of image and mask can be checked
            for folder, name, arr in (("leftImg8bit", f"{stem}_leftImg8bit.png", img),
                                      ("gtFine", f"{stem}_gtFine_labelIds.png", label_ids)):
                os.makedirs(os.path.join(base, folder, split, city), exist_ok=True)
                Image.fromarray(arr).save(os.path.join(base, folder, split, city, name))


def damage(path, how):
    if how == "missing":
        os.remove(path)
    else:  # an interrupted download or copy: half the bytes, or bytes that are no image at all
        content = open(path, "rb").read()
        open(path, "wb").write(content[:len(content) // 2] if how == "truncated" else b"<html>not found</html>")


OWN = ["--teacher", "toy-l", "--student", "toy-s", "--init", "random", "--device", "cpu", "--img_size", "28",
       "--batch_size", "4", "--epochs", "1"]
ANIMALS = ("cat", "dog", "owl")


def own_images(root, splits=(("train", 6), ("test", 3)), classes=ANIMALS):
    """A classification folder in ImageFolder's layout: each class its own colour, in several formats and modes
    (a grayscale PNG, a palette GIF, an RGBA WebP, JPEGs), beside files that are no image."""
    for split, n in splits:
        for k, c in enumerate(classes):
            for i in range(n):
                rgb = np.random.default_rng([k, i, len(split)]).integers(0, 60, (30, 36, 3)).astype(np.uint8)
                rgb[..., k] += 180  # red cats, green dogs, blue owls
                mode, ext = [("RGB", ".jpg"), ("L", ".png"), ("P", ".gif"), ("RGBA", ".webp")][i % 4]
                img = Image.fromarray(rgb).convert(mode)
                os.makedirs(os.path.join(root, split, c), exist_ok=True)
                img.save(os.path.join(root, split, c, f"{c}_{i}{ext}"))
        open(os.path.join(root, split, classes[0], "notes.txt"), "w").write("not an image")
        open(os.path.join(root, split, classes[0], ".DS_Store"), "wb").write(b"\0")
    return str(root)


def own_masks(root, splits=(("train", 8), ("test", 2)), classes=("background", "red box", "blue box"),
              sizes=((28, 42),)):
    """A segmentation folder: classes.txt, and per split images/<stem>.<ext> with masks/<stem>.png (255: ignored);
    image i is sizes[i % len(sizes)] (height, width)."""
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, "classes.txt"), "w").write("\n".join(classes) + "\n")
    for split, n in splits:
        for i in range(n):
            rng = np.random.default_rng([i, len(split)])
            h, w = sizes[i % len(sizes)]
            img = np.full((h, w, 3), 120, np.uint8) + rng.integers(0, 20, (h, w, 3)).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            label, top, left = 1 + i % 2, int(rng.integers(0, h - 16)), int(rng.integers(0, w - 22))
            img[top:top + 14, left:left + 18] = (220, 30, 30) if label == 1 else (30, 30, 220)
            mask[top:top + 14, left:left + 18] = label
            mask[top + 13, left:left + 18] = 255  # an edge nobody labelled: ignored
            image_name = f"{split}{i}.{'png' if i % 2 else 'jpg'}"
            for folder, name, arr in (("images", image_name, img), ("masks", f"{split}{i}.png", mask)):
                os.makedirs(os.path.join(root, split, folder), exist_ok=True)
                Image.fromarray(arr).save(os.path.join(root, split, folder, name))
    return str(root)


def save_sideways(path, upright):
    """An image stored as a phone stores a portrait: turned a quarter anticlockwise, with EXIF orientation 6
    (turn it clockwise to show it), so that a viewer shows `upright`."""
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(path, exif=exif)


def break_folder(root, how):
    """An own folder with one thing wrong, and what the refusal must say."""
    if how in ("image without mask", "mask without image", "mask size", "mask index", "mask channels"):
        own_masks(root)
        stem = os.path.join(root, "train", "masks", "train1.png")
        if how == "image without mask":
            os.remove(stem)
            return "has no mask: expected " + stem
        if how == "mask without image":
            os.remove(os.path.join(root, "train", "images", "train1.png"))
            return stem + " has no image"
        size = {"mask size": (40, 28), "mask index": (42, 28), "mask channels": (42, 28)}[how]
        value = {"mask size": 0, "mask index": 3, "mask channels": 0}[how]
        Image.new("RGB" if how == "mask channels" else "L", size, value).save(stem)
        return {"mask size": "is 40x28 pixels but its image", "mask channels": "has 3 channels",
                "mask index": "holds class index 3, but classes.txt names 3"}[how]
    own_images(root)
    if how == "no images":
        for c in ANIMALS:
            shutil.rmtree(os.path.join(root, "train", c))
        return "no images: " + os.path.join(root, "train") + " holds no class folder"
    if how == "empty class":
        os.makedirs(os.path.join(root, "train", "emu"))
        return os.path.join(root, "train", "emu") + " holds no image"
    if how == "one class":
        for c in ANIMALS[1:]:
            shutil.rmtree(os.path.join(root, "train", c))
        return "holds 1 class folder (cat): a classifier needs at least two classes"
    if how == "class only in test":
        shutil.copytree(os.path.join(root, "test", "cat"), os.path.join(root, "test", "emu"))
        return os.path.join(root, "test", "emu") + " is a class that"
    if how == "class under 5 images":  # val is held out: 10 % of 4 images is none, the class would go unvalidated
        for name in ("owl_4.jpg", "owl_5.png"):
            os.remove(os.path.join(root, "train", "owl", name))
        return os.path.join(root, "train", "owl") + " holds 4 images, too few to hold 10 % of a class out for val"
    bad = os.path.join(root, "test", "dog", "dog_1.png")  # unreadable: bytes that are no image
    damage(bad, "garbage")
    return f"cannot read {bad}"


TOY = ["--dataset", "synthetic", "--teacher", "toy-l", "--student", "toy-s", "--init", "random", "--device", "cpu"]
# the README's demo, on the pretrained toys
DEMO = ["--dataset", "synthetic", "--teacher", "toy-b", "--student", "toy-s", "--device", "cpu"]


TOY3 = ["--dataset", "synthetic", "--teacher", "toy3-l", "--student", "toy3-s", "--init", "random", "--device", "cpu",
        "--batch_size", "8"]


def run_main(script, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script + ".py", *argv])
    importlib.import_module(script).main()


def results_of(out):
    return json.load(open(os.path.join(out, "results.json")))


def run_as_script(script, argv, monkeypatch):
    """`python script.py argv` in this process: its __main__ block runs, so its one-line exits are what is tested
    (a patch of the script's own names does not reach it; patch the modules it imports)."""
    monkeypatch.setattr(sys, "argv", [script + ".py", *argv])
    runpy.run_path(os.path.join(HERE, script + ".py"), run_name="__main__")


# bad input: one line, a non-zero exit, nothing overwritten

def cli(args, cwd=HERE, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def small_synthetic(monkeypatch):
    monkeypatch.setattr(SyntheticTextures, "SIZES", {"train": 96, "val": 32, "test": 32})


@pytest.fixture(scope="module")
def slad_demo(tmp_path_factory):
    """The README's SLAD demo, exactly, run once for the tests that need it: its out_dir."""
    out = str(tmp_path_factory.mktemp("demo") / "slad")
    with pytest.MonkeyPatch.context() as mp:
        run_main("train_slad", DEMO + ["--epochs", "1", "--out_dir", out], mp)
    return out


@pytest.fixture
def toy3(monkeypatch):
    """Two tiny DINOv3 models under names the scripts take, heads 16 wide as the toys', and a tiny synthetic set
    (4 steps an epoch), for these tests only."""
    monkeypatch.setitem(CONFIGS, "toy3-l", replace(model.DINOV3, embed_dim=64, depth=4, num_heads=4))
    monkeypatch.setitem(CONFIGS, "toy3-s", replace(model.DINOV3, embed_dim=32, depth=2, num_heads=2))
    monkeypatch.setattr(SyntheticTextures, "SIZES", {"train": 32, "val": 16, "test": 16})


def fake_run(path, teacher_std, student_std, **config):
    """A run folder as the training scripts leave it, without training: the initial encoders, perturbed."""
    os.makedirs(path)
    for role, name, std in (("teacher", "toy-l", teacher_std), ("student", "toy-s", student_std)):
        vit = randomize_(weights.initial_backbone(name, role, "random", 0), std=std)
        deploy.save_model(os.path.join(path, f"{role}.pt"), Classifier(vit, 10))
    run_folder.write_json(os.path.join(path, "config.json"), dict(
        dataset="synthetic", teacher="toy-l", student="toy-s", init="random", seed=0, img_size=56, **config))
    slad = "teacher_adapt" not in config
    run_folder.write_json(os.path.join(path, "results.json"), dict(method="slad") if slad else dict(
        method="twostep", teacher_adapt=config["teacher_adapt"]))
    return str(path)


def fake_results(path, **r):
    os.makedirs(path)
    run_folder.write_json(os.path.join(path, "results.json"), r)


def fake_run_folder(d, dataset, val, teacher_val=None, config_id="abc123", seconds=1.0):
    """What a training run leaves that miniature.py reads: results.json and metrics.jsonl with final val values."""
    os.makedirs(d, exist_ok=True)
    json.dump(dict(method="slad", dataset=dataset, teacher="toy-b", student="toy-s", seed=0, student_acc=val,
                   teacher_acc=val, train_seconds=seconds, config_id=config_id), open(os.path.join(d, "results.json"), "w"))
    rows = [{"stage": "slad", "epoch": 1, "val_teacher_acc": teacher_val or val, "val_student_acc": val}]
    open(os.path.join(d, "metrics.jsonl"), "w").write("".join(json.dumps(r) + "\n" for r in rows))


# -----------------------------------------------------------------------------
# model.py: the ViT is DINOv2 and DINOv3; official shapes and weights files; the heads (App. C.1); FLOPs


# The golden fixture fixtures/dinov2_golden.pt was made with the official code
# (github.com/facebookresearch/dinov2 at commit b8931f7, run on the CPU with XFORMERS_DISABLED=1, torch 2.15):
# three tiny DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=16, depth=2, num_heads=2,
# init_values=1.0, block_chunks=0, MemEffAttention blocks) covering the hub models' three code paths --
# "mlp" (vit{s,b,l}14), "mlp_reg4" (the *_reg models: 4 registers, interpolate_antialias=True,
# interpolate_offset=0.0) and "swiglu" (vitg14: ffn_layer="swiglufused") -- with every tensor of their
# state dicts filled with seeded Gaussian noise (torch.manual_seed(2026)). Three random uint8 images,
# 224x224, 98x154 (non-square) and 532x532 (larger than the 518 the pos-embed was made for), are fed as
# img.float() / 255; stored are the official forward_features outputs (x_norm_clstoken, x_norm_regtokens,
# x_norm_patchtokens concatenated) and get_intermediate_layers(x, n=[0], return_class_token=True) of block 0.
GOLDEN = torch.load(os.path.join(HERE, "fixtures", "dinov2_golden.pt"), weights_only=True)


@pytest.mark.parametrize("variant", ["mlp", "mlp_reg4", "swiglu"])
def test_golden_parity_with_official_dinov2(variant):
    fix = GOLDEN["models"][variant]
    vit = ViT(ViTConfig(**fix["config"])).eval()
    vit.load_state_dict(fix["state_dict"], strict=True)  # the official keys load with no remapping
    sizes = [tuple(img.shape[-2:]) for img in GOLDEN["images"]]
    assert any(h != w for h, w in sizes) and any(h > 518 for h, w in sizes)
    R = vit.config.num_register_tokens
    with torch.no_grad():
        for img, want, want0 in zip(GOLDEN["images"], fix["features"], fix["block0_cls_patches"]):
            x = img.float() / 255
            got = vit.forward_features(x)
            assert got.shape == want.shape == (1, 1 + R + (x.shape[2] // 14) * (x.shape[3] // 14), 16)
            assert (got - want).abs().max() <= 1e-4
            got0 = vit.forward_blocks(x, [0])[0]
            got0 = torch.cat([got0[:, :1], got0[:, 1 + R:]], 1)  # drop the registers, as the official call does
            assert (got0 - want0).abs().max() <= 1e-4


# The golden fixture fixtures/dinov3_golden.pt was made with the official code (github.com/facebookresearch/dinov3
# at commit 6876159, on the CPU, torch 2.14.1): three tiny DinoVisionTransformer(patch_size=16, n_storage_tokens=4,
# mask_k_bias=True, layerscale_init=1e-5, norm_layer="layernormbf16", pos_embed_rope_base=100,
# pos_embed_rope_normalize_coords="separate", pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32",
# depth=2), the hub models' settings, covering their three code paths -- "mlp" (vit{s,b,l}16: 64 wide, one head
# 64 wide, ffn_ratio=2), "swiglu" (the plus models: 32 wide, 2 heads, ffn_layer="swiglu", ffn_ratio=6) and "7b"
# (vit7b16: 128 wide, one head 128 wide, qkv_bias=False, ffn_layer="swiglu64", ffn_ratio=3,
# untie_global_and_local_cls_norm=True). Each got init_weights(), which sets the buffers (rope_embed.periods; the
# qkv bias_mask, NaN before), then every parameter, in sorted name order k = 0, 1, ..., was replaced by
# 0.5 * hash_noise(shape, k); the buffers are stored as init_weights left them. Images: hash_noise((1, 3, h/4, w/4),
# 100 + i) to uint8 ((u + 0.5) * 256, floored), each value repeated over 4 x 4 pixels, / 255, at 64x64, 48x80
# (non-square) and 240x256 (larger than the hub's 224), eval mode. Stored: 12 tokens (CLS, the 4 storage tokens,
# 7 patches spread over the grid) of forward_features (x_norm_clstoken, x_storage_tokens, x_norm_patchtokens
# concatenated) and of get_intermediate_layers(x, n=[0], return_class_token=True, return_extra_tokens=True).
# Every real size on random weights gave max |difference| 0.0 against the official code (docs/reference.md).
GOLDEN3 = torch.load(os.path.join(HERE, "fixtures", "dinov3_golden.pt"), weights_only=True)


def golden_image(i, h, w):
    x = ((hash_noise((1, 3, h // 4, w // 4), 100 + i) + 0.5) * 256).floor().clamp(0, 255)
    return x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3) / 255


@pytest.mark.parametrize("variant", ["mlp", "swiglu", "7b"])
def test_golden_parity_with_official_dinov3(variant):
    fix = GOLDEN3["models"][variant]
    vit = ViT(ViTConfig(**fix["config"])).eval()
    own = {k: v.clone() for k, v in vit.named_buffers()}
    assert own.keys() == fix["buffers"].keys() and all(torch.equal(own[k], v) for k, v in fix["buffers"].items())
    state = {n: 0.5 * hash_noise(p.shape, k) for k, (n, p) in enumerate(sorted(vit.named_parameters()))}
    vit.load_state_dict({**state, **fix["buffers"]}, strict=True)  # the official keys, buffers included
    head = vit.embed_dim // vit.config.num_heads
    assert head == {"mlp": 64, "swiglu": 16, "7b": 128}[variant]
    assert any(h != w for h, w in GOLDEN3["sizes"]) and any(h > 224 for h, w in GOLDEN3["sizes"])
    with torch.no_grad():
        for i, (h, w) in enumerate(GOLDEN3["sizes"]):
            x = golden_image(i, h, w)
            idx = fix["tokens"][i]
            got = vit.forward_features(x)
            assert got.shape == (1, 5 + (h // 16) * (w // 16), vit.embed_dim)
            assert (got[:, idx] - fix["features"][i]).abs().max() <= 1e-5
            assert (vit.forward_blocks(x, [0])[0][:, idx] - fix["block0"][i]).abs().max() <= 1e-5


# Parameter counts of the official hub models (dinov2.hub.backbones.dinov2_*(pretrained=False)).
OFFICIAL_NUMEL = {"vits14": 22056576, "vitb14": 86580480, "vitl14": 304368640, "vitg14": 1136480768,
                  "vits14_reg": 22058112, "vitb14_reg": 86583552, "vitl14_reg": 304372736, "vitg14_reg": 1136486912}


@pytest.mark.parametrize("name", list(OFFICIAL_NUMEL))
def test_configs_have_official_shapes(name):
    with torch.device("meta"):  # no memory, no time: shapes only
        vit = ViT.from_name(name)
    sd = vit.state_dict()
    assert sum(v.numel() for v in sd.values()) == OFFICIAL_NUMEL[name]
    c = vit.config
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, c.embed_dim) and sd["mask_token"].shape == (1, c.embed_dim)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * c.embed_dim, c.embed_dim)
    assert f"blocks.{c.depth - 1}.ls2.gamma" in sd and "patch_embed.proj.weight" in sd
    assert ("register_tokens" in sd) == name.endswith("_reg")
    assert ("blocks.0.mlp.w12.weight" in sd) == name.startswith("vitg")


def test_toy_family_is_shaped_as_dinov2s():
    s, b, l = CONFIGS["toy-s"], CONFIGS["toy-b"], CONFIGS["toy-l"]
    assert s.patch_size == b.patch_size == l.patch_size == 14
    assert s.embed_dim < b.embed_dim < l.embed_dim and s.depth == b.depth and l.depth == 2 * b.depth  # as S, B, L
    assert len({c.embed_dim // c.num_heads for c in (s, b, l)}) == 1  # one head width: heads line up
    assert (layer_mapping(s.depth, l.depth) == [2 * i for i in range(s.depth)]
            and layer_mapping(s.depth, b.depth) == [0, 1, 2])


def test_forward_shapes_and_block_outputs():
    vit = ViT.from_name("toy-s", num_register_tokens=4).eval()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        feats = vit.forward_features(x)
        blocks = vit.forward_blocks(x, range(vit.config.depth))
    assert feats.shape == (2, 1 + 4 + 2 * 3, vit.embed_dim)
    assert len(blocks) == vit.config.depth and torch.equal(blocks[-1], feats)  # the last block, normed
    assert not torch.allclose(blocks[0], blocks[1])


def test_bad_image_size_is_a_clear_error():
    vit = ViT.from_name("toy-s")
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        vit(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="unknown model 'vitx14'"):
        ViT.from_name("vitx14")


def test_checkpoint_urls_are_the_hub_ones():
    assert weights.DINOV2_URL == "https://dl.fbaipublicfiles.com/dinov2"  # dinov2/hub/utils.py's _DINOV2_BASE_URL
    assert weights.checkpoint_url("vitb14") == ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/"
                                              "dinov2_vitb14_pretrain.pth")
    assert weights.checkpoint_url("vitg14_reg") == ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/"
                                                  "dinov2_vitg14_reg4_pretrain.pth")


@pytest.fixture(scope="module")
def vits14_file(tmp_path_factory):
    vit = randomize_(ViT.from_name("vits14"), seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_vits14_pretrain.pth"
    torch.save(vit.state_dict(), path)
    return path, vit


def test_from_pretrained_local_file(vits14_file):
    path, vit = vits14_file
    loaded = from_pretrained("vits14", path=str(path))
    for (k, a), b in zip(vit.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_from_pretrained_truncated_file_is_a_clear_error(vits14_file, tmp_path):
    path, _ = vits14_file
    bad = tmp_path / "dinov2_vits14_pretrain.pth"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        from_pretrained("vits14", path=str(bad))
    msg = str(e.value)
    assert str(bad) in msg and weights.checkpoint_url("vits14") in msg and "384 wide" in msg
    assert "\n" not in msg
    assert bad.stat().st_size == path.stat().st_size // 2  # nothing deleted or rewritten


def test_from_pretrained_wrong_architecture_is_a_clear_error(vits14_file):
    path, _ = vits14_file
    with pytest.raises(CheckpointError, match="not a valid checkpoint of vitb14 \\(768 wide"):
        from_pretrained("vitb14", path=str(path))


def test_from_pretrained_downloads_into_hub_cache_and_fails_clearly_offline(vits14_file, tmp_path, monkeypatch):
    path, vit = vits14_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth"

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as e:
        from_pretrained("vits14")
    assert weights.checkpoint_url("vits14") in str(e.value) and str(cached) in str(e.value)
    assert not cached.exists()

    calls = []
    def fake_download(url, dst, progress=True):
        calls.append(url)
        with open(dst, "wb") as f:
            f.write(path.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    loaded = from_pretrained("vits14")
    assert calls == [weights.checkpoint_url("vits14")] and cached.exists()
    assert torch.equal(loaded.pos_embed, vit.pos_embed)
    from_pretrained("vits14")  # second time from the cache: no download
    assert len(calls) == 1


@pytest.mark.parametrize("cached", [True, False])  # torch.hub's cache, or a path given
@pytest.mark.parametrize("content", ["empty", "truncated", "pickled objects"])
def test_unreadable_weights_file_is_one_error_line(vits14_file, tmp_path, monkeypatch, cached, content):
    path, _ = vits14_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("a file is there: no download"))
    bad = tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth"
    bad.parent.mkdir()
    if content == "pickled objects":  # loads only if the caller trusts the file: it must not be told to
        torch.save({"args": argparse.Namespace(lr=1e-3)}, bad)
    else:  # what an interrupted download leaves
        bad.write_bytes(b"" if content == "empty" else path.read_bytes()[:1000])
    before = bad.read_bytes()
    with pytest.raises(CheckpointError) as e:
        from_pretrained("vits14", path=None if cached else str(bad))
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg and e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__  # one traceback, not two chained ones
    assert not any(s in msg for s in ("weights_only", "safe_globals", "trust"))
    assert ("delete it and run again" in msg) if cached else (weights.checkpoint_url("vits14") in msg)
    assert ("empty" in msg) == (content == "empty")
    assert bad.read_bytes() == before  # nothing deleted or rewritten: the user is told to


def test_empty_weights_file_stops_a_script_with_one_line(tmp_path):
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth"  # torch.hub's cache under $TORCH_HOME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    env = dict(os.environ, TORCH_HOME=str(tmp_path), https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    r = cli(["cka.py", "--dataset", "synthetic", "--device", "cpu", "--out_dir", str(tmp_path / "cka")], env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert str(cached) in r.stderr and "empty" in r.stderr and "delete it and run again" in r.stderr
    assert cached.exists() and not os.path.exists(tmp_path / "cka")


@pytest.mark.parametrize("edit,load_as,says", [
    (None, "vitb14", "cls_token is (1, 1, 384), not (1, 1, 768); it looks like vits14 (384 wide"),
    ("add registers", "vits14", "1 unexpected key(s), the first register_tokens; it looks like vits14_reg (384 wide"),
    (None, "vits14_reg", "1 key(s) missing, the first register_tokens; it looks like vits14 (384 wide"),
    ("drop blocks 6-11", "vits14",
     "key(s) missing, the first blocks.6.norm1.weight; it fits none of the DINOv2 or DINOv3 configs"),
])
def test_wrong_architecture_says_what_differs_and_what_it_looks_like(vits14_file, tmp_path, edit, load_as, says):
    path, vit = vits14_file
    state_dict = vit.state_dict()
    if edit == "add registers":
        state_dict["register_tokens"] = torch.zeros(1, 4, 384)
    elif edit:
        state_dict = {k: v for k, v in state_dict.items()
                      if not any(k.startswith(f"blocks.{i}.") for i in range(6, 12))}
    torch.save(state_dict, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as e:
        from_pretrained(load_as, path=str(tmp_path / "w.pth"))
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_of_a_state_dict_is_its_config(name):
    with torch.device("meta"):  # shapes only: ViT-g's 1.1 B parameters take no memory
        state_dict = ViT.from_name(name).state_dict()
    assert weights.config_of(state_dict) == name


def test_toy_weights_missing_says_how_to_rebuild(tmp_path):
    with pytest.raises(CheckpointError, match="python toys.py"):
        from_pretrained("toy-s", path=str(tmp_path / "toy-s.pt"))


# Sizes of the official DINOv3 hub models' state dicts, buffers included (dinov3.hub.backbones.dinov3_*(
# pretrained=False) on the meta device; their keys and shapes were checked equal to ours, and their URLs' file names
# to checkpoint_url's, when this was written).
OFFICIAL_NUMEL_V3 = {"dinov3_vits16": 21614992, "dinov3_vits16plus": 28711312, "dinov3_vitb16": 85697296,
                     "dinov3_vitl16": 303227920, "dinov3_vitl16plus": 403989520, "dinov3_vith16plus": 840756496,
                     "dinov3_vit7b16": 6716043296}


@pytest.mark.parametrize("name", list(OFFICIAL_NUMEL_V3))
def test_dinov3_configs_have_official_shapes_and_file_names(name):
    with torch.device("meta"):
        vit = ViT.from_name(name)
    sd, c = vit.state_dict(), vit.config
    assert sum(v.numel() for v in sd.values()) == OFFICIAL_NUMEL_V3[name]
    assert sd["rope_embed.periods"].shape == (c.embed_dim // c.num_heads // 4,) and "pos_embed" not in sd
    assert sd["storage_tokens"].shape == (1, 4, c.embed_dim) and "register_tokens" not in sd
    assert ("blocks.0.attn.qkv.bias_mask" in sd) == (name != "dinov3_vit7b16") == ("blocks.0.attn.qkv.bias" in sd)
    assert ("blocks.0.mlp.w1.weight" in sd) == name.endswith(("plus", "7b16")) and "blocks.0.mlp.w12.weight" not in sd
    assert ("local_cls_norm.weight" in sd) == (name == "dinov3_vit7b16")
    assert c.embed_dim // c.num_heads == (128 if name == "dinov3_vit7b16" else 64)
    file = {"dinov3_vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
            "dinov3_vith16plus": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"}.get(name)
    if file:  # two of dinov3/hub/backbones.py's, spelled out
        assert weights.checkpoint_url(name) == f"https://dl.fbaipublicfiles.com/dinov3/{name}/{file}"


TINY3 = ViTConfig(family="dinov3", patch_size=16, num_register_tokens=4, init_values=1e-5, embed_dim=32, depth=2,
                  num_heads=2)


def test_dinov3_buffers_are_the_official_init_and_are_used():
    torch.manual_seed(0)  # x below: the periods' 1 % moves these tokens by 2e-4, other draws by 1.3e-4 and less
    vit = ViT(TINY3).eval()
    qkv = vit.blocks[0].attn.qkv
    assert torch.equal(qkv.bias_mask, torch.tensor([1.0] * 32 + [0.0] * 32 + [1.0] * 32))  # q, k, v rows
    assert torch.allclose(vit.rope_embed.periods, 100 ** (torch.arange(4) / 4))  # base 100, head_dim / 4 of them
    randomize_(vit)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        before = vit(x)
        qkv.bias[32:64] += 1.0  # the k rows' bias is masked out
        assert torch.equal(vit(x), before)
        vit.rope_embed.periods.mul_(1.01)  # the periods come from the buffer (the checkpoint's), not recomputed
        assert not torch.allclose(vit(x), before, atol=1e-4)


def test_rope_rotates_patches_in_float32_and_leaves_cls_and_storage_tokens():
    rope = model.RoPE(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sin, cos = rope(2, 3)
    assert sin.dtype == cos.dtype == torch.float32 and sin.shape == (6, 16)
    q = torch.randn(2, 2, 5 + 6, 16).bfloat16()  # CLS, 4 storage tokens, 2 x 3 patches
    turned = model.rotate(q, sin, cos)
    assert turned.dtype == torch.bfloat16 and torch.equal(turned[:, :, :5], q[:, :, :5])
    assert torch.equal(turned, model.rotate(q.float(), sin, cos).bfloat16())  # rotated in float32, rounded once
    # RoPE keeps norms, and q . k of two patches depends on their offset alone: one row down, the same score
    f = model.rotate(q.float(), sin, cos)
    assert torch.allclose(f.norm(dim=-1), q.float().norm(dim=-1), atol=1e-5)
    same = torch.ones(1, 1, 5 + 6, 16)
    r = model.rotate(same, sin, cos)[0, 0, 5:]  # the same vector at every patch (row-major 2 x 3)
    assert (torch.allclose(r[0] @ r[1], r[3] @ r[4], atol=1e-5)
            and not torch.allclose(r[0] @ r[1], r[0] @ r[2], atol=1e-3))


def test_rope_rescale_is_off_by_default_and_per_block_when_on():
    x = torch.randn(1, 3, 32, 32)
    vit = randomize_(ViT(TINY3)).train()  # train mode: where the hub models rescale
    assert vit.config.rope_rescale == 0 and torch.equal(vit(x), vit(x))
    jittered = randomize_(ViT(replace(TINY3, rope_rescale=2.0))).train()
    assert not torch.allclose(jittered(x), jittered(x))
    assert torch.equal(jittered.eval()(x), jittered.eval()(x))  # eval: never


def test_rope_attention_gradients_match_the_math_backend():
    torch.manual_seed(0)
    attn = randomize_(model.Attention(16, 2, mask_k_bias=True), std=0.2).double()
    rope = model.RoPE(8).double()(2, 2)  # float64 in a float64 model
    x = torch.randn(1, 5 + 4, 16, dtype=torch.float64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls: the analytic gradient of RoPE'd attention
        assert torch.autograd.gradcheck(lambda x: attn(x, rope), (x,), fast_mode=True)
    vit = randomize_(ViT(TINY3), std=0.1)
    x = torch.randn(2, 3, 32, 48)
    grads = []
    for backend in (None, SDPBackend.MATH):  # the default (fused) kernel against the math one
        vit.zero_grad()
        with sdpa_kernel(backend) if backend else torch.enable_grad():
            vit(x).square().mean().backward()
        grads.append([p.grad.clone() for p in vit.parameters() if p.grad is not None])  # not the unused mask_token
    assert len(grads[0]) == len(grads[1]) > 20 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def dinov3_weights(tmp_path, config=TINY3, seed=1):
    vit = randomize_(ViT(config), seed=seed)
    path = tmp_path / f"w{seed}.pth"
    torch.save(vit.state_dict(), path)
    return path, vit


def test_dinov3_weights_missing_say_where_to_request_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("gated: no download"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained("dinov3_vitl16")
    msg = str(e.value)
    assert "gated" in msg and "ai.meta.com/resources/models-and-libraries/dinov3-downloads" in msg
    assert "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert "DINOv3 License" in msg and "--teacher_weights" in msg and "\n" not in msg


def test_dinov3_weights_load_from_the_hub_cache_a_path_or_a_signed_url(tmp_path, monkeypatch):
    monkeypatch.setitem(CONFIGS, "dinov3_vits16", TINY3)  # the real name and file name, a tiny model
    path, vit = dinov3_weights(tmp_path)
    cache = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache))
    same = lambda a: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), vit.state_dict().values()))
    assert same(from_pretrained("dinov3_vits16", path=str(path)))
    calls = []

    def download(url, dst, progress=True):
        calls.append(url)
        open(dst, "wb").write(path.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    signed = ("https://dl.fbaipublicfiles.com/dinov3/x/dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
              "?Policy=abc&Signature=xyz")
    assert same(from_pretrained("dinov3_vits16", path=signed))
    cached = cache / "checkpoints" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"  # as torch.hub.load would name it
    assert calls == [signed] and cached.exists()
    assert same(from_pretrained("dinov3_vits16")) and len(calls) == 1  # from the cache, no flag needed
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated: what to do, and the signature never shown
    with pytest.raises(CheckpointError) as e:
        from_pretrained("dinov3_vits16")
    assert str(cached) in str(e.value) and "fetch" in str(e.value) and "gated" in str(e.value)

    def offline(url, dst, progress=True):
        raise urllib.error.HTTPError(url, 403, "Forbidden", None, None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached.unlink()
    with pytest.raises(CheckpointError) as e:
        from_pretrained("dinov3_vits16", path=signed)
    assert "403" in str(e.value) and "Signature" not in str(e.value) and "expires" in str(e.value)


def test_dinov3_weights_of_another_model_say_what_they_look_like(tmp_path, monkeypatch):
    monkeypatch.setitem(CONFIGS, "dinov3_vits16", TINY3)
    monkeypatch.setitem(CONFIGS, "dinov3_vitb16", replace(TINY3, embed_dim=64, num_heads=4))
    path, _ = dinov3_weights(tmp_path)
    with pytest.raises(CheckpointError) as e:
        from_pretrained("dinov3_vitb16", path=str(path))
    assert "it looks like dinov3_vits16 (32 wide, 2 blocks, 2 heads, mlp FFN, 4 storage tokens)" in str(e.value)
    toy = tmp_path / "toy.pt"
    torch.save(ViT.from_name("toy-s").state_dict(), toy)  # a DINOv2-shaped file for a DINOv3 model
    with pytest.raises(CheckpointError, match="key\\(s\\) missing, the first storage_tokens; it looks like toy-s"):
        from_pretrained("dinov3_vits16", path=str(toy))


def test_truncated_toy_weights_say_to_run_toys_py(tmp_path):
    bad = tmp_path / "toy-s.pt"
    bad.write_bytes(open(os.path.join(weights.TOY_WEIGHTS, "toy-s.pt"), "rb").read()[:1000])
    with pytest.raises(CheckpointError) as e:
        from_pretrained("toy-s", path=str(bad))
    assert "python toys.py" in str(e.value) and "http" not in str(e.value)


def test_random_init_is_rebuildable_from_seed_and_role():
    a = weights.initial_backbone("toy-s", "student", "random", seed=3)
    torch.manual_seed(123)  # whatever happened in between
    b = weights.initial_backbone("toy-s", "student", "random", seed=3)
    c = weights.initial_backbone("toy-s", "teacher", "random", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


def test_classifier_head_sizes():
    with torch.device("meta"):
        s = Classifier(ViT.from_name("vits14"), 47)
        b = Classifier(ViT.from_name("vitb14"), 47)
        l = Classifier(ViT.from_name("vitl14"), 200)
    assert s.head[0].in_features == s.head[0].out_features == 3 * 384  # n_hidden = n_in for ViT-S
    assert b.head[0].out_features == round((3 * 768 * 47) ** 0.5)  # sqrt(n_in n_out) for ViT-B/L
    assert l.head[0].out_features == round((3 * 1024 * 200) ** 0.5) and l.head[-1].out_features == 200


def test_classifier_uses_cls_of_last_three_blocks():
    torch.manual_seed(0)
    clf = Classifier(ViT.from_name("toy-s"), 5).eval()
    x = torch.randn(2, 3, 28, 28)
    blocks = clf.vit.forward_blocks(x, range(clf.vit.config.depth))
    want = clf.head(torch.cat([t[:, 0] for t in blocks[-3:]], -1))
    assert torch.allclose(clf(x), want, atol=1e-6)


def test_classifier_norms_the_cls_tokens_alone():
    """The final LayerNorm is per token: the head's CLS tokens normed alone are the whole blocks' bit for bit, at
    1 / (1 + R + N) of the cost; TED's blocks are normed whole."""
    clf = randomize_(Classifier(ViT.from_name("toy-s", num_register_tokens=4), 5)).eval()
    x = torch.randn(2, 3, 28, 28)
    normed = []
    clf.vit.norm.register_forward_hook(lambda m, args, out: normed.append(tuple(args[0].shape)))
    with torch.no_grad():
        logits = clf(x)
        assert normed == [(2, 48)] * 3
        whole = clf.vit.forward_blocks(x, [-3, -2, -1])
        assert torch.equal(logits, clf.head(torch.cat([t[:, 0] for t in whole], -1)))
        normed.clear()
        _, (block0,) = clf(x, [0])
        assert (2, 1 + 4 + 4, 48) in normed and torch.equal(block0, clf.vit.forward_blocks(x, [0])[0])


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_residual_stream_stays_in_the_autocast_dtype(family):
    """Under bf16 autocast every block adds in bf16 (LayerScale's gamma cast to x's dtype): the residual stream
    moves half the bytes of fp32's. The logits stay within 2 % of the largest fp32 logit (seen on toy-b and toy-l
    at 224 px: <= 1.3 %; 0.5-1.0 % with the fp32 residual stream before)."""
    torch.manual_seed(0)
    overrides = DINOV3_TOY if family == "dinov3" else {}  # DINOv3's: random weights, noised to matter
    vit = ViT.from_name("toy-b", **overrides)
    if not overrides:
        vit.load_state_dict(torch.load(os.path.join(weights.TOY_WEIGHTS, "toy-b.pt"), weights_only=True))
    clf = randomize_(Classifier(vit, 10), std=0.1 if overrides else 0.0).eval()
    randomize_(clf.head, std=0.1)
    x = torch.randn(8, 3, 8 * vit.config.patch_size, 8 * vit.config.patch_size)
    dtypes = []
    for blk in vit.blocks:
        blk.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    with torch.no_grad():
        want = clf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = clf(x)
    assert dtypes == [torch.float32] * 3 + [torch.bfloat16] * 3
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


def test_forward_with_blocks_computes_each_block_once():  # TED reads blocks next to the head's
    torch.manual_seed(0)
    x = torch.randn(2, 3, 28, 42)
    for head in (Classifier, Segmenter):
        m = head(ViT.from_name("toy-l", num_register_tokens=4), 4).eval()
        calls = []
        for blk in m.vit.blocks:
            blk.register_forward_hook(lambda *_: calls.append(1))
        with torch.no_grad():
            logits, blocks = m(x, [0, 2, 4])
            assert len(calls) == 6  # one pass: the chosen blocks and the head's, none twice
            assert torch.allclose(logits, m(x), atol=1e-6)
            for got, want in zip(blocks, m.vit.forward_blocks(x, [0, 2, 4])):
                assert torch.equal(got, want)


def test_segmenter_head_and_sliding_window():
    torch.manual_seed(0)
    seg = Segmenter(ViT.from_name("toy-s"), 4).eval()
    assert [type(m).__name__ for m in seg.head] == ["BatchNorm2d", "Conv2d"] and seg.head[1].kernel_size == (1, 1)
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        whole = seg(x)
        assert whole.shape == (2, 4, 56, 84)
        assert torch.allclose(slide_inference(seg, x[..., :56], 56, 28), seg(x[..., :56]), atol=1e-5)  # one window
        slid = slide_inference(seg, x, 56, 28)  # windows at 0, 28 wide: the middle seen twice, averaged
        assert slid.shape == whole.shape
        left, right = seg(x[..., :56]), seg(x[..., 28:])
        assert torch.allclose(slid[..., :28], left[..., :28], atol=1e-5)
        assert torch.allclose(slid[..., 28:56], (left[..., 28:] + right[..., :28]) / 2, atol=1e-5)
        small = slide_inference(seg, x[..., :42, :42], 56, 28)  # smaller than the window: padded, then cropped
        assert small.shape == (2, 4, 42, 42)


DINOV3_TOY = dict(family="dinov3", patch_size=16, num_register_tokens=4)  # toy-s's sizes, DINOv3's layers


@pytest.mark.parametrize("overrides", [{}, {"num_register_tokens": 4}, {"ffn": "swiglu"}, DINOV3_TOY,
                                       dict(DINOV3_TOY, ffn="swiglu", qkv_bias=False)])
def test_flops_match_torch_flop_counter(overrides):
    vit = ViT.from_name("toy-s", **overrides).eval()
    side = 4 * vit.config.patch_size  # 4 x 4 patches
    # the math backend spells attention as matmuls, which the counter sees on every torch: the fused CPU kernel
    # of torch >= 2.14 is not in its table, so under the default backend it would miss q k^T and attn v
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        vit(torch.randn(2, 3, side, side))
    assert counter.get_total_flops() == 2 * vit.flops(side)  # per image, matmuls and convolutions
    c, n = vit.config, 1 + vit.config.num_register_tokens + 16
    attention = 2 * c.depth * 2 * 2 * n * n * c.embed_dim  # batch 2, blocks, q k^T and attn v, 2 per multiply-add
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == attention  # counted, not missed
    with torch.device("meta"):
        big, big3 = ViT.from_name("vitb14"), ViT.from_name("dinov3_vitb16")
    assert 44e9 < big.flops(224) < 48e9  # ~2 x 86M parameters x 257 tokens, plus attention
    assert 34e9 < big3.flops(224) < 38e9  # ~2 x 86M parameters x (1 + 4 + 196) tokens: patches of 16, 4 storage


def counted_step(models, loss_fn, side, batch=2):
    """torch's FlopCounterMode over one training step (forward and backward) of `models`, attention as matmuls."""
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(*[m(x) for m in models], y).backward()
    return counter


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("overrides", [{}, dict(ffn="swiglu", num_register_tokens=4), DINOV3_TOY])
def test_step_flops_are_torch_flop_counters_on_a_slad_step(separate, overrides):
    """MFU's numerator is the step's count exactly: attention's backward two forwards, no backward below block 0's
    qkv, LoRA's own matmuls; left out: the heads (forward, weight and input gradients: 6 x their weights an image)
    and LoRA's fold of its weight, once a step (2 out r in a layer)."""
    torch.manual_seed(0)
    teacher = Classifier(ViT.from_name("toy-b", **overrides), 10)
    student = Classifier(ViT.from_name("toy-s", **overrides), 10)
    add_lora(teacher.vit, rank=4, separate=separate)
    share_lora(student.vit, teacher.vit)
    side, batch = 4 * teacher.vit.config.patch_size, 2
    counter = counted_step([teacher, student], lambda t, s, y: kd.slad_loss(s, t, y), side, batch)
    heads = 6 * batch * sum(p.numel() for m in (teacher, student) for p in m.head.parameters() if p.dim() == 2)
    folds = sum(2 * m.base.out_features * m.lora_B.shape[1] * m.base.in_features
                for m in [*teacher.modules(), *student.modules()] if isinstance(m, LoRALinear))
    step = mfu.step_flops(teacher.vit, side, "lora") + mfu.step_flops(student.vit, side, "lora")
    assert counter.get_total_flops() == batch * step + heads + folds
    assert torch.ops.aten.convolution_backward not in counter.get_flop_counts()["Global"]  # no patch-embed backward


@pytest.mark.parametrize("how", ["probe", "lora", "finetune"])
def test_step_flops_of_one_encoder_by_how_it_trains(how):
    torch.manual_seed(0)
    clf = Classifier(ViT.from_name("toy-s", **DINOV3_TOY), 10)
    lora.adapt(clf, how, 4)
    side, batch = 4 * clf.vit.config.patch_size, 2
    counter = counted_step([clf], F.cross_entropy, side, batch)
    first, second = [p.numel() for p in clf.head.parameters() if p.dim() == 2]
    head = 6 * batch * (first + second) - (2 * batch * first if how == "probe" else 0)  # a probe's: no input gradient
    folds = 2 * clf.vit.config.depth * (3 * 48) * 4 * 48 if how == "lora" else 0  # W0 + B A: out, rank 4, in
    assert counter.get_total_flops() == batch * mfu.step_flops(clf.vit, side, how) + head + folds
    with pytest.raises(ValueError, match="unknown how 'distill'"):
        mfu.step_flops(clf.vit, side, "distill")


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    teacher = add_lora(ViT.from_name("toy-l"), rank=4)
    randomize_(teacher, seed=2)
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for on in (False, True):
        teacher.grad_checkpointing = on
        teacher.zero_grad()
        teacher(x).square().mean().backward()
        grads.append([p.grad.clone() for p in trainable_parameters(teacher)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# -----------------------------------------------------------------------------
# lora.py: LoRA (eq. 3), merge, SLAD's sharing (Fig. 4), what adapt trains


def toy_pair(mapping="even", rank=4, seed=0):
    torch.manual_seed(seed)
    teacher, student = ViT.from_name("toy-l").eval(), ViT.from_name("toy-s").eval()
    add_lora(teacher, rank=rank)
    g = share_lora(student, teacher, mapping)
    return teacher, student, g


def test_lora_zero_init_leaves_outputs_unchanged():
    vit = ViT.from_name("toy-l").eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = vit(x)
        add_lora(vit, rank=8, targets=("attn.qkv", "mlp.fc1"))
        after = vit(x)
    assert torch.equal(before, after)
    adapters = [m for m in vit.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2 * vit.config.depth
    assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in adapters)  # A Kaiming, B zeros


def test_lora_freezes_base_and_trains_only_adapters():
    vit = add_lora(ViT.from_name("toy-l"), rank=16)
    names = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    assert all(".attn.qkv." in n for n in names)  # qkv by default, as the paper
    qkv = vit.blocks[0].attn.qkv
    d = vit.embed_dim
    assert qkv.lora_A.shape == (16, d) and qkv.lora_B.shape == (3 * d, 16)


def test_lora_forward_is_eq3():
    vit = add_lora(ViT.from_name("toy-s"), rank=4, alpha=8)
    layer = randomize_(vit.blocks[0].attn.qkv)
    x = torch.randn(5, vit.embed_dim)
    W = layer.base.weight + (8 / 4) * layer.lora_B @ layer.lora_A
    assert torch.allclose(layer(x), F.linear(x, W, layer.base.bias), atol=1e-5)


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("overrides", [{}, DINOV3_TOY])
def test_folded_lora_gives_the_gradients_of_eq3_unfolded(monkeypatch, separate, overrides):
    """LoRALinear runs W0 + scale B A as one matmul with a backward of its own (lora.FoldedLoRA): the adapters'
    gradients, from the teacher and through the student's slices, are autograd's of eq. 3 unfolded,
    W0 x + Delta W x (DINOv3's masked k bias kept): within 1e-6 in float32 (seen: 3e-8, gradients ~0.03; 2e-6 of
    them, rounding), within 1e-12 of them in float64 (seen: 3e-15)."""
    torch.manual_seed(0)
    teacher, student = ViT.from_name("toy-b", **overrides), ViT.from_name("toy-s", **overrides)
    add_lora(teacher, rank=4, alpha=8, separate=separate)
    share_lora(student, teacher)
    randomize_(teacher, seed=1)  # B no longer zero: the adapters change what flows
    side = 4 * teacher.config.patch_size
    x = torch.randn(2, 3, side, side)
    unfolded = lambda self, x: self.base(x) + F.linear(x, self.delta_weight())

    def gradients(dtype):
        teacher.to(dtype), student.to(dtype), teacher.zero_grad(set_to_none=True)
        (teacher(x.to(dtype)).square().mean() + student(x.to(dtype)).pow(3).mean()).backward()
        return [p.grad for p in trainable_parameters(teacher)]
    for dtype in (torch.float32, torch.float64):
        folded = gradients(dtype)
        with monkeypatch.context() as m:
            m.setattr(LoRALinear, "forward", unfolded)
            want = gradients(dtype)
        assert len(folded) == 2 * teacher.config.depth
        for got, w in zip(folded, want):
            if dtype == torch.float32:
                assert (got - w).abs().max() <= 1e-6
            else:
                assert (got - w).norm() <= 1e-12 * w.norm()


def test_separate_qkv_adapters_are_three_loras_and_slice_per_projection():
    """--qkv_adapters separate: q, k and v each with its own rank-r A and B, as LoRA on three separate layers;
    the student's slice is Fig. 4's, per projection; merged, it is the official layout."""
    torch.manual_seed(0)
    teacher, student = ViT.from_name("toy-b"), ViT.from_name("toy-s")
    add_lora(teacher, rank=4, separate=True)
    share_lora(student, teacher)
    t, s = teacher.blocks[0].attn.qkv, student.blocks[0].attn.qkv
    randomize_(t, seed=3)
    assert t.lora_A.shape == (3 * 4, 96) and t.lora_B.shape == (3 * 96, 4) and s.lora_A is t.lora_A
    A, B = t.lora_A.unflatten(0, (3, 4)), t.lora_B.unflatten(0, (3, 96))
    assert torch.allclose(t.delta_weight(), torch.cat([B[c] @ A[c] for c in range(3)]),  # eq. 3 per projection
                          atol=1e-6)
    x = torch.randn(5, 96)
    assert torch.allclose(t(x), F.linear(x, t.base.weight + t.delta_weight(), t.base.bias), atol=1e-5)
    want = torch.cat([B[c][:48] @ A[c][:, :48] for c in range(3)])  # Fig. 4, each projection's first d_s rows
    assert torch.allclose(s.delta_weight(), want, atol=1e-6)
    for vit in (teacher, student):
        randomize_(vit.blocks[1].attn.qkv, seed=4)
        merged, x = merge_lora(vit), torch.randn(2, 3, 28, 28)
        assert (torch.allclose(merged(x), vit(x), atol=1e-4)
                and list(merged.state_dict()) == list(ViT.from_name(vit.name).state_dict()))


def test_shared_a_drawn_for_the_students_width():
    for width, bound in ((None, 1 / 96 ** 0.5),
                         (48, 1 / 48 ** 0.5)):  # Kaiming for the teacher's width, or the student's
        A = add_lora(ViT.from_name("toy-b"), rank=4, init_width=width).blocks[0].attn.qkv.lora_A
        assert 0.9 * bound < A.abs().max() <= bound


def test_lora_bad_target_is_a_clear_error():
    with pytest.raises(ValueError, match="no linear layer 'mlp.w12'"):
        add_lora(ViT.from_name("toy-s"), targets=("mlp.w12",))


def test_merge_equivalence_and_official_layout():
    vit = add_lora(ViT.from_name("toy-l"), rank=4, targets=("attn.qkv", "attn.proj", "mlp.fc2")).eval()
    randomize_(vit, seed=3)
    x = torch.randn(2, 3, 42, 28)
    merged = merge_lora(vit).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert list(merged.state_dict()) == list(ViT.from_name("toy-l").state_dict())
    with torch.no_grad():
        assert (merged(x) - vit(x)).abs().max() <= 1e-5
        plain = ViT.from_name("toy-l")
        plain.load_state_dict(merged.state_dict(), strict=True)  # what a user deploys loads in model.py alone
        assert (plain.eval()(x) - vit(x)).abs().max() <= 1e-5


def test_sharing_uses_the_same_parameter_objects():
    teacher, student, g = toy_pair()
    for i, j in enumerate(g):
        s, t = student.blocks[i].attn.qkv, teacher.blocks[j].attn.qkv
        assert s.lora_A is t.lora_A and s.lora_B is t.lora_B
    n_unique = sum(p.numel() for p in trainable_parameters(teacher, student))
    n_teacher = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    assert n_unique == n_teacher  # every student adapter is a teacher one: listed once
    params = trainable_parameters(teacher, student, teacher)
    assert len(params) == len({id(p) for p in params})
    assert not any(p.requires_grad for n, p in student.named_parameters() if "lora" not in n)


def test_shared_delta_is_the_teachers_sliced_per_q_k_v():
    teacher, student, g = toy_pair(rank=4)
    randomize_(teacher, seed=5)
    dt, ds = teacher.embed_dim, student.embed_dim
    for i, j in enumerate(g):
        dW_t = teacher.blocks[j].attn.qkv.delta_weight()
        dW_s = student.blocks[i].attn.qkv.delta_weight()
        assert dW_s.shape == (3 * ds, ds)
        for c in range(3):  # q, k, v: the first d_s rows of each, the first d_s input columns
            assert torch.allclose(dW_s[c * ds:(c + 1) * ds], dW_t[c * dt:c * dt + ds, :ds])
        # Fig. 4 in terms of A and B: A_s = A_t[:, :d_s]
        A_s, B_s = student.blocks[i].attn.qkv.sliced()
        assert torch.equal(A_s, teacher.blocks[j].attn.qkv.lora_A[:, :ds])


def test_student_loss_trains_the_teacher_through_shared_adapters():
    teacher, student, g = toy_pair(rank=4)
    randomize_(teacher, seed=7)
    x = torch.randn(2, 3, 28, 28)
    student(x).square().mean().backward()
    for j, block in enumerate(teacher.blocks):
        grad = block.attn.qkv.lora_A.grad
        if j in g:
            assert grad is not None and grad.abs().sum() > 0
        else:  # teacher blocks that no student block maps to keep adapters of their own
            assert grad is None
    with torch.no_grad():
        before = teacher(x)
    opt = torch.optim.SGD(trainable_parameters(teacher, student), lr=1.0)
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(teacher(x), before)


def test_mappings():
    assert layer_mapping(12, 24, "even") == [2 * i for i in range(12)]  # g(i) = 2i, §5.2.1
    assert layer_mapping(12, 24, "first") == list(range(12))
    assert layer_mapping(12, 24, "last") == list(range(12, 24))
    for m in lora.MAPPINGS:
        assert layer_mapping(12, 12, m) == list(range(12))
    g = layer_mapping(12, 40, "even")
    steps = [b - a for a, b in zip(g, g[1:])]
    assert g[0] == 0 and g[-1] < 40 and len(set(g)) == 12 and min(steps) >= 3 and max(steps) <= 4
    assert layer_mapping(12, 40, "last")[-1] == 39
    with pytest.raises(ValueError, match="more than its teacher"):
        layer_mapping(24, 12, "even")
    with pytest.raises(ValueError, match="unknown mapping"):
        layer_mapping(12, 24, "odd")


def test_sharing_refuses_deeper_or_wider_student():
    t = add_lora(ViT.from_name("toy-s"))
    with pytest.raises(ValueError, match="deeper|more than its teacher"):
        share_lora(ViT.from_name("toy-s", depth=4), t)
    with pytest.raises(ValueError, match="wider than its teacher"):
        share_lora(ViT.from_name("toy-l", depth=2), t)
    with pytest.raises(ValueError, match="add_lora"):
        share_lora(ViT.from_name("toy-s"), ViT.from_name("toy-l"))


def test_sharing_mapping_last_on_real_depths():
    with torch.device("meta"):
        teacher, student = add_lora(ViT.from_name("vitl14")), ViT.from_name("vitb14")
        g = share_lora(student, teacher, "last")
    assert g == list(range(12, 24))
    assert student.blocks[0].attn.qkv.lora_A is teacher.blocks[12].attn.qkv.lora_A


def test_dinov3_sharing_merge_and_export_keep_the_k_masked_bias(tmp_path):
    """Fig. 4 on DINOv3: LoRA changes the qkv weight, k rows included; the base's bias stays masked on the k rows,
    in the adapted model, the student sharing the adapters, the merged model and the exported file."""
    torch.manual_seed(0)
    teacher = randomize_(ViT(replace(TINY3, embed_dim=64, num_heads=4, depth=4)), seed=1)
    student = randomize_(ViT(TINY3), seed=2)
    add_lora(teacher, rank=4, targets=("attn.qkv", "mlp.fc1"))
    randomize_(teacher, seed=3)  # non-zero B
    assert share_lora(student, teacher) == [0, 2]
    qkv = student.blocks[0].attn.qkv
    assert isinstance(qkv.base, model.KMaskedLinear) and qkv.lora_A is teacher.blocks[0].attn.qkv.lora_A
    x = torch.randn(2, 3, 32, 48)
    tokens = torch.randn(2, 11, 32)
    with torch.no_grad():
        want = F.linear(tokens, qkv.base.weight + qkv.delta_weight(), qkv.base.bias * qkv.base.bias_mask)
        assert torch.allclose(qkv(tokens), want, atol=1e-6)
        assert qkv.delta_weight()[32:64].abs().sum() > 0  # the adapters do move the k rows
        merged = merge_lora(student).eval()
        assert list(merged.state_dict()) == list(ViT(TINY3).state_dict())  # official layout, bias_mask included
        assert (merged(x) - student.eval()(x)).abs().max() <= 1e-5
        assert torch.equal(merged.blocks[0].attn.qkv.bias_mask, qkv.base.bias_mask)
        before = merged(x)
        merged.blocks[0].attn.qkv.bias[32:64] += 1.0
        assert torch.equal(merged(x), before)  # still masked after the merge
        clf = Classifier(student, 5).eval()
        deploy.export(str(tmp_path / "student.pt"), clf, {})
        loaded = load_model(str(tmp_path / "student.pt")).eval()
        assert loaded.vit.config == TINY3 and (loaded(x) - clf(x)).abs().max() <= 1e-5


def test_finetuned_encoders_train_every_parameter_they_mark_trainable(small_synthetic):
    """DDP needs a gradient for every parameter that requires one: ViT.mask_token (iBOT's, unused here) must not."""
    for how in ("finetune", "probe", "lora"):
        clf = Classifier(ViT.from_name("toy-s"), 4)
        lora.adapt(clf, how, 4)
        clf(torch.randn(2, 3, 28, 28)).sum().backward()
        assert all(p.grad is not None for p in clf.parameters() if p.requires_grad), how


# -----------------------------------------------------------------------------
# data.py, images.py, own_data.py, synthetic.py: the datasets on tiny fake copies of their on-disk layouts,
# Cityscapes, your own folders, the synthetic sets, image files, transforms, samplers and loaders


@pytest.mark.parametrize("name,make,n_classes,sizes", [
    ("dtd", fake_dtd, 3, (6, 6, 6)),
    ("aircraft", fake_aircraft, 3, (6, 6, 6)),
    ("cub", fake_cub, 4, (25, 3, 12)),  # no val split: 10% of the 28 train images held out
])
def test_loaders_on_fake_layouts(tmp_path, name, make, n_classes, sizes):
    make(str(tmp_path))
    splits, num_classes = load_splits(name, str(tmp_path))
    assert num_classes == n_classes
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == sizes
    img, label = splits["train"][0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and 0 <= label < n_classes
    labels = {splits["test"][i][1] for i in range(len(splits["test"]))}
    assert labels == set(range(n_classes))
    x, y = next(iter(make_loader(splits["train"], train_transform(28), 4, train=True)))
    assert x.shape == (4, 3, 28, 28) and y.shape == (4,)


def test_cub_holdout_is_fixed_and_disjoint(tmp_path):
    fake_cub(str(tmp_path))
    a, _ = load_splits("cub", str(tmp_path))
    b, _ = load_splits("cub", str(tmp_path))
    assert a["val"].indices == b["val"].indices  # a fixed seed: the same val set every run
    assert not set(a["val"].indices) & set(a["train"].indices)
    test_paths = {p for p, _ in a["test"].samples}
    assert not test_paths & {a["train"].dataset.samples[i][0] for i in a["train"].indices}


def test_missing_data_offline_is_a_clear_paragraph(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    for name, url in (("dtd", "dtd-r1.0.1.tar.gz"), ("aircraft", "fgvc-aircraft-2013b.tar.gz"),
                      ("cub", "CUB_200_2011.tgz")):
        with pytest.raises(DataError) as e:
            load_splits(name, str(tmp_path / "data"))
        msg = str(e.value)
        assert url in msg and str(tmp_path / "data") in msg and "could not be downloaded" in msg


def test_incomplete_copy_is_a_clear_error(tmp_path):
    fake_dtd(str(tmp_path))
    os.remove(tmp_path / "dtd" / "dtd" / "labels" / "val1.txt")
    with pytest.raises(DataError, match="not a complete copy of dtd"):
        load_splits("dtd", str(tmp_path))


@pytest.mark.parametrize("name,url", [
    ("dtd", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"),
    ("aircraft", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"),
    ("cub", "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"),  # Caltech's record, not 65de6-vh518
    ("cityscapes", "https://www.cityscapes-dataset.com/downloads/"),
])
def test_dataset_urls_are_the_checked_ones(name, url):
    assert (images.CITYSCAPES_URL if name == "cityscapes" else data.DATASETS[name].url) == url
    if name in ("dtd", "aircraft"):  # the ones torchvision downloads: our message must name the same file
        assert getattr({"dtd": tvd.DTD, "aircraft": tvd.FGVCAircraft}[name], "_URL", url) == url


@pytest.mark.parametrize("folder", [("dtd", "dtd"), ("dtd",)])  # torchvision's, and the archive unpacked by hand
def test_dtd_loads_from_either_layout(tmp_path, folder):
    fake_dtd(str(tmp_path), folder=folder)
    splits, num_classes = load_splits("dtd", str(tmp_path))
    assert num_classes == 3 and tuple(len(splits[s]) for s in ("train", "val", "test")) == (6, 6, 6)
    assert splits["test"][0][0].mode == "RGB"


@pytest.mark.parametrize("name,make", [("dtd", lambda r: fake_dtd(r, folder=("dtd",))), ("aircraft", fake_aircraft),
                                       ("cub", fake_cub)])
def test_offline_instruction_when_followed_gives_a_layout_that_loads(tmp_path, monkeypatch, name, make):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        load_splits(name, str(root))
    archive, into = re.search(r"tar xzf (\S+) -C ([^\s)]+)", str(e.value)).groups()
    url, top = data.DATASETS[name].url, data.DATASETS[name].folder
    assert archive == os.path.basename(url) and into == str(root)
    make(str(tmp_path / "stage"))  # the archive as published: one top folder
    with tarfile.open(tmp_path / archive, "w:gz") as tar:
        tar.add(tmp_path / "stage" / top, arcname=top)
    with tarfile.open(tmp_path / archive) as tar:  # what the instruction does
        tar.extractall(into)
    splits, _ = load_splits(name, str(root))
    assert len(splits["test"]) > 0 and splits["test"][0][0].mode == "RGB"


@pytest.mark.parametrize("name,make", [("dtd", fake_dtd), ("aircraft", fake_aircraft), ("cub", fake_cub)])
@pytest.mark.parametrize("how,num_workers", [("truncated", 0), ("truncated", 1), ("garbage", 0), ("missing", 0)])
def test_a_bad_image_file_is_one_line_that_names_it(tmp_path, name, make, how, num_workers):
    make(str(tmp_path))
    test = load_splits(name, str(tmp_path))[0]["test"]
    bad = test.samples[1][0]
    damage(bad, how)
    loader = make_loader(test, eval_transform(28), batch_size=2, train=False, num_workers=num_workers)
    with pytest.raises(DataError) as e:  # from a worker, torch re-raises it with the worker's traceback
        for _ in loader:
            pass
    msg = str(e.value)
    assert bad in msg and "\n" not in msg and "download it again" in msg and "Traceback" not in msg


@pytest.mark.parametrize("script", ["train_slad.py", "cka.py"])
def test_a_bad_image_stops_a_script_with_one_line(tmp_path, script):
    fake_cub(str(tmp_path / "data"))
    bad = load_splits("cub", str(tmp_path / "data"))[0]["test"].samples[2][0]
    damage(bad, "truncated")
    toy = ["--dataset", "cub", "--data_dir", str(tmp_path / "data"), "--teacher", "toy-l", "--student", "toy-s",
           "--init", "random", "--img_size", "28", "--batch_size", "4", "--num_workers", "1", "--device", "cpu"]
    extra = ["--split", "test"] if script == "cka.py" else ["--epochs", "1"]
    r = cli([script, *toy, *extra, "--out_dir", str(tmp_path / "out")])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and bad in r.stderr and "download it again" in r.stderr


def test_cityscapes_loader_on_a_fake_layout(tmp_path):
    fake_cityscapes(str(tmp_path))
    splits, num_classes = load_splits("cityscapes", str(tmp_path))
    assert num_classes == 19 and "cityscapes" in SEGMENTATION
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (9, 1, 2)  # test = official val
    img, mask = splits["test"][0]
    m = np.array(mask)
    assert img.size == mask.size == (56, 28) and set(np.unique(m)) == {0, 13, 255}
    assert (m[:, 10:30][m[:, 10:30] != 13] == 0).all() and (m[:, :10] == 255).all()
    ds = Transformed(splits["train"], SegTrainTransform(crop=28, base=32))
    for seed in range(5):  # the same random resize, crop and flip for image and mask
        x, y = ds[(0, seed)]
        assert x.shape == (3, 28, 28) and y.shape == (28, 28) and y.dtype == torch.long
        if (y == 13).any() and (y == 0).any():
            assert x[0][y == 13].float().mean() > x[0][y == 0].float().mean() + 50  # uint8 red channel
    x, y = Transformed(splits["test"], SegEvalTransform(base=32))[(0, 0)]
    assert x.shape == (3, 32, 64) and y.shape == (28, 56)  # image resized, mask at full resolution


def test_missing_cityscapes_says_what_to_fetch(tmp_path):
    with pytest.raises(DataError) as e:
        load_splits("cityscapes", str(tmp_path))
    msg = str(e.value)
    assert ("leftImg8bit_trainvaltest.zip" in msg and "gtFine_trainvaltest.zip" in msg
            and "cityscapes-dataset.com" in msg)
    assert str(tmp_path / "cityscapes") in msg


@pytest.mark.parametrize("bad", [None, "leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"])
def test_cityscapes_zips_unpack_and_an_incomplete_one_is_named(tmp_path, bad):
    fake_cityscapes(str(tmp_path / "stage"))
    (tmp_path / "cityscapes").mkdir()
    for folder in ("leftImg8bit", "gtFine"):  # the zips as downloaded, not unpacked yet
        path = tmp_path / "cityscapes" / f"{folder}_trainvaltest.zip"
        with zipfile.ZipFile(path, "w") as z:
            for f in (tmp_path / "stage" / "cityscapes" / folder).rglob("*.png"):
                z.write(f, f.relative_to(tmp_path / "stage" / "cityscapes"))
        if path.name == bad:  # an interrupted download
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    if bad is None:
        assert len(load_splits("cityscapes", str(tmp_path))[0]["test"]) == 2
        return
    with pytest.raises(DataError) as e:
        load_splits("cityscapes", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "cityscapes" / bad) in msg and "incomplete" in msg and "\n" not in msg
    assert sum(z in msg for z in images.CITYSCAPES_ZIPS) == 1  # the incomplete one alone


@pytest.mark.parametrize("num_workers", [0, 1])
def test_cityscapes_bad_label_file_is_one_line_that_names_it(tmp_path, num_workers):
    fake_cityscapes(str(tmp_path))
    test = load_splits("cityscapes", str(tmp_path))[0]["test"]
    bad = test.samples[1][1]  # a mask
    damage(bad, "truncated")
    loader = make_loader(test, SegEvalTransform(base=32), batch_size=1, train=False, num_workers=num_workers)
    with pytest.raises(DataError) as e:
        for _ in loader:
            pass
    assert bad in str(e.value) and "\n" not in str(e.value)


def test_an_image_folder_reads_as_imagefolder_and_holds_out_the_same_splits(tmp_path):
    root = own_images(tmp_path / "pets", splits=(("train", 10),))
    splits, num_classes = load_splits("folder", root)
    assert num_classes == 3 and splits["test"].classes == list(ANIMALS)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 3, 3]  # 10 % of each class each, rounded
    assert data.held_out_splits(splits) == {"val": "10 % of each class of train, fixed seed 0",
                                     "test": "10 % of each class of train, fixed seed 0"}
    assert "val 3 (held out of train: 10 % of each class" in data.describe_splits(splits)
    for s in ("val", "test"):  # every class counted in val and test, none of their images trained on
        assert sorted(label for _, label in splits[s].samples) == [0, 1, 2]
    paths = {s: [p for p, _ in splits[s].samples] for s in ("train", "val", "test")}
    assert len(set(sum(paths.values(), []))) == 30
    assert not any(p.endswith((".txt", ".DS_Store")) for p in paths["train"])
    again, _ = load_splits("folder", root)  # a second run holds out the same images
    assert {s: [p for p, _ in again[s].samples] for s in ("train", "val", "test")} == paths
    img, label = splits["train"][1]
    assert img.mode == "RGB" and img.size == (36, 30) and label == 0
    assert {os.path.splitext(p)[1] for p in paths["train"]} == {".jpg", ".png", ".gif", ".webp"}
    own_images(tmp_path / "pets", splits=(("val", 2),))  # a val/ of its own: read as it is, test still held out
    splits, _ = load_splits("folder", root)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [27, 6, 3]
    assert list(data.held_out_splits(splits)) == ["test"]


def test_a_mask_folder_pairs_images_and_masks_and_holds_out_val(tmp_path):
    root = own_masks(tmp_path / "boxes", splits=(("train", 20), ("test", 2)))
    splits, num_classes = load_splits("folder-seg", root)
    assert num_classes == 3 and splits["test"].classes == ["background", "red box", "blue box"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [18, 2, 2]
    assert list(data.held_out_splits(splits)) == ["val"]
    img, mask = splits["train"][0]
    m = np.array(mask)
    assert img.mode == "RGB" and mask.size == img.size == (42, 28) and set(np.unique(m)) <= {0, 1, 2, 255}
    assert (m == 255).any() and np.array(img)[m == 1].mean(0)[0] > 150  # the mask lies on its own image
    x, y = Transformed(splits["train"], SegTrainTransform(crop=28, base=32))[(0, 1)]
    assert x.shape == (3, 28, 28) and y.shape == (28, 28)


def test_photos_of_any_size_are_evaluated_each_at_its_own_size_and_one_size_still_batches(tmp_path):
    """Photos of 4 sizes, portrait and landscape, in batches of 4: each image is evaluated at its own size, as in
    batches of one, every labelled pixel counted; a folder of one size still gets stacked batches (the synthetic
    demo's and Cityscapes' evaluation unchanged)."""
    torch.manual_seed(0)
    seg = randomize_(Segmenter(ViT.from_name("toy-s"), 3)).eval()
    off = torch.autocast("cpu", enabled=False)
    for sizes in (((28, 42), (42, 28), (30, 40), (40, 30)), ((28, 42),)):
        root = own_masks(tmp_path / f"sizes{len(sizes)}", splits=(("train", 8),), sizes=sizes)
        train = load_splits("folder-seg", root)[0]["train"]
        labelled = sum(int((np.array(train[i][1]) != 255).sum()) for i in range(len(train)))
        results = []
        for batch_size in (4, 1):
            loader = make_loader(train, SegEvalTransform(32), batch_size, train=False)
            x, y = next(iter(loader))
            assert isinstance(x, list) == (len(sizes) > 1 and batch_size > 1)  # stacked whenever the sizes agree
            results.append(evaluation.evaluate({"s": seg}, loader, "cpu", off, window=28)["s"])
        assert results[0]["confusion"].sum() == labelled  # at each mask's own resolution
        assert torch.equal(results[0]["confusion"], results[1]["confusion"])


def test_a_16_bit_image_reads_as_its_8_bit_copy_and_a_16_bit_mask_keeps_its_indices(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (28, 42), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16.png")  # the same picture, 16 bits a pixel
    assert Image.open(tmp_path / "16.png").mode in images.SIXTEEN_BIT
    eight, sixteen = (np.array(images.open_image(tmp_path / f)) for f in ("8.png", "16.png"))
    assert sixteen.shape == (28, 42, 3) and np.array_equal(sixteen, eight) and sixteen.std() > 50  # not all white
    root = own_masks(tmp_path / "boxes", splits=(("train", 6),))  # a 16-bit image and a 16-bit mask in a folder
    image, mask = (os.path.join(root, "train", d, "train1.png") for d in ("images", "masks"))
    upright = np.array(Image.open(image).convert("L"))
    indices = np.array(Image.open(mask))
    Image.fromarray(upright.astype(np.uint16) * 257).save(image)
    Image.fromarray(indices.astype(np.uint16)).save(mask)
    train = load_splits("folder-seg", root)[0]["train"]
    img, m = train[[img for img, _ in train.samples].index(image)]
    assert np.array_equal(np.array(img)[..., 0], upright) and np.array_equal(np.array(m), indices)
    assert {2, 255} <= set(np.unique(indices))  # a class index and the ignored 255, neither scaled


def test_exif_orientation_turns_images_as_shown_and_a_mask_fits_the_image_as_shown(tmp_path):
    """A phone's portrait is stored sideways with an EXIF orientation: it is read upright (training, evaluation,
    predict.py: all through open_image), and its mask is checked against, and read at, that upright size."""
    root = own_masks(tmp_path / "boxes", splits=(("train", 6),))
    image, mask = (os.path.join(root, "train", d, "train1.png") for d in ("images", "masks"))
    upright = np.array(Image.open(image))
    save_sideways(image, upright)
    assert Image.open(image).size == (28, 42) and own_data.image_size(image) == (42, 28)  # stored, and as shown
    assert np.array_equal(np.array(images.open_image(image)), upright)
    jpg = os.path.join(root, "train", "images", "train0.jpg")  # as a camera writes it
    save_sideways(jpg, np.array(Image.open(jpg)))
    train = load_splits("folder-seg", root)[0]["train"]
    for path in (image, jpg):
        img, m = train[[img for img, _ in train.samples].index(path)]
        box = np.array(img)[np.array(m) == 1 + (path == image)].mean(0)  # train0's box is red, train1's blue
        assert img.size == m.size == (42, 28) and box[2 if path == image else 0] > 150  # the mask on its box
    Image.fromarray(np.ascontiguousarray(np.rot90(np.array(Image.open(mask))))).save(mask)  # drawn on it sideways
    with pytest.raises(DataError) as e:
        load_splits("folder-seg", root)
    assert f"{mask} is 28x42 pixels but its image {image} is 42x28 as shown (its EXIF orientation turns the 28x42 it " \
           f"is stored at)" in str(e.value) and "\n" not in str(e.value)


def test_a_class_under_5_images_is_refused_only_when_val_or_test_is_held_out_of_train(tmp_path):
    root = own_images(tmp_path / "pets", splits=(("train", 4), ("val", 1), ("test", 1)))
    splits, _ = load_splits("folder", root)  # val/ and test/ of its own: nothing is held out, every class tested
    assert [len(splits[s]) for s in data.SPLITS] == [12, 3, 3]
    shutil.rmtree(os.path.join(root, "val"))
    shutil.rmtree(os.path.join(root, "test"))
    with pytest.raises(DataError) as e:
        load_splits("folder", root)
    assert str(e.value) == (f"{os.path.join(root, 'train', 'cat')} holds 4 images, too few to hold 10 % of a class "
                            f"out for val and test (5 at least): add images to it, or val/ and test/ folders of your "
                            f"own")


def test_one_table_of_datasets_and_download_refuses_what_it_cannot_fetch(tmp_path):
    names = list(data.DATASETS)
    assert names.index("folder-seg") < names.index("synthetic") and all(n.startswith("synthetic") for n in names[-3:])
    assert {n for n, s in data.DATASETS.items() if s.url} == {"dtd", "aircraft", "cub"}
    assert [n for n, s in data.DATASETS.items() if not s.own_val] == ["cub", "cityscapes"]
    for name in ("folder", "cityscapes", "synthetic", "imagenet"):
        with pytest.raises(DataError, match=f"no archive to fetch for '{name}'"):
            data.download(name, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("how", ["no images", "empty class", "one class", "class only in test", "class under 5 images",
                                 "unreadable image", "image without mask", "mask without image", "mask size",
                                 "mask index", "mask channels"])
def test_a_wrong_own_folder_is_refused_in_one_line_and_nothing_is_written(tmp_path, monkeypatch, how):
    root = str(tmp_path / "data")
    says = break_folder(root, how)
    dataset = "folder-seg" if "mask" in how else "folder"
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        run_as_script("train_slad", OWN + ["--dataset", dataset, "--data_dir", root, "--out_dir", out], monkeypatch)
    msg = str(e.value.code)
    assert e.value.code != 0 and says in msg and "\n" not in msg and msg.startswith("error: "), msg
    assert not os.path.exists(out)


def test_a_classes_txt_of_one_class_is_said_in_the_singular(tmp_path):
    root = own_masks(tmp_path / "data", classes=("background",))
    with pytest.raises(DataError, match=r"classes.txt names 1 class: a segmentation needs 2 to 255"):
        load_splits("folder-seg", root)


def test_transforms_follow_appendix_c2():
    names = [type(t).__name__ for t in train_transform(518).transforms]
    assert names == ["Resize", "CenterCrop", "ColorJitter", "RandomHorizontalFlip", "PILToTensor"]
    assert [type(t).__name__ for t in eval_transform(518).transforms] == ["Resize", "CenterCrop", "PILToTensor"]
    assert train_transform(518).transforms[0].size == 648  # 640 / 512 of the crop, as the paper's 640 -> 512
    img = Image.new("RGB", (90, 70), (200, 30, 60))
    x = eval_transform(56)(img)
    assert x.shape == (3, 56, 56) and x.dtype == torch.uint8  # normalised on the device, by data.normalize
    want = (torch.tensor([200, 30, 60]) / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert torch.allclose(data.normalize(x[None])[0, :, 0, 0], want, atol=1e-6)


def test_synthetic_textures_are_deterministic_and_balanced():
    a, b = SyntheticTextures("train"), SyntheticTextures("train")
    assert len(a.CLASSES) >= 10
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0]))
    assert not np.array_equal(np.asarray(a[7][0]), np.asarray(SyntheticTextures("train", seed=1)[7][0]))
    assert not np.array_equal(np.asarray(a[7][0]), np.asarray(SyntheticTextures("test")[7][0]))
    labels = [a[i][1] for i in range(100)]
    assert sorted(set(labels)) == list(range(len(a.CLASSES))) and all(labels.count(c) == 10 for c in set(labels))


def test_synthetic_fine_is_fine_grained_and_deterministic():
    splits, n = load_splits("synthetic-fine")
    assert n == 36 == len(set(splits["train"][i][1] for i in range(72)))
    img, label = splits["val"][5]
    again = SyntheticFine("val")[5]
    assert img.size == (64, 64) and label == again[1] and np.array_equal(np.array(img), np.array(again[0]))
    assert not np.array_equal(np.array(splits["train"][5][0]), np.array(img))  # splits differ


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = EpochSampler(20, seed=3)
    s.set_epoch(1)
    first, again = list(s), list(s)
    assert first == again and sorted(i for i, _ in first) == list(range(20))
    s.set_epoch(2)
    assert list(s) != first
    ranks = [EpochSampler(20, seed=3, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    parts = [list(r) for r in ranks]
    assert sorted(parts[0] + parts[1]) == sorted(first)  # two processes see what one would
    assert [k for pair in zip(*parts) for k in pair] == first  # and form the same global batches


def test_transformed_seeds_augmentations_per_sample_and_keeps_caller_rng():
    ds = Transformed(SyntheticTextures("train"), train_transform(56))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x1, x2, x3 = ds[(5, 123)][0], ds[(5, 123)][0], ds[(5, 124)][0]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(torch.get_rng_state(), before)


# -----------------------------------------------------------------------------
# kd.py: the losses (eq. 1, eq. 2, eq. 4), TAID and TED


def test_losses_zero_when_student_is_teacher_and_scale_with_t_squared():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert kd.kl_term(s, s.clone(), T=2.0).abs() < 1e-6
    assert torch.allclose(kd.distill_loss(s, s.clone(), y), 0.5 * F.cross_entropy(s, y), atol=1e-6)
    for T in (1.0, 2.0, 4.0):  # the T^2 factor, and KL(teacher || student) at temperature T
        p_t, p_s = F.softmax(t / T, -1), F.softmax(s / T, -1)
        manual = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        assert torch.allclose(kd.kl_term(s, t, T), T * T * manual, atol=1e-5)
    full = kd.slad_loss(s, t, y)  # eq. 4 with (1, 1, 1)
    assert torch.allclose(full, F.cross_entropy(s, y) + F.cross_entropy(t, y) + kd.kl_term(s, t), atol=1e-5)


def test_loss_gradients_flow_only_where_they_should():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
    kd.distill_loss(s, t, y).backward()
    assert t.grad is None and s.grad.abs().sum() > 0  # eq. 2: the teacher is a fixed target
    s.grad = None
    kd.slad_loss(s, t, y).backward()  # eq. 4, default: the teacher learns from its own CE only
    ce_grad = torch.autograd.grad(F.cross_entropy(t, y), t)[0]
    assert torch.allclose(t.grad, ce_grad, atol=1e-6)
    t.grad = None
    kd.slad_loss(s, t, y, kl_into_teacher=True).backward()
    assert not torch.allclose(t.grad, ce_grad, atol=1e-4)


def test_segmentation_losses_ignore_255():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    y_ign = y.clone()
    y_ign[:, :2] = kd.IGNORE
    t_changed = t.clone()
    t_changed[:, :, :2] += 5 * torch.randn(2, 3, 2, 4)  # only on ignored pixels
    assert torch.allclose(kd.kl_term(s, t, 2.0, y_ign), kd.kl_term(s, t_changed, 2.0, y_ign))
    assert not torch.allclose(kd.kl_term(s, t, 2.0, y), kd.kl_term(s, t_changed, 2.0, y))
    p_t, p_s = F.softmax(t[..., 2:, :] / 2, 1), F.softmax(s[..., 2:, :] / 2, 1)  # per-pixel KL, mean over valid pixels
    assert torch.allclose(kd.kl_term(s, t, 2.0, y_ign), 4 * (p_t * (p_t.log() - p_s.log())).sum(1).mean(), atol=1e-5)
    assert torch.allclose(kd.task_loss(s, y_ign), F.cross_entropy(s[..., 2:, :], y[..., 2:, :]), atol=1e-6)


def test_taid_target_runs_from_the_student_to_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    assert torch.allclose(F.softmax(kd.taid_target(s, t, 0.0), 1), F.softmax(s, 1))  # t = 0: the student's own
    assert torch.allclose(F.softmax(kd.taid_target(s, t, 1.0), 1), F.softmax(t, 1))  # t = 1: the teacher's
    mid = kd.taid_target(s, t, 0.3)
    assert torch.allclose(mid, 0.7 * s + 0.3 * t) and not mid.requires_grad  # no gradient through the student's part
    taid = kd.TAID(total_steps=10)

    def term(t_now, *args):  # the term at a given t (each call moves t on, as a training step does)
        taid.t = torch.tensor(t_now)
        return taid(*args)
    assert torch.allclose(term(1.0, s, t, 2.0), kd.kl_term(s, t, 2.0))  # at t = 1: eq. 2's KL term exactly
    loss = term(0.0, s, t, 2.0)
    assert loss.abs() < 1e-6 and torch.autograd.grad(loss, s)[0].abs().max() < 1e-6  # at t = 0: nothing to learn
    want = torch.autograd.grad(kd.kl_term(s, mid, 2.0), s)[0]  # the KL towards p_t, p_t a fixed target
    assert torch.allclose(torch.autograd.grad(term(0.3, s, t, 2.0), s)[0], want, atol=1e-6)
    # per pixel, pixels labelled IGNORE count for nothing, as in kl_term
    s, t, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    y[:, :2] = kd.IGNORE
    t_changed = t.clone()
    t_changed[:, :, :2] += 5
    assert torch.allclose(term(0.3, s, t, 2.0, y), term(0.3, s, t_changed, 2.0, y))
    assert torch.allclose(term(0.3, s, t, 2.0, y), kd.kl_term(s, kd.taid_target(s, t, 0.3), 2.0, y))


def test_taid_t_never_decreases_and_stays_in_bounds():
    losses = [3.0, 2.5, 2.6, 4.0, 1.0, float("nan"), 1.2, 0.5, 5.0, float("inf"), 0.4] * 10
    taid = kd.TAID(total_steps=len(losses))
    ts = [float(taid.t)]
    for J in losses:
        taid.update(torch.tensor(J))
        ts.append(float(taid.t))
    assert ts[1] == ts[0] == pytest.approx(0.4)  # the first step only records the objective
    assert all(b >= a for a, b in zip(ts, ts[1:])) and min(ts) == ts[0] and max(ts) <= 1.0
    assert ts[-1] >= 0.4 + 0.6 * (len(losses) - 1) / len(losses) - 1e-6  # it has reached t_end by the end of the run
    # the adaptive part: a falling objective moves t up faster than a rising one (linear floor out of the way)
    falling, rising = kd.TAID(total_steps=10**9, alpha=0.05), kd.TAID(total_steps=10**9, alpha=0.05)
    for k in range(50):
        falling.update(torch.tensor(2.0 * 0.9**k))
        rising.update(torch.tensor(2.0 * 1.1**k))
    assert 0.4 < float(rising.t) < float(falling.t) < 1.0


def test_taid_state_round_trips_a_checkpoint(tmp_path):
    a = kd.TAID(total_steps=50)
    for J in (3.0, 2.5, 2.7, 2.0):
        a.update(torch.tensor(J))
    torch.save(a.state_dict(), tmp_path / "taid.pt")
    b = kd.TAID(total_steps=50)
    b.load_state_dict(torch.load(tmp_path / "taid.pt", weights_only=True))
    for J in (1.9, 2.2, 1.5):
        a.update(torch.tensor(J))
        b.update(torch.tensor(J))
    assert set(a.state_dict()) == {"t", "momentum", "prev_loss", "steps_done"}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_ted_filters_have_the_shapes_the_mapping_implies():
    torch.manual_seed(0)
    teacher, student = Classifier(ViT.from_name("toy-l"), 10), Classifier(ViT.from_name("toy-s"), 10)
    assert train_twostep.add_ted_filters(teacher, student, "even", 10) == [0, 2, 4]
    assert [tuple(f.weight.shape) for f in teacher.ted_filters.filters] == [(128, 128)] * 3  # d_f = the teacher's width
    assert [tuple(f.weight.shape) for f in student.ted_filters.filters] == [(128, 48)] * 3
    assert [tuple(h.weight.shape) for h in teacher.ted_filters.heads] == [(10, 128)] * 3
    assert student.ted_filters.heads is None  # Stage II: the student's filters learn from the MSE alone
    with torch.device("meta"):  # the real sizes, shapes only: ViT-L -> ViT-B, last mapping
        teacher, student = Classifier(ViT.from_name("vitl14"), 100), Classifier(ViT.from_name("vitb14"), 100)
        g = train_twostep.add_ted_filters(teacher, student, "last", 100)
        x = torch.empty(2, 3, 28, 28)
        _, teacher_blocks = teacher(x, g)
        _, student_blocks = student(x, range(12))
        filtered_t, filtered_s = teacher.ted_filters(teacher_blocks), student.ted_filters(student_blocks)
    assert g == list(range(12, 24)) and len(filtered_t) == len(filtered_s) == 12
    assert all(a.shape == b.shape == (2, 5, 1024) for a, b in zip(filtered_t, filtered_s))


def test_ted_loss_zero_for_identical_features_and_stage_one_heads():
    torch.manual_seed(0)
    feats = [torch.randn(2, 5, 8) for _ in range(3)]
    assert kd.ted_loss(feats, [f.clone() for f in feats]) == 0
    s = [(f + 0.1 * torch.randn_like(f)).requires_grad_() for f in feats]
    t = [f.clone().requires_grad_() for f in feats]
    loss = kd.ted_loss(s, t)
    assert loss > 0 and torch.allclose(loss, sum(((a - b) ** 2).mean() for a, b in zip(s, t)) / 3)
    loss.backward()
    assert all(b.grad is None for b in t) and all(a.grad.abs().sum() > 0 for a in s)  # the teacher is a target
    # Stage I: each filter's head reads the filtered CLS token, or, for segmentation, each filtered patch token
    filters = kd.TaskFilters(2, 8, 6, num_classes=3, patch_size=14)
    blocks = [torch.randn(2, 1 + 4 + 2 * 3, 8) for _ in range(2)]  # CLS, 4 registers, a 2 x 3 patch grid
    z, y = filters(blocks), torch.tensor([0, 2])
    want = sum(F.cross_entropy(h(zk[:, 0]), y) for h, zk in zip(filters.heads, z)) / 2
    assert torch.allclose(filters.task_loss(z, y), want)
    y_seg = torch.randint(0, 3, (2, 28, 42))
    other = [b.clone() for b in blocks]
    for b in other:
        b[:, :5] += 1.0  # CLS and registers: no part of a per-pixel prediction
    assert torch.allclose(filters.task_loss(filters(blocks), y_seg), filters.task_loss(filters(other), y_seg))


# -----------------------------------------------------------------------------
# flags.py, run_folder.py, evaluation.py, distributed.py: flags and one-line refusals; run folders: one run a
# folder, default names that never collide, failures that leave nothing in the way; --resume; AdamW's groups; mIoU;
# torchrun's processes


@pytest.mark.parametrize("script", ["train_slad.py", "train_twostep.py"])
@pytest.mark.parametrize("bad,says", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--teacher", "vitx14"], "invalid choice: 'vitx14'"),
    (["--img_size", "50"], "not a multiple of the patch size 14"),
    (["--teacher", "toy-s", "--student", "toy-b"], "wider or deeper than its teacher"),
    (["--teacher", "vitb14", "--student", "vitl14"], "wider or deeper than its teacher"),
    (["--img_size", "0"], "--img_size: must be a positive integer, not 0"),
    (["--img_size", "-14"], "--img_size: must be a positive integer, not -14"),
    (["--batch_size", "0"], "--batch_size: must be a positive integer"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--epochs", "-1"], "--epochs: must be a positive integer"),
    (["--log_every", "0"], "--log_every: must be a positive integer"),
    (["--rank", "0"], "--rank: must be a positive integer"),
    (["--num_workers", "-1"], "--num_workers: must be 0 or more"),
    (["--temperature", "0"], "--temperature: must be a positive number"),
    (["--lr", "-1"], "--lr: must be a positive number"),
    (["--lr", "nan"], "--lr: must be a positive number"),
    (["--weight_decay", "-0.1"], "--weight_decay: must be 0 or more"),
])
def test_bad_input_is_one_line(monkeypatch, capsys, script, bad, says):
    argv = TOY + ["--out_dir", "unused"]
    for k in range(0, len(bad), 2):
        if bad[k] in argv:
            i = argv.index(bad[k])
            argv[i + 1] = bad[k + 1]
        else:
            argv += bad[k:k + 2]
    with pytest.raises(SystemExit) as e:
        run_main(script.removesuffix(".py"), argv, monkeypatch)
    msg = str(e.value.code)
    assert e.value.code != 0 and says in msg and "\n" not in msg
    assert not os.path.exists("unused")


@pytest.mark.parametrize("bad,says", [
    (["--teacher_epochs", "0"], "--teacher_epochs: must be a positive integer"),
    (["--student_epochs", "-1"], "--student_epochs: must be a positive integer"),
    (["--backbone_lr", "-1"], "--backbone_lr: must be a positive number"),
    (["--ted_beta", "-1"], "--ted_beta: must be 0 or more"),
])
def test_bad_twostep_input_is_one_line(monkeypatch, bad, says):
    with pytest.raises(SystemExit) as e:
        run_main("train_twostep", TOY + ["--out_dir", "unused"] + bad, monkeypatch)
    assert e.value.code != 0 and says in str(e.value.code) and "\n" not in str(e.value.code)
    assert not os.path.exists("unused")


@pytest.mark.parametrize("bad,says", [
    (["--device", "tpu"], "--device tpu: these scripts run on cpu, cuda or cuda:N"),
    (["--rank", "1000"], "--rank 1000 is more than toy-s's width 48"),
    (["--epochs", "1.5"], "--epochs: must be a positive integer, not 1.5"),
    (["--grad_accum", "0"], "--grad_accum: must be a positive integer"),
    (["--grad_accum", "3"], "--batch_size 16 does not split over 1 process(es) x --grad_accum 3 micro-batches"),
])
def test_more_bad_flags_are_one_line(monkeypatch, bad, says):
    for script in ("train_slad", "train_twostep"):
        with pytest.raises(SystemExit) as e:
            run_main(script, TOY + ["--out_dir", "unused"] + bad, monkeypatch)
        assert e.value.code != 0 and says in str(e.value.code) and "\n" not in str(e.value.code), str(e.value.code)
    assert not os.path.exists("unused")


def test_other_commands_refuse_nonsense_counts():
    for argv, says in ((["cka.py", "--max_images", "-5"], "--max_images: must be a positive integer, not -5"),
                       (["miniature.py", "--workers", "0"], "--workers: must be a positive integer, not 0")):
        r = cli(argv)
        assert (r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr
                and len(r.stderr.splitlines()) == 1)


def test_batch_larger_than_the_training_set_is_refused(tmp_path, monkeypatch, small_synthetic):
    out = str(tmp_path / "run")
    for script in ("train_slad", "train_twostep"):
        with pytest.raises(SystemExit) as e:
            run_main(script, TOY + ["--batch_size", "97", "--out_dir", out], monkeypatch)
        assert "more than the 96 training images: no step to take" in str(e.value.code)
        assert not os.path.exists(out)
    monkeypatch.setattr(SyntheticTextures, "SIZES", {"train": 1, "val": 32, "test": 32})
    for script in ("train_slad", "train_twostep"):  # one image: said in the singular
        with pytest.raises(SystemExit) as e:
            run_main(script, TOY + ["--batch_size", "2", "--out_dir", out], monkeypatch)
        assert "more than the 1 training image: no step to take" in str(e.value.code)


def test_batch_must_split_over_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match=r"does not split over 3 process\(es\)"):
        run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", "unused"], monkeypatch)


def test_no_network_stops_with_a_paragraph_and_no_traceback(tmp_path):
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    r = cli(["train_slad.py", "--dataset", "dtd", "--data_dir", str(tmp_path / "data"), "--device", "cpu",
             "--out_dir", str(tmp_path / "out")], env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "dtd-r1.0.1.tar.gz" in r.stderr and str(tmp_path / "data") in r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_own_folders_name_their_runs_and_configs(tmp_path):
    """Two folders of the same name with other files get other configs and run folders; a moved copy keeps its own."""
    a, b = own_images(tmp_path / "a" / "pets"), own_images(tmp_path / "b" / "pets", classes=("cat", "dog"))
    moved = str(tmp_path / "c" / "pets")
    shutil.copytree(a, moved)
    out = {d: train_slad.parse_args(["--dataset", "folder", "--data_dir", d])[0].out_dir for d in (a, b, moved)}
    assert os.path.basename(out[a]).startswith("slad-folder-pets-vitb14-vits14-") and out[a] != out[b]
    assert out[a] == out[moved]  # --data_dir says where, not what: a moved folder resumes and averages
    args, _ = train_slad.parse_args(["--dataset", "folder-seg", "--data_dir", own_masks(tmp_path)])
    assert (args.img_size, args.batch_size, args.lr) == (560, 8, 1e-3)  # the table's row: Cityscapes' defaults
    assert train_slad.parse_args(["--dataset", "folder", "--data_dir", a])[0].img_size == 518


@pytest.mark.parametrize("script,loss,extra,bad_step,where,kept", [
    ("train_slad", "slad_loss", ["--epochs", "2"], 9, "slad epoch 2 step 3", "keeps slad epoch 1, but a --resume"),
    ("train_slad", "slad_loss", ["--epochs", "2", "--dtype", "bfloat16"], 9, "slad epoch 2 step 3",
     "keeps slad epoch 1, but a --resume"),
    ("train_twostep", "task_loss", ["--teacher_epochs", "2", "--student_epochs", "1"], 9, "teacher epoch 2 step 3",
     "keeps teacher epoch 1, but a --resume"),
    ("train_twostep", "distill_loss", ["--epochs", "1"], 3, "student epoch 1 step 3",
     "keeps the end of the stage before, but a --resume"),
    ("train_slad", "slad_loss", ["--epochs", "2"], 3, "slad epoch 1 step 3",  # no checkpoint yet: none is promised
     "the run stops before its first checkpoint, so nothing is kept: run again with a lower --lr"),
])
def test_a_loss_that_turns_non_finite_stops_the_run_and_says_what_is_kept(tmp_path, monkeypatch, small_synthetic,
                                                                          script, loss, extra, bad_step, where, kept):
    module = importlib.import_module(script)
    real, calls = getattr(module, loss), []

    def poisoned(*args, **kwargs):  # step bad_step's loss is NaN (6 steps an epoch)
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == bad_step else 1.0)
    monkeypatch.setattr(module, loss, poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        run_main(script, TOY + extra + ["--out_dir", out], monkeypatch)
    msg = str(e.value.code)
    assert f"the loss is not finite at {where}" in msg and kept in msg and "\n" not in msg
    finished = 0 if "nothing is kept" in kept else 1  # epochs finished before the bad step, over both stages
    assert os.path.exists(os.path.join(out, "ckpt.pt")) == (finished > 0) == (os.path.join(out, "ckpt.pt") in msg)
    if finished:
        assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["epoch"] == 1  # the last good one
        assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_resume_continues_in_its_own_folder_and_leaves_other_runs_alone(tmp_path, monkeypatch, small_synthetic):
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", a], monkeypatch)
    restore = interrupt_after(monkeypatch, "train_slad", 1)
    with pytest.raises(Interrupt):
        run_main("train_slad", TOY + ["--epochs", "2", "--out_dir", b], monkeypatch)
    restore()
    before = {f: open(os.path.join(a, f), "rb").read() for f in os.listdir(a)}
    with pytest.raises(SystemExit) as e:  # RUN_B's checkpoint into RUN_A: refused, RUN_A untouched
        run_main("train_slad", TOY + ["--epochs", "2", "--resume", os.path.join(b, "ckpt.pt"), "--out_dir", a],
                 monkeypatch)
    assert f"continues the run in {b}" in str(e.value.code)
    assert before == {f: open(os.path.join(a, f), "rb").read() for f in os.listdir(a)}
    monkeypatch.chdir(tmp_path)  # where a default out/ folder would appear
    run_main("train_slad", TOY + ["--epochs", "2", "--resume", os.path.join(b, "ckpt.pt")], monkeypatch)
    assert not os.path.exists(tmp_path / "out") and results_of(b)["epochs"] == 2
    assert [json.loads(l)["epoch"] for l in open(os.path.join(b, "metrics.jsonl"))] == [1, 2]


def test_resume_from_another_config_and_overwrites_are_refused(tmp_path, monkeypatch, small_synthetic):
    out = str(tmp_path / "run")
    run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", out], monkeypatch)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    cases = [
        (TOY + ["--epochs", "1", "--out_dir", out], "already holds a run"),
        (TOY + ["--epochs", "1", "--rank", "8", "--out_dir", out, "--resume", os.path.join(out, "ckpt.pt")],
         "rank=4 (now 8)"),
        (TOY + ["--epochs", "1", "--out_dir", out, "--resume", os.path.join(out, "nope.pt")], "no such file"),
    ]
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            run_main("train_slad", argv, monkeypatch)
        assert says in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # a checkpoint of the other script
        run_main("train_twostep", TOY + ["--epochs", "1", "--resume", os.path.join(out, "ckpt.pt")], monkeypatch)
    assert "written by train_slad.py, not this script (train_twostep.py)" in str(e.value.code)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(out, "ckpt.pt"), "rb").read()[:1000])
    with pytest.raises(SystemExit) as e:
        run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", out, "--resume", str(truncated)], monkeypatch)
    assert "not a checkpoint" in str(e.value.code)
    assert before == {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}  # nothing overwritten
    killed = tmp_path / "killed"  # a run of another config killed in its first epoch: a config.json, no checkpoint
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", str(killed)], monkeypatch)
    assert (f"holds a run of another config that stopped before its first checkpoint: delete that folder "
            f"(rm -r {killed})" in str(e.value.code))
    assert (killed / "config.json").read_text() == "{}"


def test_slad_results_hold_the_resolved_config(slad_demo):
    res, config = results_of(slad_demo), json.load(open(os.path.join(slad_demo, "config.json")))
    assert res["config"] == config and res["config_id"] == flags.config_id(config)
    assert config["img_size"] == 56 and config["lr"] == 3e-3 and config["rank"] == 4  # defaults resolved


def test_atomic_write_interrupted_mid_write_leaves_the_old_file_and_no_tmp(tmp_path):
    """Ctrl-C while a file is written (a checkpoint, a mask, an ONNX file): the previous file stays whole, and no
    NAME.tmp is left behind."""
    path = str(tmp_path / "results.json")
    run_folder.atomic_write(path, lambda tmp: run_folder.write_text(tmp, "old"))

    def write_then_ctrl_c(tmp):
        run_folder.write_text(tmp, "half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_folder.atomic_write(path, write_then_ctrl_c)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, small_synthetic):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for out, says in ((a_file, f"--out_dir {a_file} is a file, not a folder"),
                      (f"{a_file}/", f"--out_dir {a_file}/ is a file, not a folder"),  # not "File exists"
                      (a_file / "run" / "s0", f"--out_dir {a_file / 'run' / 's0'}: {a_file} is a file, not a folder")):
        with pytest.raises(SystemExit) as e:
            run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", str(out)], monkeypatch)
        assert says in str(e.value.code) and "\n" not in str(e.value.code)
    assert a_file.read_text() == "mine"

    def denied(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(run_folder.os, "makedirs", denied)
    with pytest.raises(SystemExit) as e:
        run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", str(tmp_path / "locked")], monkeypatch)
    assert f"cannot write to --out_dir {tmp_path / 'locked'}: Permission denied" in str(e.value.code)


def test_resume_of_a_folder_names_the_checkpoint_in_it(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("mine")
    below_a_file = tmp_path / "a-file" / "ckpt.pt"
    for resume, says in ((tmp_path, f"--resume {tmp_path} is a folder: give the checkpoint in it, --resume "
                                    f"{tmp_path / 'ckpt.pt'}"),  # not "not a checkpoint (truncated?)"
                         (below_a_file, f"--resume {below_a_file}: no such file")):
        with pytest.raises(SystemExit) as e:
            run_main("train_slad", TOY + ["--resume", str(resume)], monkeypatch)
        assert str(e.value.code).endswith(says), e.value.code


def full_disk_after(monkeypatch, n_bytes):
    """torch.save as on a disk that fills up after n_bytes: it writes them, then fails as torch's zip writer does."""
    real = torch.save

    def save(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(min(n_bytes, os.path.getsize(path)))
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 835200 vs 835088")
    monkeypatch.setattr(torch, "save", save)
    return lambda: monkeypatch.setattr(torch, "save", real)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, small_synthetic):
    out = str(tmp_path / "run")
    restore = interrupt_after(monkeypatch, "train_slad", 1)  # a first epoch whose checkpoint is whole
    with pytest.raises(Interrupt):
        run_main("train_slad", TOY + ["--epochs", "2", "--out_dir", out], monkeypatch)
    restore()
    good = open(os.path.join(out, "ckpt.pt"), "rb").read()
    full_disk_after(monkeypatch, 1000)  # the second epoch's checkpoint cannot be written
    with pytest.raises(SystemExit) as e:
        run_as_script("train_slad", TOY + ["--epochs", "2", "--resume", os.path.join(out, "ckpt.pt")], monkeypatch)
    msg = str(e.value.code)
    assert (f"cannot write {os.path.join(out, 'ckpt.pt')}: unexpected pos" in msg and "MB free there" in msg
            and "\n" not in msg)
    assert (open(os.path.join(out, "ckpt.pt"), "rb").read() == good
            and not os.path.exists(os.path.join(out, "ckpt.pt.tmp")))


def test_exports_are_atomic(tmp_path, monkeypatch, small_synthetic):
    """A disk that fills up while the models are exported: one line, no truncated student.pt or teacher.pt, and
    the run's checkpoint whole, so a --resume finishes it."""
    out = str(tmp_path / "run")
    real = deploy.save_model

    def save_model(path, model):
        if "teacher" in os.path.basename(path):
            open(path, "wb").write(b"PK\x03\x04 truncated")
            raise OSError(28, "No space left on device", path)
        real(path, model)
    monkeypatch.setattr(deploy, "save_model", save_model)
    with pytest.raises(SystemExit) as e:
        run_as_script("train_twostep", TOY + ["--epochs", "1", "--teacher_adapt", "probe", "--out_dir", out],
                      monkeypatch)
    assert f"cannot write {os.path.join(out, 'teacher.pt')}: No space left on device" in str(e.value.code)
    assert (not os.path.exists(os.path.join(out, "teacher.pt"))
            and not os.path.exists(os.path.join(out, "teacher.pt.tmp")))
    assert not os.path.exists(os.path.join(out, "results.json"))
    monkeypatch.setattr(deploy, "save_model", real)
    run_main("train_twostep", TOY + ["--epochs", "1", "--teacher_adapt", "probe",
                                     "--resume", os.path.join(out, "ckpt.pt")], monkeypatch)
    assert load_model(os.path.join(out, "teacher.pt")) and results_of(out)["teacher_adapt"] == "probe"


def test_a_run_that_died_in_its_first_epoch_is_started_again_by_the_same_command(tmp_path, monkeypatch,
                                                                                 small_synthetic):
    out = str(tmp_path / "run")
    real, calls = train_slad.slad_loss, []

    def corrupt_image_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise DataError("cannot read data/dtd/images/x.jpg (OSError: image file is truncated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(train_slad, "slad_loss", corrupt_image_at_step_3)
    with pytest.raises(DataError):
        run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", out], monkeypatch)
    assert os.path.exists(os.path.join(out, "config.json")) and not os.path.exists(os.path.join(out, "ckpt.pt"))
    with pytest.raises(SystemExit) as e:  # --resume says what to do
        run_main("train_slad", TOY + ["--epochs", "1", "--resume", os.path.join(out, "ckpt.pt")], monkeypatch)
    assert "stopped before its first checkpoint: run the same command without --resume" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # another config into that folder: told what to delete
        run_main("train_slad", TOY + ["--epochs", "2", "--out_dir", out], monkeypatch)
    assert f"rm -r {out}" in str(e.value.code)
    monkeypatch.setattr(train_slad, "slad_loss", real)
    run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", out], monkeypatch)  # the same command: starts again
    log = open(os.path.join(out, "log.txt")).read()
    assert results_of(out)["epochs"] == 1 and log.count("slad |") == 1  # the dead run's log went with it
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1


LOCK_HOLDER = """
import os, sys, time
sys.path.insert(0, {here!r})
import run_folder
held = run_folder.lock({out!r})
print("locked", flush=True)
time.sleep(600)
"""


def test_one_run_a_folder_at_a_time_and_no_stale_lock(tmp_path, monkeypatch, small_synthetic):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(here=HERE, out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # another run is writing to the folder
        with pytest.raises(SystemExit) as e:
            run_as_script("train_slad", TOY + ["--epochs", "1", "--out_dir", str(out)], monkeypatch)
        assert f"another run (process {holder.pid}) is writing to {out}" in str(e.value.code)
        assert sorted(os.listdir(out)) == ["run.lock"]
    finally:
        holder.kill()  # as a killed run: its lock file stays behind, its lock does not
        holder.wait()
    run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", str(out)], monkeypatch)
    assert results_of(str(out))["epochs"] == 1


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_adamw_decays_matrices_only_not_the_vits_tokens(family):
    """A fully trained encoder (Fine-tuning, Marrie et al.'s students): weight decay on its matrices, none on its
    learned tokens and position embeddings (timm's and DINOv2's no_weight_decay), biases, norms or LayerScale."""
    clf = Classifier(ViT.from_name("vits14_reg") if family == "dinov2" else ViT(TINY3), 4)
    lora.adapt(clf, "finetune", 4)
    named = [(n, p) for n, p in clf.named_parameters() if p.requires_grad]
    opt = model.adamw([(named, 1e-3)], 0.05, "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in named if id(p) in decayed}
    assert {"vit.cls_token", "vit.pos_embed", "vit.register_tokens", "vit.storage_tokens"}.isdisjoint(names)
    assert ("vit.storage_tokens" in dict(named)) == (family == "dinov3")
    assert "vit.blocks.0.attn.qkv.weight" in names and "head.0.weight" in names
    assert all(p.ndim >= 2 for n, p in named if n in names)


def test_miou_on_a_hand_made_confusion_matrix():
    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # rows: label, columns: prediction
    # class 0: 5 / (5 + 1 + 2), class 1: 3 / (3 + 2 + 1), class 2 absent from labels and predictions
    assert evaluation.miou(confusion) == pytest.approx(100 * (5 / 8 + 3 / 6) / 2)
    assert evaluation.miou(torch.tensor([[4, 0], [0, 0]])) == pytest.approx(100.0)
    assert evaluation.miou(torch.tensor([[0, 3], [0, 0]])) == pytest.approx(0.0)  # predicted 1, label 0: both count


def test_every_process_takes_the_same_steps_for_any_split_batch_and_world():
    for n, batch, world, accum in itertools.product(range(1, 40), (2, 4, 8, 12), (1, 2, 3, 4), (1, 2)):
        if batch % (world * accum):
            continue
        ranks = [list(data.make_loader(range(n), None, batch // world // accum, train=True, rank=r, world=world,
                                       step_batch=batch).sampler) for r in range(world)]
        one = list(data.make_loader(range(n), None, batch, train=True).sampler)
        assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == n // batch * batch // world
        for step in range(n // batch):  # together, the processes' micro-batches are one process's batch
            share = batch // world
            together = sorted(i for r in ranks for i in r[step * share:(step + 1) * share])
            assert together == sorted(one[step * batch:(step + 1) * batch])


def test_sync_batchnorm_on_gpus_and_resume_with_fewer_gpus(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "DDP", lambda module, device_ids: module)  # DDP itself needs a process group
    seg = distributed.ddp(Segmenter(ViT.from_name("toy-s"), 4), "cuda:0")
    assert isinstance(seg.head[0], torch.nn.SyncBatchNorm) and list(seg.state_dict()) == list(
        Segmenter(ViT.from_name("toy-s"), 4).state_dict())  # the same checkpoint keys
    assert isinstance(distributed.ddp(Segmenter(ViT.from_name("toy-s"), 4), "cpu").head[0], torch.nn.BatchNorm2d)
    # a checkpoint of an 8-GPU run, resumed where fewer GPUs are visible: this process's own state only
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: [states[i] for i in range(torch.cuda.device_count() + 1)])
    rng = dict(run_folder.rng_state("cpu"), cuda=[torch.zeros(16, dtype=torch.uint8)] * 8)
    run_folder.set_rng_state(rng, "cuda:0")
    assert restored == ["cuda:0"]


# -----------------------------------------------------------------------------
# train_slad.py and train_twostep.py, end to end on synthetic data: the demo, each teacher adaptation, resume,
# AMP, compile, the LR schedule, segmentation, TAID and TED, torchrun, DINOv3 pairs


def test_slad_demo_learns_and_writes_its_outputs(slad_demo):
    out = slad_demo
    res = results_of(out)
    assert res["student_acc"] >= 2 * 100 / res["num_classes"] and res["teacher_acc"] >= 2 * 100 / res["num_classes"]
    assert res["num_classes"] == 10 and res["train_seconds"] > 0
    for f in ("config.json", "log.txt", "metrics.jsonl", "ckpt.pt", "student.pt", "teacher.pt"):
        assert os.path.exists(os.path.join(out, f)), f
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 1 and {"val_teacher_acc", "val_student_acc", "train_loss"} <= set(rows[0])
    log = open(os.path.join(out, "log.txt")).read()
    assert "img/s" in log and "eta" in log and "lr" in log
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert all(k.startswith("head.") or "lora_" in k for m in ckpt["models"].values() for k in m)  # no frozen backbone
    # the exported student: adapters merged, official layout, loadable by model.py alone, same accuracy
    student = load_model(os.path.join(out, "student.pt")).eval()
    assert list(student.vit.state_dict()) == list(ViT.from_name("toy-s").state_dict())
    test = make_loader(SyntheticTextures("test"), eval_transform(56), 100, train=False)
    with torch.no_grad():
        correct = sum((student(data.normalize(x)).argmax(-1) == y).sum().item() for x, y in test)
    assert abs(100 * correct / len(test.dataset) - res["student_acc"]) < 0.11


@pytest.mark.parametrize("adapt,trained", [("probe", "head."), ("lora", "lora_"), ("finetune", "vit.")])
def test_twostep_teacher_adapt_trains_what_it_says(tmp_path, monkeypatch, small_synthetic, adapt, trained):
    out = str(tmp_path / adapt)
    run_main("train_twostep", TOY + ["--epochs", "1", "--out_dir", out, "--teacher_adapt", adapt], monkeypatch)
    keys = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["models"]["teacher"]
    assert any(trained in k for k in keys)
    assert all(k.startswith("head.") for k in keys) == (adapt == "probe")
    assert any(k.startswith("vit.") and "lora_" not in k for k in keys) == (adapt == "finetune")
    assert set(results_of(out)) >= {"teacher_acc", "student_acc", "num_classes", "train_seconds"}


def test_twostep_epoch_defaults():
    for argv, want in (([], (30, 30)), (["--teacher_adapt", "probe"], (30, 80)),
                       (["--epochs", "3", "--teacher_adapt", "probe"], (3, 3)),
                       (["--epochs", "3", "--student_epochs", "5"], (3, 5))):
        args, _ = train_twostep.parse_args(argv)
        assert (args.teacher_epochs, args.student_epochs) == want, argv
    # the student as the method reproduced: fully trained after a probed or fine-tuned teacher (Marrie et al.),
    # LoRA after a LoRA teacher (§3.2); the flag still chooses
    for argv, want in ((["--teacher_adapt", "probe"], "finetune"), (["--teacher_adapt", "finetune"], "finetune"),
                       (["--teacher_adapt", "lora"], "lora"),
                       (["--teacher_adapt", "probe", "--student_adapt", "lora"], "lora")):
        assert train_twostep.parse_args(argv)[0].student_adapt == want, argv


def test_twostep_help_gives_the_toys_encoder_lr():
    args, p = train_twostep.parse_args(["--teacher", "toy-b", "--student", "toy-s", "--device", "cpu"])
    assert f"{args.backbone_lr:g} for the toy family" in " ".join(p.format_help().split())


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, script, n_epochs):
    """Make a run stop (as if killed) right after its n-th checkpoint is written."""
    module = importlib.import_module(script)
    real, calls = module.save_checkpoint, []

    def save_checkpoint(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == n_epochs:
            raise Interrupt
    monkeypatch.setattr(module, "save_checkpoint", save_checkpoint)
    return lambda: monkeypatch.setattr(module, "save_checkpoint", real)


def same_weights(a, b):
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return (all(torch.equal(sa["vit"][k], sb["vit"][k]) for k in sa["vit"])
            and all(torch.equal(sa["head"][k], sb["head"][k]) for k in sa["head"]))


@pytest.mark.parametrize("script,extra,stop", [
    ("train_slad", ["--epochs", "2"], 1),
    ("train_twostep", ["--teacher_epochs", "2", "--student_epochs", "1"], 1),
    ("train_slad", ["--epochs", "2", "--kd", "taid"], 1),  # TAID's t, momentum and last objective resume too
    ("train_twostep", ["--teacher_epochs", "1", "--student_epochs", "2", "--kd", "taid", "--feat", "ted"], 2),
])
def test_resume_continues_exactly(tmp_path, monkeypatch, small_synthetic, script, extra, stop):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_main(script, TOY + extra + ["--out_dir", straight], monkeypatch)
    restore = interrupt_after(monkeypatch, script, stop)
    with pytest.raises(Interrupt):
        run_main(script, TOY + extra + ["--out_dir", split], monkeypatch)
    restore()
    assert not os.path.exists(os.path.join(split, "results.json"))
    # as if killed while writing the next checkpoint: its metrics row is there, and a partial ckpt.pt.tmp
    metrics = os.path.join(split, "metrics.jsonl")
    last = json.loads(open(metrics).read().splitlines()[-1])
    open(metrics, "a").write(json.dumps(dict(last, epoch=last["epoch"] + 1)) + "\n")
    open(os.path.join(split, "ckpt.pt.tmp"), "wb").write(b"partial")
    run_main(script, TOY + extra + ["--resume", os.path.join(split, "ckpt.pt")], monkeypatch)  # in its own folder
    assert not os.path.exists(os.path.join(split, "ckpt.pt.tmp"))
    a, b = results_of(straight), results_of(split)
    assert ((a["teacher_acc"], a["student_acc"], a.get("taid_t"))
            == (b["teacher_acc"], b["student_acc"], b.get("taid_t")))
    assert same_weights(os.path.join(straight, "student.pt"), os.path.join(split, "student.pt"))
    assert same_weights(os.path.join(straight, "teacher.pt"), os.path.join(split, "teacher.pt"))
    rows = [json.loads(l) for l in open(os.path.join(split, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [json.loads(l)["epoch"] for l in open(os.path.join(straight, "metrics.jsonl"))]


@pytest.mark.parametrize("script,extra,kept,rows", [
    ("train_slad", ["--epochs", "2"], "slad epoch 1", [("slad", 1), ("slad", 2)]),
    ("train_twostep", ["--epochs", "1"], "teacher epoch 1", [("teacher", 1), ("student", 1)]),
])
def test_ctrl_c_is_one_line_that_names_what_is_kept_and_the_command_that_continues(tmp_path, monkeypatch, capsys,
                                                                                    small_synthetic, script, extra,
                                                                                    kept, rows):
    out = str(tmp_path / "my run")  # a space: the command must quote it
    real, calls = run_folder.save_checkpoint, []

    def ctrl_c_in_the_second_save(path, state):  # Ctrl-C while the second checkpoint is written: a partial .tmp
        calls.append(1)
        if len(calls) == 2:
            open(path + ".tmp", "wb").write(b"partial")
            raise KeyboardInterrupt
        real(path, state)
    monkeypatch.setattr(run_folder, "save_checkpoint", ctrl_c_in_the_second_save)
    argv = TOY + extra + ["--out_dir", out]
    with pytest.raises(SystemExit) as e:
        run_as_script(script, argv, monkeypatch)
    err, ckpt = capsys.readouterr().err, os.path.join(out, "ckpt.pt")
    assert e.value.code == 130 and len(err.splitlines()) == 1, err  # a shell's status for Ctrl-C, no traceback
    path = os.path.join(HERE, f"{script}.py")  # sys.argv[0] as runpy runs it, `python train_slad.py` gives its own
    assert err.startswith(f"interrupted: {ckpt} keeps {kept}; continue with: python {path} ")
    command = shlex.split(err.split("continue with: ")[1])
    assert command == ["python", path, *argv, "--resume", ckpt]
    assert not os.path.exists(ckpt + ".tmp")  # nothing half-written, and the folder's lock let go
    assert os.path.realpath(os.path.join(out, "run.lock")) not in run_folder.LOCKS
    monkeypatch.setattr(run_folder, "save_checkpoint", real)
    run_as_script(script, command[2:], monkeypatch)  # the printed command continues the run
    assert [(r["stage"], r["epoch"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))] == rows
    assert os.path.exists(os.path.join(out, "results.json"))


@pytest.mark.parametrize("module,name,says", [
    (data, "load_splits", "interrupted before the run wrote anything"),  # while it reads the data
    (evaluation, "evaluate", "interrupted before the first checkpoint, so nothing is kept"),  # in epoch 1
])
def test_ctrl_c_before_the_first_checkpoint_says_nothing_is_kept(tmp_path, monkeypatch, capsys, small_synthetic,
                                                                 module, name, says):
    out, real = str(tmp_path / "run"), getattr(module, name)
    argv = TOY + ["--epochs", "1", "--out_dir", out]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, name, ctrl_c)
    with pytest.raises(SystemExit) as e:
        run_as_script("train_slad", argv, monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 130
    command = shlex.join(["python", os.path.join(HERE, "train_slad.py"), *argv])
    assert err.splitlines() == [f"{says}: run the same command again: {command}"]
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    monkeypatch.setattr(module, name, real)
    run_as_script("train_slad", argv, monkeypatch)  # the same command, as it says
    assert os.path.exists(os.path.join(out, "results.json"))


def test_a_real_ctrl_c_is_one_line_and_exit_130(tmp_path):
    out = str(tmp_path / "run")
    # SIGINT as at a terminal: a shell's background job (`pytest ... &`) starts with it ignored, and Python keeps that
    code = ("import runpy, signal, sys, data\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "data.SyntheticTextures.SIZES = {'train': 96, 'val': 32, 'test': 32}\n"
            "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code, "train_slad.py", *TOY, "--epochs", "100", "--out_dir", out],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(out, "ckpt.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # mid-epoch, or mid-save: the line is the same
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"interrupted: {re.escape(out)}/ckpt.pt keeps slad epoch \d+; continue with: python "
                        rf"train_slad.py .* --resume {re.escape(out)}/ckpt.pt\n", err), err


def test_amp_dtypes_on_cpu(tmp_path, monkeypatch, small_synthetic):
    for dtype in ("bfloat16", "float16"):  # fp16 runs with a GradScaler
        out = str(tmp_path / dtype)
        run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", out, "--dtype", dtype], monkeypatch)
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["dtype"] == dtype
        ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
        assert bool(ckpt["scaler"]) == (dtype == "float16")
        assert np.isfinite(json.loads(open(os.path.join(out, "metrics.jsonl")).readline())["train_loss"])


def test_compile_traces_without_graph_breaks():
    torch.manual_seed(0)
    teacher, student = Classifier(ViT.from_name("toy-l"), 4), Classifier(ViT.from_name("toy-s"), 4)
    add_lora(teacher.vit, rank=4)
    share_lora(student.vit, teacher.vit)
    x = torch.randn(2, 3, 28, 28)
    compiled = torch.compile(student, backend="eager", fullgraph=True)  # fullgraph: fails on any graph break
    assert torch.allclose(compiled(x), student(x), atol=1e-5)


def test_lr_schedule_warms_up_then_decays():
    lrs = [train_slad.get_lr(it, 100) for it in range(100)]
    assert lrs[0] < lrs[4] == 1.0 and lrs[4] >= max(lrs) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs == [train_twostep.get_lr(it, 100) for it in range(100)]  # both scripts, one schedule


def test_kl_warmup_raises_eq4_kl_weight_from_0_to_1(tmp_path, monkeypatch, small_synthetic):
    weights = []
    real = train_slad.slad_loss

    def recording(*args, alpha_kl=1.0, **kwargs):
        weights.append(alpha_kl)
        return real(*args, alpha_kl=alpha_kl, **kwargs)
    monkeypatch.setattr(train_slad, "slad_loss", recording)
    run_main("train_slad", TOY + ["--epochs", "2", "--kl_warmup", "0.5", "--out_dir", str(tmp_path / "w")], monkeypatch)
    assert len(weights) == 12 and weights[0] == 0 and weights[3] == 0.5 and weights[6:] == [1.0] * 6
    assert all(a < b for a, b in zip(weights[:7], weights[1:7]))
    weights.clear()
    run_main("train_slad", TOY + ["--epochs", "1", "--out_dir", str(tmp_path / "none")], monkeypatch)
    assert weights == [1.0] * 6  # the paper's constant weight by default


def test_a_classifier_of_256_classes_or_more_trains_and_counts_label_255():
    """255 marks pixels that count for nothing; for an image it is a class like any other (a folder may hold
    hundreds)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 300), torch.tensor([255, 3, 255, 299])
    assert torch.allclose(kd.task_loss(logits, labels), F.cross_entropy(logits, labels))
    clf = Classifier(ViT.from_name("toy-s"), 300).eval()
    x = torch.randint(0, 255, (4, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        labels = clf(data.normalize(x)).argmax(-1)
    labels[0] = 255 if labels[0] != 255 else 254  # a wrong prediction of an image labelled 255 (or 254)
    res = evaluation.evaluate({"student": clf}, [(x, labels)], "cpu", torch.autocast("cpu", enabled=False))
    assert res["student"]["acc"] == 75.0 and res["student"]["confusion"].sum() == 4


def trivial_miou(dataset):
    """mIoU of predicting background (class 0) everywhere."""
    n = len(dataset.CLASSES)
    confusion = torch.zeros(n, n, dtype=torch.long)
    for i in range(len(dataset)):
        y = torch.from_numpy(np.array(dataset[i][1], dtype=np.int64)).flatten()
        confusion[:, 0] += torch.bincount(y, minlength=n)
    return evaluation.miou(confusion)


def test_segmentation_demo_beats_all_background(tmp_path, monkeypatch):
    out = str(tmp_path / "seg")
    argv = ["--dataset", "synthetic-seg", "--teacher", "toy-l", "--student", "toy-s", "--init", "random",
            "--epochs", "1", "--device", "cpu", "--out_dir", out]
    run_main("train_slad", argv, monkeypatch)  # the README's segmentation demo, exactly
    res = results_of(out)
    floor = trivial_miou(SyntheticShapes("test"))
    assert res["num_classes"] == 4 and res["student_miou"] > floor + 10 and res["teacher_miou"] > floor + 10
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert {"val_teacher_miou", "val_student_miou", "val_student_acc"} <= set(rows[0])
    assert type(load_model(os.path.join(out, "student.pt"))).__name__ == "Segmenter"


def test_segmentation_twostep_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(SyntheticShapes, "SIZES", {"train": 32, "val": 8, "test": 8})
    out = str(tmp_path / "seg-probe")
    run_main("train_twostep", ["--dataset", "synthetic-seg", "--teacher", "toy-l", "--student", "toy-s",
                               "--init", "random", "--epochs", "1", "--device", "cpu", "--out_dir", out,
                               "--teacher_adapt", "probe"], monkeypatch)
    res = results_of(out)
    assert {"teacher_miou", "student_miou", "teacher_acc", "student_acc"} <= set(res)
    keys = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["models"]["teacher"]
    assert any(k.endswith("running_mean") for k in keys)  # BatchNorm statistics are checkpointed


def test_photos_of_4_sizes_portrait_and_landscape_validate_and_test_in_both_scripts(tmp_path, monkeypatch):
    """A mask folder of photos of 4 sizes in batches of 4: both scripts validate every epoch and test every labelled
    pixel, each image at its own size, where torch.stack of [3, 32, 48] and [3, 48, 32] used to stop them."""
    sizes = ((28, 42), (42, 28), (30, 40), (40, 30))
    root = own_masks(tmp_path / "photos", splits=(("train", 4), ("val", 4), ("test", 4)), sizes=sizes)
    test = load_splits("folder-seg", root)[0]["test"]
    labelled = sum(int((np.array(test[i][1]) != 255).sum()) for i in range(len(test)))
    for script, extra in (("train_slad", []), ("train_twostep", ["--teacher_adapt", "probe"])):
        out = str(tmp_path / script)
        run_main(script, OWN + ["--teacher", "toy-b", "--dataset", "folder-seg", "--data_dir", root, "--out_dir", out]
                 + extra, monkeypatch)
        assert sum(results_of(out)["per_class"]["test_count"]) == labelled


def test_twostep_demo_learns_with_probe_taid_and_ted(tmp_path, monkeypatch):
    """The two-step demo (a probed teacher, as Marrie et al.) with TAID and TED on: one run, to keep CI short,
    that shows the two-step script and both new objectives learn end to end."""
    out = str(tmp_path / "probe-taid-ted")
    pretrained = [a for a in TOY if a not in ("--init", "random")]  # random toys learn little in one epoch
    run_main("train_twostep", pretrained + ["--epochs", "1", "--teacher_adapt", "probe", "--kd", "taid",
                                            "--feat", "ted", "--out_dir", out], monkeypatch)
    res = results_of(out)
    assert res["student_acc"] >= 2 * 100 / res["num_classes"]
    assert res["teacher_epochs"] == res["student_epochs"] == 1 and res["teacher_adapt"] == "probe"
    assert (res["kd"], res["feat"], res["mapping"]) == ("taid", "ted", "even") and 0.99 < res["taid_t"] <= 1
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["stage"] for r in rows] == ["teacher", "student"] and "taid_t" in rows[1] and "taid_t" not in rows[0]
    assert "g(i) = [0, 2, 4]" in open(os.path.join(out, "log.txt")).read()
    models = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["models"]
    assert models["teacher"]["ted_filters.heads.2.weight"].shape == (10, 128)  # stage 1's filters are checkpointed
    assert models["student"]["ted_filters.filters.2.weight"].shape == (128, 48)
    assert set(models["taid"]) == {"t", "momentum", "prev_loss", "steps_done"}


def test_slad_taid_runs_and_logs_t(tmp_path, monkeypatch, small_synthetic):
    out = str(tmp_path / "slad-taid")
    run_main("train_slad", TOY + ["--epochs", "2", "--kd", "taid", "--out_dir", out], monkeypatch)
    ts = [json.loads(l)["taid_t"] for l in open(os.path.join(out, "metrics.jsonl"))]
    res = results_of(out)
    assert len(ts) == 2 and 0.4 < ts[0] <= ts[1] <= 1 and res["taid_t"] == round(ts[1], 3) and res["kd"] == "taid"


# torchrun on the CPU (gloo): every method gives one process's results, every process takes the same steps

RUNNER = """
import os, shutil, sys
sys.path.insert(0, {here!r})
import data
data.SyntheticTextures.SIZES = {{"train": 64, "val": 16, "test": 16}}
data.SyntheticShapes.SIZES = {{"train": 16, "val": 4, "test": 4}}


def download(name, root):  # the network, stood in for: a copy of a fake dataset, and who fetched it
    with open({log!r}, "a") as f:
        f.write(os.environ.get("RANK", "0") + "\\n")
    shutil.copytree({source!r}, root, dirs_exist_ok=True)


data.download = download
script, sys.argv = sys.argv[1], [sys.argv[1] + ".py", *sys.argv[2:]]
__import__(script).main()
"""
DDP_TOY = TOY + ["--img_size", "28", "--batch_size", "8", "--epochs", "1"]


def weight_difference(run_a, run_b, file):
    """|a - b| / |a| over all the weights of an exported model of two runs. Float tolerance, over the whole
    model: sums taken in another order differ in the last bits, and Adam, which divides a step by the gradient's
    size, turns that into whole steps where the gradient is rounding noise (the k bias of attention, whose exact
    gradient is 0): one tensor alone can differ by 6e-3 of its size, the whole model by up to 1.7e-4 (seen, torch 2.4,
    the fine-tune of one image per process; 1e-6 typically). Ranks stepping on their own halves, DDP's averaging
    switched off, differ by 3e-2 to 5e-2 of the model (measured on these five runs): 1e-3 tells the two apart."""
    a, b = (torch.load(os.path.join(d, file), weights_only=True) for d in (run_a, run_b))
    pairs = [(a[p][k], b[p][k]) for p in ("vit", "head") for k in a[p]]
    return (sum((x - y).square().sum() for x, y in pairs) / sum(x.square().sum() for x, _ in pairs)).sqrt().item()


@pytest.mark.parametrize("script,extra", [
    ("train_slad", []),
    ("train_slad", ["--kd", "taid"]),
    ("train_twostep", ["--teacher_adapt", "probe"]),  # Marrie et al.: a fully trained student
    ("train_twostep", ["--teacher_adapt", "lora", "--kd", "taid", "--feat", "ted"]),
    ("train_twostep", ["--dataset", "dtd", "--teacher_adapt", "finetune", "--batch_size", "2"]),  # downloaded once
    ("train_slad", ["--dataset", "synthetic-seg", "--img_size", "56", "--batch_size", "4"]),
    ("train_twostep",
     ["--dataset", "synthetic-seg", "--img_size", "56", "--batch_size", "4", "--teacher_adapt", "finetune"]),
])
def test_torchrun_two_processes_match_one(tmp_path, monkeypatch, script, extra):
    """DDP on gloo, 2 processes, each half of every global batch, against one process: the same weights (a
    parameter without a gradient, or ranks taking different steps, would crash or hang DDP). Segmentation's
    BatchNorm head is per process on the CPU (torch's SyncBatchNorm runs on GPUs only): there, it only has to run."""
    source, log = tmp_path / "source", tmp_path / "downloads.txt"
    fake_dtd(source, per_split=2)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(here=HERE, log=str(log), source=str(source)))
    argv = DDP_TOY + extra + ["--data_dir", str(tmp_path / "data")]
    two = str(tmp_path / "two")
    r = cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 400),
             str(runner), script, *argv, "--out_dir", two], env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    log_text = open(os.path.join(two, "log.txt")).read()
    assert "2 processes" in log_text and log_text.count("results:") == 1  # the first process writes
    if "dtd" in extra:
        assert open(log).read() == "0\n"  # the first process downloaded it; the second found it there
    if "synthetic-seg" in extra:
        return
    monkeypatch.setattr(SyntheticTextures, "SIZES", {"train": 64, "val": 16, "test": 16})
    one = str(tmp_path / "one")
    run_main(script, argv + ["--out_dir", one], monkeypatch)
    for f in ("student.pt", "teacher.pt"):
        assert weight_difference(one, two, f) < 1e-3, f
    assert abs(results_of(one)["student_acc"] - results_of(two)["student_acc"]) <= 100 / 16  # one test image


@pytest.mark.parametrize("script,extra", [("train_slad", []), ("train_twostep", ["--teacher_adapt", "lora"])])
def test_grad_accum_steps_as_the_whole_batch(tmp_path, monkeypatch, small_synthetic, script, extra):
    outs = []
    for accum in ("1", "4"):
        outs.append(str(tmp_path / accum))
        run_main(script, TOY + extra + ["--epochs", "1", "--grad_accum", accum, "--out_dir", outs[-1]], monkeypatch)
    for f in ("student.pt", "teacher.pt"):
        assert weight_difference(*outs, f) < 1e-4, f
    losses = [[json.loads(l)["train_loss"] for l in open(os.path.join(d, "metrics.jsonl"))] for d in outs]
    assert np.allclose(*losses, rtol=1e-4)  # each micro-batch's loss counts 1/N of the step's
    log = open(os.path.join(outs[1], "log.txt")).read()
    assert "step 6/6 |" in log and "step 24/" not in log  # steps of the whole batch: 96 images, batch 16


def test_no_host_sync_in_a_training_step(tmp_path, monkeypatch):
    """What would stall a GPU every step -- a .item(), a float() of a tensor, a new tensor copied from the host --
    counted where our files call it, over an epoch of 6 steps and one of 12 (no log line but the last): the same
    number, so none is in the step."""
    ours = {os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")}
    calls = []

    def counted(name, real):
        def call(*args, **kwargs):
            code = sys._getframe(1).f_code  # the data pipeline runs in loader workers, on the CPU: left out
            if code.co_filename in ours and (not code.co_filename.endswith("data.py") or code.co_name == "normalize"):
                calls.append((name, os.path.basename(code.co_filename), code.co_name))
            return real(*args, **kwargs)
        return call
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", counted("tensor", torch.tensor))
    counts = []
    for n_train in (96, 192):
        monkeypatch.setattr(SyntheticTextures, "SIZES", {"train": n_train, "val": 32, "test": 32})
        monkeypatch.setattr(data, "_STATS", {})  # normalize's constants are made once a run
        calls.clear()
        run_main("train_slad", TOY + ["--epochs", "1", "--kd", "taid", "--log_every", "1000",
                                      "--out_dir", str(tmp_path / str(n_train))], monkeypatch)
        counts.append(sorted(calls))
    assert counts[0] == counts[1]


def test_dinov3_slad_runs_exports_and_measures_cka(tmp_path, monkeypatch, toy3):
    out = str(tmp_path / "slad3")
    run_main("train_slad", TOY3 + ["--epochs", "1", "--out_dir", out], monkeypatch)
    res, cfg = results_of(out), json.load(open(os.path.join(out, "config.json")))
    assert cfg["img_size"] == 64 and np.isfinite(res["student_acc"])  # synthetic's 56, to a multiple of 16
    student = load_model(os.path.join(out, "student.pt")).eval()  # adapters merged, DINOv3's official layout
    assert list(student.vit.state_dict()) == list(ViT.from_name("toy3-s").state_dict())
    test = make_loader(SyntheticTextures("test"), eval_transform(64), 100, train=False)
    with torch.no_grad():
        correct = sum((student(data.normalize(x)).argmax(-1) == y).sum().item() for x, y in test)
    assert abs(100 * correct / len(test.dataset) - res["student_acc"]) < 0.11
    with pytest.raises(SystemExit, match="try --token patch"):  # random DINOv3 inits: CLS tokens all alike
        cka.main(["--runs", out, "--batch_size", "16", "--device", "cpu", "--out_dir", str(tmp_path / "cka")])
    cka.main(["--runs", out, "--token", "patch", "--batch_size", "16", "--device", "cpu", "--out_dir",
              str(tmp_path / "cka")])
    got = json.load(open(tmp_path / "cka" / "cka.json"))
    assert got["img_size"] == 64 and got["g"] == [0, 2] and torch.tensor(got["runs"]["slad3"]["cka"]).shape == (4, 2)


@pytest.mark.parametrize("adapt,extra", [("probe", ["--kd", "taid", "--feat", "ted"]), ("lora", []), ("finetune", [])])
def test_dinov3_twostep_baselines_run_from_given_weights(tmp_path, monkeypatch, toy3, adapt, extra):
    weights = {}
    for role, name in (("teacher", "toy3-l"), ("student", "toy3-s")):  # "official" files given by path
        weights[role] = tmp_path / f"{name}.pth"
        torch.save(randomize_(ViT.from_name(name), seed=len(weights)).state_dict(), weights[role])
    out = str(tmp_path / adapt)
    argv = [a for a in TOY3 if a not in ("--init", "random")] + ["--init", "dinov2", "--epochs", "1", "--out_dir", out,
            "--teacher_adapt", adapt, "--teacher_weights", str(weights["teacher"]),
            "--student_weights", str(weights["student"]), *extra]
    run_main("train_twostep", argv, monkeypatch)
    assert {"teacher_acc", "student_acc"} <= set(results_of(out))
    teacher = torch.load(os.path.join(out, "teacher.pt"), weights_only=True)["vit"]
    given = torch.load(weights["teacher"], weights_only=True)
    assert all(torch.equal(teacher[k], v) for k, v in given.items()) == (adapt == "probe")  # a probe keeps them


def test_dinov3_resume_continues_exactly(tmp_path, monkeypatch, toy3):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    argv = TOY3 + ["--epochs", "2", "--img_size", "32"]
    run_main("train_slad", argv + ["--out_dir", straight], monkeypatch)
    restore = interrupt_after(monkeypatch, "train_slad", 1)
    with pytest.raises(Interrupt):
        run_main("train_slad", argv + ["--out_dir", split], monkeypatch)
    restore()
    run_main("train_slad", argv + ["--resume", os.path.join(split, "ckpt.pt")], monkeypatch)
    assert results_of(straight)["student_acc"] == results_of(split)["student_acc"]
    assert same_weights(os.path.join(straight, "student.pt"), os.path.join(split, "student.pt"))


def test_dinov3_segmentation_by_sliding_window(tmp_path, monkeypatch, toy3):
    monkeypatch.setattr(SyntheticShapes, "SIZES", {"train": 8, "val": 4, "test": 4})
    out = str(tmp_path / "seg3")
    run_main("train_slad", ["--dataset", "synthetic-seg", "--teacher", "toy3-l", "--student", "toy3-s",
                            "--init", "random", "--epochs", "1", "--device", "cpu", "--out_dir", out], monkeypatch)
    assert json.load(open(os.path.join(out, "config.json")))["img_size"] == 112  # 7 x 16, synthetic-seg's own
    assert {"teacher_miou", "student_miou"} <= set(results_of(out))
    seg = load_model(os.path.join(out, "student.pt")).eval()
    x = torch.randn(1, 3, 112, 200)  # wider than the window: two windows, the middle averaged
    with torch.no_grad():
        assert slide_inference(seg, x, 112, 56).shape == (1, 4, 112, 200)


def test_dinov3_defaults_and_refusals():
    v3 = ["--teacher", "dinov3_vitl16", "--student", "dinov3_vits16", "--device", "cpu"]
    args = train_slad.parse_args(v3)[0]
    assert (args.img_size, args.rank) == (512, 16)  # the paper's crop, exactly; the paper's rank
    assert train_slad.parse_args(v3 + ["--dataset", "cityscapes"])[0].img_size == 560
    assert train_slad.parse_args(["--device", "cpu"])[0].img_size == 518  # DINOv2's, as before
    assert train_twostep.parse_args(
        ["--teacher", "dinov3_vitl16", "--student", "vits14", "--device", "cpu"])[0].img_size == 560
    refused = [(train_slad, v3 + ["--img_size", "518"], "not a multiple of the patch size 16 (e.g. 512)"),
               (train_slad, ["--teacher", "dinov3_vitl16", "--student", "vits14", "--device", "cpu"],
                "SLAD shares adapters within one family: dinov3_vitl16 is dinov3, vits14 dinov2"),
               (train_slad, ["--teacher", "dinov3_vit7b16", "--student", "dinov3_vitl16", "--device", "cpu"],
                "dinov3_vit7b16's heads are 128 wide, dinov3_vitl16's 64"),
               (train_twostep,
                ["--teacher", "dinov3_vitl16", "--student", "vits14", "--feat", "ted", "--device", "cpu"],
                "--feat ted compares the tokens of teacher and student one by one")]
    for script, argv, says in refused:
        with pytest.raises(SystemExit) as e:
            script.parse_args(argv)
        assert says in str(e.value.code) and "\n" not in str(e.value.code), argv
    with pytest.raises(ValueError, match="heads are 16 wide, its teacher's 128"):  # the library says it too
        share_lora(ViT(TINY3), add_lora(ViT(replace(TINY3, num_heads=1, embed_dim=128))))


def test_dinov3_run_without_weights_stops_with_the_access_paragraph(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path))  # an empty torch.hub cache
    r = cli(["train_slad.py", "--dataset", "synthetic", "--teacher", "dinov3_vitb16", "--student", "dinov3_vits16",
             "--device", "cpu", "--out_dir", str(tmp_path / "out")], env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    for says in ("gated", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", str(tmp_path / "hub" / "checkpoints"),
                 "--teacher_weights", "DINOv3 License"):
        assert says in r.stderr, says
    assert not os.path.exists(tmp_path / "out")


# -----------------------------------------------------------------------------
# report.py: the results table


def table_rows(text):
    """{(student, teacher, method, source): {column: cell}} of report.py's Markdown table."""
    lines = [l for l in text.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for l in lines[2:]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        rows[tuple(cells[:4])] = dict(zip(header[4:], cells[4:]))
    return rows, [tuple(c.strip() for c in l.strip("|").split("|")[:4]) for l in lines[2:]]


def test_report_is_table_1_with_the_papers_numbers(tmp_path, capsys):
    run = dict(method="twostep", teacher="vitb14", student="vits14", teacher_adapt="lora", student_adapt="lora",
               kd="kl", feat="none", num_classes=47)
    for seed, (cub, air, dtd) in enumerate([(90.0, 91.0, 84.0), (91.0, 92.0, 85.0), (92.0, 93.0, 86.0)]):
        for dataset, acc in (("cub", cub), ("aircraft", air), ("dtd", dtd)):
            fake_results(tmp_path / f"lora-{dataset}-s{seed}", dataset=dataset, seed=seed, student_acc=acc, **run)
    fake_results(tmp_path / "deeper" / "still" / "taid-dtd-s0", **dict(run, kd="taid"), dataset="dtd", seed=0,
                 student_acc=80.0)
    fake_results(tmp_path / "taid-dtd-s1", **dict(run, kd="taid"), dataset="dtd", seed=1, student_acc=82.0)
    fake_results(tmp_path / "ted-dtd-s0", **dict(run, feat="ted", mapping="even"), dataset="dtd", seed=0,
                 student_acc=83.0)
    fake_results(tmp_path / "probe-city-s0", **dict(run, teacher_adapt="probe", student_adapt="finetune"),
                 dataset="cityscapes", seed=0, student_acc=95.0, student_miou=70.0)
    fake_results(tmp_path / "probe-lora-city-s0", **dict(run, teacher_adapt="probe"), dataset="cityscapes", seed=0,
                 student_acc=94.0, student_miou=65.0)  # not the published baseline's student: labelled so
    fake_results(tmp_path / "slad-dtd-s0", method="slad", teacher="vitb14", student="vits14", mapping="even",
                 kd="kl", feat="none", dataset="dtd", seed=0, student_acc=85.5)
    fake_results(tmp_path / "toy", method="slad", teacher="toy-b", student="toy-s", mapping="last", kd="taid",
                 dataset="synthetic", seed=0, student_acc=55.0)
    out = tmp_path / "table.md"
    text = report.main([str(tmp_path), "--out", str(out)])
    assert capsys.readouterr().out == text == out.read_text()
    rows, order = table_rows(text)
    lora = rows[("ViT-S", "ViT-B", "LoRA", "ours")]
    assert lora["CUB"] == "91.00 ± 1.00 (n=3)" and lora["DTD"] == "85.00 ± 1.00 (n=3)"  # mean ± sample std
    assert lora["Avg."] == f"{(91 + 92 + 85) / 3:.2f}" and lora["Cityscapes"] == "–"
    assert rows[("ViT-S", "ViT-B", "LoRA +TAID", "ours")]["DTD"] == "81.00 ± 1.41 (n=2)"  # found at any depth
    assert rows[("ViT-S", "ViT-B", "LoRA +TED", "ours")]["DTD"] == "83.00 (n=1)"
    assert rows[("ViT-S", "ViT-B", "Probing", "ours")]["Cityscapes"] == "70.00 (n=1)"  # mIoU for segmentation
    assert rows[("ViT-S", "ViT-B", "Probing (LoRA student)", "ours")]["Cityscapes"] == "65.00 (n=1)"
    assert rows[("ViT-S", "ViT-B", "SLAD", "ours")]["DTD"] == "85.50 (n=1)"
    assert rows[("toy-s", "toy-b", "SLAD (last mapping) +TAID", "ours")]["synthetic"] == "55.00 (n=1)"
    # the paper's rows, labelled, for the model pairs of the runs only
    paper = rows[("ViT-S", "ViT-B", "LoRA", "paper (Table 1)")]
    assert ([paper[c] for c in ("CUB", "Aircraft", "DTD", "Avg.", "Cityscapes")]
            == ["90.01", "91.82", "84.71", "88.85", "72.75"])
    assert rows[("ViT-S", "ViT-B", "SLAD", "paper (Table 1)")]["Cityscapes"] == "73.91"
    assert rows[("ViT-S", "ViT-B", "Probing*", "paper (Table 1)")]["DTD"] == "81.93"
    assert not any(k[1] == "ViT-L" for k in rows) and "not measured here" in text
    assert (order.index(("ViT-S", "ViT-B", "LoRA", "ours")) + 1
            == order.index(("ViT-S", "ViT-B", "LoRA", "paper (Table 1)")))
    assert order.index(("ViT-S", "ViT-B", "LoRA +TAID", "ours")) < order.index(("ViT-S", "ViT-B", "SLAD", "ours"))


def test_report_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    fake_results(tmp_path / "broken" / "run", method="slad")
    for folder, says in ((tmp_path / "nope", "is not a folder"), (tmp_path / "empty", "no results.json below"),
                         (tmp_path / "broken", "no run to report below")):  # its only results.json: a warning
        with pytest.raises(SystemExit) as e:
            report.main([str(folder)])
        assert e.value.code != 0 and says in str(e.value.code) and "\n" not in str(e.value.code)


def test_report_leaves_out_a_truncated_results_json_with_a_warning_and_reports_the_rest(tmp_path):
    run = dict(method="slad", teacher="toy-b", student="toy-s", dataset="synthetic")
    for seed, acc in ((0, 50.0), (1, 60.0), (2, 70.0)):
        fake_results(tmp_path / f"s{seed}", **run, seed=seed, student_acc=acc)
    bad = tmp_path / "s2" / "results.json"
    bad.write_text(bad.read_text()[:40])  # a copy cut short
    r = cli(["report.py", str(tmp_path)])
    assert r.returncode == 0 and "| 55.00 ± 7.07 (n=2) |" in r.stdout
    assert r.stderr.splitlines() == [f"report.py: warning: {bad} is not a results.json of train_slad.py or "
                                     f"train_twostep.py (JSONDecodeError): left out of the table"]


@pytest.mark.parametrize("seeds,cell,left_out", [
    ([0, 0, 0, 0], "83.00 (n=1)", 3),  # four re-runs of seed 0: one seed, the newest run
    ([0, 1, 0, 1], "82.50 ± 0.71 (n=2)", 2),
    ([0, 1, 2, 3], "81.50 ± 1.29 (n=4)", 0),
    ([0, 0, 1, 2], "82.00 ± 1.00 (n=3)", 1),  # one re-run: said in the singular
])
def test_report_counts_one_result_per_seed_the_newest(tmp_path, seeds, cell, left_out):
    for k, seed in enumerate(seeds):  # folder names sort against the age: the age decides
        path = tmp_path / f"run-{9 - k}"
        fake_results(path, method="slad", teacher="toy-b", student="toy-s", dataset="synthetic", seed=seed,
                     student_acc=80.0 + k)
        os.utime(path / "results.json", (1_700_000_000 + k, 1_700_000_000 + k))
    text = report.main([str(tmp_path)])
    assert table_rows(text)[0][("toy-s", "toy-b", "SLAD", "ours")]["synthetic"] == cell
    assert (f"{left_out} re-run{'s' * (left_out > 1)} of a seed already counted left out" in text) == (left_out > 0)


def test_report_follows_symlinked_run_folders_once_and_survives_cycles(tmp_path):
    run = dict(method="slad", teacher="toy-b", student="toy-s", dataset="synthetic")
    fake_results(tmp_path / "elsewhere" / "s0", **run, seed=0, student_acc=50.0)
    fake_results(tmp_path / "out" / "s1", **run, seed=1, student_acc=60.0)
    os.symlink(tmp_path / "elsewhere" / "s0", tmp_path / "out" / "s0")  # a run kept on another disk
    os.symlink(tmp_path / "out", tmp_path / "out" / "s1" / "loop")  # a cycle
    os.symlink(tmp_path / "out" / "s1", tmp_path / "out" / "s1-again")  # the same run twice
    text = report.main([str(tmp_path / "out")])
    assert table_rows(text)[0][("toy-s", "toy-b", "SLAD", "ours")]["synthetic"] == "55.00 ± 7.07 (n=2)"
    assert "re-run" not in text


def test_report_reads_json_without_importing_torch(tmp_path):
    code = ("import sys, report\ntry:\n    report.main([sys.argv[1]])\nexcept SystemExit as e:\n    print(e.code)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'flags'}))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope")], cwd=HERE, capture_output=True, text=True)
    assert r.stdout.splitlines() == [f"report.py: error: {tmp_path / 'nope'} is not a folder this user can read", "[]"]


def test_results_record_the_config_and_report_never_averages_different_ones(tmp_path, capsys):
    run = dict(method="slad", teacher="toy-b", student="toy-s", dataset="synthetic", mapping="even", kd="kl")
    base = dict(img_size=56, epochs=8, init="dinov2", lr=3e-3)
    for seed, acc in ((0, 80.0), (1, 82.0)):
        fake_results(tmp_path / f"a{seed}", **run, seed=seed, student_acc=acc, config_id="aaaaaa",
                     config=dict(base, seed=seed))
    fake_results(tmp_path / "b0", **run, seed=0, student_acc=10.0, config_id="bbbbbb",
                 config=dict(base, img_size=14, seed=0))
    fake_results(tmp_path / "c0", **dict(run, dataset="synthetic-fine"), seed=0, student_acc=70.0, config_id="cccccc",
                 config=dict(base, img_size=56, seed=0))  # another dataset's config: its own column, same row
    text = report.main([str(tmp_path)])
    rows = table_rows(text)[0]
    assert rows[("toy-s", "toy-b", "SLAD [config aaaaaa, img_size 56]", "ours")]["synthetic"] == "81.00 ± 1.41 (n=2)"
    assert rows[("toy-s", "toy-b", "SLAD [config bbbbbb, img_size 14]", "ours")]["synthetic"] == "10.00 (n=1)"
    assert rows[("toy-s", "toy-b", "SLAD", "ours")]["synthetic-fine"] == "70.00 (n=1)"
    assert "never averaged" in text


# -----------------------------------------------------------------------------
# cka.py: linear CKA, its minibatch estimate, the layer-pair matrices and Figure 3


def gaussian(n, p, seed):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n,p", [(300, 32), (12, 40)])  # n > p, and n < p (the Gram form)
def test_cka_of_features_with_themselves_is_one(n, p):
    X = gaussian(n, p, 0)
    assert cka.linear_cka(X, X) == pytest.approx(1, abs=1e-12)
    assert cka.linear_cka(X.float(), X.float()) == pytest.approx(1, abs=1e-12)  # float64 whatever comes in


def test_cka_of_scalars_is_squared_correlation():
    x, y = gaussian(500, 1, 0), gaussian(500, 1, 1) + 0.5 * gaussian(500, 1, 0)
    r = torch.corrcoef(torch.cat([x, y], 1).T)[0, 1].item()
    assert cka.linear_cka(x, y) == pytest.approx(r**2, abs=1e-10)


@pytest.mark.parametrize("n,p", [(300, 32), (12, 40)])
def test_cka_invariant_to_orthogonal_maps_and_scaling_not_to_other_linear_maps(n, p):
    X = gaussian(n, p, 0)
    Y = torch.tanh(X @ gaussian(p, 24, 1)) + 0.3 * gaussian(n, 24, 2)  # related features, q = 24 != p
    ref = cka.linear_cka(X, Y)
    assert 0.1 < ref < 0.99 and cka.linear_cka(Y, X) == pytest.approx(ref, abs=1e-12)
    Q = torch.linalg.qr(gaussian(p, p, 3))[0]
    assert cka.linear_cka(7.5 * X @ Q + 2.0, Y) == pytest.approx(ref, abs=1e-10)  # rotated, scaled, shifted
    assert cka.linear_cka(X, 0.01 * Y) == pytest.approx(ref, abs=1e-10)
    A = gaussian(p, p, 4) @ torch.diag(torch.logspace(0, -3, p, dtype=torch.float64))  # ill-conditioned
    assert abs(cka.linear_cka(X @ A, Y) - ref) > 0.05


def test_batch_cka_is_one_for_a_rotated_copy_and_low_for_noise():
    torch.manual_seed(0)
    X = torch.randn(64, 16)
    Q = torch.linalg.qr(torch.randn(16, 16))[0]
    assert cka.batch_cka(X, 3 * X @ Q).item() == pytest.approx(1, abs=1e-5)  # orthogonal maps and scale
    Y = torch.randn(64, 8)
    assert cka.batch_cka(X, Y).item() == pytest.approx(cka.linear_cka(X, Y), abs=1e-5) and cka.batch_cka(X, Y) < 0.5


def test_unbiased_hsic_is_song_et_al_for_every_pair():
    feats = [gaussian(10, p, s) for s, p in enumerate((3, 7, 5))]
    H = cka.unbiased_hsic(torch.stack([f @ f.T for f in feats]))
    n = 10
    for a in range(3):
        for b in range(3):
            K, L = feats[a] @ feats[a].T, feats[b] @ feats[b].T
            K, L = K - torch.diag(K.diagonal()), L - torch.diag(L.diagonal())
            one = torch.ones(n, dtype=torch.float64)
            want = (torch.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                    - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))
            assert H[a, b].item() == pytest.approx(want.item(), rel=1e-10)


def test_minibatch_cka_is_close_to_full_batch_on_a_large_sample():
    X = gaussian(2003, 64, 0)
    Y = torch.relu(X @ gaussian(64, 48, 1)) + gaussian(2003, 48, 2)
    C = cka.minibatch_cka(zip(X.split(100), Y.split(100)))  # the last batch, 3 images, is dropped
    assert C.shape == (2, 2) and torch.allclose(C.diagonal(), torch.ones(2, dtype=torch.float64))
    assert abs(C[0, 1].item() - cka.linear_cka(X, Y)) < 0.02
    # why unbiased: independent features in high dimension have a CKA of 0, which the minibatch estimate finds
    # and one batch's full-batch value does not (it is pushed up when n is not >> p)
    Z = gaussian(2000, 300, 5)
    assert abs(cka.minibatch_cka(zip(X[:2000].split(100), Z.split(100)))[0, 1].item()) < 0.05
    assert cka.linear_cka(X[:100], Z[:100]) > 0.3


def tiny_loader(n=48, batch_size=16):
    return make_loader(torch.utils.data.Subset(SyntheticTextures("val"), range(n)), eval_transform(28), batch_size,
                       train=False)


def test_layer_cka_is_teacher_by_student_blocks_and_reads_off_mapped_pairs():
    teacher = randomize_(ViT.from_name("toy-l"), seed=1)
    student = ViT.from_name("toy-l", depth=3)  # the teacher's first three blocks: student block i is teacher block i
    student.load_state_dict(teacher.state_dict(), strict=False)
    other = randomize_(ViT.from_name("toy-s"), seed=2)
    C, D = cka.layer_cka([(teacher, student), (teacher, other)], tiny_loader())
    assert C.shape == D.shape == (6, 3)
    assert torch.allclose(C.diagonal(), torch.ones(3), atol=1e-5) and C.max() <= 1 + 1e-5
    assert cka.mapped_mean(C, layer_mapping(3, 6, "first")) == pytest.approx(1, abs=1e-5)
    even = layer_mapping(3, 6, "even")  # [0, 2, 4]
    assert cka.mapped_mean(C, even) == pytest.approx((C[0, 0] + C[2, 1] + C[4, 2]).item() / 3)
    assert cka.mapped_mean(C, even) < 1 - 1e-3
    assert not torch.allclose(C, D)


def test_block_features_cls_or_mean_patch_token_without_registers():
    vit = randomize_(ViT.from_name("toy-s", num_register_tokens=4)).eval()
    x = data.normalize(next(iter(tiny_loader()))[0])
    outs = vit.forward_blocks(x, range(3))
    cls, patch = cka.block_features(vit, x, "cls"), cka.block_features(vit, x, "patch")
    assert len(cls) == len(patch) == 3 and cls[1].shape == patch[1].shape == (16, 48)
    assert torch.equal(cls[1], outs[1][:, 0]) and torch.allclose(patch[1], outs[1][:, 5:].mean(1))
    C = cka.layer_cka([(vit, vit)], tiny_loader(), token="patch")[0]
    assert torch.allclose(C.diagonal(), torch.ones(3), atol=1e-5)


def test_cka_command_draws_figure_3(tmp_path, capsys):
    runs = [fake_run(tmp_path / "finetune", 0.05, 0.02, teacher_adapt="finetune", mapping="even", feat="none"),
            fake_run(tmp_path / "lora", 0.02, 0.02, teacher_adapt="lora", mapping="even", feat="none"),
            fake_run(tmp_path / "probe", 0.0, 0.02, teacher_adapt="probe"),  # a probed teacher's encoder is unchanged
            fake_run(tmp_path / "slad", 0.01, 0.01, mapping="last")]
    out = tmp_path / "cka"
    cka.main(["--runs", *runs, "--max_images", "64", "--batch_size", "32", "--device", "cpu", "--out_dir", str(out)])
    printed = capsys.readouterr().out
    res = json.load(open(out / "cka.json"))
    assert res["g"] == [3, 4, 5] and res["mapping"] == "last" and res["n_images"] == 64  # the SLAD run's mapping
    assert (res["teacher"], res["student"], res["init"], res["img_size"]) == ("toy-l", "toy-s", "random", 56)
    base = res["pretrained"]["mapped_mean"]
    assert f"(a) pretrained: {100 * base:.2f}%" in printed
    for letter, name, kind in zip("bcde", ("finetune", "lora", "probe", "slad"),
                                  ("finetune teacher", "lora teacher", "probe teacher", "SLAD")):
        r = res["runs"][name]
        assert r["change"] == pytest.approx(r["mapped_mean"] - base)
        assert f"({letter}) {name} ({kind}," in printed and f"({100 * r['change']:+.2f})" in printed
        assert torch.allclose(torch.tensor(r["delta"]), torch.tensor(r["cka"]) - torch.tensor(res["pretrained"]["cka"]))
        assert torch.tensor(r["delta"]).shape == (6, 3) and r["change"] != 0
    w, h = cka.panel_size(6, 3)
    for f in ["cka_pretrained.png"] + [f"cka_delta_{n}.png" for n in ("finetune", "lora", "probe", "slad")]:
        img = Image.open(out / f).convert("RGB")
        assert img.size == (w, h), f
        assert len(img.getcolors(maxcolors=1 << 20)) > 20, f  # a heatmap, a colour bar and text: not blank
    assert Image.open(out / "cka.png").size == (5 * w + 4 * 12, h)
    # against the pretrained student, the probe run's unchanged teacher changes nothing: (a) is the runs' start
    cka.main(["--runs", runs[2], "--pretrained_student", "--max_images", "64", "--batch_size", "32", "--device", "cpu",
              "--out_dir", str(out)])
    probe = json.load(open(out / "cka.json"))["runs"]["probe"]
    assert probe["change"] == pytest.approx(0, abs=1e-6) and torch.tensor(probe["delta"]).abs().max() < 1e-6


def test_cka_bad_input_is_one_line(tmp_path):
    good = fake_run(tmp_path / "good", 0.01, 0.01)
    other = fake_run(tmp_path / "other", 0.01, 0.01)
    config = json.load(open(os.path.join(other, "config.json")))
    run_folder.write_json(os.path.join(other, "config.json"), dict(config, student="toy-l"))
    cases = [(["--runs", str(tmp_path / "nope")], "is not a finished run"),
             (["--runs", good, "--teacher", "vitb14"], "has teacher 'toy-l', not 'vitb14'"),
             (["--runs", good, other], "has student 'toy-l', not 'toy-s'"),
             (["--runs", good, good], "the same folder name"),
             (["--runs", good, "--batch_size", "2"], "batches of 4 or more"),
             (["--runs", good, "--img_size", "50"], "not a multiple of the patch size 14")]
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            cka.main(argv + ["--out_dir", str(tmp_path / "cka")])
        assert e.value.code != 0 and says in str(e.value.code) and "\n" not in str(e.value.code), argv
    assert not os.path.exists(tmp_path / "cka")


@pytest.mark.parametrize("file,content", [
    ("results.json", '{"method": "sl'),  # cut off while written
    ("config.json", '{"dataset": "synthetic", '),
    ("config.json", b"\xff\xfe\x00"),  # not text
    ("results.json", "[1, 2]"),  # JSON, not an object
    ("config.json", '{"dataset": "imagenet", "teacher": "toy-l", "student": "toy-s"}'),  # hand-edited
])
def test_cka_on_a_broken_run_file_is_one_line(tmp_path, file, content):
    run = fake_run(tmp_path / "run", 0.01, 0.01)
    path = os.path.join(run, file)
    open(path, "wb").write(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as e:
        cka.main(["--runs", run, "--device", "cpu", "--out_dir", str(tmp_path / "cka")])
    msg = str(e.value.code)
    assert e.value.code != 0 and "\n" not in msg and (path in msg or "imagenet" in msg)
    assert not os.path.exists(tmp_path / "cka")


@pytest.mark.parametrize("change,flags,says", [
    (dict(dataset="synthetic-seg", img_size=112), [], "has dataset 'synthetic-seg', not 'synthetic'"),
    ({}, ["--dataset", "synthetic-seg"], "has dataset 'synthetic', not 'synthetic-seg'"),
    (dict(img_size=112), [], "has img_size 112, not 56"),
    ({}, ["--img_size", "112"], "has img_size 56, not 112"),
])
def test_cka_refuses_runs_trained_on_other_images(tmp_path, change, flags, says):
    first = fake_run(tmp_path / "first", 0.01, 0.01)
    other = fake_run(tmp_path / "other", 0.01, 0.01)
    config = json.load(open(os.path.join(other, "config.json")))
    json.dump(dict(config, **change), open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(SystemExit) as e:
        cka.main(["--runs", first, other, *flags, "--device", "cpu", "--out_dir", str(tmp_path / "cka")])
    assert says in str(e.value.code) and "trained on" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not os.path.exists(tmp_path / "cka")


def test_cka_removes_its_own_earlier_pngs_only(tmp_path):
    run = fake_run(tmp_path / "now", 0.01, 0.01)
    out = tmp_path / "cka"
    out.mkdir()
    for f in ("cka.png", "cka_delta_before.png", "cka_pretrained.png", "mine.png", "cka_notes.txt", "notes.txt"):
        (out / f).write_bytes(b"an earlier call's, or the user's")
    cka.main(["--runs", run, "--max_images", "16", "--batch_size", "8", "--device", "cpu", "--out_dir", str(out)])
    assert sorted(os.listdir(out)) == ["cka.json", "cka.png", "cka_delta_now.png", "cka_notes.txt",
                                       "cka_pretrained.png", "mine.png", "notes.txt"]
    assert (out / "mine.png").read_bytes() == (out / "notes.txt").read_bytes() == b"an earlier call's, or the user's"
    assert Image.open(out / "cka.png").size[0] > 100  # this call's


# -----------------------------------------------------------------------------
# bench.py: the step, memory, the input pipeline, latency, the proof


def test_bench_schedule_adds_validation_every_epoch(monkeypatch, capsys):
    """SLAD's 30 epochs with per-epoch validation, from the step and the validation batch (issue 24's Aircraft
    goal): 30 x 104 steps x 0.1 s + 30 x ceil(3,333 / 32) batches x 0.05 s = 312 + 157.5 s."""
    monkeypatch.setattr(bench, "bench_step", lambda method, args: dict(method=method, ms=100.0, img_s=320.0,
                                                                       tflops=1.0, mfu=None, mem_gib=1.0))
    monkeypatch.setattr(bench, "bench_eval", lambda args: 0.05)
    bench.main(["schedule", "--teacher", "toy-b", "--student", "toy-s", "--batch_size", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "validate       50.0 ms/batch" in out
    assert "aircraft  SLAD 30 epochs + validation: 7.8 min (2.6 min of it validation, 3333 images an epoch)" in out
    assert "dtd       SLAD 30 epochs + validation: " in out and "cub       SLAD 30 epochs + validation: " in out


def test_bench_step_profile_splits_the_step_by_kind_of_op(capsys):
    bench.main(["step", "--method", "lora", "--teacher", "toy-b", "--student", "toy-s", "--img_size", "28",
                "--batch_size", "2", "--iters", "1", "--warmup", "1", "--device", "cpu", "--profile", "4"])
    out = capsys.readouterr().out
    kinds = dict(re.findall(r"^    (\S.*?)\s+[\d.]+ ms\s+([\d.]+) %$", out, re.M))
    assert {"matmul, conv", "layer norm", "attention"} <= set(kinds), out  # AdamW: fused on CUDA alone
    assert abs(sum(map(float, kinds.values())) - 100) < 0.5  # every aten op counted once
    rows = re.findall(r"^      +[\d.]+ ms  (aten::\S+)(?:  \((.+)\))?$", out, re.M)  # each op, its input shapes
    shaped = [shapes for _, shapes in rows if shapes]  # an op of no tensor input (aten::empty) has none to show
    assert len(rows) == 4 and shaped and all(re.fullmatch(r"\d+(x\d+)*(, \d+(x\d+)*)*", s) for s in shaped), out


def test_bench_profile_counts_inductors_compiled_kernels(monkeypatch, capsys):
    """Under --compile most of a step runs in Inductor's fused kernels, not aten ops: the profile counts them.
    (A small compiled step here: compiling the toy ViT step takes minutes on a 2-core CPU.)"""
    from torch._inductor import config as inductor
    monkeypatch.setattr(inductor.cpp, "enable_kernel_profile", True)  # as bench_step sets it under --profile
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4))
    loss_fn = torch.compile(lambda x: net(x).square().mean())
    x = torch.randn(16, 32)
    loss_fn(x).backward()  # compiled here
    bench.profile_steps(lambda: loss_fn(x).backward(), "cpu", 20)
    out = capsys.readouterr().out
    assert re.search(r"^    fused \(Inductor\) +[\d.]+ ms", out, re.M), out
    assert re.search(r"^      +[\d.]+ ms  (graph_\d+_)?cpp_fused_\w*layer_norm", out, re.M), out
    # the matmuls stay aten's (Inductor calls them as extern kernels), with their shapes
    assert re.search(r"^      +[\d.]+ ms  aten::mm  \((16|4|64)x\d+, \d+x\d+, \d+x\d+\)$", out, re.M), out


def test_bench_prints_figures_on_cpu(capsys):
    toy = ["--teacher", "toy-l", "--student", "toy-s", "--img_size", "28", "--batch_size", "4", "--iters", "1",
           "--warmup", "1", "--device", "cpu"]
    bench.main(["schedule", *toy])
    out = capsys.readouterr().out
    for m in bench.METHODS:
        assert f"  {m} " in out
    assert "ms/step" in out and "img/s" in out and "MFU" in out and "SLAD / two-step" in out and "cub" in out
    assert "ms/batch of teacher + student forward passes" in out  # bench_eval ran
    bench.main(["step", "--method", "slad", "--dataset", "synthetic", "--peak_tflops", "1", *toy])
    assert "%" in capsys.readouterr().out.split("MFU")[-1]  # a known peak gives a percentage
    for dataset, size in (("synthetic", "56"), ("synthetic-seg", "112")):
        bench.main(["data", "--dataset", dataset, "--img_size", size, "--batch_size", "8", "--iters", "2",
                    "--warmup", "1"])
        assert "img/s" in capsys.readouterr().out


# bench.py memory, data and proof: the figures users need before they rent a GPU, and the GPU check in one command

def test_bench_memory_trace_grows_with_batch_and_shrinks_with_checkpointing():
    args, _ = bench.parse_args(["memory", "--img_size", "112"])
    toy = lambda method, batch, checkpointing: bench.traced_peak(method, argparse.Namespace(**{
        **vars(args), "teacher": "toy-b", "student": "toy-s", "grad_checkpointing": checkpointing}), batch)
    c, n = CONFIGS["toy-b"], 1 + (112 // 14) ** 2
    for method in ("slad", "finetune"):
        p4, p8, p8_checkpointed = toy(method, 4, False), toy(method, 8, False), toy(method, 8, True)
        assert p8_checkpointed < p8
        # each image keeps at least every block's GELU input (bf16) for the backward pass
        assert (p8 - p4) / 4 >= c.depth * n * int(c.embed_dim * c.mlp_ratio) * 2
    params = sum(p.numel() for p in ViT.from_name("toy-b").parameters()) * 4
    assert toy("finetune", 4, False) > 4 * params  # weights, gradients and AdamW's two moments, all fp32
    assert toy("probe", 8, False) < toy("lora", 8, False) < toy("finetune", 8, False)


def test_live_bytes_counts_what_pytorchs_memtracker_counts():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")  # torch >= 2.5

    def step(net, optimizer):
        F.cross_entropy(net(torch.randn(32, 64)), torch.randint(0, 10, (32,))).backward()
        optimizer.step()

    def model():
        net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 10))
        return net, torch.optim.AdamW(net.parameters(), fused=True)

    ours = bench.LiveBytes(block=1)  # MemTracker does not round to the CUDA allocator's blocks on a CPU
    with FakeTensorMode(), ours:
        step(*model())
    with FakeTensorMode():
        net, optimizer = model()
        theirs = mem_tracker.MemTracker()
        theirs.track_external(net, optimizer)
        with theirs:
            step(net, optimizer)
    assert ours.peak == theirs.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] > 0


def test_bench_memory_prints_peaks_and_largest_batches(capsys):
    bench.main(["memory", "--pairs", "toy-b:toy-s", "--methods", "slad", "lora", "--img_size", "56",
                "--batch_size", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "traced on fake tensors" in out and "largest batch in 24 / 40 / 80 GiB" in out
    rows = {r[2]: r[3:7] for r in (line.split("|") for line in out.splitlines() if line.startswith("| toy-b -> toy-s"))}
    assert set(rows) == {" slad ", " lora "}
    for peak, peak_checkpointed, fits, fits_checkpointed in rows.values():
        assert float(peak.split()[0]) > 0 and peak.split()[1] in ("MiB", "GiB")
        fits, fits_checkpointed = [int(b) for b in fits.split(" / ")], [int(b) for b in fits_checkpointed.split(" / ")]
        assert 0 < fits[0] < fits[1] < fits[2] and all(a <= b for a, b in zip(fits, fits_checkpointed))
    with pytest.raises(SystemExit, match="needs a CUDA device"):  # the measured largest batch: on a GPU only
        bench.main(["fit", "--device", "cpu"])


def test_bench_data_prints_per_worker_rate_requirements_and_shm(capsys):
    bench.main(["data", "--img_size", "112", "--batch_size", "4", "--iters", "2", "--warmup", "1",
                "--num_workers", "0"])
    out = capsys.readouterr().out
    rate = re.search(r"fake DTD .*: ([\d.]+) img/s, ([\d.]+) img/s a worker", out)
    assert rate and float(rate.group(1)) == float(rate.group(2)) > 0  # 0 workers: the main process is the one
    with torch.device("meta"):  # SLAD's step at the paper's rank, 16
        teacher, student = add_lora(ViT.from_name("vitb14"), rank=16), ViT.from_name("vits14")
        share_lora(student, teacher)
    need = 0.4 * 989e12 / (mfu.step_flops(teacher, 112, "lora") + mfu.step_flops(student, 112, "lora"))
    assert "| vitb14 -> vits14 | slad | " in out and f"| {need:,.0f} | " in out
    shm = 16 * 4 * 4 * 3 * 112 * 112  # workers x prefetch x batch x uint8 image bytes
    assert f"{shm / 1e6:,.0f} MB with 16 workers" in out and "--shm-size" in out
    assert make_loader(range(8), None, 4, train=True, num_workers=1).prefetch_factor == bench.PREFETCH  # the loaders'


def test_bench_latency_prints_onnx_runtime_against_torch(capsys):
    bench.main(["latency", "--model", "toy-s", "--img_size", "28", "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "torch " in out and "ONNX Runtime " in out and "ms/batch" in out and "ONNX Runtime / torch time" in out


def test_proof_steps_are_capped_and_a_failure_keeps_its_last_line(tmp_path):
    log = str(tmp_path / "step.log")
    sleeper = "import subprocess, sys, time; print(subprocess.Popen([sys.executable, '-c', 'import time; " \
              "time.sleep(60)']).pid, flush=True); time.sleep(60)"
    status, seconds = bench.run_capped([sys.executable, "-c", sleeper], 2, log)
    assert status == "timed out after 2 s" and seconds < 15
    child = int(open(log).read().split()[0])  # a worker the step started (as torchrun does) is killed with it
    for _ in range(50):
        try:
            os.kill(child, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    else:
        pytest.fail("the step's child process outlived its time cap")
    status, _ = bench.run_capped([sys.executable, "-c", "print('working'); raise SystemExit('error: no such thing')"],
                                 30, log)
    assert status == "failed: error: no such thing"
    assert bench.run_capped([sys.executable, "-c", "print('fine')"], 30, log)[0] == "ok"


def test_bench_proof_only_runs_the_steps_it_names(tmp_path, capsys):
    out = tmp_path / "proof.md"
    bench.main(["proof", "--tiny", "--only", "^two-step, (probe|lora)", "--out", str(out)])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in out.read_text().splitlines()[6:]}
    ran = {name for name, status in rows.items() if not status.startswith("skipped")}
    assert ran == {"device", "versions", "fake data", "two-step, probe teacher", "two-step, lora teacher"}
    assert rows["memory"] == "skipped: not in --only ^two-step, (probe|lora)"
    with pytest.raises(SystemExit):
        bench.parse_args(["proof", "--only", "["])
    assert "is not a regular expression" in capsys.readouterr().err


def test_bench_proof_tiny_runs_every_step_on_the_cpu(tmp_path):
    """The GPU proof's one command, on toy sizes: a row per step, the training scripts ok, nothing failed."""
    out = tmp_path / "proof.md"
    r = cli(["bench.py", "proof", "--tiny", "--out", str(out)], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines[4] == "| step | command | figure | status | s |"
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line[1:-1].split(" | ")] for line in lines[6:])}
    steps = bench.proof_steps(True, False, "dtd", "cityscapes", "runs")
    assert set(rows) == {"device", "versions", "fake data"} | {name for name, *_ in steps}
    for name, argv, cap, pattern, skip in steps:
        command, figure, status = rows[name][0], rows[name][1], rows[name][2]
        assert status == (f"skipped: {skip}" if skip else "ok"), (name, status)
        if not skip:
            assert figure and command.startswith("`python "), name
    for name in ("SLAD, the defaults", "SLAD under torchrun, 1 process", "two-step, finetune teacher",
                 "segmentation, SLAD"):
        assert "ms/step" in rows[name][1]
    assert "teacher:" in rows["two-step, lora teacher"][1] and "student:" in rows["two-step, lora teacher"][1]
    logs = os.listdir(tmp_path / "proof")
    assert sum(f.endswith(".log") for f in logs) == sum(skip is None for *_, skip in steps)
    assert os.path.exists(tmp_path / "proof" / "runs" / "twostep-probe" / "results.json")


# -----------------------------------------------------------------------------
# toys.py: the pretrained toy family


FAMILY = ("toy-l", "toy-b", "toy-s")


def test_shipped_toy_family_loads_strictly():
    for name in FAMILY:
        state = torch.load(os.path.join(weights.TOY_WEIGHTS, f"{name}.pt"), map_location="cpu", weights_only=True)
        vit = from_pretrained(name)  # strict load_state_dict inside
        assert list(state) == list(ViT.from_name(name).state_dict())  # the official layout, nothing more
        assert all(torch.equal(vit.state_dict()[k], v.float()) for k, v in state.items())
    assert sum(os.path.getsize(os.path.join(weights.TOY_WEIGHTS, f)) for f in os.listdir(weights.TOY_WEIGHTS)) < 10e6


def test_toys_script_builds_a_family_that_loads(tmp_path, monkeypatch, capsys):
    quick = ["--images", "64", "--epochs", "1", "--distill_epochs", "1", "--batch_size", "32", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", ["toys.py", *quick, "--out_dir", str(tmp_path / "a")])
    toys.main()
    for name in FAMILY:  # pretrained or distilled: no longer the init
        vit = from_pretrained(name, path=str(tmp_path / "a" / f"{name}.pt"))
        assert not torch.equal(vit.pos_embed, ViT.from_name(name).pos_embed)
    # --teacher_from: the students distilled again from a given teacher, which is copied as it is
    monkeypatch.setattr(sys, "argv", ["toys.py", *quick, "--teacher_from", str(tmp_path / "a" / "toy-l.pt"),
                                      "--students", "toy-s", "--out_dir", str(tmp_path / "b")])
    toys.main()
    assert sorted(os.listdir(tmp_path / "b")) == ["toy-l.pt", "toy-s.pt"]
    assert (tmp_path / "a" / "toy-l.pt").read_bytes() == (tmp_path / "b" / "toy-l.pt").read_bytes()
    a, b = toys.make_images(8, seed=0), toys.make_images(8, seed=0)  # deterministic draws
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    monkeypatch.setattr(sys, "argv", ["toys.py", *quick, "--out_dir", str(tmp_path / "c")])
    toys.main()  # the same command rebuilds the same files, byte for byte
    assert all((tmp_path / "a" / f"{n}.pt").read_bytes() == (tmp_path / "c" / f"{n}.pt").read_bytes() for n in FAMILY)
    monkeypatch.setattr(sys, "argv", ["toys.py", "--teacher_from", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit):
        toys.main()
    assert "no such file" in capsys.readouterr().err


def test_toys_schedule_is_the_scripts_one_step_late_in_the_warmup():
    lrs = [toys.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs == pytest.approx([0.0] + [train_slad.get_lr(s - 1, 100) for s in range(1, 5)]
                                + [train_slad.get_lr(s, 100) for s in range(5, 100)])


# the shipped family's alignment on 128 val images of each task (the README's figures: the whole val split),
# measured when it was made, less a margin for the smaller sample
SHIPPED_CKA_FLOOR = {"synthetic": 0.85, "synthetic-fine": 0.80}


def test_shipped_pairs_are_aligned_as_the_readme_states():
    for task, floor in SHIPPED_CKA_FLOOR.items():
        cka_of = miniature.premise_cka(task, 56, miniature.PAIRS, n_images=128)
        for pair, (pretrained, _) in cka_of.items():
            assert pretrained >= 100 * floor, (task, pair, pretrained)


@torch.no_grad()
def probe_accuracy(vit, train, test):
    """Nearest class mean on the frozen final CLS tokens: a linear probe with no training."""
    def feats(ds):
        x = torch.stack([eval_transform(56)(ds[i][0]) for i in range(len(ds))])
        return (F.normalize(vit.eval().forward_features(normalize(x))[:, 0], dim=-1),
                torch.tensor([ds[i][1] for i in range(len(ds))]))
    (xtr, ytr), (xte, yte) = feats(train), feats(test)
    means = torch.stack([xtr[ytr == c].mean(0) for c in range(int(ytr.max()) + 1)])
    return 100 * ((xte @ means.T).argmax(-1) == yte).float().mean().item()


@pytest.mark.parametrize("dataset,n_train", [(SyntheticTextures, 300), (SyntheticFine, 720)])
def test_pretrained_toys_transfer_better_than_random_ones(dataset, n_train):
    train, test = dataset("train", n=n_train), dataset("val", n=200)
    for name in FAMILY:
        torch.manual_seed(0)
        pretrained, random_init = (probe_accuracy(from_pretrained(name), train, test),
                                   probe_accuracy(ViT.from_name(name), train, test))
        assert pretrained > random_init + 15, (name, pretrained, random_init)


def test_toy_runs_default_to_a_low_rank_and_the_toys_encoder_lr():
    toy = ["--dataset", "synthetic", "--teacher", "toy-l", "--student", "toy-s", "--device", "cpu"]
    assert train_slad.parse_args(toy)[0].rank == 4 <= 0.1 * CONFIGS["toy-s"].embed_dim  # low rank, as r = 16 on ViT-S
    assert train_slad.parse_args(toy + ["--rank", "8"])[0].rank == 8
    assert train_slad.parse_args(["--device", "cpu"])[0].rank == 16  # the paper's, for DINOv2
    assert train_twostep.parse_args(toy)[0].backbone_lr == 1e-3 == miniature.TASKS["synthetic-fine"]["backbone_lr"]
    assert train_twostep.parse_args(["--device", "cpu"])[0].backbone_lr == 2e-5


# -----------------------------------------------------------------------------
# miniature.py: the paper in miniature on the toys


def test_miniature_quick_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "miniature.py", "--quick", "--out_dir", str(tmp_path)],
                       cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for heading in ("The premises, on val", "Table 1 in miniature", "Table 3 in miniature", "Fig. 3 in miniature"):
        assert heading in r.stdout, heading
    for f in ("fig1.png", "fig3.png", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0
    assert Image.open(tmp_path / "fig3.png").width <= 1000 and Image.open(tmp_path / "fig1.png").width == 900


def test_miniature_convergence_doubles_until_every_student_moves_less_than_half_a_point(tmp_path, monkeypatch):
    curve = {1: 70.0, 2: 75.0, 8: 80.0, 16: 85.0, 32: 85.4, 64: 85.5}  # SLAD's student: +5 from 8 to 16, +0.4 from
    teacher = {1: 70.0, 2: 72.0, 8: 80.0, 16: 84.0, 32: 88.0, 64: 92.0}  # 16 to 32; Fine-tuning's teacher: +4 each
    # doubling from 8, not waited for
    ran = []

    def run_all(jobs, workers, log):
        for d, cmd in jobs:
            ran.append(os.path.basename(d))
            epochs = int(cmd[cmd.index("--epochs" if "--epochs" in cmd else "--teacher_epochs") + 1])
            fake_run_folder(d, "synthetic-fine", curve[epochs] if "slad" in d else 90.0 + epochs / 100,
                            teacher[epochs] if "fine-tuning" in d else None,
                            seconds=epochs * (2.0 if "slad" in d else 3.0))  # SLAD at 2/3 of a two-step's time
    monkeypatch.setattr(miniature, "run_all", run_all)
    args, _ = miniature.parse_args(["--convergence", "--tasks", "synthetic-fine", "--seeds", "0", "1",
                                    "--out_dir", str(tmp_path)])
    lines, chosen, reports = miniature.convergence(args, print)
    table = "\n".join(lines)
    assert chosen == {"synthetic-fine": 16}  # 8 -> 16 moves SLAD's student 5 points; 16 -> 32, 0.4
    assert "| synthetic-fine | 8 → 16 |" in table and "+5.0" in table and "| 16 → 32 |" in table
    assert "+4.0" in table  # the teacher's move is shown
    # Table 1 and Fig. 1 at the longest schedule measured (32), and LoRA run at SLAD's time: 32 x 2/3 = 21 epochs
    assert len(ran) == len(set(ran)) == 3 * 4 * 2 + 2 and sum("lora-e21-" in r for r in ran) == 2
    md = reports["synthetic-fine"]
    assert "32 epochs a stage (passes the doubling check from 16)" in md
    assert "| SLAD | 32 | 85.4 ± 0.0 | 85.4 ± 0.0 | 85.4 ± 0.0 | 64 | 0.67x |" in md
    assert "| LoRA at SLAD's time | 21 | 90.2 ± 0.0 | 90.2 ± 0.0 | 90.2 ± 0.0 | 63 | 0.66x |" in md
    assert Image.open(tmp_path / "fig1-converged-synthetic-fine.png").width == 900
    long = [("LoRA at SLAD's time (193 ep.)", 1342.0, 93.4), ("SLAD (256 ep.)", 1235.0, 93.1)]
    miniature.fig1(long, "a legend's longest label", tmp_path / "long.png")
    right = np.asarray(Image.open(tmp_path / "long.png").convert("L"))[:, -4:]
    assert right.min() == 255  # the legend's text ends inside the figure, not cut at its edge
    args.max_epochs = 16
    not_reached = miniature.convergence(args, print)
    assert not_reached[1] == {"synthetic-fine": None}  # the cap: not reached, said so
    assert "16 epochs a stage (not converged" in not_reached[2]["synthetic-fine"]
    ran.clear()
    args.max_epochs, args.first_epochs = 64, 16  # --first_epochs: the search starts there
    assert miniature.convergence(args, print)[1] == {"synthetic-fine": 16}
    assert ran and not any("-e8-" in r for r in ran)  # nothing shorter than --first_epochs is asked for

    # convergence.md keeps the other tasks' rows; a task searched again replaces its own
    path = str(tmp_path / "convergence.md")
    open(path, "w").write(miniature.convergence_table(path, ["| synthetic | 3 → 6 | +1.0 |"], ["synthetic"]))
    md = miniature.convergence_table(path, lines, ["synthetic-fine"])
    assert "| synthetic | 3 → 6 |" in md and md.count("| synthetic-fine | 8 → 16 |") == 1
    assert md.splitlines()[0].count("|") == 2 + 8 + 1  # task, schedule, 4 methods x (teacher, student)

    # the summary's premise row reads the doubling from the same run folders: 16 -> 32 moves at most 0.4
    runs = miniature.doubling_runs(str(tmp_path), "synthetic-fine", 16, [0, 1])
    moves = miniature.doubling_moves(runs, "synthetic-fine", 16, [0, 1])
    assert max(abs(v) for (m, role), v in moves.items() if role == "student") == pytest.approx(0.4)
    assert miniature.doubling_runs(str(tmp_path), "synthetic-fine", 64, [0, 1]) is None  # 128 never ran

    # --quick: the machinery in one doubling, 1 -> 2 epochs, whatever --max_epochs says
    ran.clear()
    args.quick, args.first_epochs, args.tasks = True, None, ["synthetic-fine", "synthetic"]
    assert miniature.convergence(args, print)[1] == {"synthetic-fine": None}
    assert ran and all(re.search(r"^synthetic-fine-.*-e[12]-s0$", r) for r in ran)  # one task, one seed: a minute
    args.quick, args.tasks = False, ["synthetic-fine"]

    # the command writes both files: convergence.md and converged-TASK.md
    monkeypatch.setattr(sys, "argv", ["miniature.py", "--convergence", "--tasks", "synthetic-fine", "--seeds", "0",
                                      "1", "--out_dir", str(tmp_path)])
    miniature.main()
    assert "| 16 → 32 |" in (tmp_path / "convergence.md").read_text()
    assert "| LoRA at SLAD's time | 21 |" in (tmp_path / "converged-synthetic-fine.md").read_text()


def test_the_converged_verdicts_run_records_are_what_its_command_reuses():
    """docs/converged-runs/ keeps, in git, each finished run of issue 36's search (its config.json, results.json and
    metrics.jsonl; no checkpoint), so that the command docs/miniature.md gives continues the search on a new
    machine: every record must be what miniature.finished() takes as that run, done, under today's code (a change
    of config or of a default makes a record stale, and this test says which)."""
    root = os.path.join(HERE, "docs", "converged-runs")
    names = {os.path.basename(miniature.run_dir(root, *k)): k for task, methods in miniature.CONVERGED.items()
             for k in itertools.product([task], methods, ["toy-b"], ["toy-s"], range(10), range(1, 2049))}
    records = sorted(d for d in os.listdir(os.path.join(root, "runs"))
                     if os.path.exists(os.path.join(root, "runs", d, "results.json")))
    assert records, "no finished run is kept"
    for name in records:
        key = names[name]  # a folder the search names
        d, cmd = miniature.schedule_job(root, key, miniature.TASKS[key[0]])
        assert miniature.finished(d, cmd), f"{name}: a record of another config than today's command runs"
        curves = miniature.read(d)["curves"]
        assert curves and all(len(c) == key[5] for c in curves.values()), name  # every epoch's val, once


def test_miniature_ablation_rule_needs_more_than_the_seed_spread(tmp_path, monkeypatch):
    gains = {"kl-into-the-teacher": [0.2, 0.4, 0.3], "separate-qkv-adapters": [2.0, 2.5, 1.5],
             "a-drawn-for-the-student": [3.0, -2.0, 2.0], "kl-warm-up-20": [0.0, 0.0, 0.0]}

    def run_all(jobs, workers, log):
        for d, cmd in jobs:
            seed = int(d[-1])
            gain = next((g[seed] for k, g in gains.items() if k in d), 0.0)
            fake_run_folder(d, "synthetic-fine", 80.0 + seed + gain)
    monkeypatch.setattr(miniature, "run_all", run_all)
    args, _ = miniature.parse_args(["--ablation", "--out_dir", str(tmp_path)])
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line
            for line in miniature.ablation(args, print).splitlines()[2:]}
    assert ("**better**" in rows[("SLAD", "separate q/k/v adapters")]
            and "**better**" in rows[("LoRA", "separate q/k/v adapters")])
    for choice in ("KL into the teacher", "A drawn for the student", "KL warm-up 20 %"):  # too small, too noisy, none
        assert "no change" in rows[("SLAD", choice)], choice


def test_miniature_full_on_some_pairs_runs_only_theirs():
    import miniature
    args, _ = miniature.parse_args(["--full", "--pairs", "toy-b:toy-s"])
    tasks, keys = miniature.plan(True, False, False, [0, 1, 2], args.pairs)
    assert {k[2:4] for k in keys} == {("toy-b", "toy-s")} and set(tasks) == set(miniature.TASKS)
    assert {k[0] for k in keys} == set(miniature.TASKS) and len(keys) == 2 * (5 * 3 + 1) + 3
    assert len(miniature.plan(True, False, False, [0, 1, 2])[1]) > len(keys)  # every pair by default
    with pytest.raises(SystemExit):
        miniature.parse_args(["--full", "--pairs", "toy-l:toy-s"])  # Fig. 1 and Fig. 3 are of toy-b -> toy-s


def test_miniature_reuses_a_run_only_for_its_own_config(tmp_path):
    d = str(tmp_path / "run")
    cmd = miniature.command("synthetic-fine", "SLAD", "toy-b", "toy-s", 0, miniature.TASKS["synthetic-fine"], d)
    args, _ = train_slad.parse_args(cmd[2:])
    fake_run_folder(d, "synthetic-fine", 80.0, config_id=flags.config_id(vars(args)))
    assert miniature.finished(d, cmd)
    quick = miniature.command("synthetic-fine", "SLAD", "toy-b", "toy-s", 0, miniature.QUICK, d)
    assert not miniature.finished(d, quick)  # --quick's 14-px, one-epoch run is not the headline's
    assert miniature.parse_args(["--quick"])[0].out_dir == "out/miniature-quick" != miniature.parse_args([])[0].out_dir


def test_miniature_continues_a_killed_run_from_its_checkpoint_exactly(tmp_path, monkeypatch):
    settings = dict(miniature.QUICK, epochs=2)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    cmd = {d: miniature.command("synthetic-fine", "SLAD", "toy-b", "toy-s", 0, settings, d) for d in (straight, split)}
    miniature.run_all([(straight, cmd[straight])], 1, print)
    restore = interrupt_after(monkeypatch, "train_slad", 1)  # as if the session ended after the first epoch
    with pytest.raises(Interrupt):
        run_main("train_slad", cmd[split][2:], monkeypatch)
    restore()
    run_folder.LOCKS.pop(os.path.realpath(os.path.join(split, "run.lock"))).close()  # the killed process's lock goes
    assert miniature.killed(split, cmd[split]) == os.path.join(split, "ckpt.pt")
    other_seed = miniature.command("synthetic-fine", "SLAD", "toy-b", "toy-s", 1, settings, split)
    longer = miniature.command("synthetic-fine", "SLAD", "toy-b", "toy-s", 0, dict(settings, epochs=3), split)
    assert miniature.killed(split, other_seed) is None and miniature.killed(split, longer) is None  # start again
    log = []
    miniature.run_all([(split, cmd[split])], 1, log.append)
    assert "1 to run (1 continued from their checkpoints)" in log[0]
    assert "resuming from" in open(os.path.join(split, "stdout.txt")).read()
    a, b = results_of(straight), results_of(split)
    assert (a["teacher_acc"], a["student_acc"]) == (b["teacher_acc"], b["student_acc"]) and b["train_seconds"] > 0
    assert same_weights(os.path.join(straight, "student.pt"), os.path.join(split, "student.pt"))
    assert [json.loads(l)["epoch"] for l in open(os.path.join(split, "metrics.jsonl"))] == [1, 2]
    open(os.path.join(split, "ckpt.pt"), "wb").write(b"partial")  # a checkpoint cut short: the run starts again
    assert miniature.killed(split, cmd[split]) is None


def test_miniature_ctrl_c_stops_its_runs_and_says_how_to_continue(tmp_path):
    out = str(tmp_path / "mini")
    code = ("import runpy, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as at a terminal
            "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code, "miniature.py", "--convergence", "--quick", "--out_dir", out],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not glob.glob(os.path.join(out, "runs", "*", "config.json")) and time.time() < deadline:
        time.sleep(0.05)  # a run has started
    proc.send_signal(signal.SIGINT)  # to miniature alone: it stops its runs itself
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and len(err.splitlines()) == 1, err
    assert err == (f"interrupted; continue with: python miniature.py --convergence --quick --out_dir {out} (finished "
                   f"runs are reused, the stopped ones resume from their last epoch)\n")
    locks = glob.glob(os.path.join(out, "runs", "*", "run.lock"))
    assert locks
    for lock in locks:  # no run goes on: each run's lock is free (the OS frees it when its process ends)
        with open(lock) as f:
            run_folder.fcntl.flock(f, run_folder.fcntl.LOCK_EX | run_folder.fcntl.LOCK_NB)


# -----------------------------------------------------------------------------
# predict.py and export_onnx.py: your own folders end to end, per-class figures, predictions, ONNX


def predicted(lines):
    """{path: top-1 class} of predict.py's printed lines."""
    return {line.split(": ", 1)[0]: line.split(": ", 1)[1].split(" ")[0] for line in lines if ": " in line}


def onnx_vs_torch(onnx_path, torch_model, x):
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = torch_model(x).numpy()
    return float(np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max())


def test_slad_and_probing_on_an_image_folder_then_per_class_figures_predict_and_onnx(tmp_path, monkeypatch, capsys):
    root = own_images(tmp_path / "pets", splits=(("train", 8), ("test", 4)))
    monkeypatch.chdir(tmp_path)  # the default run folders land in ./out
    for script, extra in (("train_slad", []), ("train_twostep", ["--teacher_adapt", "probe"])):
        run_main(script, OWN + ["--dataset", "folder", "--data_dir", root] + extra, monkeypatch)
    slad, probe = sorted(glob.glob(str(tmp_path / "out" / "*")))
    assert os.path.basename(slad).startswith("slad-folder-pets-toy-l-toy-s-")
    assert os.path.basename(probe).startswith("twostep-probe-finetune-folder-pets-toy-l-toy-s-")
    for run in (slad, probe):
        res = results_of(run)
        figures = res["per_class"]
        assert res["held_out"] == ["val"] and figures["classes"] == list(ANIMALS) and figures["figure"] == "accuracy"
        assert figures["test_count"] == [4, 4, 4] and res["data_name"] == "folder-pets"
        for name in ("student", "teacher"):  # the per-class figures and the confusion matrix agree with the accuracy
            rows = list(csv.reader(open(os.path.join(run, f"confusion_{name}.csv"))))
            assert rows[0] == ["label \\ prediction", *ANIMALS] and [r[0] for r in rows[1:]] == list(ANIMALS)
            counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
            assert counts.sum() == 12 and figures[name] == [round(100 * counts[k, k] / 4, 2) for k in range(3)]
            assert abs(100 * np.trace(counts) / 12 - res[f"{name}_acc"]) < 0.01
        log = open(os.path.join(run, "log.txt")).read()
        assert "data folder-pets: train 21, val 3 (held out of train: 10 % of each class" in log
        assert "worst classes of the student: " in log
    text = report.main([slad, "--per_class"])  # the worst class first, and what it is taken for
    section = text.split("Per-class test accuracy (%) of ")[1].splitlines()
    worst = [line.split(" | ")[1] for line in section if line.startswith("| ") and "---" not in line][1:]
    assert sorted(worst) == sorted(f"{v:.1f}" for v in results_of(slad)["per_class"]["student"])
    assert [float(v) for v in worst] == sorted(float(v) for v in worst)
    capsys.readouterr()

    # predict: the student on its test split gives results.json's accuracy; a CSV of the top k
    student = os.path.join(slad, "student.pt")
    predict.main([student, os.path.join(root, "test"), "--top_k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert f"top-1 accuracy {results_of(slad)['student_acc']:.2f} % on 12 images" in lines[-1]
    assert len(predicted(lines)) == 12 and set(predicted(lines).values()) <= set(ANIMALS)
    predict.main([student, os.path.join(root, "test", "owl"), os.path.join(root, "train", "cat", "cat_0.jpg"),
                  "--out", str(tmp_path / "p.csv"), "--batch_size", "2", "--top_k", "9"])
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert len(rows) == 6 and all(abs(sum(float(v) for v in r[2::2]) - 1) < 1e-4 for r in rows[1:])
    (tmp_path / "files.txt").write_text(os.path.join(root, "test", "cat", "cat_0.jpg") + "\n")
    predict.main([student, "--list", str(tmp_path / "files.txt")])
    assert "cat_0.jpg: " in capsys.readouterr().out

    # export: ONNX Runtime gives torch's logits on the test images, at any batch size; the metadata says how
    export_onnx.main([student])
    out = os.path.join(slad, "student.onnx")
    model = load_model(student)
    test = load_splits("folder", root)[0]["test"]
    x = torch.stack([data.normalize(eval_transform(28)(test[i][0])[None])[0] for i in range(len(test))])
    assert onnx_vs_torch(out, model, x) <= 1e-4 and onnx_vs_torch(out, model, x[:1]) <= 1e-4
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props["classes"]) == list(ANIMALS) and props["img_size"] == "28"
    assert props["task"] == "classification"
    assert json.loads(props["mean"]) == list(data.IMAGENET_MEAN) and "center-crop 28" in props["preprocess"]
    assert "exif_transpose" in props["orientation"] and props["interpolation"].startswith("bilinear, antialiased")
    assert props["preprocess"].startswith("turn upright as its EXIF orientation says, resize the short side to 35 px "
                                          "(bilinear, antialiased)")
    assert "max |logit difference|" in capsys.readouterr().out

    # CKA measures the folder's runs on the folder's images (its --data_dir from the runs' config)
    cka.main(["--runs", slad, probe, "--split", "test", "--batch_size", "4", "--out_dir", str(tmp_path / "cka")])
    assert "folder test (12 images)" in capsys.readouterr().out


def test_slad_and_lora_taid_ted_on_a_mask_folder_then_predict_and_onnx(tmp_path, monkeypatch, capsys):
    root = own_masks(tmp_path / "boxes", splits=(("train", 12), ("val", 2), ("test", 3)))
    runs = {}
    lora_taid_ted = ["--teacher_adapt", "lora", "--kd", "taid", "--feat", "ted"]
    for script, extra in (("train_slad", []), ("train_twostep", lora_taid_ted)):
        runs[script] = str(tmp_path / script)
        run_main(script, OWN + ["--dataset", "folder-seg", "--data_dir", root, "--out_dir", runs[script]] + extra,
                 monkeypatch)
        res = results_of(runs[script])
        figures = res["per_class"]
        assert figures["figure"] == "iou" and figures["classes"] == ["background", "red box", "blue box"]
        assert res["held_out"] == [] and {"student_miou", "teacher_miou"} <= set(res)
        mean = np.mean([v for v in figures["student"] if v is not None])
        assert abs(mean - res["student_miou"]) < 0.01  # mIoU is the mean of the per-class IoUs
        assert sum(figures["test_count"]) == 3 * 28 * 42 - 3 * 18  # every labelled pixel, the 255s not
    student = os.path.join(runs["train_slad"], "student.pt")
    predict.main([student, os.path.join(root, "test", "images"), "--out", str(tmp_path / "masks")])
    out = capsys.readouterr().out
    assert out.count(" -> ") == 3 and "wrote 3 masks" in out
    for i in range(3):
        mask = Image.open(tmp_path / "masks" / f"test{i}.png")
        assert mask.size == (42, 28) and mask.mode == "L" and np.array(mask).max() <= 2
    export_onnx.main([student, "--out", str(tmp_path / "seg.onnx")])
    model = load_model(student)
    x = torch.randn(3, 3, 28, 28)
    assert onnx_vs_torch(str(tmp_path / "seg.onnx"), model, x) <= 1e-4  # (batch, classes, 28, 28), any batch size
    assert onnx_vs_torch(str(tmp_path / "seg.onnx"), model, x[:1]) <= 1e-4


def test_the_demo_student_on_its_test_split_gives_its_accuracy(slad_demo, tmp_path, capsys):
    """The README's demo: its student.pt, predicted on the synthetic test images written out as files, gives the
    test accuracy of its results.json; the file says its classes and the 56 px it trained at (not the 224 of its
    position-embedding grid), and loads in eval mode."""
    test = SyntheticTextures("test")
    for i in range(len(test)):
        img, label = test[i]
        os.makedirs(tmp_path / test.CLASSES[label], exist_ok=True)
        img.save(tmp_path / test.CLASSES[label] / f"{i}.png")
    student = load_model(os.path.join(slad_demo, "student.pt"))
    assert not student.training and student.meta["img_size"] == 56 and student.meta["classes"] == list(test.CLASSES)
    predict.main([os.path.join(slad_demo, "student.pt"), str(tmp_path), "--out", str(tmp_path / "p.json"),
                  "--batch_size", "250"])
    acc = results_of(slad_demo)["student_acc"]
    assert f"top-1 accuracy {acc:.2f} % on 1000 images" in capsys.readouterr().out
    rows = json.load(open(tmp_path / "p.json"))
    assert len(rows) == 1000 and len(rows[0]["top"]) == 5
    hits = sum(r["top"][0]["class"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert abs(hits / 10 - acc) < 0.01


def test_an_older_model_file_loads_in_eval_mode_and_predict_asks_its_image_size(tmp_path, capsys):
    torch.manual_seed(0)
    seg = Segmenter(ViT.from_name("toy-s"), 3)
    seg.head[0].running_var.fill_(4.0)  # eval mode reads it, training mode would not
    deploy.save_model(str(tmp_path / "seg.pt"), seg)
    ckpt = torch.load(tmp_path / "seg.pt", weights_only=True)
    del ckpt["meta"]  # as written before the metadata was saved
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = load_model(str(tmp_path / "old.pt"))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert not loaded.training and loaded.meta == {} and torch.allclose(loaded(x), seg.eval()(x), atol=1e-5)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "red.png")
    with pytest.raises(SystemExit) as e:
        predict.main([str(tmp_path / "old.pt"), str(tmp_path / "red.png")])
    assert "does not say the image size it trained at" in str(e.value.code) and "\n" not in str(e.value.code)
    predict.main([str(tmp_path / "old.pt"), str(tmp_path / "red.png"), "--img_size", "28", "--out",
                  str(tmp_path / "m")])
    assert Image.open(tmp_path / "m" / "red.png").size == (30, 20) and "red.png -> " in capsys.readouterr().out


def test_predict_reads_a_16_bit_or_exif_turned_picture_as_its_8_bit_upright_copy(tmp_path):
    """One picture as an 8-bit PNG, a 16-bit PNG, and stored sideways with an EXIF orientation (8 and 16 bits):
    the same probabilities from a classifier, the same mask, at the size it is shown, from a segmenter. Their meta
    lacks the keys added since (orientation, interpolation), as older student.pt files do: they load and predict."""
    gray = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.fromarray(gray).save(folder / "a8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "b16.png")
    save_sideways(folder / "c8_exif.png", gray)
    save_sideways(folder / "d16_exif.png", gray.astype(np.uint16) * 257)
    torch.manual_seed(0)
    for kind in (Classifier, Segmenter):
        net = randomize_(kind(ViT.from_name("toy-s"), 3), std=0.2)
        net.meta = {"img_size": 28, "classes": ["a", "b", "c"]}
        deploy.save_model(str(tmp_path / f"{kind.__name__}.pt"), net)
    predict.main([str(tmp_path / "Classifier.pt"), str(folder), "--out", str(tmp_path / "p.json")])
    rows = json.load(open(tmp_path / "p.json"))
    assert len(rows) == 4 and all(r["top"] == rows[0]["top"] for r in rows), rows
    predict.main([str(tmp_path / "Segmenter.pt"), str(folder), "--out", str(tmp_path / "masks")])
    masks = [np.array(Image.open(tmp_path / "masks" / f"{n}.png")) for n in ("a8", "b16", "c8_exif", "d16_exif")]
    assert masks[0].shape == (30, 40) and all(np.array_equal(m, masks[0]) for m in masks)


@pytest.mark.parametrize("argv,says", [
    ([], "no images: give image files or folders"),
    (["nowhere.jpg"], "nowhere.jpg: no such file or folder"),
])
def test_predict_bad_input_is_one_line(slad_demo, monkeypatch, argv, says):
    with pytest.raises(SystemExit) as e:
        run_as_script("predict", [os.path.join(slad_demo, "student.pt"), *argv], monkeypatch)
    assert says in str(e.value.code) and "\n" not in str(e.value.code) and e.value.code != 0


def tiny_classifier_and_segmenter(tmp_path):
    """A toy-s Classifier and Segmenter saved as the training scripts do (trained at 28 px, classes a, b, c), and
    one picture in a folder named after class a: predict.py and export_onnx.py in a second, no training."""
    torch.manual_seed(0)
    paths = []
    for kind in (Classifier, Segmenter):
        net = kind(ViT.from_name("toy-s"), 3)
        net.meta = {"img_size": 28, "classes": ["a", "b", "c"]}
        paths.append(str(tmp_path / f"{kind.__name__}.pt"))
        deploy.save_model(paths[-1], net)
    os.makedirs(tmp_path / "a")
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a" / "red.png")
    return *paths, str(tmp_path / "a" / "red.png")


def test_predict_refuses_an_img_size_the_model_file_contradicts(tmp_path, monkeypatch, capsys):
    classifier, _, image = tiny_classifier_and_segmenter(tmp_path)
    with pytest.raises(SystemExit) as e:  # another size would resample the position embeddings: other predictions
        run_as_script("predict", [classifier, image, "--img_size", "56"], monkeypatch)
    says = str(e.value.code)
    assert "--img_size 56, but" in says and "trained at 28 px" in says and "\n" not in says
    predict.main([classifier, image])
    default = capsys.readouterr().out
    predict.main([classifier, image, "--img_size", "28"])  # the size it says: the same predictions
    assert capsys.readouterr().out == default and "on 1 image, " in default  # "1 image", not "1 images"


def test_export_onnx_refuses_opsets_it_cannot_honour_and_prints_the_files_own(tmp_path, monkeypatch, capsys):
    classifier, _, _ = tiny_classifier_and_segmenter(tmp_path)
    out = tmp_path / "m.onnx"
    for opset in ("9", "16", "21"):  # refused before any work: torch >= 2.9 would write opset 18 for 9 and 16
        with pytest.raises(SystemExit) as e:
            run_as_script("export_onnx", [classifier, "--opset", opset, "--out", str(out)], monkeypatch)
        assert f"--opset {opset}: torch's exporters write this model at opsets 17 to 20" in str(e.value.code)
        assert "\n" not in str(e.value.code) and not out.exists()
    export_onnx.main([classifier, "--opset", "17", "--out", str(out)])
    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert "opset 17)" in capsys.readouterr().out
    # an exporter that keeps its own opset, or writes a graph ONNX Runtime cannot load: refused, nothing written
    os.remove(out)
    fallback = onnx.ModelProto.FromString(proto.SerializeToString())
    next(o for o in fallback.opset_import if o.domain in ("", "ai.onnx")).version = 18
    broken = onnx.ModelProto.FromString(proto.SerializeToString())
    broken.graph.node[0].op_type = "NoSuchOp"
    for wrote, says in ((fallback, "torch's exporter wrote opset 18, not the --opset 17 asked"),
                        (broken, "ONNX Runtime cannot load the opset 17 graph")):
        monkeypatch.setattr(export_onnx, "to_onnx", lambda net, x, opset: wrote)
        with pytest.raises(SystemExit) as e:
            export_onnx.main([classifier, "--opset", "17", "--out", str(out)])
        assert says in str(e.value.code) and "is not written" in str(e.value.code) and not out.exists()
        assert "\n" not in str(e.value.code)


def test_predict_segmenter_out_is_a_folder_and_the_default_one_is_said(tmp_path, monkeypatch, capsys):
    classifier, segmenter, image = tiny_classifier_and_segmenter(tmp_path)
    (tmp_path / "taken.png").write_text("mine")
    for out, says in (("taken.png", "taken.png is a file, but a segmenter writes a mask PNG an image into a folder"),
                      ("x.csv", "x.csv names a .csv or .json file, but a segmenter"), ("x.json", "x.json names a")):
        with pytest.raises(SystemExit) as e:
            run_as_script("predict", [segmenter, image, "--out", str(tmp_path / out)], monkeypatch)
        assert says in str(e.value.code) and "\n" not in str(e.value.code)
    assert (tmp_path / "taken.png").read_text() == "mine" and not glob.glob(str(tmp_path / "x.*"))
    with pytest.raises(SystemExit) as e:  # and a classifier's --out is one file, refused before predicting
        predict.main([classifier, image, "--out", str(tmp_path / "a")])
    assert "is a folder, but a classifier writes its predictions to one file" in str(e.value.code)
    os.makedirs(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    predict.main([segmenter, image])
    masks = str(tmp_path / "here" / "masks")
    printed = capsys.readouterr().out
    assert f"no --out: writing the masks into {masks}" in printed and f"wrote 1 mask to {masks}:" in printed
    assert Image.open(os.path.join(masks, "red.png")).size == (30, 20)


def test_predict_and_export_write_errors_say_run_again_and_training_ones_resume(tmp_path, capsys):
    classifier, _, image = tiny_classifier_and_segmenter(tmp_path)
    predict.main([classifier, image, "--top_k", "1", "--out", str(tmp_path / "p.csv")])
    assert "wrote the top class of 1 image to" in capsys.readouterr().out  # not "the top 1 classes of 1 image(s)"
    nowhere = str(tmp_path / "gone" / "p")
    with pytest.raises(RunError) as e:
        predict.main([classifier, image, "--out", nowhere + ".csv"])
    assert str(e.value).endswith("or give another --out, then run predict.py again") and "--resume" not in str(e.value)
    with pytest.raises(RunError) as e:
        export_onnx.main([classifier, "--out", nowhere + ".onnx"])
    assert str(e.value).endswith("then run export_onnx.py again") and "--resume" not in str(e.value)
    with pytest.raises(RunError) as e:  # a training run's files: its remedy as before
        run_folder.atomic_write(nowhere + ".json", lambda tmp: run_folder.write_text(tmp, "{}"))
    assert str(e.value).endswith("then continue with --resume if a ckpt.pt was written")


def test_dinov3_on_own_folders_then_predict_and_onnx(tmp_path, monkeypatch, capsys, toy3):
    """The own-data path, predict.py and the ONNX export on the DINOv3 family too (RoPE, storage tokens, the
    k-masked qkv bias): a class folder and a mask folder, SLAD on tiny random DINOv3 models."""
    pets = own_images(tmp_path / "pets", splits=(("train", 8), ("test", 4)))
    boxes = own_masks(tmp_path / "boxes", splits=(("train", 8), ("test", 2)))
    argv = ["--teacher", "toy3-l", "--student", "toy3-s", "--init", "random", "--device", "cpu", "--img_size", "32",
            "--batch_size", "4", "--epochs", "1"]
    for dataset, root in (("folder", pets), ("folder-seg", boxes)):
        out = str(tmp_path / dataset)
        run_main("train_slad", argv + ["--dataset", dataset, "--data_dir", root, "--out_dir", out], monkeypatch)
        student = os.path.join(out, "student.pt")
        capsys.readouterr()
        if dataset == "folder":
            predict.main([student, os.path.join(root, "test")])
            assert f"top-1 accuracy {results_of(out)['student_acc']:.2f} %" in capsys.readouterr().out
        else:
            predict.main([student, os.path.join(root, "test", "images"), "--out", str(tmp_path / "masks")])
            assert len(os.listdir(tmp_path / "masks")) == 2
        export_onnx.main([student])
        assert onnx_vs_torch(os.path.join(out, "student.onnx"), load_model(student), torch.randn(2, 3, 32, 32)) <= 1e-4
    images = os.path.join(root, "test", "images")
    for script, argv in ((predict, [student, images]), (export_onnx, [student])):  # DINOv2's 14 is not DINOv3's 16
        with pytest.raises(SystemExit) as e:
            script.main(argv + ["--img_size", "28"])
        assert "--img_size 28 is not a multiple of the model's patch size 16" in str(e.value.code)


# -----------------------------------------------------------------------------
# README.md and docs/: their commands parse and run, their links exist


DOCS = ["README.md", *sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(os.path.dirname(__file__), "docs"))
                              if f.endswith(".md"))]  # not docs/converged-runs/, the verdict's run records
SCRIPTS = ("train_slad", "train_twostep", "cka", "bench", "report", "toys", "miniature", "predict", "export_onnx")


def doc_commands():
    """(doc, line, script, argv) for every `python X.py ...` or `torchrun ... X.py ...` in README.md and docs/."""
    found = []
    for doc in DOCS:
        text = open(os.path.join(os.path.dirname(__file__), doc)).read().replace("\\\n", " ")
        for line in text.split("\n"):
            for m in re.finditer(r"(?:python|torchrun(?: --\S+ \S+)*) (\w+)\.py((?: [^`#|]*)?)", line):
                argv = [a.replace("$s", "0") for a in shlex.split(m.group(2))]
                found.append((doc, line.strip(), m.group(1), argv))
    return found


def readme_demo_commands():
    """The README's offline demo, as written: its code block's commands, in order."""
    text = open(os.path.join(HERE, "README.md")).read()
    block = text.split("## Offline demo", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_readme_and_docs_commands_parse_with_their_scripts():
    commands = doc_commands()
    assert {c[2] for c in commands} >= {"train_slad", "train_twostep", "cka", "bench", "toys", "miniature", "report"}
    for doc, line, script, argv in commands:
        assert script in SCRIPTS, (doc, line)
        try:
            importlib.import_module(script).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{doc}: `{line}`: {script}.py refuses these flags ({e})")


def test_readme_demo_commands_run_one_after_another(tmp_path, monkeypatch, small_synthetic, capsys):
    """Each command of the README's demo block, as written, in a fresh folder: each gets its own default run
    folder (none refuses another's), and report.py then tables them all."""
    commands = readme_demo_commands()
    assert [c[1] for c in commands] == ["train_slad.py"] + ["train_twostep.py"] * 3 + ["report.py"]
    monkeypatch.chdir(tmp_path)
    for python, script, *argv in commands:
        if script == "report.py":
            text = report.main(argv)
        else:
            run_main(script.removesuffix(".py"), argv, monkeypatch)
    runs = sorted(os.listdir(tmp_path / "out"))
    assert len(runs) == 4 and all(os.path.exists(tmp_path / "out" / r / "results.json") for r in runs)
    for run, name in zip(runs, ("slad-synthetic-toy-b-toy-s-", "twostep-finetune-finetune-synthetic-toy-b-toy-s-",
                                "twostep-lora-lora-synthetic-toy-b-toy-s-",
                                "twostep-probe-finetune-synthetic-toy-b-toy-s-")):
        assert run.startswith(name) and run.endswith("-s0"), (run, name)
    rows = table_rows(text)[0]
    assert {k[2] for k in rows if k[3] == "ours"} == {"SLAD", "Probing", "Fine-tuning", "LoRA"}


def test_default_run_folders_differ_for_every_readme_and_docs_command():
    """Every training command the README and docs/ give, parsed: two commands share a default --out_dir only if
    they compute the same thing."""
    folders = {}
    for doc, line, script, argv in doc_commands():
        if script in ("train_slad", "train_twostep") and "--out_dir" not in argv and "--resume" not in argv:
            args, _ = importlib.import_module(script).parse_args(argv)
            what = flags.config_id(vars(args)), args.seed, script
            folders.setdefault(args.out_dir, set()).add(what)
    assert len(folders) >= 8 and all(len(whats) == 1 for whats in folders.values()), folders
    # the name carries what the README varies, and a hash of the rest
    for argv, part in ((["--teacher_adapt", "probe"], "twostep-probe-finetune-dtd-vitb14-vits14-"),
                       (["--kd", "taid", "--feat", "ted"], "twostep-lora-lora-taid-ted-dtd-vitb14-vits14-")):
        assert train_twostep.parse_args(argv)[0].out_dir.startswith(os.path.join("out", part))
    a, b = (train_slad.parse_args(argv)[0].out_dir for argv in ([], ["--mapping", "last"]))
    assert a != b and a.endswith("-s0") and train_slad.parse_args(["--seed", "1"])[0].out_dir[:-1] == a[:-1]


def test_readme_and_docs_links_and_images_exist():
    here = os.path.dirname(__file__)
    checked = 0
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", open(os.path.join(here, doc)).read()):
            if re.match(r"(https?|mailto):", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(here, os.path.dirname(doc), target.split("#")[0]))
            assert os.path.exists(path), f"{doc}: link to {target}: no such file"
            checked += 1
    assert checked >= 10
    assert len(open(os.path.join(here, "README.md")).read().split("\n")) <= 250


def test_readme_reading_order_gives_each_files_line_count():
    """The README's "Read in this order" box names each file of the reading path with its length: kept true."""
    readme = open(os.path.join(HERE, "README.md")).read()
    box = readme[readme.index("**Read in this order**"):readme.index("## Set up")]
    named = re.findall(r"`(\w+\.py)` \((\d+)", box)
    assert {f for f, _ in named} >= {"train_slad.py", "lora.py", "kd.py", "model.py", "data.py", "evaluation.py",
                                     "train_twostep.py", "run_folder.py", "flags.py", "distributed.py"}
    for f, n in named:
        assert sum(1 for _ in open(os.path.join(HERE, f))) == int(n), f
    path = ("train_slad.py", "lora.py", "kd.py", "model.py", "data.py", "evaluation.py")
    total = sum(sum(1 for _ in open(os.path.join(HERE, f))) for f in path)
    assert f"{total:,} lines" in box and f"| **{total:,}** |" in open(os.path.join(HERE, "docs", "reading.md")).read()


def test_readme_setup_is_what_ci_runs():
    """The README's set-up block, a venv and the two commands, is what .ci/run runs, line for line, so CI tests a new
    user's way in; the CPU-build alternative installs from PyTorch's CPU index before requirements.txt."""
    text = open(os.path.join(HERE, "README.md")).read()
    block = text.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert lines[0].startswith("python3 -m venv .venv") and lines[1:] == ["pip install -r requirements.txt",
                                                                          "pytest test_slad.py"]
    ci = open(os.path.join(HERE, ".ci", "run")).read().splitlines()
    for command in ["python3 -m venv .venv", ". .venv/bin/activate", *lines[1:]]:
        assert command in ci, command
    assert "--index-url https://download.pytorch.org/whl/cpu && pip install -r requirements.txt" in text


def test_readme_own_data_cpu_command_trains_the_toys_on_a_folder(tmp_path, monkeypatch):
    """The README's CPU spelling for your own folder: the toy family at its own size, and it runs as written."""
    text = open(os.path.join(HERE, "README.md")).read().replace("\\\n", " ")
    block = text.split("## Your own data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cpu = [shlex.split(line.split("#")[0]) for line in block.splitlines() if "--device cpu" in line]
    assert len(cpu) == 1 and cpu[0][:2] == ["python", "train_slad.py"]
    argv = cpu[0][2:]
    args, _ = train_slad.parse_args(argv)
    assert (args.teacher, args.student, args.img_size, args.device) == ("toy-b", "toy-s", 56, "cpu")
    data = own_images(tmp_path / "flowers", splits=(("train", 12), ("test", 3)))
    argv[argv.index("--data_dir") + 1] = data
    run_main("train_slad", argv + ["--epochs", "1", "--out_dir", str(tmp_path / "run")], monkeypatch)
    assert results_of(tmp_path / "run")["num_classes"] == 3


def test_config_json_holds_data_dir_outside_the_hash(tmp_path):
    """docs/own-data.md: --data_dir is in config.json, but neither in the config's hash (the run folder) nor in
    what --resume compares, so a moved folder resumes."""
    a, _ = train_slad.parse_args(["--dataset", "synthetic", "--data_dir", str(tmp_path / "a")])
    b, _ = train_slad.parse_args(["--dataset", "synthetic", "--data_dir", str(tmp_path / "b")])
    assert vars(a)["data_dir"] != vars(b)["data_dir"] and a.out_dir == b.out_dir
    assert flags.config_id(vars(a)) == flags.config_id(vars(b))
    assert "data_dir" in flags.RESUMABLE_CHANGES


# -----------------------------------------------------------------------------
# weights.py, data.py: the Hugging Face Hub's copies (timm's and transformers' layouts, safetensors), SAT-493M and
# its pixel statistics


# fixtures/layouts/ was made by make_weight_fixtures.py (its docstring: timm 1.0.31, transformers 5.25.0, torch
# 2.14.1): six tiny random DINOv2 and DINOv3 models built by timm's and transformers' own classes, each saved as its
# library saves it for the Hub (config.json, model.safetensors, float16) with the library's own tokens on one image.
# make_weight_fixtures.py measured max |ours - theirs| 0 for timm's DINOv2 and DINOv3 (with float32 RoPE periods)
# and for transformers' DINOv2, <= 9e-8 for transformers' DINOv3 (its RoPE multiplies by 1 / period).
LAYOUTS = os.path.join(HERE, "fixtures", "layouts")
LAYOUT_TOKENS = torch.load(os.path.join(LAYOUTS, "outputs.pt"), weights_only=True)


def layout_fixture(name, monkeypatch, **overrides):
    """The fixture `name`'s folder, config (as CONFIGS["tiny"]), image and the library's tokens."""
    fix = LAYOUT_TOKENS[name]
    config = replace(ViTConfig(**fix["config"]), **overrides)
    monkeypatch.setitem(CONFIGS, "tiny", config)
    return os.path.join(LAYOUTS, name), config, fix["image"].float() / 255, fix["tokens"]


@pytest.mark.parametrize("name", list(LAYOUT_TOKENS))
def test_weights_of_timm_and_transformers_load_and_give_their_tokens(name, monkeypatch):
    folder, config, x, want = layout_fixture(name, monkeypatch)
    tensors = weights.read_tensors(os.path.join(folder, "model.safetensors"), "tiny", "")
    assert weights.layout_of(tensors) == {"timm": "timm", "hf": "transformers"}[name.split("_")[0]]
    for path in (folder, os.path.join(folder, "model.safetensors")):  # the Hub's folder, or its one file
        vit = from_pretrained("tiny", path=path).eval()  # strict: every tensor used, every key found
        with torch.no_grad():
            assert (vit(x) - want).abs().max() <= 1e-5
    if config.family == "dinov3":  # the periods as the released files hold them, not timm's and HF's float32 ones
        own = ViT(config).rope_embed.periods
        assert torch.equal(vit.rope_embed.periods, own.bfloat16().float()) and not torch.equal(vit.rope_embed.periods,
                                                                                                 own)
        vit.rope_embed.periods.copy_(own)
        with torch.no_grad():
            assert (vit(x) - want).abs().max() <= 1e-5  # theirs: 0 for timm, <= 1e-7 for transformers


@pytest.mark.parametrize("name", list(LAYOUT_TOKENS))
def test_weights_of_timm_and_transformers_are_restored_as_the_official_files_hold_them(name, monkeypatch):
    """What those layouts leave out comes back as the official files have it: the mask token, the qkv bias_mask,
    a zero k bias (masked), DINOv2's CLS position (timm's *_reg4 keep it in cls_token), local_cls_norm."""
    folder, config, _, _ = layout_fixture(name, monkeypatch)
    got = weights.read_weights(folder, ViT(config).state_dict(), "tiny", "")
    own = ViT(config).state_dict()
    assert got.keys() == own.keys() and all(got[k].shape == own[k].shape for k in own)
    D = config.embed_dim
    if name.startswith("timm"):  # timm drops the (unused) mask token; transformers keeps it, (1, 1, D) for DINOv3
        assert torch.equal(got["mask_token"], torch.zeros(1, D))
    if config.family == "dinov3" and config.qkv_bias:
        assert torch.equal(got["blocks.0.attn.qkv.bias_mask"], own["blocks.0.attn.qkv.bias_mask"])
        bias = got["blocks.1.attn.qkv.bias"]
        assert not bias[D:2 * D].any()  # the k rows: masked in the official model, absent from both layouts
        assert bias.any() == (name != "timm_dinov3_noqkvb")  # timm's models without _qkvb: no qkv bias, zeros
    if name == "timm_dinov2":  # no_embed_class: the CLS position is in cls_token, the official pos_embed's row 0 zero
        assert not got["pos_embed"][:, 0].any() and got["pos_embed"][:, 1:].any()
        assert got["blocks.0.mlp.w12.weight"].shape == (2 * 16, D) and "register_tokens" in got
    if name == "hf_dinov3_7b":  # no qkv bias; the unused local_cls_norm as the model initialises it
        assert "blocks.0.attn.qkv.bias" not in got and torch.equal(got["local_cls_norm.weight"], torch.ones(D))
        assert "blocks.0.mlp.w1.weight" in got and "blocks.0.mlp.w2.weight" in got


def test_weights_from_a_hub_cache_repository_sharded_or_as_an_official_safetensors_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    folder, config, x, want = layout_fixture("hf_dinov3", monkeypatch)
    repo = tmp_path / "models--facebook--dinov3-tiny"  # huggingface_hub's cache: refs/main names the snapshot
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(folder, repo / "snapshots" / "0123abcd")
    sharded = tmp_path / "sharded"  # a large model's shards, as save_pretrained writes them
    sharded.mkdir()
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(sharded / file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, part in halves.items() for k in part}}))
    official = tmp_path / "official.safetensors"  # an official state dict saved as safetensors: no conversion
    vit = from_pretrained("tiny", path=str(repo))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(official))
    for path in (repo, sharded, official):
        loaded = from_pretrained("tiny", path=str(path)).eval()
        with torch.no_grad():
            assert (loaded(x) - want).abs().max() <= 1e-5, path
    assert weights.layout_of(load_file(str(official))) == "official"


def test_weights_that_do_not_fit_say_the_first_key_and_what_the_file_looks_like(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    folder, config, _, _ = layout_fixture("timm_dinov3", monkeypatch)
    monkeypatch.setitem(CONFIGS, "wider", replace(config, embed_dim=64, num_heads=4))

    def refusal(name, path):
        with pytest.raises(CheckpointError) as e:
            from_pretrained(name, path=str(path))
        assert "\n" not in str(e.value) and e.value.__cause__ is None
        return str(e.value)
    assert ("cls_token is (1, 1, 32), not (1, 1, 64); it looks like timm's copy of tiny (32 wide, 2 blocks, 2 heads, "
            "swiglu FFN, 4 storage tokens)") in refusal("wider", folder)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edits = {"head": {**tensors, "head.weight": torch.zeros(10, 32)},
             "no norm": {k: v for k, v in tensors.items() if k != "blocks.1.norm2.bias"},
             "alien": {"model.backbone.cls_token": torch.zeros(1, 1, 32)}}
    for edit, state in edits.items():
        save_file(state, str(tmp_path / f"{edit}.safetensors"))
    assert "1 unexpected key(s), the first head.weight; it looks like timm's copy of tiny" in refusal(
        "tiny", tmp_path / "head.safetensors")
    assert "1 key(s) missing, the first blocks.1.norm2.bias; it looks like timm's copy of tiny" in refusal(
        "tiny", tmp_path / "no norm.safetensors")
    assert ("its keys are in none of the official, timm or transformers layouts (the first of 1: "
            "model.backbone.cls_token)") in refusal("tiny", tmp_path / "alien.safetensors")
    folder, _, _, _ = layout_fixture("hf_dinov3", monkeypatch)
    hf = load_file(os.path.join(folder, "model.safetensors"))
    save_file({k: v for k, v in hf.items() if k != "layer.0.attention.q_proj.weight"}, str(tmp_path / "hf.safetensors"))
    assert "2 key(s) missing, the first blocks.0.attn.qkv.weight; it looks like transformers' copy of tiny" in refusal(
        "tiny", tmp_path / "hf.safetensors")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "empty_folder" / "config.json").write_text("{}")
    assert "is a folder with no weights file" in refusal("tiny", tmp_path / "empty_folder")
    assert "it holds config.json" in refusal("tiny", tmp_path / "empty_folder")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(os.path.join(folder, "model.safetensors"), "rb").read()[:3000])
    assert str(cut) in refusal("tiny", cut) and "cannot be read as tensors" in refusal("tiny", cut)


def test_dinov3_sat493m_vitl_loads_under_its_own_name_and_refuses_the_other_weights(tmp_path, monkeypatch):
    assert CONFIGS["dinov3_vitl16_sat493m"] == replace(CONFIGS["dinov3_vitl16"], local_cls_norm=True)
    assert weights.checkpoint_url("dinov3_vitl16_sat493m") == ("https://dl.fbaipublicfiles.com/dinov3/dinov3_vitl16/"
                                                              "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as e:  # gated: where to ask, and the ungated copies
        from_pretrained("dinov3_vitl16_sat493m")
    assert "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth" in str(e.value) and "timm" in str(e.value)
    monkeypatch.setitem(CONFIGS, "dinov3_vitl16", TINY3)  # the real names, tiny models
    monkeypatch.setitem(CONFIGS, "dinov3_vitl16_sat493m", replace(TINY3, local_cls_norm=True))
    sat = randomize_(ViT.from_name("dinov3_vitl16_sat493m"))
    official = tmp_path / "sat.pth"  # a file named as neither: its keys decide
    torch.save(sat.state_dict(), official)
    loaded = from_pretrained("dinov3_vitl16_sat493m", path=str(official))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sat.state_dict().values()))
    with pytest.raises(CheckpointError) as e:  # the message no longer contradicts itself
        from_pretrained("dinov3_vitl16", path=str(official))
    assert "the first local_cls_norm.weight; it looks like dinov3_vitl16_sat493m (32 wide" in str(e.value)
    lvd, sat_file = "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    for file, name, other in ((lvd, "dinov3_vitl16_sat493m", "dinov3_vitl16"),
                              (sat_file, "dinov3_vitl16", "dinov3_vitl16_sat493m")):
        shutil.copy(official, tmp_path / file)
        with pytest.raises(CheckpointError) as e:  # named as the other weights: refused before reading
            from_pretrained(name, path=str(tmp_path / file))
        assert f"load it as {other} (--teacher or --student {other}" in str(e.value) and "\n" not in str(e.value)
    folder, config, x, want = layout_fixture("hf_dinov3", monkeypatch)  # transformers' and timm's drop local_cls_norm
    monkeypatch.setitem(CONFIGS, "dinov3_vitl16_sat493m", replace(config, local_cls_norm=True))
    with torch.no_grad():
        assert (from_pretrained("dinov3_vitl16_sat493m", path=folder).eval()(x) - want).abs().max() <= 1e-5


def test_dinov3_sat493m_statistics_normalise_runs_and_go_into_the_exported_meta():
    sat, imagenet = (data.SAT493M_MEAN, data.SAT493M_STD), (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert sat == ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))  # facebookresearch/dinov3's README
    hub = "~/.cache/huggingface/hub/models--facebook--dinov3-vit7b16-pretrain-sat493m/snapshots/0123abcd"
    assert data.pixel_stats("dinov3_vitl16_sat493m") == sat
    for weights_path in ("dinov3_vit7b16_pretrain_sat493m-a6675841.pth", hub, "vit_7b_patch16_dinov3.sat493m",
                         os.path.join(hub, "model.safetensors")):  # the SAT 7B: the LVD 7B's model, by its file
        assert data.pixel_stats("dinov3_vit7b16", weights_path) == sat, weights_path
    web = "/data/sat493m/dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"  # the file's own name says, not its folder
    for name, weights_path in (("dinov3_vit7b16", None), ("dinov3_vit7b16", web), ("vitb14", None), ("toy-s", None),
                               ("dinov3_vitl16", "model.safetensors")):
        assert data.pixel_stats(name, weights_path) == imagenet, (name, weights_path)
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)  # a black and a white image
    for mean, std in (sat, imagenet):
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        want = ((torch.tensor([0.0, 1.0]).view(2, 1, 1, 1) - m) / s).expand(2, 3, 2, 2)
        assert torch.allclose(normalize(x, (mean, std)), want)
        assert torch.allclose(data.next_batch(iter([(x, torch.zeros(2))]), "cpu", (mean, std))[0], want)
    assert torch.equal(normalize(x), normalize(x, imagenet))  # ImageNet's unless told
    args, _ = train_slad.parse_args(["--dataset", "synthetic", "--teacher", "dinov3_vitl16_sat493m",
                                     "--student", "dinov3_vits16"])
    meta = deploy.deploy_meta(args, ["a", "b"])
    assert (tuple(meta["mean"]), tuple(meta["std"])) == sat
    args, _ = train_twostep.parse_args(["--dataset", "synthetic", "--teacher", "dinov3_vit7b16", "--student",
                                        "dinov3_vitl16", "--teacher_weights",
                                        "dinov3_vit7b16_pretrain_sat493m-a6675841.pth"])  # the SAT 7B, by its file
    assert tuple(deploy.deploy_meta(args, ["a"])["mean"]) == data.SAT493M_MEAN


def test_shared_init_student_rescales_only_the_teacher_blocks_a_student_block_maps_to():
    torch.manual_seed(0)
    plain = add_lora(ViT.from_name("toy-l"), rank=4)  # 6 blocks, 128 wide; toy-s: 3 blocks, 48 wide
    torch.manual_seed(0)
    teacher = add_lora(ViT.from_name("toy-l"), rank=4)
    g = share_lora(ViT.from_name("toy-s"), teacher, "even", init_width=48)
    assert g == [0, 2, 4]
    for j in range(6):
        ratio = teacher.blocks[j].attn.qkv.lora_A / plain.blocks[j].attn.qkv.lora_A
        want = math.sqrt(128 / 48) if j in g else 1.0  # Kaiming's bound for the student's width, where it is shared
        assert torch.allclose(ratio, torch.full_like(ratio, want)), j
    torch.manual_seed(0)  # ViT-B -> ViT-S's identity mapping: every block, as add_lora's init_width would draw it
    drawn = add_lora(ViT.from_name("toy-b"), rank=4, init_width=48)
    torch.manual_seed(0)
    shared = add_lora(ViT.from_name("toy-b"), rank=4)
    share_lora(ViT.from_name("toy-s"), shared, "even", init_width=48)
    assert all(torch.equal(a.attn.qkv.lora_A, b.attn.qkv.lora_A) for a, b in zip(drawn.blocks, shared.blocks))


def test_a_satellite_teacher_is_a_config_of_its_own():
    """The SAT-493M 7B and the web 7B share an architecture and a --teacher name, and --teacher_weights may change
    on a resume: the satellite statistics go into the config, so the two never share a run folder or a resume."""
    argv = ["--dataset", "synthetic", "--teacher", "dinov3_vit7b16", "--student", "dinov3_vitl16", "--device", "cpu"]
    web = train_twostep.parse_args(argv + ["--teacher_weights", "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"])[0]
    sat = train_twostep.parse_args(argv + ["--teacher_weights", "dinov3_vit7b16_pretrain_sat493m-a6675841.pth"])[0]
    assert sat.pretraining == "sat493m" and not hasattr(web, "pretraining")
    assert flags.config_id(vars(web)) == flags.config_id(vars(train_twostep.parse_args(argv)[0]))  # as before
    assert flags.config_id(vars(sat)) != flags.config_id(vars(web)) and sat.out_dir != web.out_dir
