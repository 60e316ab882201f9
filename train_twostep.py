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

import functools
import sys
import time

import torch

import run_folder
from data import SEGMENTATION, describe_splits, load_splits, make_loaders, next_batch, pixel_stats
from deploy import export_models
from distributed import ddp, ddp_init, ddp_mean, rank0_first, sync_gradients, unwrap
from evaluation import evaluate, flat
from flags import NON_NEGATIVE, POSITIVE, POSITIVE_INT, TOY_DEFAULTS, FlagError, dataset_name, parser, steps_per_epoch
from kd import TaskFilters, distill_loss, distill_term, task_loss, ted_loss
from lora import MAPPINGS, adapt, layer_mapping, trainable_parameters
from mfu import mfu, step_flops
from model import Classifier, Segmenter, adamw, get_lr
from run_folder import RunError, hms, kept_tensors, print0, save_checkpoint, stop_if_not_finite
from weights import backbone

# -----------------------------------------------------------------------------
# the paper's hyper-parameters (§4.1, App. C.2), the flags' defaults: 30 + 30 epochs (30 + 80 after a probe, as
# Marrie et al.); AdamW's LR: a 5 % warm-up, a cosine (get_lr), a fully trained encoder's Marrie et al.'s 2e-5. Per
# dataset (data.DATASETS): 518-px crops, batch 32, LR 1e-3; Cityscapes and segmentation folders 560 px, batch 8; the
# procedural tasks 56 px (segmentation 112), LR 3e-3. The toy family: rank 4, encoder LR 1e-3 (flags.TOY_DEFAULTS).
HPARAMS = dict(rank=16, backbone_lr=2e-5, weight_decay=0.05, temperature=2.0)  # eq. 2: (alpha_s, alpha_KL) = (.5, .5)


