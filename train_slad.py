"""
SLAD (§3.3): the teacher and the student adapted to the task jointly, in one stage. The teacher carries LoRA
adapters on its qkv matrices; the student's adapters are the teacher's own Parameters, sliced to the
student's width (Fig. 4), on the teacher blocks that --mapping pairs with the student's; both are trained by
one loss, eq. 4, on the same augmented batch (App. C.2). Classification or segmentation, by --dataset.
With --kd taid, TAID's KL towards an interpolated target, whose t rises to 1, replaces eq. 4's KL (kd.TAID).

    python train_slad.py --dataset dtd          # DINOv2 ViT-B/14 -> ViT-S/14, 30 epochs
    python train_slad.py --dataset dtd --teacher dinov3_vitl16 --student dinov3_vits16  # DINOv3, at 512 px
    python train_slad.py --dataset synthetic --teacher toy-b --student toy-s --epochs 1 --device cpu
                                                # the offline demo, on the pretrained toy family: ~22 s on 2 CPU cores
"""

import json
import math
import os
import sys
import time

import torch

from data import SEGMENTATION, describe_splits, held_out_splits, load_splits, make_loaders, normalize
from deploy import deploy_meta, export
from experiment import (NON_NEGATIVE, RunError, adamw, append_line, claim_out_dir, config_id, dataset_name, ddp,
                        ddp_end, ddp_init, ddp_mean, evaluate, flat, hms, interrupted, load_checkpoint,
                        load_trained_tensors, parser, peak_flops, per_class, print0, rank0_first, resolve_flags,
                        rng_state, save_checkpoint, set_rng_state, stop_if_not_finite, sync_gradients, trained_keys,
                        trained_tensors, worst_classes, write_confusion, write_json)
from images import DataError
from kd import distill_term, slad_loss
from lora import MAPPINGS, add_lora, share_lora, trainable_parameters
from model import Classifier, Segmenter, TeacherStudent, step_flops
from weights import CheckpointError, initial_backbone


