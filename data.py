"""
The datasets: the paper's (§4.1), your own folders of images, and procedural tasks for offline runs, in one
table (DATASETS: each one's reader, archive and checksum, folder, what it holds, whether it has its own val split,
the runs' defaults); the augmentations of App. C.2; seeded loaders.

    splits, num_classes = load_splits("dtd", "./data")      # {"train", "val", "test"} of (PIL image, label)
    splits["test"].classes                                  # the class names, in label order
    loader = make_loader(splits["train"], train_transform(518), batch_size=32, train=True, seed=0)

A new dataset is one entry of DATASETS and a reader. Every sample of an epoch gets its own augmentation seed,
drawn from (seed, epoch): the data of an epoch is the same whatever the number of workers or processes, and
after a resume.
"""

import functools
import hashlib
import itertools
import os
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
IGNORE = 255  # segmentation label of pixels that count for nothing
RESIZE_RATIO = 640 / 512  # the paper resizes to 640, then center-crops 512 (App. C.2)
ARCHIVE_FIX = "unpack it again from the dataset's archive, or delete the dataset's folder and download it again"
OWN_FIX = "replace it with a good copy, or delete it"  # your own folders: nothing to download


class DataError(RuntimeError):
    """Data that is missing, incomplete or unreadable; the message, one line, names the file and what to do."""

    def __init__(self, message):
        if message.startswith("Caught DataError"):  # re-raised from a DataLoader worker: keep the worker's own line
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


def unreadable(path, e, fix=ARCHIVE_FIX):
    return DataError(f"cannot read {path} ({type(e).__name__}: {e}): the file is missing, truncated or corrupt; {fix}")


ORIENTATION = 0x0112  # the EXIF tag of how a photo is shown: 1 as stored, 5 to 8 turned by 90 degrees
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # 16-bit grayscale as pillow opens it (older pillow: "I")


def orientation(img):
    """An opened image's EXIF orientation (1: as stored), from its header; a PNG's only if its header holds it, so
    that image_size never decodes pixels, and open_image agrees with it."""
    if img.format == "PNG" and "exif" not in img.info:  # pillow would decode the PNG to look after its pixels
        return 1
    try:
        return img.getexif().get(ORIENTATION, 1)
    except Exception:  # a broken EXIF block: viewers show the photo as stored
        return 1


def open_image(path, mode="RGB", fix=ARCHIVE_FIX):
    """An image file, decoded now, so that a bad file stops here, named; turned as its EXIF orientation says, as a
    photo viewer shows it (a phone stores portraits sideways). With a mode (images), 16-bit grayscale is scaled to
    8 bits; mode None (masks) keeps the values as stored, class indices."""
    try:
        with Image.open(path) as img:
            if orientation(img) != 1:
                img = ImageOps.exif_transpose(img)
            if mode and img.mode in SIXTEEN_BIT:  # convert() would clip every value over 255: a white image
                img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))  # the high byte,
            return img.convert(mode) if mode else img.copy()  # as pillow reads a 16-bit colour PNG
    except OSError as e:  # PIL's "image file is truncated" and UnidentifiedImageError are OSErrors
        raise unreadable(path, e, fix) from None


# -----------------------------------------------------------------------------
# augmentations (App. C.2); teacher and student see the same augmented batch


# The transforms end in uint8 tensors: loader workers do the PIL work, and normalize() turns a batch into
# the floats the ViT takes on the device -- a quarter of the bytes to move, and no float work on the CPU.


def train_transform(img_size, jitter=0.4):
    return T.Compose([
        T.Resize(round(img_size * RESIZE_RATIO)),
        T.CenterCrop(img_size),
        T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])


def eval_transform(img_size):
    return T.Compose([
        T.Resize(round(img_size * RESIZE_RATIO)),
        T.CenterCrop(img_size),
        T.PILToTensor(),
    ])


_STATS = {}  # device -> (mean, std), made once a device: no host-to-device copy in a training step


def normalize(x):
    """uint8 images (B, 3, H, W) -> float, ImageNet mean / std normalised, on x's device."""
    if x.device not in _STATS:
        _STATS[x.device] = (torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1),
                            torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1))
    mean, std = _STATS[x.device]
    return (x.float() / 255 - mean) / std


