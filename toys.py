"""
The toy foundation family, made the way DINOv2's is: the largest member, toy-l (ViT-L's role), pretrained
first on procedural images; then toy-b and toy-s (ViT-B's and ViT-S's) distilled from it on those images,
never on a downstream task, so that the offline runs start from pretrained, aligned encoders as SLAD assumes.

    python toys.py        # writes weights/toy-l.pt, toy-b.pt and toy-s.pt (~20 min on a 2-core CPU)

Pretraining is supervised on the factors that generate each image -- which wave field, its orientation,
period and colour map; which shape lies over it, its hue and the pattern it is filled with -- from the final
CLS token, and, per patch, how much of the patch the shape covers and which shape and fill it is: on a CPU,
labels give transferable features in minutes, where self-distillation (DINO, iBOT) needs far longer
schedules and large batches to avoid collapse. The images share primitives with the tasks in synthetic.py, as
LVD-142M, the images DINOv2 was trained on, was gathered to resemble its downstream sets; none of the tasks'
images or generators: no flat two-colour texture classes, no marked bodies on clutter, no striped backgrounds.
The students are distilled task-agnostically from toy-l as shipped (float16), both from one teacher pass a
batch: linear projections of their tokens regress toy-l's block by block on the even mapping g(i) = 2i, and
a CKA term pulls their CLS tokens towards toy-l's, the alignment the paper's Fig. 3a measures.
"""

import argparse
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cka import batch_cka
from data import normalize
from lora import layer_mapping
from model import CONFIGS, ViT
from synthetic import hsv
from weights import TOY_WEIGHTS, from_pretrained

SIDE, CROP = 64, 56  # images are drawn at 64 px and randomly cropped to 56 (4 x 4 patches of 14)

# -----------------------------------------------------------------------------
# the pretraining distribution: every image drawn from random factors, which are its labels


FACTORS = {  # what generates an image, each a label: pretraining predicts them all from the CLS token
    "field": ("grating", "rings", "swirl", "bend", "plaid", "max of two", "mixture"),
    "orientation": tuple(f"{a} deg" for a in range(0, 180, 30)),
    "period": ("4-6 px", "6-9 px", "9-13 px", "13-20 px"),
    "tone": ("smooth", "two-tone"),  # the field's colour map: a ramp through three colours, or a threshold
    "shape": ("none", "ellipse", "triangle", "square", "diamond", "hexagon"),
    "hue": ("red", "yellow", "green", "cyan", "blue", "magenta"),  # of the shape (none: any)
    "fill": ("flat", "stripes", "checks", "spots", "rings", "halves"),  # a pattern on the shape (none: any)
}
PERIODS = (4, 6, 9, 13, 20)
POLYGONS = {"triangle": (3, -np.pi / 2), "square": (4, 0.0), "diamond": (4, np.pi / 4),  # sides, angle
            "hexagon": (6, None)}


