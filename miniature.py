"""
The paper in miniature: Tables 1, 2 and 3, Fig. 3 and Fig. 1 of SLAD, measured on the pretrained toy family
(toys.py: toy-l pretrained, toy-b and toy-s distilled from it, in ViT-L, ViT-B and ViT-S's roles) and the
procedural tasks in the paper's roles -- `synthetic` textures for DTD, `synthetic-fine` for CUB / Aircraft,
`synthetic-seg` for Cityscapes -- with the premises the paper's argument rests on measured first.

    python miniature.py           # the headline: toy-b -> toy-s on synthetic-fine, 3 seeds (~7 min on 2 CPU cores)
    python miniature.py --full    # every pair and task: Tables 1-3, Fig. 3, Fig. 1 (~43 min on 2 CPU cores)
    python miniature.py --quick   # one seed, 14-px images, one epoch: the whole pipeline in a minute or two
    python miniature.py --convergence --tasks synthetic-fine --first_epochs 32 --max_epochs 256  # ~7.5 h: the
                                  # converged verdict (convergence.md, converged-TASK.md, fig1-converged-TASK.png)

It drives train_twostep.py, train_slad.py and cka.py through their command lines, as a reader would, and reads
what they write (results.json, metrics.jsonl, cka.json); a run whose results.json exists is not run again, so
an interrupted reproduction continues where it stopped. Writes to --out_dir (out/miniature): every run,
summary.md (the premises and the tables), fig1.png and fig3.png (--full also copies them to figures/).
"""

import importlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Subset

from cka import BLUE_WHITE_RED, VIRIDIS, ImagesOnly, draw_panel, font, layer_cka, mapped_mean, text
from data import eval_transform, load_splits, make_loader
import report
from flags import POSITIVE_INT, TOY_DEFAULTS, Parser, config_id
from lora import layer_mapping
from model import CONFIGS
from weights import initial_backbone

HERE = os.path.dirname(os.path.abspath(__file__))
# Table 1's pairs (teacher, student), in the paper's order: ViT-B -> ViT-S, ViT-L -> ViT-S, ViT-L -> ViT-B
PAIRS = [("toy-b", "toy-s"), ("toy-l", "toy-s"), ("toy-l", "toy-b")]

# The hyper-parameters of each task: image side, batch, SLAD's epochs (= each two-step stage's: ~35k images a
# stage on both classification tasks, what the budget holds; `--convergence` measures how much doubling still
# moves each model: docs/miniature.md); the peak LR of heads and adapters by method, and a fully trained
# encoder's LR, chosen on val (the grid: docs/miniature.md).
TASKS = {
    "synthetic": dict(img_size=56, batch_size=32, epochs=6, backbone_lr=1e-3,  # LoRA: 3e-2, the grid's best at 3
                      lr={"Probing": 3e-3, "Fine-tuning": 3e-3, "LoRA": 1e-2, "SLAD": 1e-2}),  # epochs, diverges at 6
    "synthetic-fine": dict(img_size=56, batch_size=32, epochs=16, backbone_lr=1e-3,
                           lr={"Probing": 1e-2, "Fine-tuning": 3e-3, "LoRA": 1e-2, "SLAD": 1e-2}),
    "synthetic-seg": dict(img_size=112, batch_size=8, epochs=1, backbone_lr=3e-4, lr=3e-3),  # not tuned: 4x the tokens
}
QUICK = dict(TASKS["synthetic-fine"], img_size=14, epochs=1)  # --quick: 14-px images (one patch), one epoch
ROLES = {"synthetic": "DTD", "synthetic-fine": "CUB / Aircraft", "synthetic-seg": "Cityscapes"}

# Every method: the script and its flags. Every two-step stage runs as many epochs as SLAD (the paper's 30 +
# 30; its Probing distils for 80 after 30, which would make Probing the costliest run here).
METHODS = {
    "Probing": ("train_twostep.py", ["--teacher_adapt", "probe"]),
    "Fine-tuning": ("train_twostep.py", ["--teacher_adapt", "finetune"]),
    "LoRA": ("train_twostep.py", ["--teacher_adapt", "lora"]),
    "LoRA, student fully trained": ("train_twostep.py", ["--teacher_adapt", "lora", "--student_adapt", "finetune"]),
    "SLAD": ("train_slad.py", []),
    "SLAD, first mapping": ("train_slad.py", ["--mapping", "first"]),
    "SLAD, last mapping": ("train_slad.py", ["--mapping", "last"]),
    "LoRA +TAID": ("train_twostep.py", ["--teacher_adapt", "lora", "--kd", "taid"]),
    "LoRA +TED": ("train_twostep.py", ["--teacher_adapt", "lora", "--feat", "ted"]),
    "SLAD +TAID": ("train_slad.py", ["--kd", "taid"]),
    "Probing, random init": ("train_twostep.py", ["--teacher_adapt", "probe", "--init", "random"]),
    # the ablation (--ablation): one choice the paper leaves open at a time, from the defaults
    "SLAD, KL into the teacher": ("train_slad.py", ["--kl_into_teacher"]),
    "SLAD, separate q/k/v adapters": ("train_slad.py", ["--qkv_adapters", "separate"]),
    "SLAD, A drawn for the student": ("train_slad.py", ["--shared_init", "student"]),
    "SLAD, KL warm-up 20 %": ("train_slad.py", ["--kl_warmup", "0.2"]),
    "LoRA, separate q/k/v adapters": ("train_twostep.py", ["--teacher_adapt", "lora", "--qkv_adapters", "separate"]),
}
ABLATION = {"SLAD": ["SLAD, KL into the teacher", "SLAD, separate q/k/v adapters", "SLAD, A drawn for the student",
                     "SLAD, KL warm-up 20 %"],
            "LoRA": ["LoRA, separate q/k/v adapters"]}