def parse_args(argv=None):
    p = parser(__doc__, "twostep", HPARAMS)
    p.add_argument("--teacher_adapt", default="lora", choices=["probe", "finetune", "lora"],
                   help="how stage 1 adapts the teacher")
    p.add_argument("--student_adapt", default=None, choices=["lora", "finetune"],
                   help="how stage 2 adapts the student (default: as the method reproduced: finetune after a probe or "
                        "finetune teacher, as Marrie et al.; lora after a lora teacher, as §3.2)")
    p.add_argument("--teacher_epochs", type=POSITIVE_INT, default=None, help="stage 1 epochs (default --epochs, or 30)")
    p.add_argument("--student_epochs", type=POSITIVE_INT, default=None,
                   help="stage 2 epochs (default --epochs, or 30; 80 after a probed teacher, as the paper)")
    p.add_argument("--backbone_lr", type=POSITIVE, default=None,
                   help=f"peak learning rate of a fully fine-tuned encoder ({HPARAMS['backbone_lr']:g}; "
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
    return p.resolve(args, "twostep", HPARAMS), p


def main():
    try:
        train(parse_args()[0])
    except (FlagError, RunError) as e:  # a refusal of the flags or of the run folder: one line
        sys.exit(f"error: {e}")


def train(args):
    config = dict(vars(args))
    ckpt = run_folder.load_checkpoint(args, config, "twostep") if args.resume else None  # checked before any work

    # data, on this device: under torchrun each process loads its share of every global batch, in --grad_accum
    # micro-batches
    rank, world, device = ddp_init(args.device)
    with rank0_first():  # a download happens once
        splits, num_classes = load_splits(args.dataset, args.data_dir)
    loaders = make_loaders(args.dataset, splits, args.img_size, args.batch_size, args.seed, args.num_workers, device,
                           rank, world, args.grad_accum)  # train, val, test
    steps = steps_per_epoch(loaders[0], args, len(splits["train"]))

    # raw torch AMP: autocast for the forward passes, a GradScaler only for float16
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)

    # models: each adapted as its flag says; TED's filters and TAID's state train and checkpoint with them
    torch.manual_seed(args.seed)  # the heads' init
    Model = Segmenter if args.dataset in SEGMENTATION else Classifier  # the heads of App. C.1
    with rank0_first():  # a weights file is downloaded once
        teacher, student = Model(backbone(args, "teacher"), num_classes), Model(backbone(args, "student"), num_classes)
    teacher.vit.grad_checkpointing = student.vit.grad_checkpointing = args.grad_checkpointing
    adapt(teacher, args.teacher_adapt, args.rank, args.qkv_adapters == "separate")
    adapt(student, args.student_adapt, args.rank, args.qkv_adapters == "separate")
    g = add_ted_filters(teacher, student, args.mapping, num_classes) if args.feat == "ted" else None
    kd_term = distill_term(args.kd, args.student_epochs * steps, device)  # eq. 2's KL term, or TAID's (its state)
    teacher.to(device), student.to(device)
    kept = kept_tensors({"teacher": teacher, "student": student} | ({"taid": kd_term} if args.kd == "taid" else {}))

    # the run folder: this run's alone while it runs; a --resume continues the stage its checkpoint was in
    run_folder.claim(args, config, ckpt, "twostep")
    for name, m in (("teacher", teacher), ("student", student)):
        print0(f"{name} {getattr(args, name)} ({getattr(args, name + '_adapt')}): "
               f"{sum(p.numel() for p in trainable_parameters(m)) / 1e6:.2f}M trainable parameters", args.out_dir)
    print0(f"data {dataset_name(config)}: {describe_splits(splits)}", args.out_dir)
    if g is not None:
        print0(f"TED: student block i is distilled from teacher block g(i) = {g}, through filters "
               f"{teacher.ted_filters.filters[0].out_features} wide", args.out_dir)
    history, stage, done = run_folder.resumed(args, ckpt)
    run = (args, config, loaders[:2], scaler, autocast, kd_term, kept, history, device)  # what both stages use

    # stage 1 (eq. 1): the teacher alone, on the labels
    if stage in (None, "teacher"):
        optimizer = make_optimizer(teacher, args, device)
        run_folder.restore(ckpt if stage == "teacher" else None, kept, optimizer, scaler, device, args.resume)
        teacher_ddp = ddp(teacher, device)
        teacher_step = torch.compile(teacher_ddp) if args.compile else teacher_ddp
        train_stage(*run, "teacher", teacher_ddp, functools.partial(teach, args, teacher, teacher_step, g), optimizer,
                    args.teacher_epochs, done if stage == "teacher" else 0,
                    step_flops(teacher.vit, args.img_size, args.teacher_adapt))
        test = evaluate({"teacher": teacher}, loaders[2], device, autocast, *seen_as(args))
        history["teacher_test"] = flat(test)
        history["teacher_confusion"] = test["teacher"]["confusion"].tolist()  # for the end, through a resume
        print0(f"teacher test: {history['teacher_test']}", args.out_dir)

    # stage 2 (eq. 2): the frozen teacher distilled into the student
    teacher.eval().requires_grad_(False)
    optimizer = make_optimizer(student, args, device)  # with --feat ted, the student's filters too
    run_folder.restore(ckpt if stage == "student" else None, kept, optimizer, scaler, device, args.resume)
    teacher_fwd = torch.compile(teacher) if args.compile else teacher
    student_ddp = ddp(student, device)
    student_step = torch.compile(student_ddp) if args.compile else student_ddp
    train_stage(*run, "student", student_ddp,
                functools.partial(distill, args, teacher, teacher_fwd, student, student_step, g, kd_term), optimizer,
                args.student_epochs, done if stage == "student" else 0,
                step_flops(teacher.vit, args.img_size, "frozen") + step_flops(student.vit, args.img_size,
                                                                               args.student_adapt))

    # test; the exported models (adapters merged, with what prediction needs); results.json, the confusion matrices
    test = evaluate({"student": student}, loaders[2], device, autocast, *seen_as(args))
    export_models(args, {"teacher": teacher, "student": student}, splits["test"].classes)
    confusions = {"teacher": torch.tensor(history.get("teacher_confusion", test["student"]["confusion"] * 0)),
                  "student": test["student"]["confusion"]}  # (a checkpoint from before confusions were kept: zeros)
    run_folder.finish(args, config, "twostep", {**history["teacher_test"], **flat(test)}, confusions, splits, history,
                      num_classes=num_classes, teacher_adapt=args.teacher_adapt, student_adapt=args.student_adapt,
                      teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs, kd=args.kd,
                      feat=args.feat, **({"taid_t": round(float(kd_term.t), 3)} if args.kd == "taid" else {}),
                      **({"mapping": args.mapping} if args.feat == "ted" else {}))


def seen_as(args):
    """How the models see an image: by a sliding window of this side for segmentation (None: whole), normalised
    with the mean and std the teacher was pretrained with (data.pixel_stats)."""
    return args.img_size if args.dataset in SEGMENTATION else None, pixel_stats(args.teacher, args.teacher_weights)


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


def make_optimizer(model, args, device):
    """Heads, adapters and filters at --lr; a fully fine-tuned encoder at --backbone_lr."""
    is_backbone = lambda n: n.startswith("vit.") and "lora_" not in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return adamw([([(n, p) for n, p in named if not is_backbone(n)], args.lr),
                  ([(n, p) for n, p in named if is_backbone(n)], args.backbone_lr)], args.weight_decay, device)


