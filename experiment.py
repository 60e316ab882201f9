"""
The plain functions the two training scripts share, by job:

    flags            parser, resolve_flags    the flags of both scripts, their per-dataset and per-model defaults,
                                              what cannot run refused in one line; config_id, run_name
    torchrun         ddp_init, ddp, ...       DDP, a download on the first process first (rank0_first), gradient
                                              accumulation (sync_gradients), a mean over processes for the log
    the run folder   claim_out_dir, print0    one run a folder (lock), what a fresh run or a resume may find in it;
                                              the log, and files written whole or not at all (atomic_write);
                                              Ctrl-C told in one line (interrupted)
    the step         adamw, peak_flops        AdamW's decay groups, MFU's denominator, a loss that is not finite
    evaluation       evaluate, per_class      accuracy, sliding-window mIoU, confusion matrices, per-class figures
    checkpoints      save_checkpoint, ...     what --resume continues exactly (the trained tensors, RNG states;
                                              load_checkpoint checks the config); the exported models: deploy.py

Each script owns the method: its loop, AMP, the LR schedule, the loss, the log line and what it saves.
"""

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time

try:
    import fcntl  # the run folder's lock (Linux, macOS)
except ImportError:  # Windows: no lock, one run per folder is then up to the user
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DATASETS, normalize
from images import IGNORE
from model import CONFIGS, ViT, slide_inference
from own_data import fingerprint

# the defaults that depend on the dataset are in its row of data.DATASETS (img_size, batch_size, lr; the crop rounded
# to the models' patch size: default_img_size); those that
# depend on the models: DINOv2's (the paper's rank; Marrie et al.'s encoder LR for a fully trained
# student), and the toy family's, chosen on val (docs/miniature.md): a rank that stays low next to toy-s's 48
# dimensions, and an encoder LR for models that trained for minutes, not for weeks
REAL_MODEL_DEFAULTS = dict(rank=16, backbone_lr=2e-5)
TOY_DEFAULTS = dict(rank=4, backbone_lr=1e-3)
# flags that may change between a run and its --resume: where things are, not what is computed
RESUMABLE_CHANGES = {"resume", "out_dir", "data_dir", "device", "num_workers", "compile", "log_every",
                     "grad_checkpointing", "grad_accum", "teacher_weights", "student_weights"}
# dense bf16 peaks, FLOP/s, by a substring of torch.cuda.get_device_name(): MFU's denominator
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10": 125e12, "V100": 125e12, "4090": 165e12}


# -----------------------------------------------------------------------------
# flags


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit, instead of argparse's usage block
        sys.exit(f"{self.prog}: error: {message}")


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


