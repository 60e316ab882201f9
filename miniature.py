"""
The paper in miniature: Table 1, Table 3, Fig. 3 and Fig. 1 of SLAD, measured on the pretrained toy family
(toys.py: toy-b teacher, toy-s student distilled from it) and the procedural tasks in the paper's roles --
`synthetic` textures for DTD, `synthetic-fine` for CUB / Aircraft, `synthetic-seg` for Cityscapes.

    python miniature.py            # 47 runs (3 seeds), then the tables and figures: 17.5 min measured on 2 CPU cores
    python miniature.py --quick    # one seed, one task, 14-px images: checks the whole pipeline in a minute or two

It drives train_twostep.py, train_slad.py and cka.py through their command lines, as a reader would, and reads
what they write (results.json, metrics.jsonl, cka.json); a run whose results.json exists is not run again,
so an interrupted reproduction continues where it stopped. Writes to --out_dir (out/miniature): every run,
summary.md (the tables), fig1.png and fig3.png (also copied to figures/miniature_*.png by the full run).
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw

from cka import BLUE_WHITE_RED, VIRIDIS, draw_panel, font, text

HERE = os.path.dirname(os.path.abspath(__file__))
PAIRS = [("toy-b", "toy-s")]  # (teacher, student): the whole toy family

# The hyper-parameters of each task, chosen on val (the selection is in the README): image side, batch, the
# peak LR of heads and adapters, SLAD's epochs (= each two-step stage's), a fully fine-tuned encoder's LR.
TASKS = {
    "synthetic": dict(img_size=56, batch_size=32, lr=3e-3, epochs=1, backbone_lr=3e-4),
    "synthetic-fine": dict(img_size=56, batch_size=32, lr=3e-3, epochs=3, backbone_lr=3e-4),
    "synthetic-seg": dict(img_size=112, batch_size=8, lr=3e-3, epochs=1, backbone_lr=3e-4),
}
ROLES = {"synthetic": "DTD", "synthetic-fine": "CUB / Aircraft", "synthetic-seg": "Cityscapes"}

# Table 1's rows: the script and its flags. Every two-step stage runs as many epochs as SLAD (the paper's 30 +
# 30; its Probing distils for 80 after 30, which would make Probing the costliest run here).
METHODS = {
    "Probing": ("train_twostep.py", ["--teacher_adapt", "probe"]),
    "Fine-tuning": ("train_twostep.py", ["--teacher_adapt", "finetune"]),
    "LoRA": ("train_twostep.py", ["--teacher_adapt", "lora"]),
    "LoRA +TAID": ("train_twostep.py", ["--teacher_adapt", "lora", "--kd", "taid"]),
    "LoRA +TED": ("train_twostep.py", ["--teacher_adapt", "lora", "--feat", "ted"]),
    "SLAD": ("train_slad.py", []),
    "SLAD +TAID": ("train_slad.py", ["--kd", "taid"]),
    # the premise: what the pretrained family buys, the same method from random-init toys (first seed only)
    "Probing, random init": ("train_twostep.py", ["--teacher_adapt", "probe", "--init", "random"]),
}
ONE_SEED = {"Probing, random init"}
SEG_METHODS = ["Probing", "LoRA", "SLAD"]  # the paper's Cityscapes column (first seed only: 4x the tokens)

# The paper's numbers, ViT-B -> ViT-S (Table 1: students; Table 3: teachers; Fig. 3: CKA on CUB)
PAPER_STUDENT = {"Probing": (89.80, 89.44, 81.93, 69.32), "LoRA": (90.01, 91.82, 84.71, 72.75),
                 "SLAD": (90.54, 92.50, 84.56, 73.91)}  # CUB, Aircraft, DTD, Cityscapes
PAPER_TEACHER = {"Probing": (90.29, 87.35, 83.76, 69.54), "LoRA": (90.64, 92.86, 86.28, 77.90),
                 "SLAD": (91.50, 93.50, 86.17, 75.45)}


def run_dir(out, task, method, teacher, student, seed):
    slug = method.lower().replace(" +", "-").replace(", ", "-").replace(" ", "-")
    return os.path.join(out, "runs", f"{task}-{teacher}-{student}-{slug}-s{seed}")


def command(task, method, teacher, student, seed, settings, out_dir):
    script, extra = METHODS[method]
    s = settings
    cmd = [sys.executable, os.path.join(HERE, script), "--dataset", task, "--teacher", teacher, "--student", student,
           "--seed", str(seed), "--device", "cpu", "--img_size", str(s["img_size"]), "--batch_size", str(s["batch_size"]),
           "--lr", str(s["lr"]), "--out_dir", out_dir, "--log_every", "100000", *extra]
    if script == "train_slad.py":
        return cmd + ["--epochs", str(s["epochs"])]
    return cmd + ["--teacher_epochs", str(s["epochs"]), "--student_epochs", str(s["epochs"]),
                  "--backbone_lr", str(s["backbone_lr"])]


def run_all(jobs, workers, log):
    """Run (out_dir, cmd) jobs, `workers` at a time, one CPU thread each; skip those already done."""
    todo = [(d, c) for d, c in jobs if not os.path.exists(os.path.join(d, "results.json"))]
    log(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to run, {workers} at a time")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread a run: on a shared CPU, threads contend
    running, done, t0 = [], 0, time.time()
    while todo or running:
        while todo and len(running) < workers:
            d, c = todo.pop(0)
            shutil.rmtree(d, ignore_errors=True)  # an interrupted run starts again
            os.makedirs(d)
            f = open(os.path.join(d, "stdout.txt"), "w")
            running.append((d, c, subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE), f, time.time()))
        time.sleep(0.5)
        for r in [r for r in running if r[2].poll() is not None]:
            running.remove(r)
            d, c, p, f, start = r
            f.close()
            done += 1
            if p.returncode:
                for other in running:  # stop the rest: they would go on unseen
                    other[2].terminate()
                sys.exit(f"miniature.py: error: {' '.join(c)} failed; see {os.path.join(d, 'stdout.txt')}")
            log(f"[{done}/{done + len(todo) + len(running)}] {os.path.basename(d)} {time.time() - start:.0f}s "
                f"(total {time.time() - t0:.0f}s)")


def read(d):
    """A run's results.json, with its final val accuracies (metrics.jsonl's last line of each stage)."""
    r = json.load(open(os.path.join(d, "results.json")))
    for line in open(os.path.join(d, "metrics.jsonl")):
        m = json.loads(line)
        r.update({k: v for k, v in m.items() if k.startswith("val_")})
    return r


def mean_std(values):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def score(r, role):
    """Test accuracy (%), or mIoU for segmentation, of the run's teacher or student."""
    return r.get(f"{role}_miou", r[f"{role}_acc"])


