"""
Run a trained model on images: the student.pt (or teacher.pt) a training script exported, on image files,
folders of them or a list of files, on the CPU or a GPU, in batches. A classifier prints (or writes, CSV or JSON)
each image's top-k classes with their probabilities; a segmenter writes a mask PNG an image, a class index a
pixel as in the training masks, and prints the classes that cover most of it. What the model needs -- its class
names, the image size it trained at, its preprocessing -- comes from the file (model.meta, deploy.deploy_meta).

    python predict.py out/RUN/student.pt photo.jpg
    python predict.py out/RUN/student.pt photos/ --top_k 3 --out predictions.csv   # or predictions.json
    python predict.py out/RUN/student.pt --list files.txt --device cuda --batch_size 64
    python predict.py out/SEG-RUN/student.pt street/ --out masks/                   # masks/<image name>.png

When every image lies in a folder named after one of the classes (your test/ split, say), it also prints the
top-1 accuracy: on a run's test split, the student_acc its results.json holds.
"""

import argparse
import csv
import io
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import IMAGENET_MEAN, IMAGENET_STD, SEG_BASE_RATIO, SegEvalTransform, eval_transform, make_loader, normalize
from deploy import input_size, load_model
from flags import FlagError, COUNT, POSITIVE_INT, Parser
from images import DataError, ImageFiles, open_image
from model import Segmenter, slide_inference
from own_data import image_files
from run_folder import RunError, atomic_write, write_text
from weights import CheckpointError

FIX = "replace it, or leave it out"  # what a message about an unreadable image tells to do
AGAIN = "or give another --out, then run predict.py again"  # what a failed write tells to do: nothing to resume


def counted(n, one, many):
    return f"{n} {one if n == 1 else many}"


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a student.pt or teacher.pt written by train_slad.py or train_twostep.py")
    p.add_argument("images", nargs="*", help="image files, and folders (every image below them)")
    p.add_argument("--list", metavar="FILE", help="a text file of image paths, one a line")
    p.add_argument("--out", help="a classifier's predictions as a .csv or .json file (default: printed only); a "
                                 "segmenter's masks into this folder (default: masks, in the current folder)")
    p.add_argument("--top_k", type=POSITIVE_INT, default=5, help="classes shown an image")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=32, help="images a forward pass (a classifier's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_workers", type=COUNT, default=0, help="image loading processes")
    p.add_argument("--img_size", type=POSITIVE_INT,
                   help="the size the model trained at, for a file written before it was saved there (a file that "
                        "says its size refuses another: it would change the predictions)")
    args = p.parse_args(argv)
    if not args.images and not args.list:
        p.error("no images: give image files or folders, or --list FILE")
    return args, p


def image_paths(items, listing):
    """The image files that the arguments and the --list file name, folders searched, in order."""
    if listing:
        try:
            items = items + [line.strip() for line in open(listing) if line.strip()]
        except OSError as e:
            raise DataError(f"cannot read --list {listing}: {e.strerror}") from None
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = image_files(item)
            if not found:
                raise DataError(f"{item} holds no image (formats pillow opens: .jpg, .png, .webp, ...)")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not paths:
        raise DataError(f"--list {listing} names no image: give image paths, one a line")
    return paths


