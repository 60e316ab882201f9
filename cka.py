"""
Teacher-student feature alignment by Centered Kernel Alignment (Kornblith et al. 2019): the measurement
behind the paper's Figure 3 and its argument of §3.1 -- fine-tuning the teacher lowers its CKA with the
student, LoRA lowers it less, SLAD least.

    python cka.py --runs out/finetune out/lora out/slad      # models, init, seed, dataset from the runs' config.json
    python cka.py --dataset cub --teacher vitb14 --student vits14  # panel (a) alone: the pretrained encoders
    python cka.py --runs out/demo-finetune out/demo-lora out/demo-slad --device cpu  # the offline demo

For every teacher block x student block it measures the CKA of their CLS tokens (--token patch: the mean patch
token) over a split (val by default), for the pretrained encoders the runs started from (a) and for each run's
adapted teacher and student (b, c, d: the change from (a)). It prints the mean CKA over the blocks that
--mapping pairs (i, g(i)), the paper's number, and writes to --out_dir: cka_pretrained.png, cka_delta_<run>.png,
cka.png (all panels side by side) and cka.json (the matrices and means).
"""

import argparse
import json
import math
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset, Subset

from data import IMAGENET_MEAN, IMAGENET_STD, DATASETS, eval_transform, load_splits, make_loader, normalize, pixel_stats
from deploy import load_model
from flags import COUNT, POSITIVE_INT, Parser, default_img_size, init_value
from images import DataError
from lora import MAPPINGS, layer_mapping
from model import CONFIGS
from own_data import fingerprint
from run_folder import write_json
from weights import CheckpointError, initial_backbone

# -----------------------------------------------------------------------------
# CKA


def linear_cka(X, Y):
    """Linear CKA of features X (n, p) and Y (n, q) of the same n inputs (Kornblith et al. 2019):
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of the column-centred features; 1 when Y = X Q s for an
    orthogonal Q and a scale s, not invariant to other linear maps."""
    X, Y = X.double(), Y.double()
    if len(X) < max(X.shape[1], Y.shape[1]):  # n < p: the same value from the n x n Gram matrices, cheaper
        X, Y = X - X.mean(0), Y - Y.mean(0)
        K, L = X @ X.T, Y @ Y.T
        return ((K * L).sum() / (K.norm() * L.norm())).item()
    return batch_cka(X, Y).item()