# -----------------------------------------------------------------------------
# Fig. 1 and Fig. 3, drawn with pillow


def ticks(lo, hi, n=7):
    """Round tick values in [lo, hi]: steps of 1, 2 or 5 times a power of ten, at most n + 1 of them."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [round(k * step, 10) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def fig1(points, title, path):
    """Student accuracy against training time, a labelled point per method (paper Fig. 1)."""
    W, H, L, R, T, B = 900, 520, 80, 200, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    big, small = font(16), font(13)
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


def tables(runs, tasks, methods, seeds, cka, out):
    """summary.md: the premise (val), Table 1 (students), Table 3 (teachers), Fig. 3's means, timings."""
    get = lambda task, m, t, s: [runs[(task, m, t, s, seed)] for seed in seeds if (task, m, t, s, seed) in runs]
    lines = []
    for t, s in PAIRS:
        cls = [k for k in tasks if k != "synthetic-seg"]
        head = [f"{k} ({ROLES[k]})" for k in tasks]
        lines += [f"### Table 1 in miniature: student {s}, teacher {t} (test %, mean ± std over seeds {seeds}; "
                  f"mIoU for segmentation)", "", "| method | " + " | ".join(head) + " | avg. (classification) |",
                  "| --- |" + " --- |" * (len(tasks) + 1)]
        for m in methods:
            cells, avg = [], []
            for k in tasks:
                v = [score(r, "student") for r in get(k, m, t, s)]
                cells.append(mean_std(v))
                if k in cls and v:
                    avg.append(statistics.mean(v))
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {statistics.mean(avg):.1f} |" if len(avg) == len(cls)
                         else f"| {m} | " + " | ".join(cells) + " | – |")
        lines += ["", f"### Table 3 in miniature: the teachers ({t}, test %)", "",
                  "| method | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(tasks)]
        for m in [m for m in ("Probing", "Fine-tuning", "LoRA", "SLAD") if m in methods]:
            lines.append(f"| {m} | " + " | ".join(mean_std([score(r, 'teacher') for r in get(k, m, t, s)]) for k in tasks) + " |")
        lines += ["", "### The premise, on val (final epoch; mean over seeds)", ""]
        for k in cls:
            val = lambda m, role: mean_std([r[f"val_{role}_acc"] for r in get(k, m, t, s)])
            lines.append(f"- {k}: probe on the pretrained teacher {val('Probing', 'teacher')} against "
                         f"{val('Probing, random init', 'teacher')} on the random-init one; LoRA teacher "
                         f"{val('LoRA', 'teacher')}, fine-tuned {val('Fine-tuning', 'teacher')}")
        lines += ["", "### Training time (s, one CPU thread a run; mean over seeds)", "",
                  "| method | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(mean_std([r["train_seconds"] for r in get(k, m, t, s)]) for k in tasks) + " |")
    if cka:
        lines += ["", f"### Fig. 3 in miniature: CKA of CLS tokens, {cka['dataset']} val, mean over mapped pairs g = {cka['g']}", "",
                  f"- pretrained: {100 * cka['pretrained']['mapped_mean']:.2f}%"]
        lines += [f"- after {n}: {100 * r['mapped_mean']:.2f}% ({100 * r['change']:+.2f})" for n, r in cka["runs"].items()]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    return md


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--quick", action="store_true", help="one seed, synthetic-fine only, 14-px images (one patch), one epoch")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=3, help="runs at a time (one CPU thread each)")
    p.add_argument("--out_dir", default="out/miniature")
    args = p.parse_args()
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)
    tasks, methods, seeds = dict(TASKS), list(METHODS), args.seeds
    if args.quick:
        tasks = {"synthetic-fine": dict(TASKS["synthetic-fine"], img_size=14, epochs=1)}
        methods, seeds = ["Probing", "Fine-tuning", "LoRA", "SLAD", "Probing, random init"], [0]

    jobs, keys = [], []
    for t, s in PAIRS:
        for task, settings in tasks.items():
            for m in (SEG_METHODS if task == "synthetic-seg" else methods):
                for seed in (seeds[:1] if task == "synthetic-seg" or m in ONE_SEED else seeds):
                    d = run_dir(args.out_dir, task, m, t, s, seed)
                    jobs.append((d, command(task, m, t, s, seed, settings, d)))
                    keys.append((task, m, t, s, seed))
    run_all(jobs, args.workers, log)
    runs = {k: read(d) for k, (d, _) in zip(keys, jobs)}

    # Fig. 3: the fine-grained task (CUB's role, as the paper's figure), the first seed, the first pair
    t, s = PAIRS[0]
    task = "synthetic-fine"
    cka_dir = os.path.join(args.out_dir, "cka")
    subprocess.run([sys.executable, os.path.join(HERE, "cka.py"), "--runs",
                    *[run_dir(args.out_dir, task, m, t, s, seeds[0]) for m in ("Fine-tuning", "LoRA", "SLAD")],
                    "--device", "cpu", "--img_size", str(tasks[task]["img_size"]), "--out_dir", cka_dir],
                   check=True, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="2"))
    cka = json.load(open(os.path.join(cka_dir, "cka.json")))
    cka["runs"] = {m: r for m, r in zip(("fine-tuning", "LoRA", "SLAD"), cka["runs"].values())}
    fig3(cka, os.path.join(args.out_dir, "fig3.png"))

    # Fig. 1: the fine-grained task, every method's student (not the random-init row), mean over seeds
    points = []
    for m in [m for m in methods if m not in ONE_SEED]:
        rs = [runs[k] for k in runs if k[:2] == (task, m) and k[2:4] == (t, s)]
        if rs:
            points.append((m, statistics.mean(r["train_seconds"] for r in rs), statistics.mean(r["student_acc"] for r in rs)))
    fig1(points, f"Student {s} (teacher {t}) on {task}: test accuracy against training time", os.path.join(args.out_dir, "fig1.png"))

    print(tables(runs, tasks, methods, seeds, cka, args.out_dir))
    if not args.quick:  # the README's figures
        for f in ("fig1", "fig3"):
            shutil.copy(os.path.join(args.out_dir, f"{f}.png"), os.path.join(HERE, "figures", f"miniature_{f}.png"))
    log(f"wrote {args.out_dir}: summary.md, fig1.png, fig3.png and every run")


if __name__ == "__main__":
    main()