def render(rng, s=SIDE):
    """One image (s, s, 3) uint8, its factor labels and its shape's mask: a colour-mapped wave field (one of
    seven kinds, an orientation, a period and a colour map) and, over it, a shape of some colour and fill, or none."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    label = {name: int(rng.integers(len(values))) for name, values in FACTORS.items()}
    angle = np.pi * (label["orientation"] + rng.uniform(-0.3, 0.3)) / len(FACTORS["orientation"])
    period = rng.uniform(PERIODS[label["period"]], PERIODS[label["period"] + 1])
    cy, cx = rng.uniform(0.2 * s, 0.8 * s, size=2)
    wave = lambda u, p=period: np.sin(2 * np.pi * u / p + rng.uniform(0, 2 * np.pi))
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    other = u * np.cos(np.pi / 3) + v * np.sin(np.pi / 3)  # a second direction, 60 degrees away
    near = lambda d: u * np.cos(d) + v * np.sin(d)  # a direction d radians from the field's
    field = FACTORS["field"][label["field"]]
    f = {"grating": lambda: wave(u), "rings": lambda: wave(np.hypot(u, 1.5 * v)),
         "swirl": lambda: wave(u + 0.4 * np.hypot(u, v)),
         "bend": lambda: wave(u + 0.25 * period * np.sin(v / period * 2)), "plaid": lambda: wave(u) * wave(other),
         "max of two": lambda: np.maximum(wave(u), wave(other)),
         "mixture": lambda: sum(wave(near(rng.uniform(-0.4, 0.4)), period * rng.uniform(0.7, 1.5))
                                for _ in range(4))}[field]()
    t = ((f - f.min()) / (np.ptp(f) + 1e-6))[..., None]
    pal = rng.uniform(0, 255, size=(3, 3))
    if FACTORS["tone"][label["tone"]] == "smooth":  # a ramp through three random colours
        img = np.where(t < 0.5, pal[0] + (pal[1] - pal[0]) * 2 * t, pal[1] + (pal[2] - pal[1]) * (2 * t - 1))
    else:  # two colours, split at a random level
        img = np.where(t < rng.uniform(0.35, 0.65), pal[0], pal[1]) * np.ones((1, 1, 3))
    oy, ox, r = rng.uniform(0.35 * s, 0.65 * s), rng.uniform(0.35 * s, 0.65 * s), rng.uniform(0.25, 0.4) * s
    shape = FACTORS["shape"][label["shape"]]
    if shape == "none":
        inside = np.zeros((s, s), bool)
    elif shape == "ellipse":
        inside = ((x - ox) / r) ** 2 + ((y - oy) / (rng.uniform(0.6, 1) * r)) ** 2 < 1
    else:  # a regular polygon, inside every edge's half-plane; upright (a little tilted), the hexagon at any angle
        n, a0 = POLYGONS[shape]
        a0 = rng.uniform(0, 2 * np.pi) if a0 is None else a0 + rng.uniform(-0.2, 0.2)
        inside = np.ones((s, s), bool)
        for k in range(n):
            a = a0 + np.pi / n + 2 * np.pi * k / n  # the edges' normals, between the corners
            inside &= (x - ox) * np.cos(a) + (y - oy) * np.sin(a) < r * np.cos(np.pi / n)
    h = (label["hue"] + rng.uniform(-0.3, 0.3)) / len(FACTORS["hue"])
    colour = hsv(h, rng.uniform(0.6, 1), rng.uniform(0.6, 1))
    img[inside] = colour
    # the fill: a second tone of the shape's colour in a pattern of the shape's own scale, at any angle
    a, q = rng.uniform(0, np.pi), rng.uniform(0.3, 0.5) * r
    fu, fv = (x - ox) * np.cos(a) + (y - oy) * np.sin(a), -(x - ox) * np.sin(a) + (y - oy) * np.cos(a)
    w = lambda t: np.sin(2 * np.pi * t / q + rng.uniform(0, 2 * np.pi))
    fill = FACTORS["fill"][label["fill"]]
    mark = {"flat": np.zeros((s, s), bool), "stripes": w(fu) > 0.2, "checks": (w(fu) > 0) ^ (w(fv) > 0),
            "spots": w(fu) + w(fv) > 1.1, "rings": w(np.hypot(fu, fv)) > 0.2, "halves": fu > 0}[fill]
    img[inside & mark] = (colour + rng.choice([-1, 1], 3) * rng.uniform(60, 120, 3)) % 256
    img = img + 6 * rng.standard_normal((s, s, 1))
    return np.clip(img, 0, 255).astype(np.uint8), list(label.values()), inside


def make_images(n, seed):
    """n images (n, 3, SIDE, SIDE) uint8, their factor labels (n, len(FACTORS)) and shape masks (n, SIDE, SIDE),
    drawn once: epochs then only crop them."""
    rng = np.random.default_rng(seed)
    images, labels, masks = zip(*(render(rng) for _ in range(n)))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels),
            torch.from_numpy(np.stack(masks)))


def crop(images, masks, g):
    """A random 56-px crop of every image and mask (no flips: they would change the orientation label); the
    images normalised, the masks as the fraction of each 14-px patch the shape covers."""
    n = len(images)
    i, j = torch.randint(0, SIDE - CROP + 1, (2, n), generator=g)
    x = torch.stack([images[k, :, i[k]:i[k] + CROP, j[k]:j[k] + CROP] for k in range(n)])
    m = torch.stack([masks[k, i[k]:i[k] + CROP, j[k]:j[k] + CROP] for k in range(n)])
    return normalize(x), F.avg_pool2d(m[:, None].float(), CONFIGS["toy-l"].patch_size).flatten(1)


def lr_at(step, steps, peak, warmup=0.05):
    """Linear warm-up from 0, then cosine to 0: the training scripts' get_lr one step later during the warm-up
    (it starts at 0 where get_lr starts at peak / warm-up steps), the same after it. Kept as the shipped family
    was built with it, so that `python toys.py` rebuilds weights/ byte for byte."""
    w = max(1, int(warmup * steps))
    return peak * step / w if step < w else peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def optimizer(params, lr, weight_decay=0.05):
    """AdamW, matrices decayed: by shape alone, so the ViT's tokens and position embeddings decay too, unlike
    model.adamw's (kept as the shipped family was built with it)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # matrices only, not biases, norms or LayerScale
    rest = [p for p in params if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr)


