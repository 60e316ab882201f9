"""
The command line of both training scripts: the flags, spelled the same in each (parser), the defaults that depend on
the dataset and the models and what cannot run (resolve_flags, which raises FlagError: Parser.resolve turns it into
one line), and a run's name and identity (config_id, run_name, dataset_name).
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys

import torch

from data import DATASETS
from model import CONFIGS
from own_data import fingerprint
from weights import satellite


# the defaults that depend on the dataset are in its row of data.DATASETS (img_size, batch_size, lr; the crop rounded
# to the models' patch size: default_img_size); the paper's others are each script's HPARAMS; the toy family's,
# chosen on val (docs/miniature.md): a rank that stays low next to toy-s's 48 dimensions, and an encoder LR for
# models that trained for minutes, not for weeks
TOY_DEFAULTS = dict(rank=4, backbone_lr=1e-3)
# flags that may change between a run and its --resume: where things are, not what is computed
RESUMABLE_CHANGES = {"resume", "out_dir", "data_dir", "device", "num_workers", "compile", "log_every",
                     "grad_checkpointing", "grad_accum", "teacher_weights", "student_weights"}
# dense bf16 peaks, FLOP/s, by a substring of torch.cuda.get_device_name(): MFU's denominator


class FlagError(ValueError):
    """Flags that cannot run together, or not on this machine; the message is one line."""


# -----------------------------------------------------------------------------
# flags


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit, instead of argparse's usage block
        sys.exit(f"{self.prog}: error: {message}")

    def resolve(self, args, method, hparams):
        """resolve_flags, its refusal told as this parser's one-line error."""
        try:
            return resolve_flags(args, method, hparams)
        except FlagError as e:
            self.error(str(e))


def _number(cast, ok, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:  # "1.5" for an integer flag is told what it must be
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}" if cast is int else
                                             f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return parse


POSITIVE_INT = _number(int, lambda v: v > 0, "a positive integer")
COUNT = _number(int, lambda v: v >= 0, "0 or more")
POSITIVE = _number(float, lambda v: v > 0 and v < float("inf"), "a positive number")
NON_NEGATIVE = _number(float, lambda v: 0 <= v < float("inf"), "0 or more")


def init_value(text):
    """--init pretrained (the official weights, DINOv2's or DINOv3's) or random, as config.json stores it: pretrained
    as "dinov2", its spelling before DINOv3 (still accepted), so that run names and config IDs stay as they were."""
    if text not in ("pretrained", "dinov2", "random"):
        raise argparse.ArgumentTypeError(f"must be pretrained or random, not {text}")
    return "dinov2" if text == "pretrained" else text