class SegTrainTransform:
    """App. C.2 for segmentation, the same geometry for image and mask: random resize (short side
    base x U(0.5, 2), as mmseg's RandomResize around 640), random crop (560), horizontal flip, then a
    photometric distortion of the image alone (mmseg's PhotometricDistortion, approximated by ColorJitter)."""

    def __init__(self, crop, base, scale=(0.5, 2.0)):
        self.crop, self.base, self.scale = crop, base, scale
        self.photometric = T.ColorJitter(brightness=0.25, contrast=0.5, saturation=0.5, hue=0.05)

    def __call__(self, img, mask):
        short = round(self.base * float(torch.empty(()).uniform_(*self.scale)))
        img = TF.resize(img, short, interpolation=T.InterpolationMode.BILINEAR)
        mask = TF.resize(mask, short, interpolation=T.InterpolationMode.NEAREST)
        pad_h, pad_w = max(self.crop - img.height, 0), max(self.crop - img.width, 0)
        if pad_h or pad_w:  # padded pixels are ignored by the loss
            img = TF.pad(img, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE)
        top = int(torch.randint(img.height - self.crop + 1, ()))
        left = int(torch.randint(img.width - self.crop + 1, ()))
        img, mask = TF.crop(img, top, left, self.crop, self.crop), TF.crop(mask, top, left, self.crop, self.crop)
        if torch.rand(()) < 0.5:
            img, mask = TF.hflip(img), TF.hflip(mask)
        return TF.pil_to_tensor(self.photometric(img)), torch.from_numpy(np.array(mask, dtype=np.int64))


class SegEvalTransform:
    """The image resized to the training base (short side 640), the mask left at full resolution: logits
    from the sliding window are upsampled to the mask, and mIoU is counted on the original pixels."""

    def __init__(self, base):
        self.base = base

    def __call__(self, img, mask):
        img = TF.resize(img, self.base, interpolation=T.InterpolationMode.BILINEAR)
        return TF.pil_to_tensor(img), torch.from_numpy(np.array(mask, dtype=np.int64))


# -----------------------------------------------------------------------------
# the paper's datasets (§4.1), read from their own files


class ImageFiles(Dataset):
    """(PIL image, label) of a list of (path, label), class names in .classes: DTD, FGVC-Aircraft, CUB, your own
    folders. `fix` is what a message about an unreadable file tells to do."""

    def __init__(self, samples, classes, fix=ARCHIVE_FIX):
        self.samples, self.classes, self.fix = samples, classes, fix

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return open_image(path, fix=self.fix), label


def dtd_folder(root):
    """The folder of DTD's images/ and labels/: ROOT/dtd/dtd as torchvision downloads it, else ROOT/dtd, what
    the archive (its top folder is dtd/) gives when unpacked into ROOT."""
    folder = os.path.join(root, "dtd", "dtd")
    return folder if os.path.isdir(folder) else os.path.join(root, "dtd")


def read_dtd(root):
    """DTD, partition 1, as torchvision's DTD reads it: classes are the sorted folder names."""
    folder = dtd_folder(root)
    splits = {}
    for split in SPLITS:
        lines = [line.strip() for line in open(os.path.join(folder, "labels", f"{split}1.txt")) if line.strip()]
        classes = sorted({line.split("/")[0] for line in lines})
        index = {c: k for k, c in enumerate(classes)}
        samples = [(os.path.join(folder, "images", line), index[line.split("/")[0]]) for line in lines]
        splits[split] = ImageFiles(samples, classes)
    return splits


def read_aircraft(root):
    """FGVC-Aircraft's variants, as torchvision's FGVCAircraft reads them: classes in variants.txt's order."""
    folder = os.path.join(root, "fgvc-aircraft-2013b", "data")
    read = lambda f: [line.strip() for line in open(os.path.join(folder, f)) if line.strip()]
    classes = read("variants.txt")
    index = {c: k for k, c in enumerate(classes)}
    splits = {}
    for split in SPLITS:
        lines = [line.split(" ", 1) for line in read(f"images_variant_{split}.txt")]  # "<image id> <variant name>"
        splits[split] = ImageFiles([(os.path.join(folder, "images", f"{i}.jpg"), index[v]) for i, v in lines], classes)
    return splits


