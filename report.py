"""
The results table: every run below a folder, laid out as the paper's Table 1 -- one row per (student,
teacher, method), one column per dataset, the student's test accuracy (mIoU for segmentation) as mean ± std
over seeds -- with the paper's published numbers next to the rows they belong to, labelled as the paper's.

    for s in 0 1 2; do
        python train_twostep.py --dataset dtd --teacher_adapt lora --seed $s --out_dir out/lora-dtd-s$s
        python train_twostep.py --dataset dtd --teacher_adapt lora --kd taid --seed $s --out_dir out/lora-taid-dtd-s$s
        python train_slad.py --dataset dtd --seed $s --out_dir out/slad-dtd-s$s
    done
    python report.py out/                  # prints the Markdown table
    python report.py out/ --out table.md   # and writes it to a file
    python report.py out/RUN --per_class   # and one run's per-class figures, its worst classes first

A run is a results.json (train_slad.py and train_twostep.py write one), found at any depth, symlinked folders
followed; of re-runs of one seed, the newest counts (the table says how many were left out). Seeds are
averaged only over runs of one config (results.json's config_id, a hash of every flag but the seed and those
that say where or how fast): runs of one method and dataset with different configs get a row each. Its method is
read from it: "Probing", "Fine-tuning" or "LoRA" for train_twostep.py's --teacher_adapt, "SLAD" for
train_slad.py, then what sets it apart: "+TED" (--feat ted), "+TAID" (--kd taid), a fine-tuned student, a
mapping other than even. Your own folders (--dataset folder, folder-seg) get a column each, named as their runs'
folders are (folder-flowers).

--per_class adds, for each run, the per-class test figures results.json holds (accuracy, or IoU for
segmentation; the student's and the teacher's), the student's worst class first, with the class the student
most often mistakes it for, read from the run's confusion_student.csv.
"""

import argparse
import csv
import json
import os
import statistics
import sys

MODEL_NAMES = {"vits14": "ViT-S", "vitb14": "ViT-B", "vitl14": "ViT-L"}  # the paper's names; others as they are
MODEL_ORDER = ["ViT-S", "ViT-B", "ViT-L", "vitg14"]
TEACHER_ADAPT = {"probe": "Probing", "finetune": "Fine-tuning", "lora": "LoRA"}
METHOD_ORDER = ["Probing", "Fine-tuning", "LoRA", "SLAD"]
CLASSIFICATION = ["cub", "aircraft", "dtd"]  # averaged in "Avg.", as Table 1
COLUMN_NAMES = {"cub": "CUB", "aircraft": "Aircraft", "dtd": "DTD", "avg": "Avg.", "cityscapes": "Cityscapes"}
PAPER_COLUMNS = ["cub", "aircraft", "dtd", "avg", "cityscapes"]
# flags that say where or how fast, not what is computed (flags.RESUMABLE_CHANGES), and the seed
IGNORED = {"resume", "out_dir", "data_dir", "device", "num_workers", "compile", "log_every", "grad_checkpointing",
           "grad_accum", "seed"}