# --convergence: the methods whose every stage must converge, and the first schedule tried (epochs a stage)
CONVERGED = {"synthetic-fine": ["Probing", "Fine-tuning", "LoRA", "SLAD"],
             "synthetic": ["Probing", "Fine-tuning", "LoRA", "SLAD"], "synthetic-seg": ["Probing", "LoRA", "SLAD"]}
FIRST_SCHEDULE = {"synthetic-fine": 8, "synthetic": 3, "synthetic-seg": 1}
TABLE1 = ["Probing", "Fine-tuning", "LoRA", "SLAD", "LoRA +TAID", "LoRA +TED", "SLAD +TAID"]
MAPPINGS = {"even": "SLAD", "first": "SLAD, first mapping", "last": "SLAD, last mapping"}

VIT = {"toy-s": "ViT-S", "toy-b": "ViT-B", "toy-l": "ViT-L"}


def paper_numbers():
    """The paper's numbers (report.py's) on the toys' names, each CUB, Aircraft, DTD, Cityscapes: Table 1's
    students by pair and method (the paper's own runs over those it cites; no average), Table 2's by mapping (CUB,
    Aircraft, DTD) and Table 3's teachers, by method."""
    toy = {v: k for k, v in VIT.items()}
    students = {}
    for s, t, m, _, _, v in sorted(report.PAPER, key=lambda row: "Marrie" not in row[3]):  # Marrie et al.'s first
        students.setdefault((toy[t], toy[s]), {})[m] = (*v[:3], v[4])
    mapping = {(toy[t], toy[s]): {"even": students[toy[t], toy[s]]["SLAD"][:3], **other}
               for (s, t), other in report.PAPER_MAPPING.items()}
    in_toys = lambda label: label.replace("ViT-S", "toy-s").replace("ViT-B", "toy-b")  # "SLAD (ViT-S)"
    teachers = {toy[t]: {in_toys(label): v for label, v in by.items()} for t, by in report.PAPER_TEACHER.items()}
    return students, mapping, teachers


PAPER_STUDENT, PAPER_MAPPING, PAPER_TEACHER = paper_numbers()
PAPER_COLUMN = {"synthetic": 2, "synthetic-fine": 0, "synthetic-seg": 3}  # DTD, CUB, Cityscapes


def plan(full, quick, extras, seeds, pairs=PAIRS):
    """The runs, as (task, method, teacher, student, seed), and the tasks' settings; --full's of `pairs` only."""
    if quick:  # the pipeline end to end, on 14-px images (one patch), one epoch
        tasks = {"synthetic-fine": QUICK}
        return tasks, [(t, m, "toy-b", "toy-s", seeds[0]) for t in tasks
                       for m in ("Probing", "Fine-tuning", "LoRA", "SLAD", "Probing, random init")]
    if not full:  # the headline: one pair, one task, the paper's Fig. 3 methods, every seed
        tasks = {"synthetic-fine": TASKS["synthetic-fine"]}
        runs = [("synthetic-fine", m, "toy-b", "toy-s", s) for s in seeds
                for m in ("Probing", "Fine-tuning", "LoRA", "LoRA, student fully trained", "SLAD")]
        return tasks, runs + [("synthetic-fine", "Probing, random init", "toy-b", "toy-s", seeds[0])]
    runs = []
    for task in ("synthetic", "synthetic-fine"):
        for s in seeds:
            runs += [(task, m, "toy-b", "toy-s", s)
                     for m in ("Probing", "Fine-tuning", "LoRA", "LoRA, student fully trained", "SLAD")]
            for t, st in PAIRS[1:]:  # Table 2's other mappings on the fine-grained task only: the budget
                mappings = MAPPINGS.values() if task == "synthetic-fine" else ["SLAD"]
                runs += [(task, m, t, st, s) for m in ("Probing", "LoRA", *mappings)]
            if extras:
                runs += [(task, m, "toy-b", "toy-s", s) for m in ("LoRA +TAID", "LoRA +TED", "SLAD +TAID")]
        runs.append((task, "Probing, random init", "toy-b", "toy-s", seeds[0]))
    runs += [("synthetic-seg", m, t, st, seeds[0])  # 4x the tokens
             for t, st in PAIRS for m in ("Probing", "LoRA", "SLAD")]
    return dict(TASKS), [k for k in runs if k[2:4] in pairs]


def run_dir(out, task, method, teacher, student, seed, epochs):
    slug = method.lower().replace(" +", "-").replace(", ", "-").replace(" %", "").replace("/", "").replace(" ", "-")
    return os.path.join(out, "runs", f"{task}-{teacher}-{student}-{slug}-e{epochs}-s{seed}")


def command(task, method, teacher, student, seed, settings, out_dir):
    script, extra = METHODS[method]
    s = settings
    family = method.split(",")[0].split()[0]  # "LoRA +TED": LoRA's LR; a teacher's own where it has one
    lr = s["lr"] if isinstance(s["lr"], float) else s["lr"].get(f"{family} {teacher}", s["lr"][family])
    cmd = [sys.executable, os.path.join(HERE, script), "--dataset", task, "--teacher", teacher, "--student", student,
           "--seed", str(seed), "--device", "cpu", "--img_size", str(s["img_size"]),
           "--batch_size", str(s["batch_size"]), "--lr", str(lr), "--out_dir", out_dir, "--log_every", "100000", *extra]
    if script == "train_slad.py":
        return cmd + ["--epochs", str(s["epochs"])]
    return cmd + ["--teacher_epochs", str(s["epochs"]), "--student_epochs", str(s["epochs"]),
                  "--backbone_lr", str(s["backbone_lr"])]


