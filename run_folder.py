"""
The run folder's life, the same calls in both training scripts: a --resume's checkpoint checked (load_checkpoint),
the folder claimed for this run alone (claim), the log (print0), the trained tensors put back (restore), an epoch's
metrics row and checkpoint (end_epoch), a loss that is not finite (stop_if_not_finite), the confusion matrices and
results.json (finish), Ctrl-C told in one line (interrupted). Every file is written whole or not at all
(atomic_write). A refusal raises RunError, one line, which the scripts print.
"""

import contextlib
import csv
import io
import json
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

from data import held_out_splits
from distributed import ddp_end
from mfu import peak_flops
from images import DataError
from flags import RESUMABLE_CHANGES, config_id, dataset_name
from weights import CheckpointError

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


def claim(args, config, ckpt, method):
    """On the first process: make --out_dir this run's and only this run's, then write config.json. Returns the
    lock (keep it). A fresh run refuses a folder that holds another run's checkpoint or results; a folder left by
    a run that stopped before its first checkpoint (its config.json, no ckpt.pt) is started again if it was this
    config, and refused with what to delete if not. A resume drops what the killed run wrote after its checkpoint
    (drop_after_checkpoint). The log's first lines: the method, its flags and the folder; whether MFU is known."""
    if int(os.environ.get("RANK", 0)) > 0:
        return None
    held = claim_folder(args, config, ckpt)
    world = int(os.environ.get("WORLD_SIZE", 1))
    print0(f"{method} | {' '.join(sys.argv[1:])}" + (f" | {world} processes" if world > 1 else "") +
           f" | writing to {args.out_dir}", args.out_dir)
    if peak_flops(args.device) is None:
        print0(f"mfu: no dense bf16 peak is known for {args.device}, so the log shows none", args.out_dir)
    return held


def claim_folder(args, config, ckpt):
    out = args.out_dir
    in_the_way = file_in_path(out)  # makedirs would only say "Not a directory" or "File exists" of the whole path
    if in_the_way == os.path.normpath(out):
        raise RunError(f"--out_dir {out} is a file, not a folder: choose another --out_dir")
    if in_the_way:
        raise RunError(f"--out_dir {out}: {in_the_way} is a file, not a folder: choose another --out_dir")
    try:
        os.makedirs(out, exist_ok=True)
        held = lock(out)
    except OSError as e:
        raise RunError(f"cannot write to --out_dir {out}: {e.strerror or e}: choose another --out_dir")
    has = lambda f: os.path.exists(os.path.join(out, f))
    if ckpt is not None:
        drop_after_checkpoint(out, ckpt)
        return held
    if has("results.json"):
        raise RunError(f"{out} already holds a run, finished (its results.json is there): choose another --out_dir, "
                       f"or delete that folder to run it again")
    if has("ckpt.pt"):
        raise RunError(f"{out} already holds a run: continue it with --resume {os.path.join(out, 'ckpt.pt')}, or "
                       f"choose another --out_dir")
    if has("config.json"):  # a run that stopped in its first epoch (a kill, a bad image, a full disk)
        try:
            before = json.load(open(os.path.join(out, "config.json")))
        except (OSError, ValueError):
            before = None
        same = isinstance(before, dict) and config_id(before) == config_id(config)
        if not same or before.get("seed") != config["seed"]:
            raise RunError(f"{out} holds a run of another config that stopped before its first checkpoint: delete that "
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


def stop_if_not_finite(first_bad, steps, stage, out_dir, scaler):
    """RunError, one line, if a step's loss was not finite: first_bad is the first such step's index into the
    stage (a device tensor, 2**62 if none), so the check costs a host sync only where it is called. Not under
    float16's GradScaler, which skips an overflowed step: that is normal."""
    if scaler.is_enabled():
        return
    if dist.is_initialized():
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    it = int(first_bad)
    if it < 2**62:
        epoch, ckpt = it // steps + 1, os.path.join(out_dir, "ckpt.pt")
        where = f"the loss is not finite at {stage} epoch {epoch} step {it % steps + 1}: the run stops"
        retry = "a lower --lr (or --dtype float32 after bfloat16)"
        if not os.path.exists(ckpt):  # a checkpoint is written when an epoch ends
            raise RunError(f"{where} before its first checkpoint, so nothing is kept: run again with {retry}")
        kept = f"{stage} epoch {epoch - 1}" if epoch > 1 else "the end of the stage before"  # twostep's teacher
        raise RunError(f"{where}; {ckpt} keeps {kept}, but a --resume would take the same steps (its flags are "
                       f"fixed): start a new run with {retry}, in another --out_dir")


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
        raise RunError(f"--resume {path} does not hold the trained tensors of the model this config builds")
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


def load_checkpoint(args, config, method):
    """The --resume checkpoint, after checking it came from this script and this config; nothing is written."""
    path = args.resume
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"method", "config", "stage", "epoch", "models", "history"} <= set(ckpt)
    except IsADirectoryError:
        raise RunError(f"--resume {path} is a folder: give the checkpoint in it, --resume "
                       f"{os.path.join(path, 'ckpt.pt')}") from None
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a part of the path is a file
        folder = os.path.dirname(path) or "."
        killed = os.path.exists(os.path.join(folder, "config.json"))  # a run that stopped before its first epoch ended
        raise RunError(f"--resume {path}: no such file" + (
                       f"; {folder} holds a run that stopped before its first checkpoint: run the same command without "
                       f"--resume to start it again" if killed else ""))
    except Exception as e:
        raise RunError(f"--resume {path} is not a checkpoint written by these scripts (truncated?): {type(e).__name__}")
    if ckpt["method"] != method:
        raise RunError(f"--resume {path} was written by train_{ckpt['method']}.py, not this script (train_{method}.py)")
    diff = [f"{k}={v!r} (now {config.get(k)!r})" for k, v in ckpt["config"].items()
            if k not in RESUMABLE_CHANGES and config.get(k) != v]
    if diff:
        raise RunError(f"--resume {path} was written by another config: {', '.join(diff)}; give the run's own flags "
                       f"(its config.json) with --resume")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.abspath(args.out_dir) != folder:  # a resume continues in its checkpoint's folder, nowhere else
        raise RunError(f"--resume {path} continues the run in {folder}, not in --out_dir {args.out_dir}: drop "
                       f"--out_dir (to continue elsewhere, copy the whole run folder there first)")
    return ckpt