def read_cub(root):
    """CUB-200-2011 from the official CUB_200_2011/ folder (torchvision has no class for it); train and test (no
    val: load_splits holds it out). Class names are the image folders' ("001.Black_footed_Albatross": the part
    after the number)."""
    base = os.path.join(root, "CUB_200_2011")
    read = lambda f: [line.split() for line in open(os.path.join(base, f)) if line.strip()]
    paths = {i: p for i, p in read("images.txt")}
    is_train = {i: t == "1" for i, t in read("train_test_split.txt")}
    labels = {i: int(c) - 1 for i, c in read("image_class_labels.txt")}  # 1-based in the files
    names = {labels[i]: os.path.dirname(p).split(".", 1)[-1] for i, p in paths.items()}
    classes = [names[k] for k in sorted(names)]
    return {split: ImageFiles([(os.path.join(base, "images", paths[i]), labels[i]) for i in paths
                               if is_train[i] == (split == "train")], classes) for split in ("train", "test")}


# the page the zips are on, after a free registration (linked so by mmsegmentation's dataset_prepare.md)
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"
CITYSCAPES_ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


class Cityscapes(Dataset):
    """Cityscapes, fine annotations, labels mapped to the 19 train ids (255: ignored), read from the official
    leftImg8bit/ and gtFine/ folders through torchvision."""

    # labelId -> trainId of the 19 evaluated classes (cityscapesScripts' labels.py)
    TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")

    def __init__(self, root, split):
        import torchvision.datasets as tvd
        ds = tvd.Cityscapes(os.path.join(root, "cityscapes"), split=split, mode="fine", target_type="semantic")
        self.samples = sorted(zip(ds.images, (t[0] for t in ds.targets)))  # os.listdir's order is arbitrary
        self.classes = list(self.CLASSES)
        self.lut = np.full(256, IGNORE, dtype=np.uint8)
        for label_id, train_id in self.TRAIN_IDS.items():
            self.lut[label_id] = train_id

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img, target = self.samples[i]
        return open_image(img), Image.fromarray(self.lut[np.array(open_image(target, mode=None))])


def read_cityscapes(root):
    """Cityscapes' train, and its official val as test: the test labels are not public (§4.2.2)."""
    try:
        return {"train": Cityscapes(root, "train"), "test": Cityscapes(root, "val")}
    except zipfile.BadZipFile:  # torchvision unpacks the zips on the first run
        zips = [os.path.join(root, "cityscapes", z) for z in CITYSCAPES_ZIPS]
        bad = [z for z in zips if not zipfile.is_zipfile(z)] or zips  # a truncated zip has no central directory
        raise DataError(f"incomplete zip file: {' and '.join(bad)} (an interrupted download?); delete it, download "
                        f"it again from {CITYSCAPES_URL} and run again") from None
    except (OSError, RuntimeError) as e:
        raise DataError(
            f"Cityscapes is not in {os.path.join(root, 'cityscapes')} ({type(e).__name__}: {str(e).strip()[:120]}). "
            f"It needs a (free) registration, so it cannot be downloaded for you: log in at "
            f"{CITYSCAPES_URL}, download {CITYSCAPES_ZIPS[0]} (11 GB) and {CITYSCAPES_ZIPS[1]} (241 MB), and "
            f"put them (or what they unpack to) in {os.path.join(root, 'cityscapes')}, so that it holds "
            f"leftImg8bit/{{train,val}}/ and gtFine/{{train,val}}/ (the zips are unpacked on the first run)."
        ) from None


# -----------------------------------------------------------------------------
# your own images: a folder of classes (torchvision's ImageFolder layout) or of images and masks (docs/own-data.md)

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


def hold_out(samples, splits, group, frac=0.1, seed=0):
    """{"train": [...], split: [...] for each of `splits`}: frac of each group's samples (a class, by group(sample))
    held out of train for each split, the rest train; drawn with a fixed seed, so the same on every run. Per
    class, so that a rare class keeps most of its images for training and is counted in val and test."""
    groups = {}
    for s in samples:
        groups.setdefault(group(s), []).append(s)
    out = {name: [] for name in ("train", *splits)}
    for k, key in enumerate(sorted(groups)):
        members = groups[key]
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


