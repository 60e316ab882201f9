"""
SLAD (§3.3): the teacher and the student adapted to the task jointly, in one stage. The teacher carries LoRA
adapters on its qkv matrices; the student's adapters are the teacher's own Parameters, sliced to the
student's width (Fig. 4), on the teacher blocks that --mapping pairs with the student's; both are trained by
one loss, eq. 4, on the same augmented batch (App. C.2). Classification or segmentation, by --dataset.
With --kd taid, TAID's KL towards an interpolated target, whose t rises to 1, replaces eq. 4's KL (kd.TAID).

    python train_slad.py --dataset dtd          # DINOv2 ViT-B/14 -> ViT-S/14, 30 epochs
    python train_slad.py --dataset synthetic --teacher toy-b --student toy-s --init random --epochs 1 \\
        --device cpu --out_dir out/demo-slad    # the offline demo: a minute on a laptop CPU
"""

import sys
import time

import torch.nn as nn

from data import DataError, load_splits
from experiment import Run, flat, parser
from kd import TAID, slad_loss
from lora import MAPPINGS, add_lora, share_lora, trainable_parameters
from model import CheckpointError


class TeacherStudent(nn.Module):
    """Both models in one module: one forward for the step, and DDP sees each shared adapter once."""

    def __init__(self, teacher, student):
        super().__init__()
        self.teacher, self.student = teacher, student

    def forward(self, x):
        return self.teacher(x), self.student(x)


def parse_args(argv=None):
    p = parser(__doc__, "slad")
    p.add_argument("--mapping", default="even", choices=MAPPINGS,
                   help="which teacher block shares its adapters with student block i (§5.2.1; paper: even)")
    p.add_argument("--kl_into_teacher", action="store_true",
                   help="let eq. 4's KL term send gradients into the teacher's logits too (default: the "
                        "teacher's logits are the KL's fixed target, as in eq. 2)")
    args = p.parse_args(argv)
    args.epochs = args.epochs or 30
    return args, p


def main():
    args, p = parse_args()
    run = Run(args, p, "slad")

    # data and models: a teacher with LoRA adapters, a student whose adapters are the teacher's (Fig. 4)
    splits, num_classes = load_splits(args.dataset, args.data_dir)
    train_loader, val_loader, test_loader = run.loaders(splits)
    teacher = run.model(run.backbone(args.teacher, "teacher"), num_classes)  # Classifier or Segmenter
    student = run.model(run.backbone(args.student, "student"), num_classes)
    add_lora(teacher.vit, rank=args.rank)
    g = share_lora(student.vit, teacher.vit, args.mapping)
    teacher.to(run.device), student.to(run.device)
    params = trainable_parameters(teacher, student)  # the shared adapters once
    optimizer = run.optimizer([(params, args.lr)])
    taid = TAID(args.epochs * len(train_loader)).to(run.device) if args.kd == "taid" else None
    run.track(teacher=teacher, student=student, **({"taid": taid} if taid is not None else {}))
    run.start()
    run.log(f"teacher {args.teacher}, student {args.student}, {num_classes} classes, "
            f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters; student block i uses the "
            f"adapters of teacher block g(i) = {g}")
    _, start_epoch = run.resume_point()
    if run.ckpt:
        run.restore(optimizer)
    both = run.wrap(TeacherStudent(teacher, student))  # DDP (torchrun) and torch.compile, if asked

    steps = len(train_loader)
    progress = run.progress("slad", args.epochs, steps)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        teacher.train(), student.train()
        train_loader.sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(train_loader):
            lr = run.set_lr(optimizer, epoch * steps + step, args.epochs * steps)
            x, y = run.to_device(x, y)
            with run.autocast:
                teacher_logits, student_logits = both(x)  # the same augmented batch for both (App. C.2)
                loss = slad_loss(student_logits, teacher_logits, y, T=args.temperature,  # eq. 4, (1, 1, 1)
                                 kl_into_teacher=args.kl_into_teacher, taid=taid)
            run.scaler.scale(loss).backward()  # reaches the shared adapters from both models
            run.scaler.step(optimizer)
            run.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.update(epoch, step, loss, lr, len(y))
        train_loss = progress.epoch_loss()
        val = run.evaluate({"teacher": teacher, "student": student}, val_loader)
        run.end_epoch("slad", epoch, time.perf_counter() - t0, optimizer=optimizer,
                      metrics={"train_loss": train_loss, **flat(val, "val_"),
                               **({"taid_t": float(taid.t)} if taid is not None else {})})

    test = run.evaluate({"teacher": teacher, "student": student}, test_loader)
    run.finish({**flat(test), "num_classes": num_classes, "mapping": args.mapping, "epochs": args.epochs,
                "kd": args.kd, "feat": "none", **({"taid_t": float(taid.t)} if taid is not None else {})},
               exports={"student.pt": student, "teacher.pt": teacher})


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