def cost(task, method, teacher):
    """A rough relative cost, to start the longest runs first (two workers finish together)."""
    return ((4 if task == "synthetic-seg" else 1) * (3 if teacher == "toy-l" else 1)
            * (1.5 if "train_twostep" in METHODS[method][0] else 1))


def cmd_config(cmd):
    """The resolved config (flags.py's) a run command stands for."""
    script = os.path.basename(cmd[1]).removesuffix(".py")
    return vars(importlib.import_module(script).parse_args(cmd[2:])[0])


def finished(d, cmd):
    """Whether run folder d holds the finished run of cmd: its results.json, of the config cmd resolves to (a run
    of other flags -- --quick's, an older version's -- is run again)."""
    try:
        kept_id = json.load(open(os.path.join(d, "results.json")))["config_id"]
    except (OSError, ValueError, KeyError):
        return False
    return kept_id == config_id(cmd_config(cmd))


def killed(d, cmd):
    """The ckpt.pt a killed run of cmd left in folder d (its last finished epoch), or None: no checkpoint, an
    unreadable one, or one of another config or seed (that run starts again)."""
    path = os.path.join(d, "ckpt.pt")
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)["config"]
    except Exception:
        return None
    config = cmd_config(cmd)
    return path if (config_id(kept), kept["seed"]) == (config_id(config), config["seed"]) else None


def run_all(jobs, workers, log):
    """Run (out_dir, cmd) jobs, `workers` at a time, one CPU thread each; skip those already done, and continue
    those killed part-way (a session's end, a Ctrl-C) from their last epoch's checkpoint: --resume, exactly as if
    never stopped, its training time the sum of its epochs' (run_folder.end_epoch)."""
    todo = [(d, c) for d, c in jobs if not finished(d, c)]
    resumed = sum(killed(d, c) is not None for d, c in todo)
    log(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to run ({resumed} continued from "
        f"their checkpoints), {workers} at a time")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread a run: tiny models gain little from a second one
    running, done, t0 = [], 0, time.time()
    try:
        while todo or running:
            while todo and len(running) < workers:
                d, c = todo.pop(0)
                ckpt = killed(d, c)
                if ckpt:
                    c = c + ["--resume", ckpt]
                else:
                    shutil.rmtree(d, ignore_errors=True)  # a run with nothing to continue from starts again
                    os.makedirs(d)
                f = open(os.path.join(d, "stdout.txt"), "a" if ckpt else "w")
                proc = subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE)
                running.append((d, c, proc, f, time.time()))
            time.sleep(0.2)
            for r in [r for r in running if r[2].poll() is not None]:
                running.remove(r)
                d, c, p, f, start = r
                f.close()
                done += 1
                if p.returncode:
                    sys.exit(f"miniature.py: error: {' '.join(c)} failed; see {os.path.join(d, 'stdout.txt')}")
                log(f"[{done}/{done + len(todo) + len(running)}] {os.path.basename(d)} {time.time() - start:.0f}s "
                    f"(total {time.time() - t0:.0f}s)")
    finally:  # a failed run or a Ctrl-C stops the rest: none goes on unseen; each keeps its last epoch's ckpt.pt
        for r in running:
            r[2].terminate()
            r[2].wait()


def read(d):
    """A run's results.json, and from metrics.jsonl every epoch's val accuracy of each model: curves[(stage, model)];
    r["val_MODEL"]: the final val accuracy (mIoU for segmentation) of each model."""
    r = json.load(open(os.path.join(d, "results.json")))
    r["curves"] = {}
    metric = "miou" if r["dataset"] == "synthetic-seg" else "acc"
    for line in open(os.path.join(d, "metrics.jsonl")):
        m = json.loads(line)
        for k, v in m.items():
            if k.startswith("val_") and k.endswith(f"_{metric}"):
                r["curves"].setdefault(f"{m['stage']} {k[4:-len(metric) - 1]}", []).append(v)
    for key, curve in r["curves"].items():  # the final val accuracy of each model
        r[f"val_{key.split()[1]}_acc"] = curve[-1]
    return r


def mean(values):
    return statistics.mean(values) if values else float("nan")


def mean_std(values, digits=1):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def score(r, role):
    """Test accuracy (%), or mIoU for segmentation, of the run's teacher or student."""
    return r.get(f"{role}_miou", r[f"{role}_acc"])


# -----------------------------------------------------------------------------
# the premises: alignment of the pretrained pairs, against random-init ones


def premise_cka(task, img_size, pairs, n_images=None, batch_size=64):
    """Mean CKA over the mapped pairs (i, g(i)) of the even mapping, CLS tokens on the task's val split (its first
    n_images), for the pretrained family and for random-init encoders (rebuilt as --init random does, seed 0), as
    cka.py measures them: {pair: (pretrained %, random init %)}."""
    family = {name: initial_backbone(name, "teacher", "dinov2", 0) for name in {n for p in pairs for n in p}}
    random_init = {(t, s): (initial_backbone(t, "teacher", "random", 0), initial_backbone(s, "student", "random", 0))
                   for t, s in pairs}
    models = [(family[t], family[s]) for t, s in pairs] + [random_init[p] for p in pairs]
    val = ImagesOnly(load_splits(task)[0]["val"])
    val = Subset(val, range(min(n_images or len(val), len(val))))
    loader = make_loader(val, eval_transform(img_size), batch_size, train=False)
    mats = layer_cka(models, loader)
    g = {p: layer_mapping(CONFIGS[p[1]].depth, CONFIGS[p[0]].depth, "even") for p in pairs}
    return {p: (100 * mapped_mean(mats[k], g[p]), 100 * mapped_mean(mats[len(pairs) + k], g[p]))
            for k, p in enumerate(pairs)}