def read_image_folder(root):
    """Your classification images, torchvision's ImageFolder layout: ROOT/train/<class>/<image> (any format
    pillow opens; subfolders of a class are read too), and val/ and test/ alike if you have them. Classes are
    train's folder names, sorted. A split you do not have is held out of train: 10 % of each class, fixed seed.
    What would train on nonsense is refused, one line each."""
    layout = f"{os.path.join(root, 'train')}/<class>/<image>, val/ and test/ alike if you have them"
    if os.path.isdir(os.path.join(root, "train", "images")) and os.path.isdir(os.path.join(root, "train", "masks")):
        raise DataError(f"{root} holds train/images/ and train/masks/, a segmentation folder: use --dataset folder-seg")
    found = {}  # split -> {class: [image paths]}
    for split in SPLITS:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            if split == "train":
                raise DataError(f"no images: {folder} is not a folder (--dataset folder reads {layout})")
            continue
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
    samples.update(hold_out(samples["train"], missing, group=lambda sample: sample[1]))
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
    for split in SPLITS:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            if split == "train":
                raise DataError(f"no images: {folder} is not a folder (--dataset folder-seg reads {layout})")
            continue
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
    samples.update(hold_out(samples["train"], missing, group=lambda sample: 0))
    splits = {s: MaskFiles(samples[s], classes) for s in SPLITS}
    for s in missing:
        splits[s].held_out = "10 % of train's images, fixed seed 0"
    return splits


def fingerprint(root):
    """Eight hex digits of your folder's content as listed (not its pixels): classes.txt and the path of every image
    and mask below train/, val/ and test/. Two folders share it only if they list the same files; a moved or
    renamed folder keeps it. Runs carry it in their config (experiment.resolve_flags)."""
    h = hashlib.sha1()
    names_file = os.path.join(root, "classes.txt")
    if os.path.isfile(names_file):
        h.update(open(names_file, "rb").read())
    for split in SPLITS:
        for path in image_files(os.path.join(root, split)):
            h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\n")
    return h.hexdigest()[:8]


# -----------------------------------------------------------------------------
# procedural tasks, drawn on the fly (no download), for the toy family


def hsv(h, s, v):
    """An RGB colour (0-255) from hue in [0, 1), saturation and value in [0, 1]."""
    k = (np.array([5, 3, 1]) + 6 * h) % 6
    return 255 * v * (1 - s * np.clip(np.minimum(k, 4 - k), 0, 1))


class Procedural(Dataset):
    """A dataset drawn on the fly, no download: item i of a split depends on (seed, split, i) alone."""

    SIZES, SIZE, STREAM = {}, 64, ()  # images per split, side in pixels, an extra seed to keep sets apart

    def __init__(self, split, seed=0, n=None):
        self.split, self.seed, self.size = split, seed, self.SIZE
        self.n = n or self.SIZES[split]
        self.classes = list(self.CLASSES)
        self.grid = np.mgrid[0:self.size, 0:self.size].astype(np.float32)
        self.cache = {}

    @classmethod
    def read(cls, root=None):
        """The three splits, drawn on the fly: nothing is read from root."""
        return {split: cls(split) for split in SPLITS}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i not in self.cache:  # drawn once a process: later epochs and evaluations reuse it
            self.cache[i] = self.draw(i)
        return self.cache[i]

    def rng(self, i):
        return np.random.default_rng([self.seed, ("train", "val", "test").index(self.split), i, *self.STREAM])


