"""
The two-step baselines of Table 1 (§3.1, §3.2; Marrie et al. 2024): adapt the teacher to the task, then
distill the frozen teacher into the student.

  stage 1, eq. 1: the teacher alone, cross-entropy, adapted by --teacher_adapt
      probe     encoder frozen, only the head trains ("Probing", Marrie et al.'s recipe)
      finetune  every weight trains
      lora      LoRA adapters on qkv and the head ("LoRA (ours)", §3.2)
  stage 2, eq. 2: the student, adapted by --student_adapt (lora or finetune), with
      alpha_s CE + alpha_KL T^2 KL(teacher || student), (alpha_s, alpha_KL) = (0.5, 0.5), T = 2, from the
      frozen teacher (eval mode, no grad)

Other objectives to compare with (kd.py):
  --kd taid   TAID's KL towards an interpolated target, whose t rises to 1, in place of eq. 2's KL
  --feat ted  TED: stage 1 also trains task-aware filters on the teacher blocks g(i) of --mapping, stage 2
              adds beta * MSE(filtered student block i, filtered teacher block g(i)) to eq. 2

Classification, or segmentation (per-pixel losses, a linear head, mIoU), by --dataset.

    python train_twostep.py --dataset dtd --teacher_adapt probe     # 30 + 80 epochs, as Marrie et al.
    python train_twostep.py --dataset synthetic --teacher toy-b --student toy-s --epochs 1 --device cpu \\
        --teacher_adapt lora --out_dir out/demo-lora   # the offline demo, on the pretrained toy family
"""

import json
import math
import os
import sys
import time

import torch

from data import SEGMENTATION, describe_splits, held_out_splits, load_splits, make_loaders, normalize
from deploy import deploy_meta, export
from experiment import (NON_NEGATIVE, POSITIVE, POSITIVE_INT, REAL_MODEL_DEFAULTS, TOY_DEFAULTS, RunError, adamw,
                        append_line, claim_out_dir, config_id, dataset_name, ddp, ddp_end, ddp_init, ddp_mean,
                        evaluate, flat, hms, interrupted, load_checkpoint, load_trained_tensors, parser, peak_flops,
                        per_class, print0, rank0_first, resolve_flags, rng_state, save_checkpoint, set_rng_state,
                        stop_if_not_finite, sync_gradients, trained_keys, trained_tensors, worst_classes,
                        write_confusion, write_json)
from images import DataError
from kd import TaskFilters, distill_loss, distill_term, task_loss, ted_loss
from lora import MAPPINGS, adapt, layer_mapping, trainable_parameters
from model import Classifier, Segmenter, step_flops
from weights import CheckpointError, initial_backbone


def add_ted_filters(teacher, student, mapping, num_classes):
    """TED's task-aware filters (kd.TaskFilters), d_f = the teacher's width wide (TED's default), put on the
    models they read so that they train and checkpoint with them: the teacher's on its blocks g(i) of the
    mapping, with task heads (trained in stage 1); the student's on each of its blocks (trained in stage 2).
    Returns g."""
    g = layer_mapping(len(student.vit.blocks), len(teacher.vit.blocks), mapping)
    d_f = teacher.vit.embed_dim
    teacher.ted_filters = TaskFilters(len(g), teacher.vit.embed_dim, d_f, num_classes, teacher.vit.config.patch_size)
    student.ted_filters = TaskFilters(len(g), student.vit.embed_dim, d_f)
    return g