def teach(args, teacher, teacher_step, g, x, y):
    """Stage 1's loss, eq. 1: the teacher's cross-entropy. With --feat ted, TED's Stage I too: the filters learn
    the task from blocks g(i), detached, so that the teacher trains as without."""
    if args.feat == "none":
        return task_loss(teacher_step(x), y)
    logits, blocks = teacher_step(x, g)
    filters = teacher.ted_filters
    return task_loss(logits, y) + filters.task_loss(filters([b.detach() for b in blocks]), y)


def distill(args, teacher, teacher_fwd, student, student_step, g, kd_term, x, y):
    """Stage 2's loss, eq. 2, (alpha_s, alpha_KL) = (0.5, 0.5), from the frozen teacher (--kd taid: TAID's term in
    place of the KL). With --feat ted, TED's Stage II: + beta * MSE(student filters(block i), frozen teacher
    filters(block g(i)))."""
    if args.feat == "none":
        with torch.no_grad():
            teacher_logits = teacher_fwd(x)
        return distill_loss(student_step(x), teacher_logits, y, T=args.temperature, kd_term=kd_term)
    with torch.no_grad():
        teacher_logits, teacher_blocks = teacher_fwd(x, g)
        teacher_filtered = teacher.ted_filters(teacher_blocks)
    student_logits, student_blocks = student_step(x, range(len(g)))
    return (distill_loss(student_logits, teacher_logits, y, T=args.temperature, kd_term=kd_term)
            + args.ted_beta * ted_loss(student.ted_filters(student_blocks), teacher_filtered))


def train_stage(args, config, loaders, scaler, autocast, kd_term, kept, history, device, name, model, loss_fn,
                optimizer, epochs, start_epoch, flops_per_img):
    """One stage, `name`, of `epochs`: AdamW with get_lr's schedule, raw AMP, `loss_fn(x, y)` on every batch (it
    calls `model`, in DDP under torchrun); a val accuracy, a metrics row and a checkpoint an epoch."""
    train_loader, val_loader = loaders
    window, stats = seen_as(args)
    steps = len(train_loader) // args.grad_accum
    total = epochs * steps
    for epoch in range(start_epoch, epochs):
        t_epoch = t0 = time.perf_counter()
        model.train(), train_loader.sampler.set_epoch(epoch)
        loss_sum, n, epoch_loss = torch.zeros((), device=device), 0, 0.0
        first_bad = torch.full((), 2**62, device=device)  # the first step whose loss is not finite
        batches = iter(train_loader)
        for step in range(steps):
            it = epoch * steps + step
            lrm = get_lr(it, total)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lrm
            for micro in range(args.grad_accum):  # --grad_accum micro-batches make one step of the batch
                x, y = next_batch(batches, device, stats)
                sync_gradients(model, micro == args.grad_accum - 1)
                with autocast:
                    loss = loss_fn(x, y) / args.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()  # stays on the device: read (a host sync) only for a log line
                first_bad = torch.where(torch.isfinite(loss.detach()), first_bad, first_bad.clamp(max=it))
            scaler.step(optimizer)
            scaler.update()
            if args.kd == "taid" and name == "student":
                kd_term.step()  # TAID's t moves on, once a step
            optimizer.zero_grad(set_to_none=True)
            n += 1
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                stop_if_not_finite(first_bad, steps, name, args.out_dir, scaler)
                mean_loss, dt = ddp_mean(loss_sum, device) / n, (time.perf_counter() - t0) / n
                print0(f"{name} epoch {epoch + 1}/{epochs} step {step + 1}/{steps} | loss {mean_loss:.4f} | "
                       f"lr {args.lr * lrm:.2e} | {1000 * dt:.0f} ms/step | {args.batch_size / dt:.1f} img/s | "
                       f"mfu {mfu(flops_per_img * args.batch_size / dt, device)} | eta {hms((total - it - 1) * dt)}",
                       args.out_dir)
                epoch_loss += mean_loss * n
                loss_sum, n, t0 = torch.zeros((), device=device), 0, time.perf_counter()

        # per epoch: validation, the log line, metrics.jsonl's row and the checkpoint
        val = evaluate({name: unwrap(model)}, val_loader, device, autocast, window, stats)
        metrics = {"train_loss": epoch_loss / steps, **flat(val, "val_"),
                   **({"taid_t": float(kd_term.t)} if args.kd == "taid" and name == "student" else {})}
        print0(f"{name} epoch {epoch + 1} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), args.out_dir)
        save_checkpoint(*run_folder.end_epoch(args, config, "twostep", name, epoch + 1, metrics, t_epoch, kept,
                                              optimizer, scaler, history, device))  # metrics.jsonl's row; ckpt.pt


if __name__ == "__main__":
    run_folder.command(main, parse_args)  # a bad folder or weights file, Ctrl-C: one line (run_folder.command)