class SyntheticTextures(Procedural):
    """Procedural textures, one class each, with random colours, scale, phase and a little rotation, in low
    contrast, uneven light and noise. Deterministic per (seed, split, index), generated on the fly. Every class is its
    own mirror
    image, so RandomHorizontalFlip keeps labels right."""

    CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots",
               "rings", "waves", "grid lines", "blobs", "rays")
    SIZES = {"train": 6000, "val": 500, "test": 1000}

    def draw(self, i):
        rng = self.rng(i)
        label = i % len(self.CLASSES)
        return Image.fromarray(self.render(label, rng)), label

    def render(self, label, rng):
        s = self.size
        y, x = self.grid
        period = rng.uniform(6, 14)
        phase = rng.uniform(0, 2 * np.pi)
        tilt = np.deg2rad(rng.uniform(-10, 10))
        u = x * np.cos(tilt) + y * np.sin(tilt)  # slightly rotated axes
        v = -x * np.sin(tilt) + y * np.cos(tilt)
        cy, cx = rng.uniform(0.2 * s, 0.8 * s, size=2)
        wave = lambda t: np.sin(2 * np.pi * t / period + phase)
        name = self.CLASSES[label]
        if name == "horizontal stripes":
            val = wave(v) > 0
        elif name == "vertical stripes":
            val = wave(u) > 0
        elif name == "diagonal stripes":
            val = wave((u + rng.choice([-1, 1]) * v) / np.sqrt(2)) > 0
        elif name == "checkerboard":
            val = (wave(u) > 0) ^ (wave(v) > 0)
        elif name == "dots":
            val = (wave(u) + wave(v)) > 1.2
        elif name == "rings":
            val = wave(np.hypot(x - cx, y - cy)) > 0
        elif name == "waves":
            val = wave(v + 0.25 * period * np.sin(2 * np.pi * u / (2.5 * period))) > 0
        elif name == "grid lines":
            val = (wave(u) > 0.8) | (wave(v) > 0.8)
        elif name == "blobs":
            noise = rng.normal(size=(s // 8 + 2, s // 8 + 2))
            val = np.array(Image.fromarray(noise.astype(np.float32)).resize((s, s), Image.Resampling.BICUBIC)) > 0.5
        else:  # rays
            val = np.sin(np.arctan2(y - cy, x - cx) * rng.integers(4, 9) + phase) > 0
        # "in the wild", as DTD's photographs: two close colours, uneven light, sensor noise
        bg = rng.uniform(40, 215, size=3)
        fg = bg + rng.choice([-1, 1], size=3) * rng.uniform(20, 70, size=3)
        a, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)  # light falls off along a random direction
        light = 1 + strength * (np.cos(a) * (x - s / 2) + np.sin(a) * (y - s / 2)) / (s / 2)
        noise = 20 * rng.standard_normal(size=(s, s, 1), dtype=np.float32)
        img = np.where(val[..., None], fg, bg) * light[..., None] + noise
        return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticShapes(Procedural):
    """Shapes over textures, for offline segmentation: a striped or noisy background (class 0) and one to
    three disks, squares and triangles (classes 1-3), each class in its own colour family, overlapping in
    random order. Deterministic per (seed, split, index)."""

    CLASSES = ("background", "disk", "square", "triangle")
    SIZES = {"train": 1200, "val": 100, "test": 200}
    HUES = {1: (220, 60, 40), 2: (50, 190, 60), 3: (60, 90, 220)}  # reddish, greenish, bluish

    SIZE, STREAM = 128, (1,)

    def draw(self, i):
        rng = self.rng(i)
        s = self.size
        y, x = self.grid
        period, phase, angle = rng.uniform(6, 16), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)[..., None]
        img = rng.uniform(60, 190, 3) + rng.uniform(20, 60) * stripes + 12 * rng.standard_normal((s, s, 1))
        mask = np.zeros((s, s), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            label = int(rng.integers(1, 4))
            r = rng.uniform(0.12, 0.25) * s
            cy, cx = rng.uniform(r, s - r, size=2)
            if label == 1:
                inside = np.hypot(x - cx, y - cy) < r
            elif label == 2:
                inside = (np.abs(x - cx) < r * 0.85) & (np.abs(y - cy) < r * 0.85)
            else:  # an upward triangle: below the apex, above the base, inside both slanted sides
                inside = (y < cy + r * 0.8) & (np.abs(x - cx) < (y - (cy - r)) * 0.6)
            img[inside] = np.array(self.HUES[label]) + rng.uniform(-30, 30, 3)
            mask[inside] = label
        img = np.clip(img, 0, 255).astype(np.uint8)
        return Image.fromarray(img), Image.fromarray(mask)


class SyntheticFine(Procedural):
    """Fine-grained offline classification (the role of FGVC-Aircraft and CUB): one body on a cluttered
    background, 36 classes = 4 colours of the body x 9 markings on it, so that classes differ in a detail
    inside the object while its outline (disk, square, triangle or diamond), shade, size, position and the
    background vary within each, as a species' plumage stays while pose and scene change. Every class is its
    own mirror image."""

    COLOURS = {"red": 0.0, "yellow": 0.15, "green": 0.33, "blue": 0.62}  # hue families of the body
    MARKINGS = ("plain", "horizontal bars", "vertical bars", "diagonal bars", "checks", "spots", "centre dot",
                "ring", "cross")
    BODIES = ("disk", "square", "triangle", "diamond")
    CLASSES = tuple(map(" body, ".join, itertools.product(COLOURS, MARKINGS)))
    SIZES = {"train": 2160, "val": 720, "test": 1440}
    STREAM = (2,)

    def draw(self, i):
        rng = self.rng(i)
        label = i % len(self.CLASSES)
        hue = list(self.COLOURS.values())[label // len(self.MARKINGS)]
        marking = self.MARKINGS[label % len(self.MARKINGS)]
        body = self.BODIES[rng.integers(len(self.BODIES))]
        s = self.size
        y, x = self.grid
        # clutter: smooth noise in a random colour, so the body is not the only thing in view
        coarse = Image.fromarray(rng.normal(size=(6, 6)).astype(np.float32))
        noise = np.array(coarse.resize((s, s), Image.Resampling.BICUBIC))
        img = rng.uniform(40, 215, 3) + rng.uniform(15, 40) * noise[..., None]
        r = rng.uniform(0.28, 0.36) * s
        cy, cx = rng.uniform(0.45 * s, 0.55 * s, size=2)
        dy, dx = y - cy, x - cx
        inside = {"disk": np.hypot(dx, dy) < r, "square": np.maximum(np.abs(dx), np.abs(dy)) < 0.85 * r,
                  "triangle": (dy < 0.8 * r) & (np.abs(dx) < (dy + r) * 0.65),
                  "diamond": np.abs(dx) + np.abs(dy) < 1.15 * r}[body]
        period = rng.uniform(0.35, 0.5) * r
        wave = lambda t: np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
        mark = {"plain": np.zeros_like(inside), "horizontal bars": wave(dy) > 0.3, "vertical bars": wave(dx) > 0.3,
                "diagonal bars": wave((dx + rng.choice([-1, 1]) * dy) / np.sqrt(2)) > 0.3,
                "checks": (wave(dx) > 0) ^ (wave(dy) > 0), "spots": (wave(dx) + wave(dy)) > 1.1,
                "centre dot": np.hypot(dx, dy) < 0.3 * r, "ring": np.abs(np.hypot(dx, dy) - 0.5 * r) < 0.1 * r,
                "cross": (np.abs(dx) < 0.12 * r) | (np.abs(dy) < 0.12 * r)}[marking]
        colour = hsv((hue + rng.uniform(-0.04, 0.04)) % 1, rng.uniform(0.55, 1), rng.uniform(0.5, 1))
        img[inside] = colour
        img[inside & mark] = (colour + rng.choice([-1, 1], 3) * rng.uniform(60, 120, 3)) % 256
        img = img + 8 * rng.standard_normal((s, s, 1))
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), label


# -----------------------------------------------------------------------------
# the table: every dataset a --dataset flag names, in one place


@dataclass(frozen=True)
class Source:
    """One dataset: how it is read, where it comes from, and the defaults its runs get."""

    task: str  # "classification" or "segmentation"
    read: Callable  # read(root) -> {"train", "test"[, "val"]}: datasets of (PIL image, label or mask), .classes
    folder: str = ""  # where it is below --data_dir ("": --data_dir is the dataset)
    holds: str = ""  # what that folder holds, as the messages say it
    url: str = None  # the archive download() fetches and unpacks into --data_dir; None: none to fetch
    md5: str = None  # that archive's MD5 where one is published; None: not checked
    own_val: bool = True  # False: load_splits holds out 10 % of train for val (fixed seed), as the paper does
    own: bool = False  # your own folder: its name joins the run's name, a fingerprint of its files the config
    img_size: int = 518  # the runs' defaults (experiment.resolve_flags): 518 = 37 x 14, the patch-14 size nearest
    batch_size: int = 32  # the paper's 512 crop; the procedural tasks are for toy models, which need more steps
    lr: float = 1e-3  # (smaller batches) and a larger learning rate to learn in one epoch


SEG = dict(img_size=560, batch_size=8)  # the paper's 560 crop (App. C.2)
TOY = dict(lr=3e-3)
DATASETS = {
    # the paper's (§4.1); URLs checked against the source named
    "dtd": Source("classification", read_dtd, "dtd", "images/ and labels/",  # torchvision's DTD._URL and _MD5
                  url="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                  md5="fff73e5086ae6bdbea199a49dfb8a4c1"),
    "aircraft": Source("classification", read_aircraft, "fgvc-aircraft-2013b", "data/",  # FGVCAircraft._URL, no MD5
                       url="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"),
    "cub": Source("classification", read_cub, "CUB_200_2011",  # Caltech's record (data.caltech.edu/records/65de6-vp158)
                  "images/, images.txt, train_test_split.txt and image_class_labels.txt",
                  url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                  md5="97eceeb196236b17998738112f37df78", own_val=False),
    "cityscapes": Source("segmentation", read_cityscapes, "cityscapes",  # a registration: read_cityscapes says where
                         "leftImg8bit/{train,val}/ and gtFine/{train,val}/", own_val=False, **SEG),
    # your own (docs/own-data.md): --data_dir is the folder; val/ and test/ are held out of train when absent
    "folder": Source("classification", read_image_folder, "", "train/<class>/<image>, val/ and test/ alike if any",
                     own=True),
    "folder-seg": Source("segmentation", read_mask_folder, "",
                         "classes.txt, train/images/<stem>.<ext> and train/masks/<stem>.png, val/ and test/ alike "
                         "if any",
                         own=True, **SEG),
    # procedural, in the roles of DTD, of CUB and Aircraft, and of Cityscapes (docs/miniature.md)
    "synthetic": Source("classification", SyntheticTextures.read, img_size=56, batch_size=16, **TOY),
    "synthetic-fine": Source("classification", SyntheticFine.read, img_size=56, batch_size=32, **TOY),
    "synthetic-seg": Source("segmentation", SyntheticShapes.read, img_size=112, batch_size=8, **TOY),
}
CLASSIFICATION = tuple(name for name, s in DATASETS.items() if s.task == "classification")
SEGMENTATION = tuple(name for name, s in DATASETS.items() if s.task == "segmentation")


def download(name, root):
    """Fetch a dataset's archive, check its MD5 and unpack it into root (torchvision's download_and_extract_archive);
    when that fails, one paragraph that says how to do it by hand. Refuses a dataset it has no archive for."""
    source = DATASETS.get(name)
    if source is None or source.url is None:
        why = "no such dataset" if source is None else "it is not fetched from an archive"
        fetched = ", ".join(n for n, s in DATASETS.items() if s.url)
        raise DataError(f"download: no archive to fetch for {name!r} ({why}); the datasets fetched are {fetched}")
    from torchvision.datasets.utils import download_and_extract_archive
    url, folder = source.url, os.path.join(root, source.folder)
    try:
        download_and_extract_archive(url, root, md5=source.md5)
    except Exception as e:
        raise DataError(
            f"The {name} dataset is not in {folder} and could not be downloaded "
            f"({type(e).__name__}: {str(e).strip()[:200]}). Download {url} yourself and unpack it into {root} "
            f"(tar xzf {os.path.basename(url)} -C {root}), so that {folder} holds {source.holds}; "
            f"then run again (or point --data_dir at the folder that holds it)."
        ) from None


def holdout(dataset, frac=0.1, seed=0):
    """(train, val) from a set with no val split: a fixed 10% held out, as the paper (after Marrie et al.)."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(frac * len(dataset))
    return Subset(dataset, sorted(perm[n_val:])), Subset(dataset, sorted(perm[:n_val]))


def load_splits(name, root="./data"):
    """({'train', 'val', 'test'} datasets of (PIL image, label or mask), num_classes); splits["test"].classes are
    the class names. A dataset with an archive is downloaded when its folder is absent."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    source = DATASETS[name]
    folder = os.path.join(root, source.folder)
    if source.url and not os.path.isdir(folder):
        download(name, root)
    try:
        splits = source.read(root)
    except (OSError, KeyError, ValueError) as e:
        if source.url is None:
            raise
        raise DataError(f"{folder} is not a complete copy of {name} ({type(e).__name__}: {str(e).strip()[:200]}): it "
                        f"should hold {source.holds}, as unpacked from {source.url}; delete it and run again to "
                        f"download it again") from None
    if not source.own_val:
        splits["train"], splits["val"] = holdout(splits["train"])
        splits["val"].held_out = "10 % of train, fixed seed 0"
    return {s: splits[s] for s in SPLITS}, len(splits["test"].classes)


def held_out(splits):
    """{split: how} of the splits held out of train, the data having none of its own."""
    return {s: splits[s].held_out for s in SPLITS if getattr(splits[s], "held_out", None)}


def describe(splits):
    """One line for a run's log: each split's size, and how any was held out of train."""
    held = held_out(splits)
    return ", ".join(f"{s} {len(splits[s])}" + (f" (held out of train: {held[s]})" if s in held else "")
                     for s in SPLITS)


# -----------------------------------------------------------------------------
# loaders: per-sample augmentation seeds, so an epoch's data is a function of (seed, epoch)


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) for one epoch: a shuffled order (train) or the natural one (eval),
    every world-th item from rank on (rank r of a world of w processes; together they make the batches one
    process would). With `batch` (a training step's images over all processes), the order is cut to whole
    steps first, so every process takes the same number of steps. Call set_epoch(e) before each epoch."""

    def __init__(self, n, seed=0, shuffle=True, rank=0, world=1, batch=None):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.epoch = n, seed, shuffle, rank, world, 0
        self.used = n // batch * batch if batch else n  # the incomplete last step is dropped, on every process

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(range(self.rank, self.used, self.world))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        for i in order[:self.used][self.rank::self.world].tolist():
            yield i, int(seeds[i])


class Transformed(Dataset):
    """A dataset of (PIL image, label) seen through a transform, each sample with its own RNG seed. A
    segmentation transform (SegTrainTransform, SegEvalTransform) takes the image and its mask together."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform
        self.joint = isinstance(transform, (SegTrainTransform, SegEvalTransform))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, seed = key
        img, label = self.dataset[i]
        rng = torch.random.default_generator  # torchvision's random transforms draw from it
        state = rng.get_state()
        rng.manual_seed(seed)
        try:
            return self.transform(img, label) if self.joint else (self.transform(img), label)
        finally:
            rng.set_state(state)  # leave the caller's RNG as it was


def keep_sizes(batch):
    """DataLoader's collate for evaluation: a batch stacked as usual when its images (and masks) are all one size;
    otherwise (photos, portrait and landscape, evaluated at their own sizes) a list of images and a list of their
    labels or masks, which experiment.evaluate takes one at a time."""
    if len({(x.shape, torch.as_tensor(y).shape) for x, y in batch}) == 1:
        return default_collate(batch)
    return [x for x, _ in batch], [torch.as_tensor(y) for _, y in batch]


def make_loader(dataset, transform, batch_size, train, seed=0, num_workers=0, device="cpu", rank=0, world=1,
                step_batch=None):
    """A DataLoader over dataset; batch_size is per process. Train loaders shuffle and keep whole steps of
    `step_batch` images over all processes (default batch_size x world); evaluation loaders keep each image's
    size (keep_sizes)."""
    sampler = EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world=world,
                           batch=(step_batch or batch_size * world) if train else None)
    return DataLoader(Transformed(dataset, transform), batch_size=batch_size, sampler=sampler, drop_last=train,
                      collate_fn=None if train else keep_sizes, num_workers=num_workers,
                      pin_memory=device.startswith("cuda"), persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


SEG_BASE_RATIO = 640 / 560  # segmentation resizes around a short side of 640 for a 560 crop (App. C.2)


def make_loaders(name, splits, img_size, batch_size, seed=0, num_workers=0, device="cpu", rank=0, world=1,
                 grad_accum=1):
    """(train, val, test) loaders of dataset `name`'s splits with App. C.2's transforms for its task,
    batch_size images a step over all `world` processes; the train loader yields each process's share in
    `grad_accum` micro-batches a step."""
    kw = dict(seed=seed, num_workers=num_workers, device=device, rank=rank, world=world)
    if name in SEGMENTATION:
        base = round(img_size * SEG_BASE_RATIO)
        train_tf, eval_tf = SegTrainTransform(img_size, base), SegEvalTransform(base)
    else:
        train_tf, eval_tf = train_transform(img_size), eval_transform(img_size)
    batch = batch_size // world
    return (make_loader(splits["train"], train_tf, batch // grad_accum, train=True, step_batch=batch_size, **kw),
            make_loader(splits["val"], eval_tf, batch, train=False, **kw),
            make_loader(splits["test"], eval_tf, batch, train=False, **kw))