# -----------------------------------------------------------------------------
# Fig. 1 and Fig. 3, drawn with pillow


def ticks(lo, hi, n=7):
    """Round tick values in [lo, hi]: steps of 1, 2 or 5 times a power of ten, at most n + 1 of them."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [round(k * step, 10) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def fig1(points, title, path):
    """Student accuracy against training time, a labelled point per method (paper Fig. 1)."""
    img = Image.new("RGB", (900, 520), "white")
    d = ImageDraw.Draw(img)
    big, small = font(16), font(13)
    R = max(200, 44 + math.ceil(max(d.textlength(p[0], font=small) for p in points)))  # the legend, whole
    W, H, L, T, B = 900, 520, 80, 50, 60
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x_hi = max(xs) * 1.1
    y_lo, y_hi = min(ys) - 0.1 * (max(ys) - min(ys) + 1), max(ys) + 0.1 * (max(ys) - min(ys) + 1)
    X = lambda v: L + (W - L - R) * v / x_hi
    Y = lambda v: H - B - (H - T - B) * (v - y_lo) / (y_hi - y_lo)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for v in ticks(0, x_hi):
        d.line([X(v), H - B, X(v), H - B + 5], fill="black")
        text(d, (X(v), H - B + 8), f"{v:g}", small, "mt")
    for u in ticks(y_lo, y_hi):
        d.line([L - 5, Y(u), L, Y(u)], fill="black")
        text(d, (L - 8, Y(u)), f"{u:g}", small, "rm")
    text(d, (L + (W - L - R) / 2, H - 28), "training time (s, CPU, one thread)", big, "mt")
    text(d, (10, 12), title, big)
    label = Image.new("RGB", (260, 20), "white")
    text(ImageDraw.Draw(label), (2, 2), "student test accuracy (%)", big)
    label = label.rotate(90, expand=True)
    img.paste(label, (6, T + (H - T - B) // 2 - label.height // 2))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34)]
    for k, (name, x, y) in enumerate(points):
        c = colours[k % len(colours)]
        d.ellipse([X(x) - 6, Y(y) - 6, X(x) + 6, Y(y) + 6], fill=c, outline="black")
        d.ellipse([W - R + 16, T + 10 + 24 * k, W - R + 28, T + 22 + 24 * k], fill=c, outline="black")
        text(d, (W - R + 34, T + 16 + 24 * k), name, small, "lm")
    img.save(path)


def fig3(cka, path):
    """Paper Fig. 3 as a 2 x 2 grid, in %: (a) the pretrained pair on a scale fit to its values, (b)-(d) the
    change after each adaptation, on one scale symmetric around 0."""
    g = cka["g"]
    C0 = 100 * torch.tensor(cka["pretrained"]["cka"])
    base = 100 * cka["pretrained"]["mapped_mean"]
    panels = [draw_panel(C0, ["(a) pretrained", f"mean CKA, mapped pairs: {base:.2f}%"],
                         C0.min().item(), C0.max().item(), VIRIDIS, g)]
    runs = list(cka["runs"].values())
    limit = max(100 * abs(v) for r in runs for row in r["delta"] for v in row)
    for k, (name, r) in enumerate(cka["runs"].items()):
        title = [f"({chr(ord('b') + k)}) change after {name}",
                 f"{100 * r['mapped_mean']:.2f}% ({100 * r['change']:+.2f} points)"]
        panels.append(draw_panel(100 * torch.tensor(r["delta"]), title, -limit, limit, BLUE_WHITE_RED, g))
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    img = Image.new("RGB", (2 * w + 12, 2 * h + 12), "white")
    for k, p in enumerate(panels[:4]):
        img.paste(p, ((k % 2) * (w + 12), (k // 2) * (h + 12)))
    img.save(path)


# -----------------------------------------------------------------------------
# the tables


def row(cells):
    return "| " + " | ".join(cells) + " |"


def tables(runs, tasks, seeds, premise, cka, out):
    """summary.md: the premises (val), Table 1 (students), Table 2 (mappings), Table 3 (teachers), Fig. 3's
    means, the curves, the training times."""
    get = lambda task, m, t, s: [runs[k] for k in sorted(runs) if k[:4] == (task, m, t, s)]
    cls = [k for k in tasks if k != "synthetic-seg"]
    head = [f"{k} ({ROLES[k]})" for k in tasks]
    pairs = [p for p in PAIRS if any(k[2:4] == p for k in runs)]
    lines = [f"Test accuracy (%; mIoU for segmentation), mean ± sample std over seeds {seeds} (one seed where one "
             f"number is given); val where it says so.", ""]

    lines += ["### The premises, on val", "", row(["premise", *cls]), row(["---"] * (len(cls) + 1))]
    for t, s in PAIRS:
        if all((k, (t, s)) in premise for k in cls):
            lines.append(row([f"CKA, mapped pairs, pretrained {t} -> {s} (random init)",
                              *[f"{premise[(k, (t, s))][0]:.1f} ({premise[(k, (t, s))][1]:.1f})" for k in cls]]))
    val = lambda task, m, t, s, role: [r[f"val_{role}_acc"] for r in get(task, m, t, s)]
    gap = lambda task, a, b, role: (
        f"{mean(val(task, a, 'toy-b', 'toy-s', role)) - mean(val(task, b, 'toy-b', 'toy-s', role)):+.1f}")
    has = lambda m: all(val(k, m, "toy-b", "toy-s", "teacher") for k in cls)
    if has("Probing") and has("Probing, random init"):
        lines.append(row(["probed toy-b, pretrained (random init)", *[
            f"{mean_std(val(k, 'Probing', 'toy-b', 'toy-s', 'teacher'))} "
            f"({mean_std(val(k, 'Probing, random init', 'toy-b', 'toy-s', 'teacher'))})" for k in cls]]))
    if has("Probing") and has("LoRA"):
        lines.append(row(["LoRA toy-b (minus the probed one)", *[
            f"{mean_std(val(k, 'LoRA', 'toy-b', 'toy-s', 'teacher'))} ({gap(k, 'LoRA', 'Probing', 'teacher')})"
            for k in cls]]))
    if has("LoRA") and has("LoRA, student fully trained"):
        lines.append(row(["LoRA toy-s (minus a fully trained toy-s, same LoRA teacher)", *[
            f"{mean_std(val(k, 'LoRA', 'toy-b', 'toy-s', 'student'))} "
            f"({gap(k, 'LoRA', 'LoRA, student fully trained', 'student')})" for k in cls]]))
    rank = TOY_DEFAULTS["rank"]
    width = CONFIGS['toy-s'].embed_dim
    lines.append(row(["LoRA rank / toy-s's width", *[f"{rank} / {width} = {100 * rank / width:.1f} %"] * len(cls)]))
    doubled = {k: doubling_runs(out, k, tasks[k]["epochs"], seeds) for k in cls}
    moved = lambda k: max(abs(v) for (m, role), v in doubling_moves(doubled[k], k, tasks[k]["epochs"], seeds).items()
                          if role == "student")
    lines.append(row(["convergence: the largest move of a student's mean val when the schedule doubles (< 0.5)", *[
        f"{moved(k):.1f} ({tasks[k]['epochs']} → {2 * tasks[k]['epochs']} epochs)" if doubled[k]
        else "not measured: `--convergence`" for k in cls]]))

    lines += ["", "### Table 1 in miniature: students (test)", "",
              row(["student ← teacher", "method", *head, "avg. (classification)", "paper: CUB / DTD / Cityscapes"]),
              row(["---"] * (len(tasks) + 4))]
    for t, s in pairs:
        for m in TABLE1:
            if not any(k[1:4] == (m, t, s) for k in runs):
                continue
            v = {k: [score(r, "student") for r in get(k, m, t, s)] for k in tasks}
            avg = f"{mean([mean(v[k]) for k in cls]):.1f}" if all(v[k] for k in cls) else "–"
            paper = PAPER_STUDENT.get((t, s), {}).get(m)
            paper = " / ".join("–" if paper[i] is None else f"{paper[i]:.2f}" for i in (0, 2, 3)) if paper else ""
            lines.append(row([f"{s} ← {t}", m, *[mean_std(v[k]) for k in tasks], avg, paper]))

    if any(k[1] in MAPPINGS.values() and k[1] != "SLAD" for k in runs):
        mapped = [k for k in cls if any(key[0] == k and key[1] == MAPPINGS["first"] for key in runs)]
        lines += ["", "### Table 2 in miniature: SLAD's mapping (students, test)", "",
                  row(["student ← teacher", "mapping", *mapped, "paper: CUB / Aircraft / DTD"]),
                  row(["---"] * (len(mapped) + 3))]
        for t, s in [p for p in PAIRS[1:] if p in pairs]:
            for mapping, m in MAPPINGS.items():
                paper = " / ".join(f"{v:.2f}" for v in PAPER_MAPPING[(t, s)][mapping])
                cells = [mean_std([score(r, "student") for r in get(k, m, t, s)]) for k in mapped]
                lines.append(row([f"{s} ← {t}", mapping, *cells, paper]))

    lines += ["", "### Table 3 in miniature: teachers (test)", "",
              row(["teacher", "method", *head, "paper: CUB / DTD / Cityscapes"]), row(["---"] * (len(tasks) + 3))]
    for t in ("toy-b", "toy-l"):
        student = "toy-s"
        for label, m, s in (("Probing", "Probing", student), ("Fine-tuning", "Fine-tuning", student),
                            ("LoRA", "LoRA", student), ("SLAD (toy-s)", "SLAD", "toy-s"),
                            ("SLAD (toy-b)", "SLAD", "toy-b")):
            if not any(k[1:4] == (m, t, s) for k in runs):
                continue
            paper = PAPER_TEACHER[t].get(label)
            paper = " / ".join(f"{paper[i]:.2f}" for i in (0, 2, 3)) if paper else ""
            cells = [mean_std([score(r, "teacher") for r in get(k, m, t, s)]) for k in tasks]
            lines.append(row([t, label, *cells, paper]))

    if cka:
        lines += ["", f"### Fig. 3 in miniature: CKA of CLS tokens, {cka['dataset']} val, {cka['teacher']} -> "
                  f"{cka['student']}, seed {cka['seed']}, mean over the mapped pairs g = {cka['g']}", "",
                  f"- pretrained: {100 * cka['pretrained']['mapped_mean']:.2f}%"]
        lines += [f"- after {n}: {100 * r['mapped_mean']:.2f}% ({100 * r['change']:+.2f})"
                  for n, r in cka["runs"].items()]

    for name, title in (("convergence.md", "Convergence: doubling each schedule, toy-b -> toy-s (mean val, "
                                           "`--convergence`)"),
                        ("ablation.md", "The open choices, one at a time (val, `--ablation`)")):
        if os.path.exists(os.path.join(out, name)):
            lines += ["", f"### {title}", "", open(os.path.join(out, name)).read().strip()]

    lines += ["", "### The val curves (mean over seeds, one number an epoch)", ""]
    for k in cls:
        for t, s in pairs:
            for m in [m for m in METHODS if any(key[:4] == (k, m, t, s) for key in runs)]:
                rs = get(k, m, t, s)
                for curve in rs[0]["curves"]:
                    c = [mean([r["curves"][curve][e] for r in rs]) for e in range(len(rs[0]["curves"][curve]))]
                    lines.append(f"- {k}, {s} ← {t}, {m}, {curve}: " + " ".join(f"{v:.1f}" for v in c))

    lines += ["", "### Training time (s, one CPU thread a run; mean over seeds)", "",
              row(["student ← teacher", "method", *tasks]), row(["---"] * (len(tasks) + 2))]
    for t, s in pairs:
        for m in [m for m in METHODS if any(k[1:4] == (m, t, s) for k in runs)]:
            cells = [mean_std([r["train_seconds"] for r in get(k, m, t, s)]) for k in tasks]
            lines.append(row([f"{s} ← {t}", m, *cells]))
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    return md


# -----------------------------------------------------------------------------
# --convergence and --ablation


def val_means(runs, task, method, epochs, seeds, role):
    return mean([runs[(task, method, "toy-b", "toy-s", s, epochs)][f"val_{role}_acc"] for s in seeds])


def doubling_moves(runs, task, epochs, seeds):
    """{(method, role): how much doubling the schedule from `epochs` moves the mean val (over the seeds) of that
    model}, for every method of CONVERGED[task] and both of its models, toy-b -> toy-s."""
    return {(m, role): val_means(runs, task, m, 2 * epochs, seeds, role) - val_means(runs, task, m, epochs, seeds, role)
            for m in CONVERGED[task] for role in ("teacher", "student")}


def doubling_keys(task, epochs, seeds):
    """The runs of one doubling: each method of CONVERGED[task], toy-b -> toy-s, at `epochs` and twice that."""
    return [(task, m, "toy-b", "toy-s", s, e) for e in (epochs, 2 * epochs) for m in CONVERGED[task] for s in seeds]


def doubling_runs(out_dir, task, epochs, seeds):
    """The runs doubling_moves reads, from the folders --convergence leaves in out_dir; None if any is missing."""
    keys = doubling_keys(task, epochs, seeds)
    if not all(os.path.exists(os.path.join(run_dir(out_dir, *k), "results.json")) for k in keys):
        return None
    return {k: read(run_dir(out_dir, *k)) for k in keys}


def schedule_job(out_dir, key, settings):
    """(run folder, command) of the run `key` = (task, method, teacher, student, seed, epochs a stage)."""
    d = run_dir(out_dir, *key)
    return d, command(*key[:5], dict(settings, epochs=key[5]), d)


def convergence(args, log):
    """Per task (toy-b -> toy-s), double the schedule from FIRST_SCHEDULE (or --first_epochs) until doubling it
    moves the mean val (over the seeds) of every method's student by less than 0.5 points (the teachers' moves
    are shown beside, not waited for); --max_epochs caps it. Returns the markdown rows, one per doubling,
    {task: the shortest schedule, None where the cap came first} and {task: at_schedule's tables}."""
    lines, chosen, reports = [], {}, {}
    if args.quick:  # the search's machinery in about a minute: one seed, synthetic-fine, one doubling (1 -> 2 epochs)
        args = type(args)(**dict(vars(args), tasks=["synthetic-fine"], seeds=args.seeds[:1]))  # a copy
    for task in args.tasks:
        settings, epochs, runs = TASKS[task], args.first_epochs or FIRST_SCHEDULE[task], {}
        cap = args.max_epochs
        if args.quick:
            settings, epochs, cap = dict(settings, img_size=14), 1, 2
        while True:
            keys = doubling_keys(task, epochs, args.seeds)
            run_all([schedule_job(args.out_dir, k, settings) for k in keys if k not in runs], args.workers, log)
            runs.update({k: read(run_dir(args.out_dir, *k)) for k in keys})
            moves = doubling_moves(runs, task, epochs, args.seeds)
            lines.append(row([task, f"{epochs} → {2 * epochs}", *[
                f"{moves[(m, role)]:+.1f}" if m in CONVERGED[task] else "–"  # segmentation: no Fine-tuning
                for m in TABLE1[:4] for role in ("teacher", "student")]]))
            if all(abs(v) < 0.5 for (m, role), v in moves.items() if role == "student"):
                chosen[task] = epochs
                break
            if 2 * epochs >= cap:
                chosen[task] = None  # not reached within the cap: the table says by how much each still moves
                break
            epochs *= 2
        log(lines[-1])
        reports[task] = at_schedule(args, task, settings, 2 * epochs, chosen[task], log)
    return lines, chosen, reports


def at_schedule(args, task, settings, epochs, passed, log):
    """Table 1 and Fig. 1 at the longest schedule the search measured (`epochs` a stage; `passed`: the schedule
    whose doubling to it moved every student by < 0.5, None if none did): each method's models on test (mean +-
    std over the seeds) and its training time; and LoRA given SLAD's time, run at the schedule SLAD's mean time
    buys it (epochs x SLAD's time / LoRA's, both measured here), so that the paper's claim is read both ways: SLAD
    in less time than LoRA, and against LoRA at equal time. Writes fig1-converged-TASK.png; returns markdown."""
    keys = [(task, m, "toy-b", "toy-s", s, epochs) for m in CONVERGED[task] for s in args.seeds]
    runs = {k: read(run_dir(args.out_dir, *k)) for k in keys}
    seconds = {m: mean([runs[k]["train_seconds"] for k in keys if k[1] == m]) for m in CONVERGED[task]}
    equal = max(1, round(epochs * seconds["SLAD"] / seconds["LoRA"]))
    at_equal_time = [(task, "LoRA", "toy-b", "toy-s", s, equal) for s in args.seeds]
    run_all([schedule_job(args.out_dir, k, settings) for k in at_equal_time if k not in runs], args.workers, log)
    runs.update({k: read(run_dir(args.out_dir, *k)) for k in at_equal_time})
    state = f"passes the doubling check from {passed}" if passed else "not converged: see the doubling rows"
    lines = [f"### {task}, toy-b -> toy-s, {epochs} epochs a stage ({state}); test, mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))}", "",
             row(["method", "epochs a stage", "teacher", "student", "student val", "training time (s)",
                  "time / LoRA's"]), row(["---"] * 7)]
    points = []
    for m, e in [(m, epochs) for m in CONVERGED[task]] + [("LoRA", equal)]:
        rs = [runs[(task, m, "toy-b", "toy-s", s, e)] for s in args.seeds]
        name = "LoRA at SLAD's time" if (m, e) == ("LoRA", equal) and e != epochs else m
        t = mean([r["train_seconds"] for r in rs])
        lines.append(row([name, str(e), mean_std([score(r, "teacher") for r in rs]),
                          mean_std([score(r, "student") for r in rs]), mean_std([r["val_student_acc"] for r in rs]),
                          f"{t:.0f}", f"{t / seconds['LoRA']:.2f}x"]))
        points.append((f"{name} ({e} ep.)", t, mean([score(r, "student") for r in rs])))
    fig1(points, f"toy-b -> toy-s on {task}, {epochs} epochs a stage: student test accuracy against time",
         os.path.join(args.out_dir, f"fig1-converged-{task}.png"))
    return "\n".join(lines) + "\n"


def convergence_table(path, lines, tasks):
    """convergence.md: the rows of `tasks` just measured, beside the rows of other tasks already in the file (each
    task's search runs on its own: `--tasks`)."""
    kept = []
    if os.path.exists(path):
        kept = [line for line in open(path).read().splitlines()[2:] if line.split(" | ")[0][2:] not in tasks]
    head = [f"{m} {role}" for m in TABLE1[:4] for role in ("teacher", "student")]
    table = [row(["task", "epochs a stage", *head]), row(["---"] * (len(head) + 2)), *kept, *lines]
    return "\n".join(table) + "\n"


def ablation(args, log):
    """The choices the paper leaves open, one at a time from the defaults, on val (seeds, toy-b -> toy-s, the
    fine-grained task at its schedule): each against the default of its method, with the rule decided before
    the runs (docs/miniature.md): a choice wins when it raises the student's mean val by more than the seed
    spread of the per-seed differences (and at least 0.5 points) without lowering the teacher's by as much."""
    task = "synthetic-fine"
    settings = QUICK if args.quick else TASKS[task]
    methods = [m for base, variants in ABLATION.items() for m in [base, *variants]]
    keys = [(task, m, "toy-b", "toy-s", s, settings["epochs"]) for m in methods for s in args.seeds]
    keys.sort(key=lambda k: -cost(k[0], k[1], k[2]))
    run_all([(run_dir(args.out_dir, *k), command(*k[:5], settings, run_dir(args.out_dir, *k))) for k in keys],
            args.workers, log)
    runs = {k: read(run_dir(args.out_dir, *k)) for k in keys}
    per_seed = lambda m, role: [runs[(task, m, "toy-b", "toy-s", s, settings["epochs"])][f"val_{role}_acc"]
                                for s in args.seeds]
    lines = [row(["method", "choice", "student val", "minus the default (per-seed spread)", "teacher val",
                  "minus the default", "verdict"]), row(["---"] * 7)]
    for base, variants in ABLATION.items():
        lines.append(row([base, "default", mean_std(per_seed(base, "student")), "", mean_std(per_seed(base, "teacher")),
                          "", ""]))
        for m in variants:
            ds = [v - d for v, d in zip(per_seed(m, "student"), per_seed(base, "student"))]
            dt = [v - d for v, d in zip(per_seed(m, "teacher"), per_seed(base, "teacher"))]
            spread = max(0.5, statistics.stdev(ds) if len(ds) > 1 else 0.0)
            wins = mean(ds) > spread and mean(dt) > -spread
            lines.append(row([base, m.split(", ", 1)[1], mean_std(per_seed(m, "student")),
                              f"{mean(ds):+.1f} ({spread:.1f})", mean_std(per_seed(m, "teacher")), f"{mean(dt):+.1f}",
                              "**better**" if wins else "no change"]))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--full", action="store_true", help="every pair and task: Tables 1-3, Fig. 3, Fig. 1")
    p.add_argument("--quick", action="store_true",
                   help="one seed, synthetic-fine only, 14-px images (one patch), one epoch (into out/miniature-quick)")
    p.add_argument("--pairs", nargs="+", default=[f"{t}:{s}" for t, s in PAIRS],
                   choices=[f"{t}:{s}" for t, s in PAIRS], metavar="TEACHER:STUDENT",
                   help="with --full: only these pairs (default: all three; toy-b:toy-s, of which Fig. 1 and Fig. 3 "
                        "are, always)")
    p.add_argument("--extras", action="store_true",
                   help="with --full: also LoRA +TAID, LoRA +TED and SLAD +TAID (toy-b -> toy-s)")
    p.add_argument("--convergence", action="store_true",
                   help="find each task's shortest schedule that doubling moves each student's mean val by < 0.5 "
                        "points; Table 1 and Fig. 1 (with LoRA at SLAD's time) at the longest schedule run")
    p.add_argument("--ablation", action="store_true", help="the choices the paper leaves open, one at a time, on val")
    p.add_argument("--tasks", nargs="+", default=list(FIRST_SCHEDULE), choices=list(FIRST_SCHEDULE),
                   help="with --convergence: the tasks to search")
    p.add_argument("--max_epochs", type=POSITIVE_INT, default=64, help="with --convergence: the longest schedule tried")
    p.add_argument("--first_epochs", type=POSITIVE_INT, default=None,
                   help="with --convergence: the first schedule tried (default: 8 on synthetic-fine, 3 on synthetic)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=POSITIVE_INT, default=max(1, os.cpu_count() or 1),
                   help="runs at a time (one CPU thread each)")
    p.add_argument("--out_dir", default=None, help="default out/miniature (--quick: out/miniature-quick)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out/miniature-quick" if args.quick else "out/miniature")
    args.pairs = [tuple(pair.split(":")) for pair in args.pairs]
    if PAIRS[0] not in args.pairs:
        p.error("--pairs must hold toy-b:toy-s: Fig. 1 and Fig. 3 are of it")
    return args, p


def main():
    args, p = parse_args()
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.convergence or args.ablation:
        name = "convergence.md" if args.convergence else "ablation.md"
        if args.convergence:
            lines, chosen, reports = convergence(args, log)
            md = convergence_table(os.path.join(args.out_dir, name), lines, args.tasks)
            log(f"the shortest schedule that passes (None: not within --max_epochs {args.max_epochs}): {chosen}")
            for task, report_md in reports.items():  # Table 1 and Fig. 1 at the longest schedule, a file a task
                with open(os.path.join(args.out_dir, f"converged-{task}.md"), "w") as f:
                    f.write(report_md)
                print(report_md)
        else:
            md = ablation(args, log)
        with open(os.path.join(args.out_dir, name), "w") as f:
            f.write(md)
        print(md)
        log(f"wrote {os.path.join(args.out_dir, name)}")
        return
    tasks, keys = plan(args.full, args.quick, args.extras, args.seeds, args.pairs)
    keys = [(*k, tasks[k[0]]["epochs"]) for k in keys]
    keys.sort(key=lambda k: -cost(k[0], k[1], k[2]))  # the longest first
    jobs = [(run_dir(args.out_dir, *k), command(*k[:5], tasks[k[0]], run_dir(args.out_dir, *k))) for k in keys]
    run_all(jobs, args.workers, log)
    runs = {k[:5]: read(d) for k, (d, _) in zip(keys, jobs)}
    # the premises: the pretrained pairs' alignment on every classification task, against random-init pairs
    torch.set_num_threads(args.workers)
    pairs = [p for p in PAIRS if any(k[2:4] == p for k in keys)]
    premise = {(task, pair): v for task in tasks if task != "synthetic-seg"
               for pair, v in premise_cka(task, tasks[task]["img_size"], pairs).items()}

    # Fig. 3: the fine-grained task (CUB's role, as the paper's figure), toy-b -> toy-s, the first seed
    task, (t, s) = "synthetic-fine", PAIRS[0]
    cka_dir = os.path.join(args.out_dir, "cka")
    subprocess.run([sys.executable, os.path.join(HERE, "cka.py"), "--runs",
                    *[run_dir(args.out_dir, task, m, t, s, args.seeds[0], tasks[task]["epochs"])
                      for m in ("Fine-tuning", "LoRA", "SLAD")],
                    "--device", "cpu", "--img_size", str(tasks[task]["img_size"]), "--out_dir", cka_dir],
                   check=True, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS=str(args.workers)))
    cka = json.load(open(os.path.join(cka_dir, "cka.json")))
    cka["runs"] = {m: r for m, r in zip(("fine-tuning", "LoRA", "SLAD"), cka["runs"].values())}
    fig3(cka, os.path.join(args.out_dir, "fig3.png"))

    # Fig. 1: the fine-grained task, toy-b -> toy-s, every method's student, mean over seeds
    points = []
    for m in [m for m in TABLE1 if any(k[:4] == (task, m, t, s) for k in runs)]:
        rs = [runs[k] for k in runs if k[:4] == (task, m, t, s)]
        points.append((m, mean([r["train_seconds"] for r in rs]), mean([r["student_acc"] for r in rs])))
    fig1(points, f"Student {s} (teacher {t}) on {task}: test accuracy against training time",
         os.path.join(args.out_dir, "fig1.png"))

    print(tables(runs, tasks, args.seeds, premise, cka, args.out_dir))
    if args.full:  # the README's figures
        for f in ("fig1", "fig3"):
            shutil.copy(os.path.join(args.out_dir, f"{f}.png"), os.path.join(HERE, "figures", f"miniature_{f}.png"))
    log(f"wrote {args.out_dir}: summary.md, fig1.png, fig3.png and every run")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the runs in flight stop too (run_all), each keeping its last epoch's ckpt.pt
        print(f"interrupted; continue with: {shlex.join(['python', *sys.argv])} (finished runs are reused, the "
              f"stopped ones resume from their last epoch)", file=sys.stderr)
        sys.exit(130)