def get_lr(it, total):
    """The learning rate of step `it` of `total`, as a fraction of the peak: a linear warm-up over the first
    5 % of the steps, then a cosine to zero."""
    warmup = max(1, round(0.05 * total))
    if it < warmup:
        return (it + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


def parse_args(argv=None):
    p = parser(__doc__, "slad")
    p.add_argument("--mapping", default="even", choices=MAPPINGS,
                   help="which teacher block shares its adapters with student block i (§5.2.1; paper: even)")
    p.add_argument("--kl_into_teacher", action="store_true",
                   help="let eq. 4's KL term send gradients into the teacher's logits too (default: the "
                        "teacher's logits are the KL's fixed target, as in eq. 2) (paper: silent)")
    p.add_argument("--shared_init", default="teacher", choices=["teacher", "student"],
                   help="draw the shared A for the teacher's width (Kaiming, as LoRA on the teacher alone), or for "
                        "the student's, so that the student's slice starts as a fresh student adapter would (the "
                        "teacher's A then sqrt(d_t / d_s) larger) (paper: silent)")
    p.add_argument("--kl_warmup", type=NON_NEGATIVE, default=0.0, metavar="FRACTION",
                   help="raise eq. 4's KL weight from 0 to 1 over this fraction of the steps, while the teacher "
                        "learns the task (default 0: the paper's constant weight; the paper is silent)")
    args = p.parse_args(argv)
    args.epochs = args.epochs or 30
    return resolve_flags(args, p, "slad"), p


def main():
    args, p = parse_args()
    config = dict(vars(args))
    ckpt = load_checkpoint(args, config, "slad", p) if args.resume else None

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

    # models: a teacher with LoRA adapters on qkv, a student whose adapters are the teacher's (Fig. 4)
    torch.manual_seed(args.seed)  # the heads' init
    Model = Segmenter if args.dataset in SEGMENTATION else Classifier  # the heads of App. C.1
    with rank0_first():
        teacher = Model(initial_backbone(args.teacher, "teacher", args.init, args.seed, args.teacher_weights),
                        num_classes)
        student = Model(initial_backbone(args.student, "student", args.init, args.seed, args.student_weights),
                        num_classes)
    teacher.vit.grad_checkpointing = student.vit.grad_checkpointing = args.grad_checkpointing
    add_lora(teacher.vit, rank=args.rank, separate=args.qkv_adapters == "separate",  # eq. 3 on every block's qkv;
             init_width=student.vit.embed_dim if args.shared_init == "student" else None)  # the backbone frozen
    g = share_lora(student.vit, teacher.vit, args.mapping)  # student block i uses teacher block g(i)'s, sliced
    teacher.to(device), student.to(device)
    named = trainable_parameters(teacher, student, named=True)  # each shared adapter once
    params = [p for _, p in named]
    optimizer = adamw([(named, args.lr)], args.weight_decay, device)
    kd_term = distill_term(args.kd, args.epochs * steps, device)  # eq. 4's KL term, or TAID's (a module: its state)
    trained = {"teacher": teacher, "student": student, **({"taid": kd_term} if args.kd == "taid" else {})}
    keys = {name: trained_keys(m) for name, m in trained.items()}  # what a checkpoint holds: no frozen backbone

    # the output folder (this run's alone while it runs), and --resume
    folder_lock = claim_out_dir(args, config, ckpt, p)  # the folder is this run's until the process ends
    print0(f"slad | {' '.join(sys.argv[1:])}" + (f" | {world} processes" if world > 1 else "") +
           f" | writing to {args.out_dir}", args.out_dir)
    print0(f"teacher {args.teacher}, student {args.student}, {num_classes} classes, "
           f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters; student block i uses the "
           f"adapters of teacher block g(i) = {g}", args.out_dir)
    print0(f"data {dataset_name(config)}: {describe_splits(splits)}", args.out_dir)
    history, start_epoch = {"train_seconds": 0.0, "metrics_rows": 0}, 0
    if ckpt:
        for name, m in trained.items():
            load_trained_tensors(m, ckpt["models"][name], keys[name], args.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], device)
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        print0(f"resuming from {args.resume} (epoch {start_epoch} done)", args.out_dir)
    both = ddp(TeacherStudent(teacher, student), device)  # one module, so DDP averages each shared adapter once
    step_model = torch.compile(both) if args.compile else both

    # training: eq. 4 on every batch, both models at once
    total = args.epochs * steps
    flops_per_img = step_flops(teacher.vit, args.img_size, "lora") + step_flops(student.vit, args.img_size, "lora")
    peak = peak_flops(device)
    if peak is None:
        print0(f"mfu: no dense bf16 peak is known for {device}, so the log shows none", args.out_dir)
    window = args.img_size if args.dataset in SEGMENTATION else None  # segmentation evaluates by sliding window
    for epoch in range(start_epoch, args.epochs):
        t_epoch = t0 = time.perf_counter()
        teacher.train(), student.train()
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
                sync_gradients(both, micro == args.grad_accum - 1)
                with autocast:
                    teacher_logits, student_logits = step_model(x)  # the same augmented batch for both (App. C.2)
                    loss = slad_loss(student_logits, teacher_logits, y, T=args.temperature,  # eq. 4, (1, 1, 1)
                                     alpha_kl=min(1.0, it / (args.kl_warmup * total)) if args.kl_warmup else 1.0,
                                     kl_into_teacher=args.kl_into_teacher, kd_term=kd_term) / args.grad_accum
                scaler.scale(loss).backward()  # reaches the shared adapters from both models
                loss_sum += loss.detach()
                first_bad = torch.where(torch.isfinite(loss.detach()), first_bad, first_bad.clamp(max=it))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if args.kd == "taid":
                kd_term.step()  # TAID's t moves on, once a step

            # the loss stays on the device; it is read (a host sync) only for a log line
            n += 1
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                if not scaler.is_enabled():  # fp16's GradScaler skips an overflowed step: that is normal
                    stop_if_not_finite(first_bad, steps, "slad", args.out_dir)
                mean_loss = ddp_mean(loss_sum, device) / n
                dt = (time.perf_counter() - t0) / n
                img_s = args.batch_size / dt
                mfu = f"{100 * flops_per_img * img_s / (peak * world):.1f}%" if peak else "n/a"
                print0(f"slad epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} | loss {mean_loss:.4f} | "
                       f"lr {args.lr * lrm:.2e} | {1000 * dt:.0f} ms/step | {img_s:.1f} img/s | mfu {mfu} | "
                       f"eta {hms((total - it - 1) * dt)}", args.out_dir)
                epoch_loss += mean_loss * n
                loss_sum, n, t0 = torch.zeros((), device=device), 0, time.perf_counter()

        # per epoch: validation, metrics.jsonl, the log line, the checkpoint
        val = evaluate({"teacher": teacher, "student": student}, val_loader, device, autocast, window)
        seconds = time.perf_counter() - t_epoch
        history["train_seconds"] += seconds
        metrics = {"train_loss": epoch_loss / steps, **flat(val, "val_"),
                   **({"taid_t": float(kd_term.t)} if args.kd == "taid" else {})}
        print0(f"slad epoch {epoch + 1} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), args.out_dir)
        if rank == 0:
            row = {"stage": "slad", "epoch": epoch + 1, **{k: round(v, 4) for k, v in metrics.items()},
                   "epoch_seconds": round(seconds, 1)}
            append_line(os.path.join(args.out_dir, "metrics.jsonl"), json.dumps(row))
        history["metrics_rows"] += 1  # a resume keeps this many rows
        save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
            "method": "slad", "config": config, "stage": "slad", "epoch": epoch + 1,
            "models": {name: trained_tensors(m, keys[name]) for name, m in trained.items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "history": history,
            "rng": rng_state(device)})

    # test, the exported models (adapters merged, with what prediction needs), the confusion matrices, results.json
    test = evaluate({"teacher": teacher, "student": student}, test_loader, device, autocast, window)
    classes = splits["test"].classes
    confusions = {name: test[name]["confusion"] for name in ("teacher", "student")}
    results = {"method": "slad", "dataset": args.dataset, "data_name": dataset_name(config), "teacher": args.teacher,
               "student": args.student, "seed": args.seed, **{k: round(v, 3) for k, v in flat(test).items()},
               "num_classes": num_classes, "mapping": args.mapping, "epochs": args.epochs, "kd": args.kd,
               "feat": "none", **({"taid_t": round(float(kd_term.t), 3)} if args.kd == "taid" else {}),
               "train_seconds": round(history["train_seconds"], 1),
               "held_out": list(held_out_splits(splits)),
               "per_class": per_class(classes, confusions, window is not None),
               "config_id": config_id(config), "config": config}
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