# -----------------------------------------------------------------------------
# the two stages


def pretrain(name, images, labels, masks, epochs, batch_size, lr, seed, log):
    """Supervised pretraining from scratch: linear heads on the final CLS token predict every factor
    (cross-entropy), and heads on each patch token predict how much of the patch the shape covers and, where
    the shape covers most of it, the shape and its fill (dense targets: patch tokens, which segmentation reads,
    get a target of their own, as iBOT's term gives DINOv2's; they also teach the CLS token shape and fill
    faster)."""
    torch.manual_seed(seed)
    vit = ViT.from_name(name)
    sizes = [len(v) for v in FACTORS.values()]
    shape, fill = list(FACTORS).index("shape"), list(FACTORS).index("fill")
    head = nn.Linear(vit.embed_dim, sum(sizes))
    patch_head = nn.Linear(vit.embed_dim, 1 + sizes[shape] + sizes[fill])  # cover, shape, fill
    params = [*vit.parameters(), *head.parameters(), *patch_head.parameters()]
    opt = optimizer(params, lr)
    g = torch.Generator().manual_seed(seed)
    steps, step = epochs * (len(images) // batch_size), 0
    for epoch in range(epochs):
        perm, t0, correct = torch.randperm(len(images), generator=g), time.time(), torch.zeros(len(sizes))
        for b in range(len(images) // batch_size):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            (x, cover), y = crop(images[idx], masks[idx], g), labels[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            tokens = vit.forward_features(x)
            logits = head(tokens[:, 0]).split(sizes, dim=-1)
            loss = sum(F.cross_entropy(l, y[:, k]) for k, l in enumerate(logits)) / len(sizes)
            cover_logit, shape_logits, fill_logits = patch_head(tokens[:, 1:]).split([1, sizes[shape], sizes[fill]], -1)
            on_shape = lambda k: torch.where(cover > 0.5, y[:, k, None], -100).flatten()  # -100: no target
            loss = loss + F.binary_cross_entropy_with_logits(cover_logit[..., 0], cover) + (
                F.cross_entropy(shape_logits.flatten(0, 1), on_shape(shape), ignore_index=-100)
                + F.cross_entropy(fill_logits.flatten(0, 1), on_shape(fill), ignore_index=-100)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            correct += torch.stack([(l.argmax(-1) == y[:, k]).sum() for k, l in enumerate(logits)])
        seen = len(images) // batch_size * batch_size
        accs = " ".join(f"{n} {100 * c / seen:.0f}" for n, c in zip(FACTORS, correct))
        log(f"pretrain {name} epoch {epoch + 1}/{epochs} | loss {loss.item():.3f} | train acc % {accs} | "
            f"{time.time() - t0:.0f}s")
    return vit


def distill(names, teacher, images, masks, epochs, batch_size, lr, seed, log, cka_weight=1.0):
    """Task-agnostic distillation of every student in `names` on the pretraining images, all of them from one
    teacher forward a batch: linear projections of each student's tokens (CLS and patches) regress the
    teacher's, at every student block i against teacher block g(i) = i * n_t // n_s (the even mapping), and
    their CLS tokens are pulled to the teacher's by the batch's CKA, the alignment Fig. 3 measures. DINOv2
    distils the output alone, and its members come out aligned block by block (the paper's Fig. 3a: 93%);
    toys trained for minutes do not, so the blocks are distilled too."""
    teacher.eval().requires_grad_(False)
    n_t = teacher.config.depth
    students, runs = {}, []
    for k, name in enumerate(names):
        torch.manual_seed(seed + 1 + k)
        student = ViT.from_name(name)
        n_s = student.config.depth
        pairs = list(enumerate(layer_mapping(n_s, n_t, "even")))
        projs = nn.ModuleList(nn.Linear(student.embed_dim, teacher.embed_dim) for _ in pairs)
        params = [*student.parameters(), *projs.parameters()]
        students[name] = student
        runs.append((name, student, pairs, projs, params, optimizer(params, lr)))
    g = torch.Generator().manual_seed(seed + 1)
    steps, step = epochs * (len(images) // batch_size), 0
    for epoch in range(epochs):
        perm, t0, losses, ckas = torch.randperm(len(images), generator=g), time.time(), {}, {}
        for b in range(len(images) // batch_size):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x, _ = crop(images[idx], masks[idx], g)
            with torch.no_grad():
                target = teacher.forward_blocks(x, list(range(n_t)))
            for name, student, pairs, projs, params, opt in runs:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, lr)
                out = student.forward_blocks(x, [i for i, _ in pairs])
                # the CLS token counts as much as the patches together: it is what the heads and the CKA read
                mse = sum(F.mse_loss(p(o)[:, 0], target[j][:, 0]) + F.mse_loss(p(o)[:, 1:], target[j][:, 1:])
                          for p, o, (_, j) in zip(projs, out, pairs)) / len(pairs)
                cka = sum(batch_cka(o[:, 0], target[j][:, 0]) for o, (_, j) in zip(out, pairs)) / len(pairs)
                loss = mse + cka_weight * (1 - cka)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses[name], ckas[name] = losses.get(name, 0) + mse.item(), ckas.get(name, 0) + cka.item()
            step += 1
        n = len(images) // batch_size
        log(f"distill epoch {epoch + 1}/{epochs} | " + " | ".join(
            f"{name}: mse {losses[name] / n:.4f}, CLS CKA {100 * ckas[name] / n:.1f}%" for name in names)
            + f" | {time.time() - t0:.0f}s")
    return students


def save(vit, path):
    """The official DINOv2 state-dict layout, in float16 (half the bytes; loaded back into float32)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({k: v.half() for k, v in vit.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--teacher", default="toy-l", help="pretrained first, on the procedural images' factors")
    p.add_argument("--students", nargs="*", default=["toy-b", "toy-s"], help="distilled from the teacher")
    p.add_argument("--images", type=int, default=16000, help="pretraining images, drawn once")
    p.add_argument("--epochs", type=int, default=24, help="pretraining epochs")
    p.add_argument("--distill_epochs", type=int, default=24)
    p.add_argument("--cka_weight", type=float, default=2.0, help="of the CKA term in the distillation loss")
    p.add_argument("--teacher_from", default=None, help="a pretrained teacher's file: distil from it, skip pretraining")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the result depends on it, slightly)")
    p.add_argument("--out_dir", default=TOY_WEIGHTS)
    return p.parse_args(argv), p


def main():
    args, p = parse_args()
    if args.teacher_from and not os.path.isfile(args.teacher_from):
        p.error(f"--teacher_from {args.teacher_from}: no such file")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)
    images, labels, masks = make_images(args.images, args.seed)
    log(f"drew {len(images)} procedural images")
    path = os.path.join(args.out_dir, f"{args.teacher}.pt")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.teacher_from:
        if os.path.abspath(args.teacher_from) != os.path.abspath(path):
            shutil.copy(args.teacher_from, path)
    else:
        teacher = pretrain(args.teacher, images, labels, masks, args.epochs, args.batch_size, args.lr, args.seed, log)
        save(teacher, path)
    teacher = from_pretrained(args.teacher, path=path)  # as shipped
    students = distill(args.students, teacher, images, masks, args.distill_epochs, args.batch_size, args.lr, args.seed,
                       log, args.cka_weight)
    for name, student in students.items():
        save(student, os.path.join(args.out_dir, f"{name}.pt"))
    log(f"wrote {', '.join(f'{n}.pt' for n in [args.teacher, *args.students])} to {args.out_dir}")


if __name__ == "__main__":
    main()
