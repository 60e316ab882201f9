"""
The toy foundation family: toy-b pretrained, then toy-s distilled from it, the way DINOv2's family is made
(the largest model trained first, the smaller ones distilled from it on the pretraining images, never on a
downstream task), so that the offline runs start from aligned, pretrained encoders as SLAD assumes.

    python toys.py        # writes weights/toy-b.pt and weights/toy-s.pt (7 min 44 s measured on a 2-core CPU)

Pretraining is supervised on the factors that generate procedural images (which wave field, orientation,
period, shape, hue; and per patch, how much of it the shape covers): on a CPU, labels give transferable
features in minutes, where self-distillation (DINO, iBOT) needs far longer schedules and large batches to
avoid collapse. The distribution is disjoint from the downstream sets in data.py: smooth colour-mapped wave
fields under one flat shape, never their two-colour textures, marked bodies or striped backgrounds. The student is distilled task-agnostically from the teacher as shipped (float16): linear
projections of its tokens (CLS and patches) regress the teacher's, at the output as DINOv2, and block by block.
"""

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import normalize
from model import ViT

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SIDE, CROP = 64, 56  # images are drawn at 64 px and randomly cropped to 56 (4 x 4 patches of 14)

# -----------------------------------------------------------------------------
# the pretraining distribution: every image drawn from random factors, which are its labels


FACTORS = {  # what generates an image, each a label: pretraining predicts them all from the CLS token
    "field": ("grating", "rings", "swirl", "bend", "plaid", "max of two"),
    "orientation": tuple(f"{a} deg" for a in range(0, 180, 30)),
    "period": ("4-6 px", "6-9 px", "9-13 px", "13-20 px"),
    "shape": ("none", "ellipse", "triangle", "square", "pentagon", "hexagon"),
    "hue": ("red", "yellow", "green", "cyan", "blue", "magenta"),  # of the shape (none: any)
}
PERIODS = (4, 6, 9, 13, 20)


def hsv(h, s, v):
    """An RGB colour (0-255) from hue in [0, 1), saturation and value in [0, 1]."""
    k = (np.array([5, 3, 1]) + 6 * h) % 6
    return 255 * v * (1 - s * np.clip(np.minimum(k, 4 - k), 0, 1))