# The paper's numbers (DINOv2; student test accuracy %, Cityscapes mIoU %), Table 1 and Table 4's fine-tuned
# teacher: (student, teacher, the method it belongs to here, the paper's label, source, values by PAPER_COLUMNS).
PAPER = [
    ("ViT-S", "ViT-B", "Probing", "Probing*", "Table 1", (89.80, 89.44, 81.93, 87.06, 69.32)),
    ("ViT-S", "ViT-B", "LoRA", "LoRA", "Table 1", (90.01, 91.82, 84.71, 88.85, 72.75)),
    ("ViT-S", "ViT-B", "SLAD", "SLAD", "Table 1", (90.54, 92.50, 84.56, 89.20, 73.91)),
    ("ViT-S", "ViT-L", "Probing", "Probing (Marrie et al.)", "Table 1", (89.70, 89.20, 83.40, 87.43, 74.00)),
    ("ViT-S", "ViT-L", "Probing", "Probing*", "Table 1", (89.61, 90.10, 81.61, 87.11, 72.42)),
    ("ViT-S", "ViT-L", "Fine-tuning", "Fine-tuning (Marrie et al.)", "Table 4", (88.60, 88.90, 81.50, 86.33, None)),
    ("ViT-S", "ViT-L", "LoRA", "LoRA", "Table 1", (90.04, 91.46, 84.18, 88.56, 73.43)),
    ("ViT-S", "ViT-L", "SLAD", "SLAD", "Table 1", (90.44, 92.44, 84.24, 89.04, 73.97)),
    ("ViT-B", "ViT-L", "Probing", "Probing*", "Table 1", (90.61, 91.02, 83.49, 88.37, 73.87)),
    ("ViT-B", "ViT-L", "LoRA", "LoRA", "Table 1", (91.41, 93.25, 86.58, 90.41, 77.06)),
    ("ViT-B", "ViT-L", "SLAD", "SLAD", "Table 1", (91.81, 94.18, 86.40, 90.80, 77.35)),
]
# Table 2: SLAD's students by mapping (CUB, Aircraft, DTD), the first and last ones (even: Table 1's SLAD rows)
PAPER_MAPPING = {("ViT-S", "ViT-L"): {"first": (90.32, 92.64, 84.29), "last": (90.33, 92.58, 84.38)},
                 ("ViT-B", "ViT-L"): {"first": (91.81, 93.95, 86.67), "last": (91.82, 94.04, 86.67)}}
# Table 3: the teachers (CUB, Aircraft, DTD, Cityscapes), by method; SLAD's by its student too
PAPER_TEACHER = {"ViT-B": {"Probing": (90.29, 87.35, 83.76, 69.54), "LoRA": (90.64, 92.86, 86.28, 77.90),
                           "SLAD (ViT-S)": (91.50, 93.50, 86.17, 75.45)},
                 "ViT-L": {"Probing": (91.46, 90.84, 84.40, 72.58), "LoRA": (91.78, 94.32, 87.23, 79.99),
                           "SLAD (ViT-S)": (92.21, 94.96, 87.21, 77.61), "SLAD (ViT-B)": (92.57, 95.14, 87.52, 79.02)}}


class Parser(argparse.ArgumentParser):  # flags.Parser's twin: importing torch would take seconds to read JSON
    def error(self, message):  # one line, non-zero exit, instead of argparse's usage block
        sys.exit(f"{self.prog}: error: {message}")


def find_runs(folder):
    """Every results.json below folder (symlinks followed, each folder once), read, oldest first; one that cannot
    be read is left out with a warning that names it; stops with one line if none is left."""
    if not os.path.isdir(folder) or not os.access(folder, os.R_OK | os.X_OK):
        sys.exit(f"report.py: error: {folder} is not a folder this user can read")

    def unreadable(e):
        sys.exit(f"report.py: error: cannot read {e.filename}: {e.strerror}")
    paths, seen = [], set()
    for d, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        if os.path.realpath(d) in seen:  # a symlink cycle, or a run reached twice
            dirs[:] = []
            continue
        seen.add(os.path.realpath(d))
        if "results.json" in files:
            paths.append(os.path.join(d, "results.json"))
    paths.sort(key=lambda p: (os.path.getmtime(p), p))  # oldest first: a seed's newest run is read last
    if not paths:
        sys.exit(f"report.py: error: no results.json below {folder}: point it at the runs' --out_dir, or a folder "
                 f"above them")
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                r = json.load(f)
            assert {"method", "dataset", "teacher", "student", "seed"} <= set(r)
            assert "student_acc" in r or "student_miou" in r
        except Exception as e:  # one bad file (a copy cut short, a hand edit) costs its own row, not the table
            print(f"report.py: warning: {path} is not a results.json of train_slad.py or train_twostep.py "
                  f"({type(e).__name__}): left out of the table", file=sys.stderr)
            continue
        r["_dir"] = os.path.dirname(path)  # not in the file: where it was found
        runs.append(r)
    if not runs:
        sys.exit(f"report.py: error: no run to report below {folder}: " + (
            "its results.json was left out (the warning above says why)" if len(paths) == 1 else
            f"all {len(paths)} results.json files were left out (the warnings above say why)"))
    return runs


