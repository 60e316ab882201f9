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
    python train_twostep.py --dataset synthetic --teacher toy-b --student toy-s --init random --epochs 1 \\
        --device cpu --teacher_adapt lora --out_dir out/demo-lora   # the offline demo
"""

import sys
import time

import torch

from data import DataError, load_splits
from experiment import Run, flat, parser
from kd import TAID, TaskFilters, distill_loss, task_loss, ted_loss
from lora import MAPPINGS, add_lora, layer_mapping, trainable_parameters
from model import CheckpointError


def adapt(model, how, rank):
    """Choose what of a Classifier or Segmenter trains: the head always; the encoder's LoRA adapters, all of it, or nothing."""
    if how == "lora":
        add_lora(model.vit, rank=rank)  # freezes the encoder, adds trainable adapters
    else:
        model.vit.requires_grad_(how == "finetune")


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


def make_optimizer(run, model):
    """Heads and adapters at --lr; a fully fine-tuned encoder at --backbone_lr."""
    is_backbone = lambda n: n.startswith("vit.") and "lora_" not in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return run.optimizer([([p for n, p in named if not is_backbone(n)], run.args.lr),
                          ([p for n, p in named if is_backbone(n)], run.args.backbone_lr)])


def train_stage(run, stage, model, loss_fn, optimizer, epochs, start_epoch, train_loader, val_loader, taid=None):
    """The loop of one stage: AdamW + cosine, raw AMP, a val accuracy and a checkpoint every epoch (and
    TAID's t, read once an epoch)."""
    steps = len(train_loader)
    progress = run.progress(stage, epochs, steps)
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        train_loader.sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(train_loader):
            lr = run.set_lr(optimizer, epoch * steps + step, epochs * steps)
            x, y = run.to_device(x, y)
            with run.autocast:
                loss = loss_fn(x, y)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.update(epoch, step, loss, lr, len(y))
        train_loss = progress.epoch_loss()
        val = run.evaluate({stage: model}, val_loader)
        run.end_epoch(stage, epoch, time.perf_counter() - t0, optimizer=optimizer,
                      metrics={"train_loss": train_loss, **flat(val, "val_"),
                               **({"taid_t": float(taid.t)} if taid is not None else {})})


def parse_args(argv=None):
    p = parser(__doc__, "twostep")
    p.add_argument("--teacher_adapt", default="lora", choices=["probe", "finetune", "lora"],
                   help="how stage 1 adapts the teacher")
    p.add_argument("--student_adapt", default="lora", choices=["lora", "finetune"],
                   help="how stage 2 adapts the student")
    p.add_argument("--teacher_epochs", type=int, default=None, help="stage 1 epochs (default --epochs, or 30)")
    p.add_argument("--student_epochs", type=int, default=None,
                   help="stage 2 epochs (default --epochs, or 30; 80 after a probed teacher, as the paper)")
    p.add_argument("--backbone_lr", type=float, default=2e-5, help="peak learning rate of a fully fine-tuned encoder")
    p.add_argument("--feat", default="none", choices=["none", "ted"],
                   help="a layer-wise term on top of eq. 2: ted, TED's task-aware filters (kd.TaskFilters)")
    p.add_argument("--mapping", default="even", choices=MAPPINGS,
                   help="with --feat ted: the teacher block g(i) that student block i is distilled from (as SLAD's)")
    p.add_argument("--ted_beta", type=float, default=1.0, help="with --feat ted: the weight of TED's layer-wise MSE")
    args = p.parse_args(argv)
    args.teacher_epochs = args.teacher_epochs or args.epochs or 30
    args.student_epochs = args.student_epochs or args.epochs or (80 if args.teacher_adapt == "probe" else 30)
    return args, p


