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

import sys
import time

import torch

import run_folder
from data import SEGMENTATION, describe_splits, load_splits, make_loaders, next_batch, pixel_stats
from deploy import export_models
from distributed import ddp, ddp_init, ddp_mean, rank0_first, sync_gradients
from evaluation import evaluate, flat
from flags import NON_NEGATIVE, FlagError, dataset_name, parser, steps_per_epoch
from kd import distill_term, slad_loss
from lora import MAPPINGS, add_lora, share_lora, trainable_parameters
from mfu import mfu, step_flops
from model import Classifier, Segmenter, TeacherStudent, adamw, get_lr
from run_folder import RunError, hms, print0, save_checkpoint, stop_if_not_finite
from weights import backbone

# -----------------------------------------------------------------------------
# the paper's hyper-parameters (§4.1, App. C.2), the flags' defaults; AdamW's LR: a 5 % warm-up, a cosine (get_lr).
# Per dataset (data.DATASETS): 518-px crops, batch 32, LR 1e-3; Cityscapes and segmentation folders 560 px, batch 8;
# the procedural tasks 56 px (segmentation 112), LR 3e-3. The toy family: rank 4 (flags.TOY_DEFAULTS, chosen on val).
HPARAMS = dict(epochs=30, rank=16, weight_decay=0.05, temperature=2.0)  # eq. 4's loss weights: (1, 1, 1)


def parse_args(argv=None):
    p = parser(__doc__, "slad", HPARAMS)
    p.add_argument("--mapping", default="even", choices=MAPPINGS,
                   help="which teacher block shares its adapters with student block i (§5.2.1; paper: even)")
    p.add_argument("--kl_into_teacher", action="store_true", help="let eq. 4's KL term send gradients into the "
                   "teacher's logits too (default: they are the KL's fixed target, as in eq. 2) (paper: silent)")
    p.add_argument("--shared_init", default="teacher", choices=["teacher", "student"],
                   help="draw the shared A for the teacher's width (Kaiming, as LoRA on the teacher alone) or for the "
                        "student's (its slice starts as a fresh student adapter; on the teacher blocks it maps to)")
    p.add_argument("--kl_warmup", type=NON_NEGATIVE, default=0.0, metavar="FRACTION",
                   help="raise eq. 4's KL weight from 0 to 1 over this fraction of the steps, while the teacher learns "
                        "the task (paper: silent; default 0, a constant weight)")
    return p.resolve(p.parse_args(argv), "slad", HPARAMS), p