def method_of(r):
    """(base method, label): Table 1's name of the run's method, and the label that adds what sets it apart."""
    base = "SLAD" if r["method"] == "slad" else TEACHER_ADAPT.get(r.get("teacher_adapt"), r["method"])
    label = base
    published = "lora" if r.get("teacher_adapt") == "lora" else "finetune"  # the student of the method as published
    if r["method"] == "twostep" and r.get("student_adapt", published) != published:
        label += " (LoRA student)" if r["student_adapt"] == "lora" else " (student fine-tuned)"
    if r.get("mapping", "even") != "even":
        label += f" ({r['mapping']} mapping)"
    if r.get("feat", "none") != "none":
        label += " +" + r["feat"].upper()
    if r.get("kd", "kl") != "kl":
        label += " +" + r["kd"].upper()
    return base, label


def score(r):
    """The student's test mIoU for segmentation, else its test accuracy (%)."""
    return r["student_miou"] if "student_miou" in r else r["student_acc"]


def difference(config, cid, configs):
    """What sets one config apart from the others of its cell: its id, then each flag whose value differs."""
    others = [c for k, (c, _) in configs.items() if k != cid]
    keys = sorted(k for k in config if k not in IGNORED and any(o.get(k) != config[k] for o in others))
    return ", ".join([f"config {cid or 'unknown'}"] + [f"{k} {config[k]}" for k in keys])