# -----------------------------------------------------------------------------
# the per-class figures results.json keeps, and the log's worst classes


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
# the calls of a training script: what a resume puts back, an epoch's end, the run's end


def kept_tensors(trained):
    """{name: (module, the names of what training changes in it now)}: what every checkpoint of the run holds of
    each of `trained` (no frozen backbone), fixed before a stage freezes anything."""
    return {name: (m, trained_keys(m)) for name, m in trained.items()}


def resumed(args, ckpt):
    """(history, stage, epochs done) of a --resume's checkpoint, said in the log; a fresh run's: (a history of
    nothing yet, None, 0)."""
    if ckpt is None:
        return {"train_seconds": 0.0, "metrics_rows": 0}, None, 0
    stage = "" if ckpt["method"] == "slad" else f"{ckpt['stage']} stage, "
    print0(f"resuming from {args.resume} ({stage}epoch {ckpt['epoch']} done)", args.out_dir)
    return ckpt["history"], ckpt["stage"], ckpt["epoch"]


def restore(ckpt, kept, optimizer, scaler, device, path):
    """A --resume (nothing to do without a checkpoint): the checkpoint's trained tensors, optimizer and GradScaler
    states and RNG states put back."""
    if ckpt is None:
        return
    for name, (m, keys) in kept.items():
        load_trained_tensors(m, ckpt["models"][name], keys, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)


def end_epoch(args, config, method, stage, epoch, metrics, t_epoch, kept, optimizer, scaler, history, device):
    """An epoch's end in the run folder: its row of metrics.jsonl, its time (since `t_epoch`) in `history`; and
    (ckpt.pt's path, what it keeps), all that --resume needs to continue exactly from here, for save_checkpoint."""
    seconds = time.perf_counter() - t_epoch
    history["train_seconds"] += seconds
    if int(os.environ.get("RANK", 0)) == 0:
        row = {"stage": stage, "epoch": epoch, **{k: round(v, 4) for k, v in metrics.items()},
               "epoch_seconds": round(seconds, 1)}
        append_line(os.path.join(args.out_dir, "metrics.jsonl"), json.dumps(row))
    history["metrics_rows"] += 1  # a resume keeps this many rows
    return os.path.join(args.out_dir, "ckpt.pt"), {
        "method": method, "config": config, "stage": stage, "epoch": epoch,
        "models": {name: trained_tensors(m, keys) for name, (m, keys) in kept.items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "history": history,
        "rng": rng_state(device)}


def finish(args, config, method, test, confusions, splits, history, **settings):
    """The run's end: results.json (the test figures, the method's `settings`, the per-class figures of each model's
    confusion matrix) and confusion_{model}.csv, on the first process; the results in the log; torchrun's end."""
    classes, segmentation = splits["test"].classes, any(k.endswith("_miou") for k in test)
    results = {"method": method, "dataset": config["dataset"], "data_name": dataset_name(config),
               "teacher": config["teacher"], "student": config["student"], "seed": config["seed"],
               **{k: round(v, 3) for k, v in test.items()}, **settings,
               "train_seconds": round(history["train_seconds"], 1), "held_out": list(held_out_splits(splits)),
               "per_class": per_class(classes, confusions, segmentation), "config_id": config_id(config),
               "config": config}
    if int(os.environ.get("RANK", 0)) == 0:
        for name, confusion in confusions.items():
            write_confusion(os.path.join(args.out_dir, f"confusion_{name}.csv"), confusion, classes)
        write_json(os.path.join(args.out_dir, "results.json"), results)
    shown = {k: v for k, v in results.items() if k not in ("config", "per_class")}  # per_class: the line below
    print0("results: " + json.dumps(shown), args.out_dir)
    print0(f"worst classes of the student: {worst_classes(results['per_class'], 'student')} (every class: python "
           f"report.py {args.out_dir} --per_class)", args.out_dir)
    ddp_end()  # torchrun: every process ends here


def command(main, parse_args):
    """A training script run as a command: a dataset or weights file it cannot use is one line and exit status 1
    (a refusal of the flags or of the run folder is already one line: the scripts' main), Ctrl-C one line and
    130 (interrupted)."""
    try:
        main()
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # what the folder keeps and the command that continues
        interrupted(parse_args()[0])