def batch_cka(X, Y):
    """linear_cka as a tensor in the features' dtype, with its gradient: toys.py's distillation trains on it."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return (Y.T @ X).pow(2).sum() / ((X.T @ X).norm() * (Y.T @ Y).norm())


def unbiased_hsic(G):
    """Unbiased HSIC (Song et al. 2012) of every pair of the M Gram matrices G (M, n, n), n >= 4:
    an (M, M) matrix, all pairs in three matrix products."""
    n = G.shape[-1]
    G = G * (1 - torch.eye(n, dtype=G.dtype, device=G.device))  # the estimator drops the diagonals
    rows = G.sum(-1)  # (M, n): G~ 1
    totals = rows.sum(-1)  # (M,): 1^T G~ 1
    trace = G.flatten(1) @ G.flatten(1).T  # tr(K~ L~) for symmetric Grams
    return (trace + totals[:, None] * totals[None] / ((n - 1) * (n - 2)) - 2 / (n - 2) * rows @ rows.T) / (n * (n - 3))


def minibatch_cka(feature_batches):
    """CKA of every pair of M features, estimated over batches (Nguyen et al. 2021): feature_batches yields,
    per batch, a list of M tensors (B, p_m) of the same B inputs. Returns the (M, M) CKA matrix."""
    # CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) mean HSIC(L, L)), each HSIC unbiased and every batch weighted
    # the same. How it differs from linear_cka on all n inputs at once: it never pairs images of different
    # batches, and its HSICs have no O(1/n) bias -- the full-batch value is pushed up when n is not >> p,
    # these do not depend on the batch size in expectation -- so the two agree on large samples only.
    hsic, batches = 0.0, 0
    for feats in feature_batches:
        if len(feats[0]) < 4:  # the unbiased estimator needs 4 inputs: a last batch smaller than that is dropped
            continue
        grams = torch.stack([f.double() @ f.double().T for f in feats])  # linear kernels, float64
        hsic, batches = hsic + unbiased_hsic(grams), batches + 1
    if not batches:
        raise ValueError("CKA needs at least one batch of 4 or more inputs")
    norm = (hsic / batches).diagonal().sqrt()
    return hsic / batches / (norm[:, None] * norm[None])


@torch.no_grad()
def block_features(vit, x, token="cls"):
    """Every block's normed output, reduced to one vector an image: the CLS token, or the mean patch token
    (registers skipped). A list of depth tensors (B, D)."""
    outs = vit.forward_blocks(x, range(vit.config.depth))
    if token == "cls":
        return [o[:, 0] for o in outs]
    return [o[:, 1 + vit.config.num_register_tokens:].mean(1) for o in outs]


@torch.no_grad()
def layer_cka(pairs, loader, token="cls", device="cpu", stats=(IMAGENET_MEAN, IMAGENET_STD)):
    """Fig. 3's matrices: for each (teacher, student) ViT pair, the (teacher depth, student depth) CKA between
    their blocks, over the images of loader (normalised with `stats`, data.pixel_stats). One pass over the data for
    all pairs."""
    models = list({id(m): m for pair in pairs for m in pair}.values())  # a model shared by pairs runs once
    for m in models:
        m.eval()

    def features():
        for x, _ in loader:
            x = normalize(x.to(device), stats)
            yield [f for m in models for f in block_features(m, x, token)]

    C = minibatch_cka(features())
    start = {id(m): sum(n.config.depth for n in models[:k]) for k, m in enumerate(models)}
    blocks = lambda m: slice(start[id(m)], start[id(m)] + m.config.depth)
    return [C[blocks(t), blocks(s)].float() for t, s in pairs]


def mapped_mean(C, g):
    """The paper's "mean CKA across similar layers": the mean of C[g(i), i] over student blocks i."""
    return C[g, list(range(len(g)))].mean().item()


# -----------------------------------------------------------------------------
# the figure, drawn with pillow: one panel a matrix, teacher blocks on x, student blocks on y from the bottom

VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # (a): CKA in [0, 1]
BLUE_WHITE_RED = [(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)]  # changes
LEFT, TOP, RIGHT, BOTTOM, MIN_WIDTH = 64, 62, 96, 52, 380


