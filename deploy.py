"""
A deployable model: what a training script exports (student.pt, teacher.pt) and what predict.py and export_onnx.py
read -- the ViT with its adapters merged into the official DINOv2 or DINOv3 layout, its config, its head, and what
prediction needs (deploy_meta: the task, the class names, the image size it trained at, the preprocessing).

    model = load_model("out/RUN/student.pt")   # a Classifier or Segmenter in eval mode, its meta in model.meta
"""

import os
from dataclasses import asdict

import torch
import torch.nn as nn

from data import DATASETS, RESIZE_RATIO, SEG_BASE_RATIO, pixel_stats
from flags import FlagError, dataset_name
from lora import merge_lora
from model import Classifier, Segmenter, ViT, ViTConfig
from run_folder import atomic_write
from weights import CheckpointError

# -----------------------------------------------------------------------------
# the file: the backbone in the official layout, its config, the head and what prediction needs


def save_model(path, model, **extra):
    """A deployable Classifier or Segmenter: its backbone's official-layout state dict and config, its head, and
    model.meta if it has one (what prediction needs: the task, class names, the image size it trained at, the
    preprocessing; deploy_meta)."""
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


# -----------------------------------------------------------------------------
# what a training script exports: the trained model, its adapters merged, and what prediction needs


def deploy_meta(args, classes):
    """What prediction needs, saved with the exported models (load_model gives it back as model.meta): the
    task, the class names in label order, and the preprocessing it was evaluated with at the size it trained at
    (the ViT config's img_size is the grid its position embeddings were pretrained on, not this); its mean and std
    are the run's, its teacher's pretraining's (data.pixel_stats)."""
    segmentation = DATASETS[args.dataset].task == "segmentation"
    mean, std = pixel_stats(args.teacher, args.teacher_weights)
    resize = round(args.img_size * (SEG_BASE_RATIO if segmentation else RESIZE_RATIO))
    crop = (f"windows of {args.img_size} px, stride {args.img_size // 2}" if segmentation
            else f"center-crop {args.img_size} px")
    how = (f"turn upright as its EXIF orientation says, resize the short side to {resize} px (bilinear, "
           f"antialiased), then {crop}")
    return {"task": "segmentation" if segmentation else "classification", "classes": list(classes),
            "img_size": args.img_size, "resize": resize, "preprocess": how, "mean": list(mean),
            "std": list(std), "input": "RGB, (pixel / 255 - mean) / std, (batch, 3, height, width)",
            "orientation": "EXIF orientation applied first (PIL.ImageOps.exif_transpose): the image as shown",
            "interpolation": "bilinear, antialiased (PIL's Image.resize, as torchvision resizes a PIL image)",
            "dataset": dataset_name(vars(args))}


def export(path, model, meta):
    """A Classifier or Segmenter with its adapters merged into the official DINOv2 or DINOv3 layout and `meta`
    (deploy_meta) beside it (load_model reads it), written atomically."""
    merged = type(model)(merge_lora(model.vit), model.num_classes)
    merged.head.load_state_dict(model.head.state_dict())
    merged.meta = meta
    atomic_write(path, lambda tmp: save_model(tmp, merged))


def export_models(args, models, classes):
    """A run's student.pt and teacher.pt in --out_dir (export), with what prediction needs (deploy_meta), written by
    the first process."""
    if int(os.environ.get("RANK", 0)) > 0:
        return
    meta = deploy_meta(args, classes)
    for name in ("student", "teacher"):
        export(os.path.join(args.out_dir, f"{name}.pt"), models[name], meta)


# -----------------------------------------------------------------------------
# what predict.py and export_onnx.py do with a loaded model: the image size it takes, fixed for a graph


def input_size(model, path, img_size):
    """The side of the images `model` (read from `path`) takes: `img_size` (--img_size) if given, else the size it
    trained at (model.meta); FlagError, one line, if neither says one or it is not a multiple of the patch size."""
    img_size = img_size or model.meta.get("img_size")
    if not img_size:
        raise FlagError(f"{path} does not say the image size it trained at (written before that was saved): give "
                        f"--img_size, the run's (its config.json)")
    if img_size % model.vit.config.patch_size:
        raise FlagError(f"--img_size {img_size} is not a multiple of the model's patch size "
                        f"{model.vit.config.patch_size}")
    return img_size


def fix_size(vit, img_size):
    """The ViT made for img_size x img_size inputs alone: its position embeddings resampled now, once, as its
    forward pass would (ViT.interpolate_pos_embed), so that an exporter's graph reads them as they are. DINOv3 has
    none."""
    if vit.config.family == "dinov3":  # RoPE: nothing stored per grid, the graph computes it at the fixed size
        return
    grid = img_size // vit.config.patch_size
    with torch.no_grad():
        vit.pos_embed = nn.Parameter(vit.interpolate_pos_embed(grid, grid).detach())
    vit.grid = grid  # interpolate_pos_embed returns pos_embed as is at this grid
