"""
Your own images (docs/own-data.md): a folder of classes (torchvision's ImageFolder layout) or of images and masks,
read and checked before a run starts, so that what would train on nonsense is refused, one line each; a split you
do not have is held out of train. DATASETS' "folder" and "folder-seg" (data.py) read them.

    splits = read_image_folder("./flowers")                 # {"train", "val", "test"}: ImageFiles
    splits = read_mask_folder("./streets")                  # {"train", "val", "test"}: MaskFiles
    fingerprint("./flowers")                                # eight hex digits of the files it lists
"""

import functools
import hashlib
import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from images import IGNORE, SPLITS, DataError, ImageFiles, open_image, orientation, unreadable

OWN_FIX = "replace it with a good copy, or delete it"  # your own folders: nothing to download


@functools.cache
def image_extensions():
    """The file extensions of every format pillow opens (.jpg, .png, .webp, .tif, ...), looked up once."""
    Image.init()  # every plugin: pillow 9 lists only those loaded so far once an image was opened (no .webp)
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def image_files(folder, recursive=True):
    """The image files in folder (and below it), by extension, hidden ones skipped, sorted: the same order on
    every machine."""
    found, extensions = [], image_extensions()
    for d, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".")) if recursive else []
        found += [os.path.join(d, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions]
    return found


def hold_out_per_class(samples, splits, class_of, frac=0.1, seed=0):
    """{"train": [...], split: [...] for each of `splits`}: frac of each class's samples (by class_of(sample)) held
    out of train for each split, the rest train; drawn with a fixed seed, so the same on every run. Per class, so
    that a rare class keeps most of its images for training and is counted in val and test."""
    by_class = {}
    for s in samples:
        by_class.setdefault(class_of(s), []).append(s)
    out = {name: [] for name in ("train", *splits)}
    for k, key in enumerate(sorted(by_class)):
        members = by_class[key]
        order = np.random.default_rng([seed, k]).permutation(len(members)).tolist()
        n = int(frac * len(members) + 0.5)  # 10 %, rounded half up: a class of 5 images gives 1
        for j, name in enumerate(splits):
            out[name] += [members[i] for i in sorted(order[j * n:(j + 1) * n])]
        out["train"] += [members[i] for i in sorted(order[len(splits) * n:])]
    for name in splits:
        if not out[name]:
            raise DataError(f"too few images to hold {name} out of train (10 % of a class rounds to none under 5 "
                            f"images): add more images, or a {name}/ folder of your own")
    return out


def split_folders(root, dataset, layout):
    """(split, its folder) for each split `root` has; no train/ is a DataError (--dataset `dataset` reads `layout`)."""
    for split in SPLITS:
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            yield split, folder
        elif split == "train":
            raise DataError(f"no images: {folder} is not a folder (--dataset {dataset} reads {layout})")


def read_image_folder(root):
    """Your classification images, torchvision's ImageFolder layout: ROOT/train/<class>/<image> (any format
    pillow opens; subfolders of a class are read too), and val/ and test/ alike if you have them. Classes are
    train's folder names, sorted. A split you do not have is held out of train: 10 % of each class, fixed seed.
    What would train on nonsense is refused, one line each."""
    layout = f"{os.path.join(root, 'train')}/<class>/<image>, val/ and test/ alike if you have them"
    if os.path.isdir(os.path.join(root, "train", "images")) and os.path.isdir(os.path.join(root, "train", "masks")):
        raise DataError(f"{root} holds train/images/ and train/masks/, a segmentation folder: use --dataset folder-seg")
    found = {}  # split -> {class: [image paths]}
    for split, folder in split_folders(root, "folder", layout):
        classes = sorted(c for c in os.listdir(folder)
                         if not c.startswith(".") and os.path.isdir(os.path.join(folder, c)))
        found[split] = {c: image_files(os.path.join(folder, c)) for c in classes}
        empty = [c for c, files in found[split].items() if not files]
        if empty:
            raise DataError(f"{os.path.join(folder, empty[0])} holds no image (formats pillow opens: .jpg, .png, "
                            f".webp, ...): add its images or remove that folder")
        if not classes:
            loose = " (the images in it go in a folder of their class)" if image_files(folder, recursive=False) else ""
            raise DataError(f"no images: {folder} holds no class folder{loose}; --dataset folder reads {layout}")
    classes = list(found["train"])
    if len(classes) < 2:
        raise DataError(f"{os.path.join(root, 'train')} holds 1 class folder ({classes[0]}): a classifier needs at "
                        f"least two classes")
    for split in ("val", "test"):
        extra = [c for c in found.get(split, {}) if c not in classes]
        if extra:
            raise DataError(f"{os.path.join(root, split, extra[0])} is a class that {os.path.join(root, 'train')} "
                            f"lacks: add its training images there, or remove it from {split}/")
    index = {c: k for k, c in enumerate(classes)}
    samples = {s: [(p, index[c]) for c, files in found[s].items() for p in files] for s in found}
    for path, _ in (sample for split in samples.values() for sample in split):
        image_size(path)  # ~0.1 ms an image
    missing = [s for s in ("val", "test") if s not in samples]
    small = [c for c in classes if len(found["train"][c]) < 5] if missing else []  # 10 % of under 5 rounds to none
    if small:  # such a class would be trained on but go untested, its figures empty
        n = len(found["train"][small[0]])
        own = f"a {missing[0]}/ folder" if len(missing) == 1 else "val/ and test/ folders"
        raise DataError(f"{os.path.join(root, 'train', small[0])} holds {n} image{'s' * (n != 1)}, too few to hold "
                        f"10 % of a class out for {' and '.join(missing)} (5 at least): add images to it, or {own} of "
                        f"your own")
    samples.update(hold_out_per_class(samples["train"], missing, class_of=lambda sample: sample[1]))
    splits = {s: ImageFiles(samples[s], classes, fix=OWN_FIX) for s in SPLITS}
    for s in missing:
        splits[s].held_out = "10 % of each class of train, fixed seed 0"
    return splits


class MaskFiles(Dataset):
    """(PIL image, PIL mask of class indices) of a list of (image path, mask path): your segmentation folder."""

    def __init__(self, pairs, classes):
        self.samples, self.classes = pairs, classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img, mask = self.samples[i]
        return open_image(img, fix=OWN_FIX), Image.fromarray(np.array(open_image(mask, None, OWN_FIX), dtype=np.uint8))


def image_size(path):
    """(width, height) of an image as shown (its EXIF orientation applied, as open_image does), from the file's
    header (not its pixels): a file pillow cannot open is refused now, one line that names it, before a run writes
    anything; one cut short is found when it is read."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)  # turned by 90 degrees
    except OSError as e:
        raise unreadable(path, e, OWN_FIX) from None


def check_mask(img, mask, num_classes):
    """Refuse a mask that does not fit its image: another size, more than one channel, an index past the classes.
    A mask labels the image as shown: a photo stored sideways with an EXIF orientation, its mask upright."""
    size = image_size(img)
    m = np.array(open_image(mask, mode=None, fix=OWN_FIX))
    if m.ndim != 2:
        raise DataError(f"{mask} has {m.shape[2]} channels: a mask holds one class index a pixel (an 8-bit grayscale "
                        f"or palette PNG, 255 ignored)")
    if (m.shape[1], m.shape[0]) != size:
        with Image.open(img) as stored:  # say so when a mask may have been drawn on the photo as stored, sideways
            w, h = stored.size
            turned = f" as shown (its EXIF orientation turns the {w}x{h} it is stored at)" if (w, h) != size else ""
        raise DataError(f"{mask} is {m.shape[1]}x{m.shape[0]} pixels but its image {img} is {size[0]}x{size[1]}"
                        f"{turned}: a mask labels each pixel of its image, at the same size")
    if m.max() >= num_classes:
        top = int(m[m != IGNORE].max(initial=0))
        if top >= num_classes:
            raise DataError(f"{mask} holds class index {top}, but classes.txt names {num_classes} classes (indices "
                            f"0-{num_classes - 1}; 255 is ignored): fix the mask or add the class to classes.txt")


def read_mask_folder(root):
    """Your segmentation images: ROOT/classes.txt (one class name a line, the first line is index 0) and
    ROOT/train/images/<stem>.<ext> (any format pillow opens) with ROOT/train/masks/<stem>.png (a class index a
    pixel, 255 ignored), and val/ and test/ alike if you have them. A split you do not have is held out of train
    (10 % of its images, fixed seed). Every mask is read once here, so that a bad one is refused before a run
    starts rather than in its middle."""
    names_file = os.path.join(root, "classes.txt")
    layout = f"{names_file} and {os.path.join(root, 'train', 'images')}/<stem>.<ext> with masks/<stem>.png"
    if not os.path.isfile(names_file):
        raise DataError(f"no {names_file}: --dataset folder-seg reads {layout} (classes.txt: one class name a line, "
                        f"the first is index 0)")
    classes = [line.strip() for line in open(names_file) if line.strip()]
    if not 2 <= len(classes) <= IGNORE:
        raise DataError(f"{names_file} names {len(classes)} class{'es' * (len(classes) != 1)}: a segmentation needs "
                        f"2 to 255 (e.g. background and one object; index 255 is ignored)")
    samples = {}
    for split, folder in split_folders(root, "folder-seg", layout):
        images, masks = {}, {}
        for path in image_files(os.path.join(folder, "images"), recursive=False):
            stem = os.path.splitext(os.path.basename(path))[0]
            if stem in images:
                raise DataError(f"{images[stem]} and {path} share a name: one image a mask, rename one of them")
            images[stem] = path
        mask_folder = os.path.join(folder, "masks")
        for f in sorted(os.listdir(mask_folder)) if os.path.isdir(mask_folder) else []:
            if f.lower().endswith(".png") and not f.startswith("."):
                masks[os.path.splitext(f)[0]] = os.path.join(mask_folder, f)
        if not images:
            raise DataError(f"no images: {os.path.join(folder, 'images')} holds none; --dataset folder-seg reads "
                            f"{layout}")
        no_mask, no_image = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
        if no_mask:
            raise DataError(f"{images[no_mask[0]]} has no mask: expected "
                            f"{os.path.join(folder, 'masks', no_mask[0] + '.png')}")
        if no_image:
            raise DataError(f"{masks[no_image[0]]} has no image: expected {os.path.join(folder, 'images', no_image[0])}"
                            f".<ext> (.jpg, .png, ...), or remove the mask")
        samples[split] = [(images[stem], masks[stem]) for stem in sorted(images)]
    for img, mask in (pair for pairs in samples.values() for pair in pairs):
        check_mask(img, mask, len(classes))
    missing = [s for s in ("val", "test") if s not in samples]
    samples.update(hold_out_per_class(samples["train"], missing, class_of=lambda sample: 0))  # 10 % of all images
    splits = {s: MaskFiles(samples[s], classes) for s in SPLITS}
    for s in missing:
        splits[s].held_out = "10 % of train's images, fixed seed 0"
    return splits


def fingerprint(root):
    """Eight hex digits of your folder's content as listed (not its pixels): classes.txt and the path of every image
    and mask below train/, val/ and test/. Two folders share it only if they list the same files; a moved or
    renamed folder keeps it. Runs carry it in their config (flags.resolve_flags)."""
    h = hashlib.sha1()
    names_file = os.path.join(root, "classes.txt")
    if os.path.isfile(names_file):
        h.update(open(names_file, "rb").read())
    for split in SPLITS:
        for path in image_files(os.path.join(root, split)):
            h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\n")
    return h.hexdigest()[:8]