def get_lr(it, total):
    """The learning rate of step `it` of `total`, as a fraction of the peak: a linear warm-up over the first
    5 % of the steps, then a cosine to zero."""
    warmup = max(1, round(0.05 * total))
    if it < warmup:
        return (it + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


def parse_args(argv=None):
    p = parser(__doc__, "twostep")
    p.add_argument("--teacher_adapt", default="lora", choices=["probe", "finetune", "lora"],
                   help="how stage 1 adapts the teacher")
    p.add_argument("--student_adapt", default=None, choices=["lora", "finetune"],
                   help="how stage 2 adapts the student (default: as the method reproduced: finetune after a probe or "
                        "finetune teacher, as Marrie et al.; lora after a lora teacher, as §3.2)")
    p.add_argument("--teacher_epochs", type=POSITIVE_INT, default=None, help="stage 1 epochs (default --epochs, or 30)")
    p.add_argument("--student_epochs", type=POSITIVE_INT, default=None,
                   help="stage 2 epochs (default --epochs, or 30; 80 after a probed teacher, as the paper)")
    p.add_argument("--backbone_lr", type=POSITIVE, default=None,
                   help=f"peak learning rate of a fully fine-tuned encoder ({REAL_MODEL_DEFAULTS['backbone_lr']:g}; "
                        f"{TOY_DEFAULTS['backbone_lr']:g} for the toy family)")
    p.add_argument("--feat", default="none", choices=["none", "ted"],
                   help="a layer-wise term on top of eq. 2: ted, TED's task-aware filters (kd.TaskFilters)")
    p.add_argument("--mapping", default="even", choices=MAPPINGS,
                   help="with --feat ted: the teacher block g(i) that student block i is distilled from (as SLAD's)")
    p.add_argument("--ted_beta", type=NON_NEGATIVE, default=1.0,
                   help="with --feat ted: the weight of TED's layer-wise MSE")
    args = p.parse_args(argv)
    args.teacher_epochs = args.teacher_epochs or args.epochs or 30
    args.student_epochs = args.student_epochs or args.epochs or (80 if args.teacher_adapt == "probe" else 30)
    args.student_adapt = args.student_adapt or ("lora" if args.teacher_adapt == "lora" else "finetune")
    return resolve_flags(args, p, "twostep"), p


def main():
    args, p = parse_args()
    config = dict(vars(args))
    ckpt = load_checkpoint(args, config, "twostep", p) if args.resume else None

    # device, raw torch AMP (autocast for the forward passes, a GradScaler only for float16), torchrun
    rank, world, device = ddp_init(args.device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # data: each process loads its share of every global batch, in --grad_accum micro-batches
    with rank0_first():  # a download happens once
        splits, num_classes = load_splits(args.dataset, args.data_dir)
    train_loader, val_loader, test_loader = make_loaders(args.dataset, splits, args.img_size, args.batch_size,
                                                         args.seed, args.num_workers, device, rank, world,
                                                         args.grad_accum)
    steps = len(train_loader) // args.grad_accum  # optimizer steps an epoch, the same on every process
    if steps == 0:
        n_train = len(splits["train"])
        p.error(f"--batch_size {args.batch_size} is more than the {n_train} training image"
                f"{'s' * (n_train != 1)}: no step to take")

    # models: each adapted as its flag says; TED's filters and TAID's state train and checkpoint with them
    torch.manual_seed(args.seed)  # the heads' init
    Model = Segmenter if args.dataset in SEGMENTATION else Classifier  # the heads of App. C.1
    with rank0_first():
        teacher = Model(initial_backbone(args.teacher, "teacher", args.init, args.seed, args.teacher_weights),
                        num_classes)
        student = Model(initial_backbone(args.student, "student", args.init, args.seed, args.student_weights),
                        num_classes)
    teacher.vit.grad_checkpointing = student.vit.grad_checkpointing = args.grad_checkpointing
    adapt(teacher, args.teacher_adapt, args.rank, args.qkv_adapters == "separate")
    adapt(student, args.student_adapt, args.rank, args.qkv_adapters == "separate")
    g = add_ted_filters(teacher, student, args.mapping, num_classes) if args.feat == "ted" else None
    kd_term = distill_term(args.kd, args.student_epochs * steps, device)  # eq. 2's KL term, or TAID's (its state)
    teacher.to(device), student.to(device)
    trained = {"teacher": teacher, "student": student, **({"taid": kd_term} if args.kd == "taid" else {})}
    keys = {name: trained_keys(m) for name, m in trained.items()}  # what a checkpoint holds: no frozen backbone

    # the output folder (this run's alone while it runs), and --resume
    folder_lock = claim_out_dir(args, config, ckpt, p)  # the folder is this run's until the process ends
    print0(f"twostep | {' '.join(sys.argv[1:])}" + (f" | {world} processes" if world > 1 else "") +
           f" | writing to {args.out_dir}", args.out_dir)
    for name, m in (("teacher", teacher), ("student", student)):
        print0(f"{name} {getattr(args, name)} ({getattr(args, name + '_adapt')}): "
               f"{sum(p.numel() for p in trainable_parameters(m)) / 1e6:.2f}M trainable parameters", args.out_dir)
    print0(f"data {dataset_name(config)}: {describe_splits(splits)}", args.out_dir)
    if g is not None:
        print0(f"TED: student block i is distilled from teacher block g(i) = {g}, through filters "
               f"{teacher.ted_filters.filters[0].out_features} wide", args.out_dir)
    history, stage, done = {"train_seconds": 0.0, "metrics_rows": 0}, None, 0
    if ckpt:
        history, stage, done = ckpt["history"], ckpt["stage"], ckpt["epoch"]
        print0(f"resuming from {args.resume} ({stage} stage, epoch {done} done)", args.out_dir)
    peak = peak_flops(device)
    if peak is None:
        print0(f"mfu: no dense bf16 peak is known for {device}, so the log shows none", args.out_dir)
    window = args.img_size if args.dataset in SEGMENTATION else None  # segmentation evaluates by sliding window

    def make_optimizer(model):
        """Heads, adapters and filters at --lr; a fully fine-tuned encoder at --backbone_lr."""
        is_backbone = lambda n: n.startswith("vit.") and "lora_" not in n
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return adamw([([(n, p) for n, p in named if not is_backbone(n)], args.lr),
                      ([(n, p) for n, p in named if is_backbone(n)], args.backbone_lr)], args.weight_decay, device)

    def resume(optimizer):
        for name, m in trained.items():
            load_trained_tensors(m, ckpt["models"][name], keys[name], args.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], device)

    def train_stage(name, model, step_model, loss_fn, optimizer, epochs, start_epoch, flops_per_img):
        """One stage: AdamW with get_lr's schedule, raw AMP, a val accuracy, a metrics row and a checkpoint an epoch.
        step_model is what loss_fn calls, `model` in DDP under torchrun."""
        total = epochs * steps
        for epoch in range(start_epoch, epochs):
            t_epoch = t0 = time.perf_counter()
            model.train()
            train_loader.sampler.set_epoch(epoch)
            loss_sum, n, epoch_loss = torch.zeros((), device=device), 0, 0.0
            first_bad = torch.full((), 2**62, device=device)  # the first step whose loss is not finite
            batches = iter(train_loader)
            for step in range(steps):
                it = epoch * steps + step
                lrm = get_lr(it, total)
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * lrm
                for micro in range(args.grad_accum):  # --grad_accum micro-batches make one step of the batch
                    x, y = next(batches)
                    x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
                    sync_gradients(step_model, micro == args.grad_accum - 1)
                    with autocast:
                        loss = loss_fn(x, y) / args.grad_accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                    first_bad = torch.where(torch.isfinite(loss.detach()), first_bad, first_bad.clamp(max=it))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if args.kd == "taid" and name == "student":
                    kd_term.step()  # TAID's t moves on, once a step

                # the loss stays on the device; it is read (a host sync) only for a log line
                n += 1
                if (step + 1) % args.log_every == 0 or step + 1 == steps:
                    if not scaler.is_enabled():  # fp16's GradScaler skips an overflowed step: that is normal
                        stop_if_not_finite(first_bad, steps, name, args.out_dir)
                    mean_loss = ddp_mean(loss_sum, device) / n
                    dt = (time.perf_counter() - t0) / n
                    img_s = args.batch_size / dt
                    mfu = f"{100 * flops_per_img * img_s / (peak * world):.1f}%" if peak else "n/a"
                    print0(f"{name} epoch {epoch + 1}/{epochs} step {step + 1}/{steps} | loss {mean_loss:.4f} | "
                           f"lr {args.lr * lrm:.2e} | {1000 * dt:.0f} ms/step | {img_s:.1f} img/s | mfu {mfu} | "
                           f"eta {hms((total - it - 1) * dt)}", args.out_dir)
                    epoch_loss += mean_loss * n
                    loss_sum, n, t0 = torch.zeros((), device=device), 0, time.perf_counter()

            # per epoch: validation, metrics.jsonl, the log line, the checkpoint
            val = evaluate({name: model}, val_loader, device, autocast, window)
            seconds = time.perf_counter() - t_epoch
            history["train_seconds"] += seconds
            metrics = {"train_loss": epoch_loss / steps, **flat(val, "val_"),
                       **({"taid_t": float(kd_term.t)} if args.kd == "taid" and name == "student" else {})}
            print0(f"{name} epoch {epoch + 1} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                   args.out_dir)
            if rank == 0:
                row = {"stage": name, "epoch": epoch + 1, **{k: round(v, 4) for k, v in metrics.items()},
                       "epoch_seconds": round(seconds, 1)}
                append_line(os.path.join(args.out_dir, "metrics.jsonl"), json.dumps(row))
            history["metrics_rows"] += 1  # a resume keeps this many rows
            save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
                "method": "twostep", "config": config, "stage": name, "epoch": epoch + 1,
                "models": {k: trained_tensors(m, keys[k]) for k, m in trained.items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "history": history,
                "rng": rng_state(device)})

    # stage 1 (eq. 1): the teacher alone, on the labels
    if stage in (None, "teacher"):
        optimizer = make_optimizer(teacher)
        if stage == "teacher":
            resume(optimizer)
        teacher_ddp = ddp(teacher, device)
        teacher_step = torch.compile(teacher_ddp) if args.compile else teacher_ddp

        def teach(x, y):
            if args.feat == "none":
                return task_loss(teacher_step(x), y)
            # and TED's Stage I: the filters learn the task from blocks g(i), detached: the teacher trains as without
            logits, blocks = teacher_step(x, g)
            filters = teacher.ted_filters
            return task_loss(logits, y) + filters.task_loss(filters([b.detach() for b in blocks]), y)

        train_stage("teacher", teacher, teacher_ddp, teach, optimizer, args.teacher_epochs,
                    done if stage == "teacher" else 0,
                    step_flops(teacher.vit, args.img_size, args.teacher_adapt))
        teacher_test = evaluate({"teacher": teacher}, test_loader, device, autocast, window)
        history["teacher_test"] = flat(teacher_test)
        history["teacher_confusion"] = teacher_test["teacher"]["confusion"].tolist()  # for the end, through a resume
        print0(f"teacher test: {history['teacher_test']}", args.out_dir)

    # stage 2 (eq. 2): the frozen teacher distilled into the student
    teacher.eval().requires_grad_(False)
    optimizer = make_optimizer(student)  # with --feat ted, the student's filters too
    if stage == "student":
        resume(optimizer)
    teacher_fwd = torch.compile(teacher) if args.compile else teacher
    student_ddp = ddp(student, device)
    student_step = torch.compile(student_ddp) if args.compile else student_ddp

    def distill(x, y):  # (alpha_s, alpha_KL) = (0.5, 0.5); --kd taid: TAID's term in place of the KL
        if args.feat == "none":
            with torch.no_grad():
                teacher_logits = teacher_fwd(x)
            return distill_loss(student_step(x), teacher_logits, y, T=args.temperature, kd_term=kd_term)
        # TED's Stage II: eq. 2 + beta * MSE(student filters(block i), frozen teacher filters(block g(i)))
        with torch.no_grad():
            teacher_logits, teacher_blocks = teacher_fwd(x, g)
            teacher_filtered = teacher.ted_filters(teacher_blocks)
        student_logits, student_blocks = student_step(x, range(len(g)))
        return (distill_loss(student_logits, teacher_logits, y, T=args.temperature, kd_term=kd_term)
                + args.ted_beta * ted_loss(student.ted_filters(student_blocks), teacher_filtered))

    train_stage("student", student, student_ddp, distill, optimizer, args.student_epochs,
                done if stage == "student" else 0,
                step_flops(teacher.vit, args.img_size, "frozen")
                + step_flops(student.vit, args.img_size, args.student_adapt))

    # test, the exported models (adapters merged, with what prediction needs), the confusion matrices, results.json
    test = evaluate({"student": student}, test_loader, device, autocast, window)
    classes = splits["test"].classes
    confusions = {"teacher": torch.tensor(history.get("teacher_confusion", test["student"]["confusion"] * 0)),
                  "student": test["student"]["confusion"]}  # (a checkpoint from before confusions were kept: zeros)
    results = {"method": "twostep", "dataset": args.dataset, "data_name": dataset_name(config), "teacher": args.teacher,
               "student": args.student, "seed": args.seed,
               **{k: round(v, 3) for k, v in {**history["teacher_test"], **flat(test)}.items()},
               "num_classes": num_classes, "teacher_adapt": args.teacher_adapt, "student_adapt": args.student_adapt,
               "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs, "kd": args.kd,
               "feat": args.feat, **({"taid_t": round(float(kd_term.t), 3)} if args.kd == "taid" else {}),
               **({"mapping": args.mapping} if args.feat == "ted" else {}),
               "train_seconds": round(history["train_seconds"], 1), "held_out": list(held_out_splits(splits)),
               "per_class": per_class(classes, confusions, window is not None), "config_id": config_id(config),
               "config": config}
    if rank == 0:
        meta = deploy_meta(args, classes)
        export(os.path.join(args.out_dir, "student.pt"), student, meta)
        export(os.path.join(args.out_dir, "teacher.pt"), teacher, meta)
        for name, confusion in confusions.items():
            write_confusion(os.path.join(args.out_dir, f"confusion_{name}.csv"), confusion, classes)
        write_json(os.path.join(args.out_dir, "results.json"), results)
    shown = {k: v for k, v in results.items() if k not in ("config", "per_class")}  # per_class: the line below
    print0("results: " + json.dumps(shown), args.out_dir)
    print0(f"worst classes of the student: {worst_classes(results['per_class'], 'student')} (every class: python "
           f"report.py {args.out_dir} --per_class)", args.out_dir)
    if world > 1:
        ddp_end()


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, RunError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: what the folder keeps and the command that continues, in one line
        interrupted(parse_args()[0])
