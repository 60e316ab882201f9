"""
What the two training scripts share that is not the method: the flags, the device and AMP set-up, torchrun's
processes (DistributedDataParallel), the optimizer and its schedule, evaluation, the progress log, and the
checkpoints that --resume continues exactly. The methods themselves -- the losses and the loops -- are in
train_twostep.py and train_slad.py.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (DATASETS, IGNORE, SEGMENTATION, SegEvalTransform, SegTrainTransform, eval_transform, make_loader,
                  normalize, train_transform)
from lora import merge_lora
from model import CONFIGS, Classifier, Segmenter, ViT, save_model, slide_inference

# defaults that depend on the dataset. Classification: 518 = 37 x 14, the patch-14 size nearest the paper's
# 512 crop; segmentation: the paper's 560 crop. The synthetic sets are for random-init toy models, which need
# more steps (smaller batches) and a larger learning rate to learn in one epoch.
REAL = dict(img_size=518, batch_size=32, lr=1e-3)
DATASET_DEFAULTS = {"dtd": REAL, "aircraft": REAL, "cub": REAL, "synthetic": dict(img_size=56, batch_size=16, lr=3e-3),
                    "cityscapes": dict(img_size=560, batch_size=8, lr=1e-3),
                    "synthetic-seg": dict(img_size=112, batch_size=8, lr=3e-3)}
DATASET_DEFAULTS["synthetic-fine"] = dict(img_size=56, batch_size=32, lr=3e-3)  # the toy family's fine-grained task
SEG_BASE_RATIO = 640 / 560  # segmentation resizes around a short side of 640 for a 560 crop (App. C.2)

# flags that may change between a run and its --resume: where things are, not what is computed
RESUMABLE_CHANGES = {"resume", "out_dir", "data_dir", "device", "num_workers", "compile", "log_every", "grad_checkpointing"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit, instead of argparse's usage block
        sys.exit(f"{self.prog}: error: {message}")


def parser(doc, method):
    """The flags of both scripts, spelled the same; each script adds its own."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dtd", choices=DATASETS)
    p.add_argument("--data_dir", default="./data", help="where datasets are, or are downloaded to")
    p.add_argument("--teacher", default="vitb14", choices=list(CONFIGS), help="the larger ViT")
    p.add_argument("--student", default="vits14", choices=list(CONFIGS), help="the smaller ViT")
    p.add_argument("--init", default="dinov2", choices=["dinov2", "random"], help="official weights or random ones")
    p.add_argument("--epochs", type=int, default=None, help="30 by default (the paper's)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per optimizer step, split over torchrun's processes (32; cityscapes 8; synthetic 16)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the heads and LoRA adapters (1e-3; 3e-3 for synthetic)")
    p.add_argument("--weight_decay", type=float, default=0.05, help="AdamW decay on matrices (not biases, norms)")
    p.add_argument("--img_size", type=int, default=None,
                   help="crop side, a multiple of 14: 518 for classification, 560 for cityscapes (the sliding "
                        "window too), 56 for synthetic, 112 for synthetic-seg")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (paper: 16)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T (paper: 2)")
    p.add_argument("--kd", default="kl", choices=["kl", "taid"],
                   help="the distillation term: kl, the T^2 KL of eq. 2 / eq. 4 (paper); taid, TAID's KL towards an "
                        "interpolated target whose t rises to 1 (kd.TAID), at the same T")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype; bfloat16 on GPUs that have it, else float16 with a GradScaler; float32 on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher and the student")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute each block in the backward pass: less memory (ViT-L/g at 518), ~1/3 more compute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=None, help=f"default out/{method}-DATASET-TEACHER-STUDENT-sSEED")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from a ckpt.pt this script wrote")
    p.add_argument("--num_workers", type=int, default=None,
                   help="data loading processes per GPU process (default: the CPUs shared out, at most 16; 0 on CPU)")
    p.add_argument("--log_every", type=int, default=10, help="steps between progress lines")
    return p