def render(rng, s=SIDE):
    """One image (s, s, 3) uint8, its factor labels and its shape's mask: a smooth colour-mapped wave field
    (one of six kinds, an orientation and a period) and, over it, a shape of some colour, or none."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    label = {name: int(rng.integers(len(values))) for name, values in FACTORS.items()}
    angle = np.pi * (label["orientation"] + rng.uniform(-0.3, 0.3)) / len(FACTORS["orientation"])
    period = rng.uniform(PERIODS[label["period"]], PERIODS[label["period"] + 1])
    cy, cx = rng.uniform(0.2 * s, 0.8 * s, size=2)
    wave = lambda u: np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    other = u * np.cos(np.pi / 3) + v * np.sin(np.pi / 3)  # a second direction, 60 degrees away
    field = FACTORS["field"][label["field"]]
    f = {"grating": lambda: wave(u), "rings": lambda: wave(np.hypot(u, 1.5 * v)), "swirl": lambda: wave(u + 0.4 * np.hypot(u, v)),
         "bend": lambda: wave(u + 0.25 * period * np.sin(v / period * 2)), "plaid": lambda: wave(u) * wave(other),
         "max of two": lambda: np.maximum(wave(u), wave(other))}[field]()
    t = ((f - f.min()) / (np.ptp(f) + 1e-6))[..., None]  # a smooth colour map through three random colours
    pal = rng.uniform(0, 255, size=(3, 3))
    img = np.where(t < 0.5, pal[0] + (pal[1] - pal[0]) * 2 * t, pal[1] + (pal[2] - pal[1]) * (2 * t - 1))
    oy, ox, r = rng.uniform(0.25 * s, 0.75 * s), rng.uniform(0.25 * s, 0.75 * s), rng.uniform(0.12, 0.25) * s
    shape = FACTORS["shape"][label["shape"]]
    if shape == "none":
        inside = np.zeros((s, s), bool)
    elif shape == "ellipse":
        inside = ((x - ox) / r) ** 2 + ((y - oy) / (0.6 * r)) ** 2 < 1
    else:  # a regular polygon: inside every edge's half-plane
        n, a0 = FACTORS["shape"].index(shape) + 1, rng.uniform(0, 2 * np.pi)  # triangle: 3 sides
        inside = np.ones((s, s), bool)
        for k in range(n):
            a = a0 + 2 * np.pi * k / n
            inside &= (x - ox) * np.cos(a) + (y - oy) * np.sin(a) < r * np.cos(np.pi / n)
    h = (label["hue"] + rng.uniform(-0.3, 0.3)) / len(FACTORS["hue"])
    img[inside] = hsv(h, rng.uniform(0.6, 1), rng.uniform(0.6, 1))
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
    return normalize(x), F.avg_pool2d(m[:, None].float(), 14).flatten(1)


def lr_at(step, steps, peak, warmup=0.05):
    """Linear warm-up, then cosine to 0 (as the training scripts)."""
    w = max(1, int(warmup * steps))
    return peak * step / w if step < w else peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def optimizer(params, lr, weight_decay=0.05):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # matrices only, not biases, norms or LayerScale
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)], lr=lr)


# -----------------------------------------------------------------------------
# the two stages


def pretrain(name, images, labels, masks, epochs, batch_size, lr, seed, log):
    """Supervised pretraining from scratch: linear heads on the final CLS token predict every factor
    (cross-entropy), and one on each patch token the share of the patch the shape covers (patch features
    for segmentation, as DINOv2's iBOT term gives its patch tokens a target of their own)."""
    torch.manual_seed(seed)
    vit = ViT.from_name(name)
    sizes = [len(v) for v in FACTORS.values()]
    head, patch_head = nn.Linear(vit.embed_dim, sum(sizes)), nn.Linear(vit.embed_dim, 1)
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
            loss = loss + F.binary_cross_entropy_with_logits(patch_head(tokens[:, 1:])[..., 0], cover)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            correct += torch.stack([(l.argmax(-1) == y[:, k]).sum() for k, l in enumerate(logits)])
        accs = " ".join(f"{n} {100 * c / (len(images) // batch_size * batch_size):.0f}" for n, c in zip(FACTORS, correct))
        log(f"pretrain {name} epoch {epoch + 1}/{epochs} | loss {loss.item():.3f} | train acc % {accs} | {time.time() - t0:.0f}s")
    return vit


def distill(name, teacher, images, masks, epochs, batch_size, lr, seed, log):
    """Task-agnostic distillation on the pretraining images: linear projections of the student's tokens (CLS
    and patches) regress the teacher's, at the output and at every student block i against teacher block
    g(i) = i * n_t // n_s (the even mapping). DINOv2 distils the output alone, and its members come out
    aligned block by block (the paper's Fig. 3a: 93%); a toy trained for minutes does not, so the blocks are
    distilled too."""
    torch.manual_seed(seed + 1)
    student = ViT.from_name(name)
    n_s, n_t = student.config.depth, teacher.config.depth
    pairs = [(i, i * n_t // n_s) for i in range(n_s)] + [(n_s - 1, n_t - 1)]  # the last: the output
    projs = nn.ModuleList(nn.Linear(student.embed_dim, teacher.embed_dim) for _ in pairs)
    params = [*student.parameters(), *projs.parameters()]
    opt = optimizer(params, lr)
    teacher.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    steps, step = epochs * (len(images) // batch_size), 0
    for epoch in range(epochs):
        perm, t0 = torch.randperm(len(images), generator=g), time.time()
        for b in range(len(images) // batch_size):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x, _ = crop(images[idx], masks[idx], g)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            with torch.no_grad():
                target = dict(zip(range(n_t), teacher.forward_blocks(x, list(range(n_t)))))
            out = student.forward_blocks(x, list(range(n_s)))
            loss = sum(F.mse_loss(p(out[i]), target[j]) for p, (i, j) in zip(projs, pairs)) / len(pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
        log(f"distill {name} epoch {epoch + 1}/{epochs} | loss {loss.item():.4f} | {time.time() - t0:.0f}s")
    return student


def save(vit, path):
    """The official DINOv2 state-dict layout, in float16 (half the bytes; loaded back into float32)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({k: v.half() for k, v in vit.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--teacher", default="toy-b", help="pretrained first, on the procedural classes")
    p.add_argument("--students", nargs="*", default=["toy-s"], help="distilled from the teacher")
    p.add_argument("--images", type=int, default=16000, help="pretraining images, drawn once")
    p.add_argument("--epochs", type=int, default=8, help="pretraining epochs")
    p.add_argument("--distill_epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the result depends on it, slightly)")
    p.add_argument("--out_dir", default=WEIGHTS_DIR)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)
    images, labels, masks = make_images(args.images, args.seed)
    log(f"drew {len(images)} procedural images")
    teacher = pretrain(args.teacher, images, labels, masks, args.epochs, args.batch_size, args.lr, args.seed, log)
    save(teacher, os.path.join(args.out_dir, f"{args.teacher}.pt"))
    teacher = ViT.from_pretrained(args.teacher, path=os.path.join(args.out_dir, f"{args.teacher}.pt"))  # as shipped
    for name in args.students:
        student = distill(name, teacher, images, masks, args.distill_epochs, args.batch_size, args.lr, args.seed, log)
        save(student, os.path.join(args.out_dir, f"{name}.pt"))
    log(f"wrote {', '.join(f'{n}.pt' for n in [args.teacher, *args.students])} to {args.out_dir}")


if __name__ == "__main__":
    main()