def train(args):
    config = dict(vars(args))
    ckpt = run_folder.load_checkpoint(args, config, "slad") if args.resume else None  # checked before any work

    # device and torchrun; raw torch AMP: autocast for the forward passes, a GradScaler only for float16
    rank, world, device = ddp_init(args.device)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)

    # data: each process loads its share of every global batch, in --grad_accum micro-batches
    with rank0_first():  # a download happens once
        splits, num_classes = load_splits(args.dataset, args.data_dir)
    train_loader, val_loader, test_loader = make_loaders(args.dataset, splits, args.img_size, args.batch_size,
                                                         args.seed, args.num_workers, device, rank, world,
                                                         args.grad_accum)
    steps = steps_per_epoch(train_loader, args, len(splits["train"]))

    # models: a teacher with LoRA adapters on qkv, a student whose adapters are the teacher's (Fig. 4)
    torch.manual_seed(args.seed)  # the heads' init
    Model = Segmenter if args.dataset in SEGMENTATION else Classifier  # the heads of App. C.1
    with rank0_first():  # a weights file is downloaded once
        teacher, student = Model(backbone(args, "teacher"), num_classes), Model(backbone(args, "student"), num_classes)
    teacher.vit.grad_checkpointing = student.vit.grad_checkpointing = args.grad_checkpointing
    add_lora(teacher.vit, rank=args.rank, separate=args.qkv_adapters == "separate")  # eq. 3 on each qkv, W0 frozen
    g = share_lora(student.vit, teacher.vit, args.mapping,  # student block i uses teacher block g(i)'s, sliced
                   init_width=student.vit.embed_dim if args.shared_init == "student" else None)
    models = {"teacher": teacher.to(device), "student": student.to(device)}
    named = trainable_parameters(teacher, student, named=True)  # each shared adapter once
    optimizer = adamw([(named, args.lr)], args.weight_decay, device)
    kd_term = distill_term(args.kd, args.epochs * steps, device)  # eq. 4's KL term, or TAID's (a module: its state)
    kept = run_folder.kept_tensors({**models, **({"taid": kd_term} if args.kd == "taid" else {})})  # checkpointed

    # the run folder: this run's alone while it runs; a --resume puts back what its checkpoint kept
    run_folder.claim(args, config, ckpt, "slad")
    print0(f"teacher {args.teacher}, student {args.student}, {num_classes} classes, "
           f"{sum(p.numel() for _, p in named) / 1e6:.2f}M trainable parameters; student block i uses the "
           f"adapters of teacher block g(i) = {g}", args.out_dir)
    print0(f"data {dataset_name(config)}: {describe_splits(splits)}", args.out_dir)
    history, _, start_epoch = run_folder.resumed(args, ckpt)
    run_folder.restore(ckpt, kept, optimizer, scaler, device, args.resume)
    both = ddp(TeacherStudent(teacher, student), device)  # one module, so DDP averages each shared adapter once
    step_model = torch.compile(both) if args.compile else both
    window = args.img_size if args.dataset in SEGMENTATION else None  # segmentation evaluates by sliding window
    stats = pixel_stats(args.teacher, args.teacher_weights)  # the mean and std the teacher was pretrained with
    flops_per_img = step_flops(teacher.vit, args.img_size, "lora") + step_flops(student.vit, args.img_size, "lora")

    # training, an epoch at a time; then validation, metrics.jsonl's row and the checkpoint
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        train_loss = train_epoch(args, epoch, both, step_model, optimizer, scaler, autocast, kd_term, train_loader,
                                 device, stats, flops_per_img)
        val = evaluate(models, val_loader, device, autocast, window, stats)
        metrics = {"train_loss": train_loss, **flat(val, "val_"),
                   **({"taid_t": float(kd_term.t)} if args.kd == "taid" else {})}
        print0(f"slad epoch {epoch + 1} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), args.out_dir)
        save_checkpoint(*run_folder.end_epoch(args, config, "slad", "slad", epoch + 1, metrics, t0, kept, optimizer,
                                              scaler, history, device))  # metrics.jsonl's row; ckpt.pt, for --resume

    # test; the exported models (adapters merged, with what prediction needs); results.json, the confusion matrices
    test = evaluate(models, test_loader, device, autocast, window, stats)
    export_models(args, models, splits["test"].classes)
    run_folder.finish(args, config, "slad", flat(test), {k: test[k]["confusion"] for k in models}, splits, history,
                      num_classes=num_classes, mapping=args.mapping, epochs=args.epochs, kd=args.kd, feat="none",
                      **({"taid_t": round(float(kd_term.t), 3)} if args.kd == "taid" else {}))


def train_epoch(args, epoch, both, step_model, optimizer, scaler, autocast, kd_term, loader, device, stats, flops):
    """One epoch of eq. 4 on every batch, teacher and student at once (`flops`: a step's per image); the mean loss."""
    both.train(), loader.sampler.set_epoch(epoch)
    steps = len(loader) // args.grad_accum
    batches, total = iter(loader), args.epochs * steps
    loss_sum, epoch_loss, t0 = torch.zeros((), device=device), 0.0, time.perf_counter()
    first_bad = torch.full((), 2**62, device=device)  # the first step whose loss is not finite
    for step in range(steps):
        it = epoch * steps + step
        lr = args.lr * get_lr(it, total)  # every parameter SLAD trains has the one peak, --lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(args.grad_accum):  # --grad_accum micro-batches make one step of the batch
            x, y = next_batch(batches, device, stats)
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
        if (step + 1) % args.log_every == 0 or step + 1 == steps:  # the loss is read (a host sync) only here
            stop_if_not_finite(first_bad, steps, "slad", args.out_dir, scaler)
            n = step % args.log_every + 1  # the steps since the last log line
            mean_loss, dt = ddp_mean(loss_sum, device) / n, (time.perf_counter() - t0) / n
            img_s = args.batch_size / dt
            print0(f"slad epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} | loss {mean_loss:.4f} | "
                   f"lr {lr:.2e} | {1000 * dt:.0f} ms/step | {img_s:.1f} img/s | "
                   f"mfu {mfu(flops * img_s, device)} | eta {hms((total - it - 1) * dt)}", args.out_dir)
            epoch_loss += mean_loss * n
            loss_sum, t0 = torch.zeros((), device=device), time.perf_counter()
    return epoch_loss / steps


def main():
    try:
        train(parse_args()[0])
    except (FlagError, RunError) as e:  # a refusal of the flags or of the run folder: one line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_folder.command(main, parse_args)  # a bad folder or weights file, Ctrl-C: one line (run_folder.command)