class Run:
    """One training run: checks its flags, then holds its device, AMP, output folder and checkpoint."""

    def __init__(self, args, parser, method):
        self.args, self.method = args, method
        a = args
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
        self.is_main = self.rank == 0
        for k, v in DATASET_DEFAULTS[a.dataset].items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        if a.img_size % 14:
            parser.error(f"--img_size {a.img_size} is not a multiple of the patch size 14 (e.g. {a.img_size // 14 * 14 or 14})")
        t, s = CONFIGS[a.teacher], CONFIGS[a.student]
        if s.embed_dim > t.embed_dim or s.depth > t.depth:
            parser.error(f"the student {a.student} ({s.embed_dim} wide, {s.depth} blocks) is wider or deeper than "
                         f"its teacher {a.teacher} ({t.embed_dim} wide, {t.depth} blocks)")
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {a.device}, but torch sees no CUDA device here (use --device cpu)")
        if a.dtype is None:
            a.dtype = "float32" if a.device == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if a.num_workers is None:  # a 518-px image costs ~11 ms of a CPU core to decode, resize and jitter
            a.num_workers = min(16, max(1, (os.cpu_count() or 1) // self.world)) if a.device.startswith("cuda") else 0
        a.out_dir = a.out_dir or f"out/{method}-{a.dataset}-{a.teacher}-{a.student}-s{a.seed}"
        self.config = {k: v for k, v in vars(a).items()}

        # --resume: the checkpoint must come from the same config; a fresh run must not overwrite an old one
        self.ckpt = None
        if a.resume:
            self.ckpt = load_checkpoint(a.resume, parser)
            diff = [f"{k}={v!r} (now {self.config.get(k)!r})" for k, v in self.ckpt["config"].items()
                    if k not in RESUMABLE_CHANGES and self.config.get(k) != v]
            if self.ckpt.get("method") != method or diff:
                parser.error(f"--resume {a.resume} was written by another config: "
                             f"{', '.join(diff) or 'method ' + repr(self.ckpt.get('method'))}")
        elif any(os.path.exists(os.path.join(a.out_dir, f)) for f in ("ckpt.pt", "results.json")):
            parser.error(f"{a.out_dir} already holds a run: continue it with --resume {a.out_dir}/ckpt.pt, "
                         f"or choose another --out_dir")

        self.segmentation = a.dataset in SEGMENTATION
        self.device = a.device
        self.device_type = "cuda" if a.device.startswith("cuda") else "cpu"
        dtype = getattr(torch, a.dtype)
        # raw torch AMP: autocast for the forward passes, a GradScaler only for float16
        self.autocast = torch.autocast(self.device_type, dtype=dtype, enabled=dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.history = dict(self.ckpt["history"]) if self.ckpt else {"train_seconds": 0.0}
        self.tracked = {}
        torch.manual_seed(a.seed)  # head init

        # torchrun: one process a GPU (gloo on CPUs), each with its share of every global batch (as nanoGPT)
        if self.world > 1:
            if a.batch_size % self.world:
                parser.error(f"--batch_size {a.batch_size} does not split over {self.world} processes")
            if self.device_type == "cuda":
                self.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device_type == "cuda" else "gloo")

    # --- set-up -------------------------------------------------------------------------------------

    def start(self):
        """Create the output folder and the log (the first process only); called once data and weights are in hand."""
        if self.is_main:
            os.makedirs(self.args.out_dir, exist_ok=True)
            self.log_file = open(os.path.join(self.args.out_dir, "log.txt"), "a")
            if self.ckpt is None:
                write_json(os.path.join(self.args.out_dir, "config.json"), self.config)
        self.log(f"{self.method} | {' '.join(sys.argv[1:])}" + (f" | {self.world} processes" if self.world > 1 else ""))
        if self.ckpt:
            self.log(f"resuming from {self.args.resume} ({self.ckpt['stage']} stage, epoch {self.ckpt['epoch']} done)")

    def backbone(self, name, role):
        vit = initial_backbone(name, role, self.args.init, self.args.seed)
        vit.grad_checkpointing = self.args.grad_checkpointing
        return vit

    def model(self, vit, num_classes):
        """The task's head on a backbone: Classifier, or Segmenter for a segmentation dataset (App. C.1)."""
        return (Segmenter if self.segmentation else Classifier)(vit, num_classes)

    def loaders(self, splits):
        a = self.args
        kw = dict(seed=a.seed, num_workers=a.num_workers, device=self.device, rank=self.rank, world=self.world)
        batch = a.batch_size // self.world
        if self.segmentation:
            base = round(a.img_size * SEG_BASE_RATIO)
            train_tf, eval_tf = SegTrainTransform(a.img_size, base), SegEvalTransform(base)
        else:
            train_tf, eval_tf = train_transform(a.img_size), eval_transform(a.img_size)
        return (make_loader(splits["train"], train_tf, batch, train=True, **kw),
                make_loader(splits["val"], eval_tf, batch, train=False, **kw),
                make_loader(splits["test"], eval_tf, batch, train=False, **kw))

    def wrap(self, model):
        """The module a training step calls: DDP over torchrun's processes (it averages the gradients of each
        parameter once, so teacher and student must come in one module when they share adapters), then compiled."""
        if self.world > 1:
            model = DDP(model, device_ids=[self.device] if self.device_type == "cuda" else None)
        return self.compile(model)

    def compile(self, model):
        return torch.compile(model) if self.args.compile else model

    def to_device(self, x, y):
        """A batch from a loader onto the device, the uint8 images normalised there."""
        return normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)

    # --- optimization -------------------------------------------------------------------------------

    def optimizer(self, groups):
        """AdamW over groups of (params, peak lr); matrices decay, biases and norms do not."""
        param_groups = []
        for params, lr in groups:
            for decay in (True, False):
                ps = [p for p in params if (p.ndim >= 2) == decay]
                if ps:
                    param_groups.append(dict(params=ps, lr=lr, base_lr=lr,
                                             weight_decay=self.args.weight_decay if decay else 0.0))
        return torch.optim.AdamW(param_groups, fused=self.device_type == "cuda")

    @staticmethod
    def set_lr(optimizer, it, total):
        """Linear warm-up over the first 5% of steps, then a cosine to zero."""
        warmup = max(1, round(0.05 * total))
        f = (it + 1) / warmup if it < warmup else 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def evaluate(self, models, loader):
        """{name: {"acc": %, and "miou": % for segmentation}} of each model in {name: model} on loader, in one
        pass over the data. Accuracy is top-1, or per pixel; segmentation runs a sliding window (App. C.2)
        over the whole image and counts mIoU on the labels' own resolution."""
        for m in models.values():
            m.eval()
        n = next(iter(models.values())).num_classes if self.segmentation else 0
        hits = {k: torch.zeros((), device=self.device, dtype=torch.long) for k in models}
        confusion = {k: torch.zeros(n, n, device=self.device, dtype=torch.long) for k in models}
        total = torch.zeros((), device=self.device, dtype=torch.long)
        for x, y in loader:  # each process evaluates its share of the split
            x, y = self.to_device(x, y)
            valid = y != IGNORE
            total += valid.sum()
            with self.autocast:
                for k, m in models.items():
                    if self.segmentation:
                        logits = slide_inference(m, x, self.args.img_size, self.args.img_size // 2)
                        pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
                        confusion[k] += torch.bincount(y[valid] * n + pred[valid], minlength=n * n).view(n, n)
                    else:
                        pred = m(x).argmax(-1)
                    hits[k] += ((pred == y) & valid).sum()
        if self.world > 1:
            for t in [total, *hits.values(), *confusion.values()]:
                dist.all_reduce(t)
        total = max(int(total), 1)
        return {k: {"acc": 100.0 * hits[k].item() / total, **({"miou": miou(confusion[k])} if self.segmentation else {})}
                for k in models}

    # --- logging and checkpoints ---------------------------------------------------------------------

    def log(self, msg):
        if self.is_main:
            print(msg, flush=True)
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    def progress(self, stage, epochs, steps_per_epoch):
        return Progress(self, stage, epochs, steps_per_epoch)

    def track(self, **models):
        """Remember, for each model, the tensors that training changes (those requiring grad now, and
        buffers): what a checkpoint holds, not the frozen backbone."""
        for name, m in models.items():
            keys = {n for n, p in m.named_parameters() if p.requires_grad} | {n for n, _ in m.named_buffers()}
            self.tracked[name] = (m, keys)

    def resume_point(self):
        """(stage, epochs done) of the checkpoint being resumed, (None, 0) for a fresh run."""
        return (self.ckpt["stage"], self.ckpt["epoch"]) if self.ckpt else (None, 0)

    def restore(self, optimizer=None):
        """Load the tracked tensors, and the optimizer, scaler and RNG states, from the --resume checkpoint."""
        for name, (m, keys) in self.tracked.items():
            state = self.ckpt["models"][name]
            if set(state) != keys:
                sys.exit(f"error: --resume {self.args.resume} does not hold the trained tensors of the {name} this config builds")
            with torch.no_grad():
                params = dict(m.named_parameters()) | dict(m.named_buffers())
                for k, v in state.items():
                    params[k].copy_(v)
        if optimizer is not None:
            optimizer.load_state_dict(self.ckpt["optimizer"])
            self.scaler.load_state_dict(self.ckpt["scaler"])
        rng = self.ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device_type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(("MT19937", rng["numpy"].numpy(), *rng["numpy_pos"]))
        random.setstate(rng["python"])

    def checkpoint(self, stage, epoch, optimizer):
        """Write out_dir/ckpt.pt atomically: what --resume needs to continue after `epoch` epochs."""
        if not self.is_main:
            return
        models = {name: {k: v.detach() for k, v in (dict(m.named_parameters()) | dict(m.named_buffers())).items() if k in keys}
                  for name, (m, keys) in self.tracked.items()}
        np_state = np.random.get_state()
        state = {
            "method": self.method, "config": self.config, "stage": stage, "epoch": epoch, "models": models,
            "optimizer": optimizer.state_dict(), "scaler": self.scaler.state_dict(), "history": self.history,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device_type == "cuda" else [],
                    "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": list(np_state[2:]),
                    "python": random.getstate()},
        }
        path = os.path.join(self.args.out_dir, "ckpt.pt")
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash mid-write leaves the previous checkpoint whole

    def end_epoch(self, stage, epoch, seconds, metrics, optimizer):
        """One line of metrics.jsonl, the log line, and the checkpoint."""
        self.history["train_seconds"] += seconds
        row = {"stage": stage, "epoch": epoch + 1, **{k: round(v, 4) for k, v in metrics.items()},
               "epoch_seconds": round(seconds, 1)}
        if self.is_main:
            with open(os.path.join(self.args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        self.log(f"{stage} epoch {epoch + 1} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.checkpoint(stage, epoch + 1, optimizer)

    def finish(self, results, exports):
        """results.json, and each {filename: model} exported with its adapters merged (model.load_model reads it)."""
        for fname, model in exports.items() if self.is_main else ():
            merged = type(model)(merge_lora(model.vit), model.num_classes)
            merged.head.load_state_dict(model.head.state_dict())
            save_model(os.path.join(self.args.out_dir, fname), merged)
        results = {"method": self.method, "dataset": self.args.dataset, "teacher": self.args.teacher,
                   "student": self.args.student, "seed": self.args.seed,
                   **{k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()},
                   "train_seconds": round(self.history["train_seconds"], 1)}
        if self.is_main:
            write_json(os.path.join(self.args.out_dir, "results.json"), results)
        self.log("results: " + json.dumps(results))
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return results


class Progress:
    """A line every --log_every steps: epoch, step, loss, lr, img/s, ETA. The loss is summed on the device
    and read (a host sync) only when a line is printed."""

    def __init__(self, run, stage, epochs, steps_per_epoch):
        self.run, self.stage, self.epochs, self.steps = run, stage, epochs, steps_per_epoch
        self.loss_sum, self.n, self.t0, self.done = 0.0, 0, time.perf_counter(), 0
        self.epoch_sum, self.epoch_n = 0.0, 0

    def update(self, epoch, step, loss, lr, batch_size):
        self.loss_sum = self.loss_sum + loss.detach()
        self.epoch_sum = self.epoch_sum + loss.detach()
        self.n += 1
        self.epoch_n += 1
        self.done += 1
        if (step + 1) % self.run.args.log_every == 0 or step + 1 == self.steps:
            dt = time.perf_counter() - self.t0
            left = (self.epochs - epoch - 1) * self.steps + self.steps - step - 1
            self.run.log(f"{self.stage} epoch {epoch + 1}/{self.epochs} step {step + 1}/{self.steps} | "
                         f"loss {self.mean(self.loss_sum) / self.n:.4f} | lr {lr:.2e} | "
                         f"{self.n * batch_size * self.run.world / dt:.1f} img/s | eta {hms(left * dt / self.n)}")
            self.loss_sum, self.n, self.t0 = 0.0, 0, time.perf_counter()

    def epoch_loss(self):
        loss = self.mean(self.epoch_sum) / max(self.epoch_n, 1)
        self.epoch_sum, self.epoch_n = 0.0, 0
        return loss

    def mean(self, loss_sum):
        """The loss summed on this process, averaged over torchrun's processes: the host sync of a log line."""
        loss_sum = torch.as_tensor(loss_sum, dtype=torch.float32, device=self.run.device)
        if self.run.world > 1:
            dist.all_reduce(loss_sum)
        return float(loss_sum) / self.run.world


def miou(confusion):
    """Mean intersection over union (%) from a confusion matrix (rows: label, columns: prediction), over the
    classes that occur in the labels or the predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return 100.0 * (tp[union > 0] / union[union > 0]).mean().item()


def flat(metrics, prefix=""):
    """{"teacher": {"acc": a, "miou": m}} -> {prefix + "teacher_acc": a, prefix + "teacher_miou": m}."""
    return {f"{prefix}{name}_{k}": v for name, ms in metrics.items() for k, v in ms.items()}


def initial_backbone(name, role, init, seed):
    """A run's encoder before adaptation: the official weights, or a random init that depends on
    (seed, role) alone -- 'teacher' or 'student' -- so that cka.py, or anyone, can rebuild it."""
    if init == "dinov2":
        return ViT.from_pretrained(name)
    torch.manual_seed(2 * seed + (role == "student"))
    return ViT.from_name(name)


def hms(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def load_checkpoint(path, parser):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"config", "stage", "epoch", "models"} <= set(ckpt)
    except FileNotFoundError:
        parser.error(f"--resume {path}: no such file")
    except Exception as e:
        parser.error(f"--resume {path} is not a checkpoint written by these scripts (truncated?): {type(e).__name__}")
    return ckpt