def cell(values):
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def table(runs):
    """The Markdown table of the runs (and of the paper's rows for the model pairs they cover)."""
    cells = {}  # (student, teacher, base, label, dataset) -> {config id: (config, {seed: score})}
    for r in runs:  # oldest first: a re-run of a seed replaces the earlier one
        key = (MODEL_NAMES.get(r["student"], r["student"]), MODEL_NAMES.get(r["teacher"], r["teacher"]), *method_of(r),
               r.get("data_name", r["dataset"]))
        config, seeds = cells.setdefault(key, {}).setdefault(r.get("config_id", ""), (r.get("config") or {}, {}))
        seeds[r["seed"]] = score(r)
    reruns = len(runs) - sum(len(seeds) for configs in cells.values() for _, seeds in configs.values())
    groups, split = {}, False  # (student, teacher, base, label) -> {dataset: [score of each seed]}
    for (student, teacher, base, label, dataset), configs in cells.items():
        for cid, (config, seeds) in configs.items():  # runs of different configs are never averaged together
            name = label if len(configs) == 1 else f"{label} [{difference(config, cid, configs)}]"
            split |= len(configs) > 1
            groups.setdefault((student, teacher, base, name), {})[dataset] = list(seeds.values())
    pairs = {k[:2] for k in groups}
    paper = [p for p in PAPER if p[:2] in pairs]

    datasets = {d for ds in groups.values() for d in ds}
    avg = any(set(CLASSIFICATION) <= set(ds) for ds in groups.values())
    columns = PAPER_COLUMNS if paper else [c for c in PAPER_COLUMNS if c in datasets or (c == "avg" and avg)]
    columns = columns + sorted(datasets - set(columns))

    rows = []  # (sort key, cells)
    rank = lambda name, order: (order.index(name) if name in order else len(order), name)
    for (student, teacher, base, label), ds in groups.items():
        means = {d: statistics.mean(v) for d, v in ds.items()}
        cells = {d: cell(v) for d, v in ds.items()}
        if set(CLASSIFICATION) <= set(means):
            cells["avg"] = f"{statistics.mean(means[d] for d in CLASSIFICATION):.2f}"
        variant = 0 if label == base else 2
        rows.append(((rank(teacher, MODEL_ORDER), rank(student, MODEL_ORDER), rank(base, METHOD_ORDER), variant, label),
                     [student, teacher, label, "ours"] + [cells.get(c, "–") for c in columns]))
    for student, teacher, base, name, source, values in paper:
        cells = {c: f"{v:.2f}" for c, v in zip(PAPER_COLUMNS, values) if v is not None}
        rows.append(((rank(teacher, MODEL_ORDER), rank(student, MODEL_ORDER), rank(base, METHOD_ORDER), 1, name),
                     [student, teacher, name, f"paper ({source})"] + [cells.get(c, "–") for c in columns]))

    header = ["student", "teacher", "method", "source"] + [COLUMN_NAMES.get(c, c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for _, cells in sorted(rows)]
    note = "Student test accuracy (%; mIoU for segmentation), mean ± sample std over seeds (n seeds)."
    if reruns:
        note += (f" {reruns} re-run{'s' * (reruns > 1)} of a seed already counted left out: of the runs of one "
                 f"seed, the newest results.json counts.")
    if split:
        note += (" Runs of one method and dataset with different configs are reported apart, never averaged: "
                 "[...] says what sets each apart (its config id, and the flags that differ).")
    if "avg" in columns:
        note += " Avg.: the mean of CUB, Aircraft and DTD."
    if paper:
        note += (" Rows marked paper are the numbers published in the SLAD paper (DINOv2, its Table 1 and Table 4), "
                 "not measured here; Probing* is its re-implementation of Marrie et al.")
    return note + "\n\n" + "\n".join(lines) + "\n"


def mistakes(folder, classes):
    """{class: "the class the student most often predicts for it (how often)"} from folder/confusion_student.csv;
    {} where there is none."""
    try:
        with open(os.path.join(folder, "confusion_student.csv"), newline="") as f:
            rows = list(csv.reader(f))[1:]
    except OSError:
        return {}
    out = {}
    for k, (label, *counts) in enumerate(rows):
        counts = [int(c) if j != k else -1 for j, c in enumerate(counts)]  # the diagonal is no mistake
        j = max(range(len(counts)), key=counts.__getitem__, default=None)
        if j is not None and counts[j] > 0:
            out[label] = f"{classes[j]} ({counts[j]})"
    return out


def per_class_table(r):
    """One run's per-class test figures as Markdown, the student's worst class first."""
    figures, where = r.get("per_class"), r["_dir"]
    if not figures:
        return f"{where}: no per-class figures (a run from before results.json recorded them)\n"
    what, unit = ("IoU", "pixels") if figures["figure"] == "iou" else ("accuracy", "images")
    _, label = method_of(r)
    lines = [f"Per-class test {what} (%) of {where}: {label}, {r.get('data_name', r['dataset'])}, {r['teacher']} -> "
             f"{r['student']}, config {r.get('config_id', '?')}, seed {r['seed']}; the student's worst class first.",
             "", f"| class | student | teacher | test {unit} | the student's most frequent mistake for it |",
             "| --- | --- | --- | --- | --- |"]
    wrong = mistakes(where, figures["classes"])
    number = lambda v: "–" if v is None else f"{v:.1f}"
    student = figures["student"]
    order = sorted(range(len(student)), key=lambda k: (student[k] is None, student[k] or 0))  # absent classes last
    for k in order:
        c = figures["classes"][k]
        lines.append(f"| {c} | {number(figures['student'][k])} | {number(figures['teacher'][k])} | "
                     f"{figures['test_count'][k]} | {wrong.get(c, '–')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a folder of runs: every results.json below it is read")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the Markdown to FILE")
    p.add_argument("--per_class", action="store_true",
                   help="also each run's per-class test figures, its worst classes first (point it at a run's folder)")
    return p.parse_args(argv), p


def main(argv=None):
    args, _ = parse_args(argv)
    runs = find_runs(args.folder)
    text = table(runs)
    if args.per_class:
        text += "".join("\n" + per_class_table(r) for r in sorted(runs, key=lambda r: r["_dir"]))
    print(text, end="")
    if args.out:
        try:
            with open(args.out, "w") as f:
                f.write(text)
        except OSError as e:
            sys.exit(f"report.py: error: cannot write {args.out}: {e.strerror}")
    return text


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130, a shell's exit status for it
        print("report.py: interrupted", file=sys.stderr)
        sys.exit(130)