def font(size):
    try:
        return ImageFont.load_default(size=size)  # a scalable font, pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def colour(v, lo, hi, stops):
    t = min(max((v - lo) / (hi - lo), 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    return tuple(round(a + (b - a) * (t - i)) for a, b in zip(stops[i], stops[i + 1]))


def cell_size(n_t, n_s):
    return max(24, min(64, 320 // max(n_t, n_s)))  # toys get big cells, ViT-g's 40 blocks 24 px


def panel_size(n_t, n_s):
    c = cell_size(n_t, n_s)
    return max(MIN_WIDTH, LEFT + n_t * c + RIGHT), TOP + n_s * c + BOTTOM


def fit(d, s, f, width):  # shorten a title line that would not fit the panel
    while d.textlength(s, font=f) > width and len(s) > 4:
        s = s[:-4] + "..."
    return s


def text(d, xy, s, f, anchor="lt"):
    """Draw s with its left / middle / right and top / middle at xy (pillow's anchors need a TrueType font)."""
    l, t, r, b = d.textbbox((0, 0), s, font=f)
    d.text((xy[0] - {"l": l, "m": (l + r) / 2, "r": r}[anchor[0]], xy[1] - {"t": t, "m": (t + b) / 2}[anchor[1]]),
           s, fill="black", font=f)


def draw_panel(C, title, lo, hi, stops, g):
    """A heatmap of C (teacher blocks x student blocks), g's mapped pairs outlined, a colour bar, a title."""
    n_t, n_s = C.shape
    c = cell_size(n_t, n_s)
    img = Image.new("RGB", panel_size(n_t, n_s), "white")
    d = ImageDraw.Draw(img)
    big, small = font(15), font(12)
    for k, line in enumerate(title):
        text(d, (10, 10 + 20 * k), fit(d, line, big, img.width - 20), big)
    x0, y1 = LEFT, TOP + n_s * c  # the heatmap's left and bottom edges
    for j in range(n_t):
        for i in range(n_s):
            d.rectangle([x0 + j * c, y1 - (i + 1) * c, x0 + (j + 1) * c - 1, y1 - i * c - 1],
                        fill=colour(C[j, i].item(), lo, hi, stops))
    for i, j in enumerate(g):  # mapped pairs (i, g(i)): a black and a white outline, visible on any colour
        box = [x0 + j * c, y1 - (i + 1) * c, x0 + (j + 1) * c - 1, y1 - i * c - 1]
        d.rectangle(box, outline="black", width=2)
        d.rectangle([box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2], outline="white")
    for j in range(n_t):
        text(d, (x0 + j * c + c / 2, y1 + 5), str(j), small, "mt")
    for i in range(n_s):
        text(d, (x0 - 6, y1 - i * c - c / 2), str(i), small, "rm")
    text(d, (x0 + n_t * c / 2, y1 + 24), "teacher block", big, "mt")
    label = Image.new("RGB", (round(d.textlength("student block", font=big)) + 4, 20), "white")
    text(ImageDraw.Draw(label), (2, 2), "student block", big)
    label = label.rotate(90, expand=True)
    img.paste(label, (8, y1 - n_s * c // 2 - label.height // 2))
    bx = x0 + n_t * c + 16  # the colour bar: hi at the top, lo at the bottom
    for y in range(n_s * c):
        d.line([bx, y1 - 1 - y, bx + 14, y1 - 1 - y], fill=colour(lo + (hi - lo) * y / (n_s * c - 1), lo, hi, stops))
    d.rectangle([bx, TOP, bx + 14, y1 - 1], outline="black")
    for v, y in ((hi, TOP), ((lo + hi) / 2, TOP + n_s * c / 2), (lo, y1)):
        text(d, (bx + 20, y), (f"{v:+.3f}" if v else "0") if lo < 0 else f"{v:.2f}", small, "lm")
    return img


def side_by_side(panels, gap=12):
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    img = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        img.paste(p, (x, 0))
        x += p.width + gap
    return img


# -----------------------------------------------------------------------------
# the command: the pretrained encoders and the runs' adapted ones, on one split


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], metavar="DIR",
                   help="run folders written by train_twostep.py / train_slad.py (config.json, teacher.pt, student.pt)")
    p.add_argument("--dataset", choices=list(DATASETS), help="default: the first run's, else dtd")
    p.add_argument("--data_dir", help="default: the first run's, else ./data")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--max_images", type=POSITIVE_INT, default=None,
                   help="a fixed random subset of the split (default: all of it)")
    p.add_argument("--teacher", choices=list(CONFIGS), help="default: the runs', else vitb14")
    p.add_argument("--student", choices=list(CONFIGS), help="default: the runs', else vits14")
    p.add_argument("--init", type=init_value, metavar="{pretrained,random}",
                   help="the encoders the runs started from (default: the runs', else pretrained)")
    p.add_argument("--teacher_weights", metavar="PATH_OR_URL",
                   help="the teacher's official weights (default: the runs')")
    p.add_argument("--student_weights", metavar="PATH_OR_URL",
                   help="the student's official weights (default: the runs')")
    p.add_argument("--seed", type=int, help="rebuilds --init random's encoders (default: the runs', else 0)")
    p.add_argument("--img_size", type=POSITIVE_INT, help="default: the first run's, else the dataset's")
    p.add_argument("--mapping", choices=MAPPINGS,
                   help="the pairs (i, g(i)) to average (default: a SLAD or TED run's, else even)")
    p.add_argument("--token", default="cls", choices=["cls", "patch"], help="CLS token or mean patch token")
    p.add_argument("--pretrained_student", action="store_true",
                   help="(b-d) compare each run's teacher with the pretrained student, not the run's own student")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=64, help="images a batch; the minibatch CKA needs >= 4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_workers", type=COUNT, default=0)
    p.add_argument("--out_dir", default="out/cka")
    args = p.parse_args(argv)
    if args.batch_size < 4:
        p.error(f"--batch_size {args.batch_size}: the unbiased HSIC needs batches of 4 or more")
    return args, p


class ImagesOnly(Dataset):
    """The images of a classification or segmentation split, with a dummy label: CKA needs no labels, and a
    segmentation mask would not batch with the center-cropped images."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], 0


def read_json(path, parser):
    """The JSON object in path; one line and an exit if it holds none (a broken or hand-edited file)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, OSError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        parser.error(f"cannot read {path} ({type(e).__name__}: {e})")
    if not isinstance(obj, dict):
        parser.error(f"{path} holds a JSON {type(obj).__name__}, not the object the training scripts write")
    return obj


def read_run(path, parser):
    files = [os.path.join(path, f) for f in ("config.json", "results.json", "teacher.pt", "student.pt")]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        parser.error(f"{path} is not a finished run of train_twostep.py or train_slad.py: no {', '.join(missing)}")
    config, results = read_json(files[0], parser), read_json(files[1], parser)
    slad = results.get("method") == "slad"
    kind = "SLAD" if slad else f"{results.get('teacher_adapt', '?')} teacher"
    return dict(dir=path, name=os.path.basename(os.path.normpath(path)), kind=kind, config=config,
                mapping=config.get("mapping") if slad or config.get("feat") == "ted" else None)


def resolve(args, runs, parser):
    """Fill unset flags from the first run's config, then check that every run started from the same encoders
    and was trained on the images it is measured on."""
    first = runs[0]["config"] if runs else {}
    defaults = dict(dataset="dtd", data_dir="./data", teacher="vitb14", student="vits14", init="dinov2", seed=0,
                    img_size=None, teacher_weights=None, student_weights=None)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, first.get(k, v))
    for k, known in (("dataset", DATASETS), ("teacher", CONFIGS), ("student", CONFIGS)):  # a hand-edited config.json
        if getattr(args, k) not in known:
            parser.error(f"{runs[0]['dir']} has {k} {getattr(args, k)!r}, not one of {', '.join(known)}")
    patch = math.lcm(CONFIGS[args.teacher].patch_size, CONFIGS[args.student].patch_size)
    args.img_size = args.img_size or default_img_size(args.dataset, patch)
    if args.img_size % patch:
        parser.error(f"--img_size {args.img_size} is not a multiple of the patch size {patch}")
    args.mapping = args.mapping or next((r["mapping"] for r in runs if r["mapping"]), "even")  # SLAD's or TED's
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):
        parser.error(f"runs with the same folder name ({', '.join(names)}): their figures would overwrite each other")
    same = ("teacher", "student", "init") + (("seed",) if args.init == "random" else ())
    data = ("dataset", "img_size")
    if DATASETS[args.dataset].own:  # your folder: the files it lists now, not where it is (flags.resolve_flags)
        args.data_fingerprint = fingerprint(args.data_dir)
        data += ("data_fingerprint",)
    for r in runs:
        for k in same + data:
            if r["config"].get(k) != getattr(args, k):
                why = ("its pretrained panel would not be its starting point" if k in same else
                       "it would be measured on other images than it was trained on")
                parser.error(f"{r['dir']} has {k} {r['config'].get(k)!r}, not {getattr(args, k)!r} (the flags' or "
                             f"the first run's): {why}")
    try:
        return layer_mapping(CONFIGS[args.student].depth, CONFIGS[args.teacher].depth, args.mapping)
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    args, parser = parse_args(argv)
    runs = [read_run(d, parser) for d in args.runs]
    g = resolve(args, runs, parser)

    # the models: the encoders the runs started from, and each run's adapted ones (adapters merged)
    teacher0 = initial_backbone(args.teacher, "teacher", args.init, args.seed, args.teacher_weights)
    student0 = initial_backbone(args.student, "student", args.init, args.seed, args.student_weights)
    pairs = [(teacher0, student0)]
    for r in runs:
        teacher = load_model(os.path.join(r["dir"], "teacher.pt")).vit
        student = student0 if args.pretrained_student else load_model(os.path.join(r["dir"], "student.pt")).vit
        pairs.append((teacher, student))
    for m in {id(m): m for pair in pairs for m in pair}.values():
        m.to(args.device)

    ds = ImagesOnly(load_splits(args.dataset, args.data_dir)[0][args.split])
    if args.max_images and args.max_images < len(ds):
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.max_images]
        ds = Subset(ds, sorted(keep.tolist()))
    loader = make_loader(ds, eval_transform(args.img_size), args.batch_size, train=False,
                         num_workers=args.num_workers, device=args.device)
    mats = layer_cka(pairs, loader, args.token, args.device, pixel_stats(args.teacher, args.teacher_weights))
    if any(C.isnan().any() for C in mats):  # e.g. a random-init DINOv3's CLS token: LayerScale starts at 1e-5
        parser.error(f"a block's {args.token} token does not vary over the images, so its CKA is undefined "
                     f"(a random-init DINOv3's CLS token barely moves): try --token patch")

    # the numbers and the figure: (a) pretrained, (b), (c), ... the change after each run
    base = mapped_mean(mats[0], g)
    student_of = "pretrained student" if args.pretrained_student else "its own student"
    token = "CLS" if args.token == "cls" else "mean patch"
    images = f"{len(ds)} image{'s' * (len(ds) != 1)}"
    print(f"CKA of {token} tokens, {args.dataset} {args.split} ({images}), {args.teacher} (teacher) vs "
          f"{args.student} (student); mean over the pairs (i, g(i)) of --mapping {args.mapping}, g = {g}")
    print(f"(a) pretrained: {100 * base:.2f}%")
    limit = max([1e-6] + [(C - mats[0]).abs().max().item() for C in mats[1:]])  # one scale for (b), (c), ...
    title = ["(a) pretrained", f"mean CKA over mapped pairs {100 * base:.2f}%"]
    panels = [draw_panel(mats[0], title, 0.0, 1.0, VIRIDIS, g)]
    results = dict(vars(args), g=g, n_images=len(ds), pretrained=dict(cka=mats[0].tolist(), mapped_mean=base), runs={})
    os.makedirs(args.out_dir, exist_ok=True)
    for f in os.listdir(args.out_dir):  # an earlier call's panels, of runs not measured now, would pass for this call's
        if f == "cka.png" or (f.startswith("cka_") and f.endswith(".png")):
            os.remove(os.path.join(args.out_dir, f))
    panels[0].save(os.path.join(args.out_dir, "cka_pretrained.png"))
    for k, (r, C) in enumerate(zip(runs, mats[1:])):
        m = mapped_mean(C, g)
        letter = chr(ord("b") + k)
        change = f"{100 * m:.2f}% ({100 * (m - base):+.2f})"
        print(f"({letter}) {r['name']} ({r['kind']}, vs {student_of}): {change}")
        title = [f"({letter}) change after {r['name']} ({r['kind']}, vs {student_of})", f"mapped pairs {change}"]
        panels.append(draw_panel(C - mats[0], title, -limit, limit, BLUE_WHITE_RED, g))
        panels[-1].save(os.path.join(args.out_dir, f"cka_delta_{r['name']}.png"))
        results["runs"][r["name"]] = dict(dir=r["dir"], kind=r["kind"], cka=C.tolist(), delta=(C - mats[0]).tolist(),
                                          mapped_mean=m, change=m - base)
    side_by_side(panels).save(os.path.join(args.out_dir, "cka.png"))
    write_json(os.path.join(args.out_dir, "cka.json"), results)
    shown = f"{len(panels)} panels side by side" if len(panels) > 1 else "1 panel"
    print(f"wrote to {args.out_dir}: cka.png ({shown}), one PNG a panel, cka.json")


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130, a shell's exit status for it
        print("cka.py: interrupted", file=sys.stderr)
        sys.exit(130)