def parser(doc, method, hparams):
    """The flags of both scripts, spelled the same, the paper's values (the script's `hparams`) their defaults; each
    script adds its own."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dtd", choices=list(DATASETS),
                   help="a dataset of data.DATASETS: the paper's, your own folder (folder: classes, folder-seg: images "
                        "and masks; docs/own-data.md) or a procedural one")
    p.add_argument("--data_dir", default="./data",
                   help="where datasets are, or are downloaded to; with --dataset folder or folder-seg, your folder")
    p.add_argument("--teacher", default="vitb14", choices=list(CONFIGS), help="the larger ViT")
    p.add_argument("--student", default="vits14", choices=list(CONFIGS), help="the smaller ViT")
    p.add_argument("--init", default="pretrained", type=init_value, metavar="{pretrained,random}",
                   help="the official weights (DINOv2's, or DINOv3's for a dinov3_* model) or random ones; "
                        "pretrained was spelled dinov2, which still works")
    p.add_argument("--teacher_weights", default=None, metavar="PATH_OR_URL",
                   help="the teacher's weights: the official .pth (a file, or DINOv3's signed URL), a .safetensors "
                        "file or a downloaded model folder in the official, timm or Hugging Face layout "
                        "(docs/weights.md); "
                        "default: torch.hub's cache (checkpoints/), where DINOv2's are downloaded")
    p.add_argument("--student_weights", default=None, metavar="PATH_OR_URL", help="the same for the student")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="30 by default (the paper's)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=None,
                   help="images per optimizer step, split over torchrun's processes (32; cityscapes 8; synthetic 16)")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="peak learning rate of the heads and LoRA adapters (1e-3; 3e-3 for synthetic)")
    p.add_argument("--weight_decay", type=NON_NEGATIVE, default=hparams["weight_decay"],
                   help="AdamW decay on matrices (not biases, norms)")
    p.add_argument("--img_size", type=POSITIVE_INT, default=None,
                   help="crop side, a multiple of the patch size (14; DINOv3 16): 518 for classification (DINOv3 512), "
                        "560 for cityscapes (the sliding window too), 56 for synthetic (DINOv3 64), 112 for "
                        "synthetic-seg")
    p.add_argument("--rank", type=POSITIVE_INT, default=None,
                   help="LoRA rank (paper: 16; 4 for the toy family, 8 %% of toy-s's width as 16 is 4 %% of ViT-S's)")
    p.add_argument("--qkv_adapters", default="fused", choices=["fused", "separate"],
                   help="LoRA on the fused qkv matrix: fused, one rank-r adapter for q, k and v (one A); separate, "
                        "one each (three A's), as LoRA on separate q, k, v layers (Hugging Face + PEFT) "
                        "(paper: silent)")
    p.add_argument("--temperature", type=POSITIVE, default=hparams["temperature"],
                   help="distillation temperature T (paper: 2)")
    p.add_argument("--kd", default="kl", choices=["kl", "taid"],
                   help="the distillation term: kl, the T^2 KL of eq. 2 / eq. 4 (paper); taid, TAID's KL towards an "
                        "interpolated target whose t rises to 1 (kd.TAID), at the same T")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype; bfloat16 on GPUs that have it, else float16 with a GradScaler; float32 on "
                        "the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher and the student")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute each block in the backward pass: less memory (ViT-L/g at 518), ~1/3 more compute")
    p.add_argument("--grad_accum", type=POSITIVE_INT, default=1, metavar="N",
                   help="split each step's batch into N micro-batches whose gradients add up: the same step in less "
                        "memory (--batch_size stays the step's batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=None,
                   help=f"default out/{method}[-...]-DATASET-TEACHER-STUDENT-ID-sSEED, ID a hash of the config")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue the run of a ckpt.pt this script wrote, in that checkpoint's folder")
    p.add_argument("--num_workers", type=COUNT, default=None,
                   help="data loading processes per GPU process (default: the CPUs shared out, at most 16; 0 on CPU)")
    p.add_argument("--log_every", type=POSITIVE_INT, default=10, help="steps between progress lines")
    return p


def resolve_flags(args, method, hparams):
    """Fill in the defaults that depend on the dataset, the models and the machine (else the paper's: `hparams`), and
    refuse what cannot run: FlagError, one line."""
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    toys = args.teacher.startswith("toy") and args.student.startswith("toy")
    source = DATASETS[args.dataset]
    t, s = CONFIGS[args.teacher], CONFIGS[args.student]
    patch = math.lcm(t.patch_size, s.patch_size)  # both models see the same crops
    if args.img_size is None:
        args.img_size = default_img_size(args.dataset, patch)
    dataset_defaults = dict(batch_size=source.batch_size, lr=source.lr)
    for k, v in {**dataset_defaults, **hparams, **(TOY_DEFAULTS if toys else {})}.items():
        if getattr(args, k, v) is None:  # unset; a flag this script does not have is skipped
            setattr(args, k, v)
    if source.own:  # your folder: its files, not where it is (--data_dir may move), make it this config's data
        args.data_fingerprint = fingerprint(args.data_dir)
    if satellite(args.teacher, args.teacher_weights):  # its images' mean and std: another config (data.pixel_stats)
        args.pretraining = "sat493m"
    if args.img_size % patch:
        raise FlagError(f"--img_size {args.img_size} is not a multiple of the patch size {patch} "
                        f"(e.g. {args.img_size // patch * patch or patch})")
    if s.embed_dim > t.embed_dim or s.depth > t.depth:
        raise FlagError(f"the student {args.student} ({s.embed_dim} wide, {s.depth} blocks) is wider or deeper than "
                        f"its teacher {args.teacher} ({t.embed_dim} wide, {t.depth} blocks)")
    if method == "slad" and t.family != s.family:  # the paper's setting: two sizes of one foundation model
        raise FlagError(f"SLAD shares adapters within one family: {args.teacher} is {t.family}, {args.student} "
                        f"{s.family} (train_twostep.py distils across families)")
    if method == "slad" and t.embed_dim // t.num_heads != s.embed_dim // s.num_heads:  # DINOv3's 7B: 128
        raise FlagError(f"SLAD slices the teacher's adapters head by head (Fig. 4): {args.teacher}'s heads are "
                        f"{t.embed_dim // t.num_heads} wide, {args.student}'s {s.embed_dim // s.num_heads}")
    same_tokens = (t.patch_size, t.num_register_tokens) == (s.patch_size, s.num_register_tokens)
    if getattr(args, "feat", "none") == "ted" and not same_tokens:
        raise FlagError(f"--feat ted compares the tokens of teacher and student one by one: {args.teacher} and "
                        f"{args.student} differ in patch size or registers")
    lora_models = [name for name, how in ((args.student, getattr(args, "student_adapt", "lora")),
                                          (args.teacher, getattr(args, "teacher_adapt", "lora"))) if how == "lora"]
    for name in lora_models:  # A is rank x width: a rank past the width adds nothing but cost
        if args.rank > CONFIGS[name].embed_dim:
            raise FlagError(f"--rank {args.rank} is more than {name}'s width {CONFIGS[name].embed_dim}: a LoRA rank "
                            f"is at most the width of the matrix it adapts")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise FlagError(f"--device {args.device}: these scripts run on cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise FlagError(f"--device {args.device}, but torch sees no CUDA device here (use --device cpu)")
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        raise FlagError(f"--device {args.device}, but torch sees {torch.cuda.device_count()} CUDA device(s) here")
    if args.batch_size % (world * args.grad_accum):
        raise FlagError(f"--batch_size {args.batch_size} does not split over {world} process(es) x --grad_accum "
                        f"{args.grad_accum} micro-batches")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if args.num_workers is None:  # a 518-px image costs ~11 ms of a CPU core to decode, resize and jitter
        args.num_workers = min(16, max(1, (os.cpu_count() or 1) // world)) if args.device.startswith("cuda") else 0
    if args.resume and not args.out_dir:  # a resume continues in its checkpoint's folder (load_checkpoint)
        args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    args.out_dir = args.out_dir or os.path.join("out", run_name(vars(args), method))
    return args


def steps_per_epoch(train_loader, args, n_train):
    """The optimizer steps an epoch, the same on every process; FlagError if --batch_size leaves none."""
    steps = len(train_loader) // args.grad_accum
    if steps == 0:
        raise FlagError(f"--batch_size {args.batch_size} is more than the {n_train} training image"
                        f"{'s' * (n_train != 1)}: no step to take")
    return steps


def default_img_size(dataset, patch_size):
    """The dataset's default crop rounded to the nearest multiple of the patch size: 518 and 560 stay for
    DINOv2's 14; DINOv3's 16 gives 512 (the paper's crop exactly) and 560; 112 across the two families."""
    return max(1, round(DATASETS[dataset].img_size / patch_size)) * patch_size


def config_id(config):
    """Six hex digits that differ for configs that compute different things: a hash of every resolved flag but
    the seed and those that only say where or how fast (RESUMABLE_CHANGES). Seeds of one config share it."""
    what = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES | {"seed"}}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:6]


def run_name(config, method):
    """The default run folder's name: the method and what the README varies, readable, then config_id, so that
    runs of different configs never share a folder: e.g. twostep-probe-finetune-dtd-vitb14-vits14-1a2b3c-s0, or
    slad-folder-flowers-vitb14-vits14-4d5e6f-s0 for your folder ./flowers (config_id holds its fingerprint)."""
    parts = [method]
    if method == "twostep":
        parts += [config["teacher_adapt"], config["student_adapt"]]
    parts += [k for k in (config["kd"], config.get("feat", "none")) if k not in ("kl", "none")]
    parts += [dataset_name(config), config["teacher"], config["student"], config_id(config), f"s{config['seed']}"]
    return "-".join(parts)


def dataset_name(config):
    """The dataset flag, and for your own folder its name too (folder-flowers), as run names and the log say it."""
    if not DATASETS[config["dataset"]].own:
        return config["dataset"]
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.basename(os.path.abspath(config["data_dir"]))).strip("_.")
    return f"{config['dataset']}-{name or 'data'}"