def main():
    args, p = parse_args()
    run = Run(args, p, "twostep")

    splits, num_classes = load_splits(args.dataset, args.data_dir)
    train_loader, val_loader, test_loader = run.loaders(splits)
    teacher = run.model(run.backbone(args.teacher, "teacher"), num_classes)  # Classifier or Segmenter
    student = run.model(run.backbone(args.student, "student"), num_classes)
    adapt(teacher, args.teacher_adapt, args.rank)
    adapt(student, args.student_adapt, args.rank)
    g = add_ted_filters(teacher, student, args.mapping, num_classes) if args.feat == "ted" else None
    taid = TAID(args.student_epochs * len(train_loader)).to(run.device) if args.kd == "taid" else None
    teacher.to(run.device), student.to(run.device)
    run.track(teacher=teacher, student=student, **({"taid": taid} if taid is not None else {}))
    run.start()
    for name, m in (("teacher", teacher), ("student", student)):
        run.log(f"{name} {getattr(args, name)} ({getattr(args, name + '_adapt')}): "
                f"{sum(p.numel() for p in trainable_parameters(m)) / 1e6:.2f}M trainable parameters")
    if args.feat == "ted":
        run.log(f"TED: student block i is distilled from teacher block g(i) = {g}, through filters "
                f"{teacher.ted_filters.filters[0].out_features} wide")
    stage, done = run.resume_point()

    # stage 1 (eq. 1): the teacher alone, on the labels
    if stage in (None, "teacher"):
        optimizer = make_optimizer(run, teacher)
        if stage == "teacher":
            run.restore(optimizer)
        teacher_step = run.wrap(teacher)  # DDP (torchrun) and torch.compile, if asked

        def teach(x, y):
            if args.feat == "none":
                return task_loss(teacher_step(x), y)
            # and TED's Stage I: the filters learn the task from blocks g(i), detached: the teacher trains as without
            logits, blocks = teacher_step(x, g)
            filters = teacher.ted_filters
            return task_loss(logits, y) + filters.task_loss(filters([b.detach() for b in blocks]), y)

        train_stage(run, "teacher", teacher, teach, optimizer,
                    args.teacher_epochs, done if stage == "teacher" else 0, train_loader, val_loader)
        run.history["teacher_test"] = flat(run.evaluate({"teacher": teacher}, test_loader))
        run.log(f"teacher test: {run.history['teacher_test']}")

    # stage 2 (eq. 2): the frozen teacher distilled into the student
    teacher.eval().requires_grad_(False)
    optimizer = make_optimizer(run, student)  # with --feat ted, the student's filters too
    if stage == "student":
        run.restore(optimizer)
    teacher_fwd, student_step = run.compile(teacher), run.wrap(student)

    def distill(x, y):  # (alpha_s, alpha_KL) = (0.5, 0.5); --kd taid: TAID's term in place of the KL
        if args.feat == "none":
            with torch.no_grad():
                teacher_logits = teacher_fwd(x)
            return distill_loss(student_step(x), teacher_logits, y, T=args.temperature, taid=taid)
        # TED's Stage II: eq. 2 + beta * MSE(student filters(block i), frozen teacher filters(block g(i)))
        with torch.no_grad():
            teacher_logits, teacher_blocks = teacher_fwd(x, g)
            teacher_filtered = teacher.ted_filters(teacher_blocks)
        student_logits, student_blocks = student_step(x, range(len(g)))
        return (distill_loss(student_logits, teacher_logits, y, T=args.temperature, taid=taid)
                + args.ted_beta * ted_loss(student.ted_filters(student_blocks), teacher_filtered))

    train_stage(run, "student", student, distill, optimizer, args.student_epochs,
                done if stage == "student" else 0, train_loader, val_loader, taid)

    test = run.evaluate({"student": student}, test_loader)
    run.finish({**run.history["teacher_test"], **flat(test), "num_classes": num_classes,
                "teacher_adapt": args.teacher_adapt, "student_adapt": args.student_adapt,
                "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs,
                "kd": args.kd, "feat": args.feat, **({"taid_t": float(taid.t)} if taid is not None else {}),
                **({"mapping": args.mapping} if args.feat == "ted" else {})},
               exports={"student.pt": student, "teacher.pt": teacher})


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