def parser(doc, method):
    """The flags of both scripts, spelled the same; each script adds its own."""
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
                   help="the teacher's official .pth, a file or a URL (DINOv3's are gated: its signed URL); default: "
                        "torch.hub's cache (checkpoints/), where DINOv2's are downloaded")
    p.add_argument("--student_weights", default=None, metavar="PATH_OR_URL", help="the same for the student")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="30 by default (the paper's)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=None,
                   help="images per optimizer step, split over torchrun's processes (32; cityscapes 8; synthetic 16)")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="peak learning rate of the heads and LoRA adapters (1e-3; 3e-3 for synthetic)")
    p.add_argument("--weight_decay", type=NON_NEGATIVE, default=0.05,
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
    p.add_argument("--temperature", type=POSITIVE, default=2.0, help="distillation temperature T (paper: 2)")
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


def resolve_flags(args, p, method):
    """Fill in the defaults that depend on the dataset and the machine, and refuse what cannot run (one line)."""
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    toys = args.teacher.startswith("toy") and args.student.startswith("toy")
    source = DATASETS[args.dataset]
    t, s = CONFIGS[args.teacher], CONFIGS[args.student]
    patch = math.lcm(t.patch_size, s.patch_size)  # both models see the same crops
    if args.img_size is None:
        args.img_size = default_img_size(args.dataset, patch)
    dataset_defaults = dict(batch_size=source.batch_size, lr=source.lr)
    for k, v in {**dataset_defaults, **(TOY_DEFAULTS if toys else REAL_MODEL_DEFAULTS)}.items():
        if getattr(args, k, v) is None:  # unset; a flag this script does not have is skipped
            setattr(args, k, v)
    if source.own:  # your folder: its files, not where it is (--data_dir may move), make it this config's data
        args.data_fingerprint = fingerprint(args.data_dir)
    if args.img_size % patch:
        p.error(f"--img_size {args.img_size} is not a multiple of the patch size {patch} "
                f"(e.g. {args.img_size // patch * patch or patch})")
    if s.embed_dim > t.embed_dim or s.depth > t.depth:
        p.error(f"the student {args.student} ({s.embed_dim} wide, {s.depth} blocks) is wider or deeper than "
                f"its teacher {args.teacher} ({t.embed_dim} wide, {t.depth} blocks)")
    if method == "slad" and t.family != s.family:  # the paper's setting: two sizes of one foundation model
        p.error(f"SLAD shares adapters within one family: {args.teacher} is {t.family}, {args.student} {s.family} "
                f"(train_twostep.py distils across families)")
    if method == "slad" and t.embed_dim // t.num_heads != s.embed_dim // s.num_heads:  # DINOv3's 7B: 128
        p.error(f"SLAD slices the teacher's adapters head by head (Fig. 4): {args.teacher}'s heads are "
                f"{t.embed_dim // t.num_heads} wide, {args.student}'s {s.embed_dim // s.num_heads}")
    same_tokens = (t.patch_size, t.num_register_tokens) == (s.patch_size, s.num_register_tokens)
    if getattr(args, "feat", "none") == "ted" and not same_tokens:
        p.error(f"--feat ted compares the tokens of teacher and student one by one: {args.teacher} and {args.student} "
                f"differ in patch size or registers")
    lora_models = [name for name, how in ((args.student, getattr(args, "student_adapt", "lora")),
                                          (args.teacher, getattr(args, "teacher_adapt", "lora"))) if how == "lora"]
    for name in lora_models:  # A is rank x width: a rank past the width adds nothing but cost
        if args.rank > CONFIGS[name].embed_dim:
            p.error(f"--rank {args.rank} is more than {name}'s width {CONFIGS[name].embed_dim}: a LoRA rank is at "
                    f"most the width of the matrix it adapts")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device {args.device}: these scripts run on cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but torch sees no CUDA device here (use --device cpu)")
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        p.error(f"--device {args.device}, but torch sees {torch.cuda.device_count()} CUDA device(s) here")
    if args.batch_size % (world * args.grad_accum):
        p.error(f"--batch_size {args.batch_size} does not split over {world} process(es) x --grad_accum "
                f"{args.grad_accum} micro-batches")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if args.num_workers is None:  # a 518-px image costs ~11 ms of a CPU core to decode, resize and jitter
        args.num_workers = min(16, max(1, (os.cpu_count() or 1) // world)) if args.device.startswith("cuda") else 0
    if args.resume and not args.out_dir:  # a resume continues in its checkpoint's folder (load_checkpoint)
        args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    args.out_dir = args.out_dir or os.path.join("out", run_name(vars(args), method))
    return args


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


# -----------------------------------------------------------------------------
# torchrun


def ddp_init(device):
    """(rank, world size, device) of this process: under torchrun one process a GPU (gloo on CPUs), each
    with its share of every global batch, as nanoGPT; (0, 1, device) otherwise."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


@contextlib.contextmanager
def rank0_first():
    """Run the block on the first process, then on the others: a download (data, weights) happens once, and
    the others find it done."""
    if dist.is_initialized() and dist.get_rank() > 0:
        dist.barrier()
    yield
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()


def ddp(module, device):
    """`module` as each training step calls it: under torchrun, in DistributedDataParallel, which averages its
    gradients over the processes, its BatchNorm (the segmentation head's) made SyncBatchNorm so that it normalises
    over the global batch -- on GPUs: torch's SyncBatchNorm has no CPU kernel, so on gloo each process keeps its own.
    Alone, `module` itself."""
    if not dist.is_initialized():
        return module
    if device.startswith("cuda"):
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place below the top: the same Parameters
    return DDP(module, device_ids=[device] if device.startswith("cuda") else None)


def sync_gradients(module, now):
    """--grad_accum: let DDP average gradients only on a step's last micro-batch (nanoGPT's
    require_backward_grad_sync); the others add up locally. No-op without DDP."""
    if isinstance(module, DDP):
        module.require_backward_grad_sync = now


def ddp_mean(x, device):
    """A number summed on this process, averaged over torchrun's processes (a host sync: for log lines)."""
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def ddp_end():
    """The end of a torchrun run: each process waits for the others, then leaves the process group. The pause
    between lets gloo's worker threads free the last collective's tensors, which takes the GIL: torch before 2.8
    frees a gloo group (here, with the DDP reducer that holds it, as the script returns) while holding the GIL
    and waits for those threads (pytorch/pytorch#154976), which hung a process at exit now and then (seen on
    torch 2.4, about one run in three under load)."""
    dist.barrier()
    time.sleep(0.2)  # releases the GIL: the worker threads finish, then wait idle for the group's end
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the run folder: one run a folder, its log, files written whole


class RunError(RuntimeError):
    """A run that cannot go on: its folder is taken, or a file cannot be written. The message is one line."""


LOCKS = {}  # folder -> this process's lock on it


def lock(out_dir):
    """Hold out_dir/run.lock for as long as this process lives: a second run into the folder is refused while
    this one runs. The OS lets go of the lock when the process ends, however it ends, so none is ever stale; a
    process that starts another run in the folder (a test, a notebook) lets go of its own first."""
    path = os.path.realpath(os.path.join(out_dir, "run.lock"))
    if path in LOCKS:
        LOCKS.pop(path).close()
    f = open(path, "a+")
    if fcntl is None:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RunError(f"another run (process {f.read().strip() or '?'}) is writing to {out_dir}: wait for it to end, "
                       f"or choose another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    LOCKS[path] = f
    return f


RUN_FILES = ("config.json", "log.txt", "metrics.jsonl", "ckpt.pt.tmp")  # what a run writes before its first checkpoint


def claim_out_dir(args, config, ckpt, p):
    """On the first process: make --out_dir this run's and only this run's, then write config.json. Returns the
    lock (keep it). A fresh run refuses a folder that holds another run's checkpoint or results; a folder left by
    a run that stopped before its first checkpoint (its config.json, no ckpt.pt) is started again if it was this
    config, and refused with what to delete if not. A resume drops what the killed run wrote after its checkpoint
    (drop_after_checkpoint)."""
    if int(os.environ.get("RANK", 0)) > 0:
        return None
    out = args.out_dir
    in_the_way = file_in_path(out)  # makedirs would only say "Not a directory" or "File exists" of the whole path
    if in_the_way == os.path.normpath(out):
        p.error(f"--out_dir {out} is a file, not a folder: choose another --out_dir")
    if in_the_way:
        p.error(f"--out_dir {out}: {in_the_way} is a file, not a folder: choose another --out_dir")
    try:
        os.makedirs(out, exist_ok=True)
        held = lock(out)
    except OSError as e:
        p.error(f"cannot write to --out_dir {out}: {e.strerror or e}: choose another --out_dir")
    has = lambda f: os.path.exists(os.path.join(out, f))
    if ckpt is not None:
        drop_after_checkpoint(out, ckpt)
        return held
    if has("results.json"):
        p.error(f"{out} already holds a run, finished (its results.json is there): choose another --out_dir, or delete "
                f"that folder to run it again")
    if has("ckpt.pt"):
        p.error(f"{out} already holds a run: continue it with --resume {os.path.join(out, 'ckpt.pt')}, or choose "
                f"another --out_dir")
    if has("config.json"):  # a run that stopped in its first epoch (a kill, a bad image, a full disk)
        try:
            before = json.load(open(os.path.join(out, "config.json")))
        except (OSError, ValueError):
            before = None
        same = isinstance(before, dict) and config_id(before) == config_id(config)
        if not same or before.get("seed") != config["seed"]:
            p.error(f"{out} holds a run of another config that stopped before its first checkpoint: delete that "
                    f"folder (rm -r {out}) or choose another --out_dir")
        for f in RUN_FILES:
            if has(f):
                os.remove(os.path.join(out, f))
        print(f"{out}: starting again the run that stopped before its first checkpoint", flush=True)
    write_json(os.path.join(out, "config.json"), config)
    return held


def file_in_path(path):
    """The first part of path (a of a/b/c, or path itself) that exists but is not a folder; None if there is none."""
    parts = os.path.normpath(path).split(os.sep)
    for k in range(1, len(parts) + 1):
        head = os.sep.join(parts[:k]) or os.sep
        if not os.path.exists(head):
            return None
        if not os.path.isdir(head):
            return head
    return None


def drop_after_checkpoint(out_dir, ckpt):
    """A resume's folder as it was at its checkpoint: the partial checkpoint of the epoch the kill interrupted and
    metrics.jsonl's rows past the checkpoint's (history["metrics_rows"]) go."""
    path = lambda f: os.path.join(out_dir, f)
    if os.path.exists(path("ckpt.pt.tmp")):
        os.remove(path("ckpt.pt.tmp"))
    keep = ckpt["history"]["metrics_rows"]
    lines = open(path("metrics.jsonl")).readlines() if os.path.exists(path("metrics.jsonl")) else []
    if len(lines) > keep:
        atomic_write(path("metrics.jsonl"), lambda tmp: write_text(tmp, "".join(lines[:keep])))


def interrupted(args):
    """Ctrl-C in a training script: in place of KeyboardInterrupt's traceback, one line that says what the run
    folder keeps and the command that continues, and exit status 130 (a shell's for Ctrl-C). A file caught
    mid-write (NAME.tmp) goes, and so does the folder's lock."""
    if int(os.environ.get("RANK", 0)) > 0:  # torchrun's first process speaks for all
        sys.exit(130)
    world = int(os.environ.get("WORLD_SIZE", 1))
    launch = ["python"] if world == 1 else ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"]
    flags = sys.argv[1:]
    resume_at = {i + 1 for i, a in enumerate(flags) if a == "--resume"}  # the flag and its value are replaced
    flags = [a for i, a in enumerate(flags) if not (a == "--resume" or a.startswith("--resume=") or i in resume_at)]
    out, lock_path = args.out_dir, os.path.realpath(os.path.join(args.out_dir, "run.lock"))
    ckpt = os.path.join(os.path.dirname(args.resume) if args.resume else out, "ckpt.pt")
    if lock_path not in LOCKS:  # stopped before it claimed the folder (claim_out_dir): it wrote nothing
        print(f"interrupted before the run wrote anything: run the same command again: "
              f"{shlex.join(launch + sys.argv)}", file=sys.stderr)
        sys.exit(130)
    for f in os.listdir(out):
        if f.endswith(".tmp"):
            os.remove(os.path.join(out, f))
    LOCKS.pop(lock_path).close()
    if os.path.exists(os.path.join(out, "results.json")):
        line = f"interrupted after the run finished: its results are in {os.path.join(out, 'results.json')}"
    elif os.path.exists(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)  # mmap: reads only what it uses
        line = (f"interrupted: {ckpt} keeps {state['stage']} epoch {state['epoch']}; continue with: "
                f"{shlex.join(launch + [sys.argv[0], *flags, '--resume', ckpt])}")
    else:
        line = (f"interrupted before the first checkpoint, so nothing is kept: run the same command again: "
                f"{shlex.join(launch + sys.argv)}")
    print(line, file=sys.stderr)
    sys.exit(130)


def print0(msg, out_dir):
    """Print and append to out_dir/log.txt, on the first process only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)
        append_line(os.path.join(out_dir, "log.txt"), msg)


def append_line(path, line):
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}{free_space(path)}") from None


def free_space(path):
    try:
        return f" ({shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.0f} MB free there)"
    except OSError:
        return ""


def atomic_write(path, write, then="then continue with --resume if a ckpt.pt was written"):
    """write(temporary path), then rename it to `path`: a kill or a full disk mid-write leaves the previous file
    whole and no partial one. A failed write is one line that names the file and, in `then`, the caller's way on
    (a training run's by default)."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        else:  # e.g. "[enforce fail at inline_container.cc:626] . unexpected pos 835200 vs 835088"
            first = str(e).strip().splitlines()[0]
            reason = re.sub(r"^\[enforce fail at [^]]*\][ .]*", "", first)[:120] + " (a full disk?)"
        raise RunError(f"cannot write {path}: {reason}{free_space(path)}; free space or fix the folder's permissions, "
                       f"{then}") from None
    except KeyboardInterrupt:  # Ctrl-C mid-write: no partial file left behind either
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def write_json(path, obj):
    atomic_write(path, lambda tmp: write_text(tmp, json.dumps(obj, indent=2)))


def write_confusion(path, confusion, classes):
    """A confusion matrix as CSV, written atomically: a row a label, a column a prediction, class names first."""
    counts = torch.as_tensor(confusion).tolist()
    rows = [["label \\ prediction", *classes]] + [[c, *row] for c, row in zip(classes, counts)]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    atomic_write(path, lambda tmp: write_text(tmp, text.getvalue()))


def hms(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# the step: AdamW's groups, MFU's peak, a loss that is not finite


def adamw(groups, weight_decay, device):
    """AdamW over groups of (named parameters, peak lr): matrices decay; biases, norms, LayerScale and the ViT's
    learned tokens and position embeddings (ViT.NO_WEIGHT_DECAY, as timm and DINOv2) do not. Each group keeps
    its peak as "peak_lr", which the scripts' get_lr scales."""
    param_groups = []
    for named, lr in groups:
        for decay in (True, False):
            ps = [p for n, p in named if (p.ndim >= 2 and n.rsplit(".", 1)[-1] not in ViT.NO_WEIGHT_DECAY) == decay]
            if ps:
                param_groups.append(dict(params=ps, lr=lr, peak_lr=lr, weight_decay=weight_decay if decay else 0.0))
    return torch.optim.AdamW(param_groups, fused=device.startswith("cuda"))


def peak_flops(device):
    """The device's dense bf16 peak in FLOP/s, None where none is known (a CPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def stop_if_not_finite(first_bad, steps, stage, out_dir):
    """Exit with one line if a step's loss was not finite: first_bad is the first such step's index into the
    stage (a device tensor, 2**62 if none), so the check costs a host sync only where it is called."""
    if dist.is_initialized():
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    it = int(first_bad)
    if it < 2**62:
        epoch, ckpt = it // steps + 1, os.path.join(out_dir, "ckpt.pt")
        where = f"error: the loss is not finite at {stage} epoch {epoch} step {it % steps + 1}: the run stops"
        retry = "a lower --lr (or --dtype float32 after bfloat16)"
        if not os.path.exists(ckpt):  # a checkpoint is written when an epoch ends
            sys.exit(f"{where} before its first checkpoint, so nothing is kept: run again with {retry}")
        kept = f"{stage} epoch {epoch - 1}" if epoch > 1 else "the end of the stage before"  # twostep's teacher
        sys.exit(f"{where}; {ckpt} keeps {kept}, but a --resume would take the same steps (its flags are fixed): "
                 f"start a new run with {retry}, in another --out_dir")


# -----------------------------------------------------------------------------
# evaluation


def same_size_batches(loader):
    """The loader's batches, those of images of different sizes (lists, data.keep_sizes) cut into batches of one."""
    for x, y in loader:
        if isinstance(x, list):  # photos, portrait and landscape: each predicted at its own size
            yield from ((xi[None], yi[None]) for xi, yi in zip(x, y))
        else:
            yield x, y


@torch.no_grad()
def evaluate(models, loader, device, autocast, window=None):
    """{name: {"acc": %, "miou": % for segmentation, "confusion": (n, n) counts}} of each model in {name: model} on
    loader, in one pass over the data. Accuracy is top-1, or per pixel; with a `window` (segmentation) each image
    is predicted by a sliding window of that side and stride window // 2 (App. C.2), and mIoU is counted at the
    labels' resolution, whatever each image's size. The confusion matrix counts images (pixels) by label (row) and
    prediction (column)."""
    for m in models.values():
        m.eval()
    n = next(iter(models.values())).num_classes
    hits = {k: torch.zeros((), device=device, dtype=torch.long) for k in models}
    confusion = {k: torch.zeros(n, n, device=device, dtype=torch.long) for k in models}
    total = torch.zeros((), device=device, dtype=torch.long)
    for x, y in same_size_batches(loader):  # each process evaluates its share of the split
        x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        valid = y != IGNORE if window else torch.ones_like(y, dtype=torch.bool)  # an image's label 255 is a class
        total += valid.sum()
        with autocast:
            for k, m in models.items():
                if window:
                    logits = slide_inference(m, x, window, window // 2)
                    pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
                else:
                    pred = m(x).argmax(-1)
                pairs = y * n + pred  # label, prediction; a classifier's are all valid: no boolean indexing, no sync
                confusion[k] += torch.bincount(pairs[valid] if window else pairs, minlength=n * n).view(n, n)
                hits[k] += ((pred == y) & valid).sum()
    if dist.is_initialized():
        for t in [total, *hits.values(), *confusion.values()]:
            dist.all_reduce(t)
    total = max(int(total), 1)
    return {k: {"acc": 100.0 * hits[k].item() / total, **({"miou": miou(confusion[k])} if window else {}),
                "confusion": confusion[k].cpu()} for k in models}


def miou(confusion):
    """Mean intersection over union (%) from a confusion matrix (rows: label, columns: prediction), over the
    classes that occur in the labels or the predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return 100.0 * (tp[union > 0] / union[union > 0]).mean().item()


def flat(metrics, prefix=""):
    """{"teacher": {"acc": a, "miou": m, "confusion": C}} -> {prefix + "teacher_acc": a, prefix + "teacher_miou": m}:
    the numbers of a log line or results.json."""
    return {f"{prefix}{name}_{k}": v for name, ms in metrics.items() for k, v in ms.items() if k != "confusion"}


def per_class(classes, confusions, segmentation):
    """results.json's per-class figures from {model: confusion matrix} (rows: label, columns: prediction): each
    class's accuracy (the share of its test images predicted right) or, for segmentation, its IoU, in %; None
    where a class is absent (no test image; for IoU, neither labelled nor predicted)."""
    figures = {}
    for name, c in confusions.items():
        c = torch.as_tensor(c).double()
        tp, count = c.diag(), c.sum(1)
        union = c.sum(0) + count - tp if segmentation else count
        figures[name] = [round(100 * t / u, 2) if u > 0 else None for t, u in zip(tp.tolist(), union.tolist())]
    count = torch.as_tensor(next(iter(confusions.values()))).sum(1).tolist()
    return {"classes": list(classes), "figure": "iou" if segmentation else "accuracy",
            "test_count": count, **figures}  # test_count: images, or labelled pixels


def worst_classes(figures, name, k=5):
    """'dotted 40.0, striped 55.0, ...': the k classes where `name` does worst, for the log."""
    ranked = sorted((v, c) for c, v in zip(figures["classes"], figures[name]) if v is not None)
    return ", ".join(f"{c} {v:.1f}" for v, c in ranked[:k])


# -----------------------------------------------------------------------------
# checkpoints: only what training changes, so --resume continues exactly


def trained_keys(model):
    """The names of what training changes in `model`: the tensors that require grad now, and buffers."""
    return {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}


def trained_tensors(model, keys):
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {k: v.detach() for k, v in tensors.items() if k in keys}


def load_trained_tensors(model, state, keys, path):
    if set(state) != keys:
        sys.exit(f"error: --resume {path} does not hold the trained tensors of the model this config builds")
    with torch.no_grad():
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        for k, v in state.items():
            tensors[k].copy_(v)


def rng_state(device):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.startswith("cuda") else [],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": list(np_state[2:]),
            "python": random.getstate()}


def set_rng_state(rng, device):
    torch.set_rng_state(rng["torch"])
    if device.startswith("cuda") and rng["cuda"]:  # this process's device only: a host may have fewer GPUs now
        torch.cuda.set_rng_state(rng["cuda"][0], device)
    np.random.set_state(("MT19937", rng["numpy"].numpy(), *rng["numpy_pos"]))
    random.setstate(rng["python"])


def save_checkpoint(path, state):
    """torch.save through a temporary file and a rename: a kill mid-write leaves the previous checkpoint whole."""
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(args, config, method, p):
    """The --resume checkpoint, after checking it came from this script and this config; nothing is written."""
    path = args.resume
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"method", "config", "stage", "epoch", "models", "history"} <= set(ckpt)
    except IsADirectoryError:
        p.error(f"--resume {path} is a folder: give the checkpoint in it, --resume {os.path.join(path, 'ckpt.pt')}")
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a part of the path is a file
        folder = os.path.dirname(path) or "."
        killed = os.path.exists(os.path.join(folder, "config.json"))  # a run that stopped before its first epoch ended
        p.error(f"--resume {path}: no such file" + (
            f"; {folder} holds a run that stopped before its first checkpoint: run the same command without "
            f"--resume to start it again" if killed else ""))
    except Exception as e:
        p.error(f"--resume {path} is not a checkpoint written by these scripts (truncated?): {type(e).__name__}")
    if ckpt["method"] != method:
        p.error(f"--resume {path} was written by train_{ckpt['method']}.py, not this script (train_{method}.py)")
    diff = [f"{k}={v!r} (now {config.get(k)!r})" for k, v in ckpt["config"].items()
            if k not in RESUMABLE_CHANGES and config.get(k) != v]
    if diff:
        p.error(f"--resume {path} was written by another config: {', '.join(diff)}; give the run's own flags "
                f"(its config.json) with --resume")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.abspath(args.out_dir) != folder:  # a resume continues in its checkpoint's folder, nowhere else
        p.error(f"--resume {path} continues the run in {folder}, not in --out_dir {args.out_dir}: drop --out_dir "
                f"(to continue elsewhere, copy the whole run folder there first)")
    return ckpt