def main(argv=None):
    args, p = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but torch sees no CUDA device here (use --device cpu)")
    model = load_model(args.model).to(args.device)  # eval mode; model.meta: what prediction needs
    meta = model.meta
    stats = (meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD))  # the teacher's pretraining's
    trained = meta.get("img_size")  # None in a file written before it was saved
    try:
        img_size = input_size(model, args.model, args.img_size)
    except FlagError as e:
        p.error(str(e))
    if trained and img_size != trained:  # another size resamples the position embeddings: other predictions
        p.error(f"--img_size {img_size}, but {args.model} trained at {trained} px and says so: leave --img_size out "
                f"(it is for files too old to say)")
    classes = meta.get("classes") or [str(k) for k in range(model.num_classes)]
    paths = image_paths(args.images, args.list)
    top_k = min(args.top_k, len(classes))

    if isinstance(model, Segmenter):  # one image at a time, each at its own size, by sliding window (App. C.2)
        out = args.out or "masks"
        if os.path.isfile(out) or (not os.path.isdir(out) and out.lower().endswith((".csv", ".json"))):
            what = "is a file" if os.path.isfile(out) else "names a .csv or .json file"
            p.error(f"{out} {what}, but a segmenter writes a mask PNG an image into a folder (--out, default masks): "
                    f"give --out a folder")
        names = [os.path.splitext(os.path.basename(path))[0] + ".png" for path in paths]
        if len(set(names)) < len(names):
            p.error("two images of the same name would write the same mask: predict them in separate calls")
        if not args.out:  # said, since it lands wherever the command ran
            print(f"no --out: writing the masks into {os.path.abspath(out)}", flush=True)
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot make the folder {out}: {e.strerror}; give another --out") from None
        resize = meta.get("resize") or round(img_size * SEG_BASE_RATIO)
        for path, name in zip(paths, names):
            img = open_image(path, fix=FIX)
            x, _ = SegEvalTransform(resize)(img, Image.new("L", (1, 1)))  # the evaluation's resize; no mask here
            with torch.no_grad():
                logits = slide_inference(model, normalize(x[None].to(args.device), stats), img_size, img_size // 2)
                mask = F.interpolate(logits, size=(img.height, img.width), mode="bilinear", align_corners=False)
            mask = mask.argmax(1)[0].to(torch.uint8).cpu().numpy()
            atomic_write(os.path.join(out, name), lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"), AGAIN)
            share = np.bincount(mask.ravel(), minlength=len(classes)) / mask.size
            top = np.argsort(-share)[:top_k]
            print(f"{path} -> {os.path.join(out, name)}: " +
                  ", ".join(f"{classes[k]} {100 * share[k]:.1f}%" for k in top if share[k] > 0), flush=True)
        print(f"wrote {counted(len(paths), 'mask', 'masks')} to {os.path.abspath(out)}: a class index a pixel "
              f"({', '.join(classes)})")
        return

    # a classifier: batches through the evaluation's transform; an image's label is its folder's name, if a class
    if args.out and os.path.isdir(args.out):  # refused now, not after the predictions
        p.error(f"--out {args.out} is a folder, but a classifier writes its predictions to one file: give --out a "
                f".csv or .json file")
    index = {c: k for k, c in enumerate(classes)}
    labelled = [(path, index.get(os.path.basename(os.path.dirname(os.path.abspath(path))), -1)) for path in paths]
    loader = make_loader(ImageFiles(labelled, classes, fix=FIX), eval_transform(img_size), args.batch_size,
                         train=False, num_workers=args.num_workers, device=args.device)
    rows, hits = [], 0
    for x, y in loader:
        with torch.no_grad():
            probs = model(normalize(x.to(args.device), stats)).float().softmax(-1).cpu()
        p_top, k_top = probs.topk(top_k, dim=-1)
        for pk, kk, label in zip(p_top.tolist(), k_top.tolist(), y.tolist()):
            path = paths[len(rows)]
            rows.append((path, [(classes[k], prob) for k, prob in zip(kk, pk)]))
            hits += kk[0] == label
            if not args.out:
                print(f"{path}: " + ", ".join(f"{c} {prob:.3f}" for c, prob in rows[-1][1]), flush=True)
    if args.out:
        if args.out.endswith(".json"):
            text = json.dumps([{"path": path, "top": [{"class": c, "probability": round(prob, 6)} for c, prob in top]}
                               for path, top in rows], indent=1)
        else:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["path"] + [f"{what}_{k + 1}" for k in range(top_k) for what in ("class", "probability")])
            writer.writerows([path] + [v for c, prob in top for v in (c, f"{prob:.6f}")] for path, top in rows)
            text = buf.getvalue()
        atomic_write(args.out, lambda tmp: write_text(tmp, text), AGAIN)
        best = "class" if top_k == 1 else f"{top_k} classes"
        print(f"wrote the top {best} of {counted(len(rows), 'image', 'images')} to {args.out}")
    if all(label >= 0 for _, label in labelled):  # e.g. a test/ split: each image in its class's folder
        print(f"top-1 accuracy {100 * hits / len(rows):.2f} % on {counted(len(rows), 'image', 'images')}, each in a "
              f"folder named after its class")


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, RunError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130, a shell's exit status for it
        print("predict.py: interrupted", file=sys.stderr)
        sys.exit(130)
