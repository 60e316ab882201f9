"""
The datasets of the paper (§4.1) and the augmentations of App. C.2, plus a procedural texture set for
offline runs.

    splits, num_classes = load_splits("dtd", "./data")      # {"train", "val", "test"} of (PIL image, label)
    loader = make_loader(splits["train"], train_transform(518), batch_size=32, train=True, seed=0)

Every sample of an epoch gets its own augmentation seed, drawn from (seed, epoch): the data of an epoch is
the same whatever the number of workers or processes, and after a resume.
"""

import itertools
import os
import zipfile

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSIFICATION = ("dtd", "aircraft", "cub", "synthetic", "synthetic-fine")
SEGMENTATION = ("cityscapes", "synthetic-seg")
DATASETS = CLASSIFICATION + SEGMENTATION
IGNORE = 255  # segmentation label of pixels that count for nothing
RESIZE_RATIO = 640 / 512  # the paper resizes to 640, then center-crops 512 (App. C.2)


class DataError(RuntimeError):
    """Data that is missing, incomplete or unreadable; the message, one line, names the file and what to do."""

    def __init__(self, message):
        if message.startswith("Caught DataError"):  # re-raised from a DataLoader worker: keep the worker's own line
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


def open_image(path, mode="RGB"):
    """An image file, decoded now (mode None: as stored), so that a bad file stops here, named."""
    try:
        with Image.open(path) as img:
            return img.convert(mode) if mode else img.copy()
    except OSError as e:  # PIL's "image file is truncated" and UnidentifiedImageError are OSErrors
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): the file is missing, truncated or corrupt; "
                        f"unpack it again from the dataset's archive, or delete the dataset's folder and download "
                        f"it again") from None


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
# the datasets


class ImageFiles(Dataset):
    """(PIL image, label) of a list of (path, label): DTD, FGVC-Aircraft and CUB, read from their own files."""

    def __init__(self, samples, classes):
        self.samples, self.classes = samples, classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return open_image(path), label


def dtd_folder(root):
    """The folder of DTD's images/ and labels/: ROOT/dtd/dtd as torchvision downloads it, else ROOT/dtd, what
    the archive (its top folder is dtd/) gives when unpacked into ROOT by hand."""
    folder = os.path.join(root, "dtd", "dtd")
    return folder if os.path.isdir(folder) else os.path.join(root, "dtd")


def read_dtd(root, split):
    """DTD, partition 1, as torchvision's DTD reads it: classes are the sorted folder names."""
    folder = dtd_folder(root)
    lines = [line.strip() for line in open(os.path.join(folder, "labels", f"{split}1.txt")) if line.strip()]
    classes = sorted({line.split("/")[0] for line in lines})
    index = {c: k for k, c in enumerate(classes)}
    return ImageFiles([(os.path.join(folder, "images", line), index[line.split("/")[0]]) for line in lines], classes)


def read_aircraft(root, split):
    """FGVC-Aircraft's variants, as torchvision's FGVCAircraft reads them: classes in variants.txt's order."""
    folder = os.path.join(root, "fgvc-aircraft-2013b", "data")
    read = lambda f: [line.strip() for line in open(os.path.join(folder, f)) if line.strip()]
    classes = read("variants.txt")
    index = {c: k for k, c in enumerate(classes)}
    lines = [line.split(" ", 1) for line in read(f"images_variant_{split}.txt")]  # "<image id> <variant name>"
    return ImageFiles([(os.path.join(folder, "images", f"{i}.jpg"), index[variant]) for i, variant in lines], classes)


def read_cub(root, split):
    """CUB-200-2011 from the official CUB_200_2011/ folder (torchvision has no class for it)."""
    base = os.path.join(root, "CUB_200_2011")
    read = lambda f: [line.split() for line in open(os.path.join(base, f)) if line.strip()]
    paths = {i: p for i, p in read("images.txt")}
    is_train = {i: t == "1" for i, t in read("train_test_split.txt")}
    labels = {i: int(c) - 1 for i, c in read("image_class_labels.txt")}  # 1-based in the files
    keep = [i for i in paths if is_train[i] == (split == "train")]
    return ImageFiles([(os.path.join(base, "images", paths[i]), labels[i]) for i in keep], sorted(set(labels.values())))


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
        self.classes = list(range(len(self.CLASSES)))
        self.grid = np.mgrid[0:self.size, 0:self.size].astype(np.float32)
        self.cache = {}

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
    contrast, uneven light and noise. Deterministic per (seed, split, index), generated on the fly. Every class is its own mirror
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
        img = np.where(val[..., None], fg, bg) * light[..., None] + 20 * rng.standard_normal(size=(s, s, 1), dtype=np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)


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
        self.classes = list(range(len(self.CLASSES)))
        self.lut = np.full(256, IGNORE, dtype=np.uint8)
        for label_id, train_id in self.TRAIN_IDS.items():
            self.lut[label_id] = train_id

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img, target = self.samples[i]
        return open_image(img), Image.fromarray(self.lut[np.array(open_image(target, mode=None))])


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
        hue, marking = list(self.COLOURS.values())[label // len(self.MARKINGS)], self.MARKINGS[label % len(self.MARKINGS)]
        body = self.BODIES[rng.integers(len(self.BODIES))]
        s = self.size
        y, x = self.grid
        # clutter: smooth noise in a random colour, so the body is not the only thing in view
        noise = np.array(Image.fromarray(rng.normal(size=(6, 6)).astype(np.float32)).resize((s, s), Image.Resampling.BICUBIC))
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


READERS = {"dtd": read_dtd, "aircraft": read_aircraft, "cub": read_cub}
HELP = {  # where to get it (each URL checked against the source named), the folder it unpacks to, what that holds
    # torchvision.datasets.DTD._URL (torchvision 0.29); the archive's top folder is dtd/
    "dtd": ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", "dtd", "images/ and labels/"),
    # torchvision.datasets.FGVCAircraft._URL (torchvision 0.29)
    "aircraft": ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                 "fgvc-aircraft-2013b", "data/"),
    # Caltech's record of CUB-200-2011 (data.caltech.edu/records/65de6-vp158), the URL public CUB loaders use
    "cub": ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011",
            "images/, images.txt, train_test_split.txt and image_class_labels.txt"),
}
CUB_MD5 = "97eceeb196236b17998738112f37df78"
# the page the zips are on, after a free registration (linked so by mmsegmentation's dataset_prepare.md)
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"
CITYSCAPES_ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


def download(name, root):
    """Fetch and unpack a dataset into root, as torchvision does; a clear DataError when it cannot."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive
    url, folder, content = HELP[name]
    try:
        if name == "dtd":
            tvd.DTD(root, split="train", partition=1, download=True)
        elif name == "aircraft":
            tvd.FGVCAircraft(root, split="train", annotation_level="variant", download=True)
        else:
            download_and_extract_archive(url, root, filename="CUB_200_2011.tgz", md5=CUB_MD5)
    except Exception as e:
        raise DataError(
            f"The {name} dataset is not in {os.path.join(root, folder)} and could not be downloaded "
            f"({type(e).__name__}: {str(e).strip()[:200]}). Download {url} yourself and unpack it into {root} "
            f"(tar xzf {os.path.basename(url)} -C {root}), so that {os.path.join(root, folder)} holds {content}; "
            f"then run again (or point --data_dir at the folder that holds it)."
        ) from None


def holdout(dataset, frac=0.1, seed=0):
    """(train, val) from a set with no val split: a fixed 10% held out, as the paper (after Marrie et al.)."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(frac * len(dataset))
    return Subset(dataset, sorted(perm[n_val:])), Subset(dataset, sorted(perm[:n_val]))


def load_splits(name, root="./data"):
    """({'train', 'val', 'test'} datasets of (PIL image, label), num_classes). Absent data is downloaded."""
    if name == "synthetic":
        splits = {s: SyntheticTextures(s) for s in ("train", "val", "test")}
        return splits, len(SyntheticTextures.CLASSES)
    if name == "synthetic-seg":
        splits = {s: SyntheticShapes(s) for s in ("train", "val", "test")}
        return splits, len(SyntheticShapes.CLASSES)
    if name == "synthetic-fine":
        splits = {s: SyntheticFine(s) for s in ("train", "val", "test")}
        return splits, len(SyntheticFine.CLASSES)
    if name == "cityscapes":  # test labels are not public: test on val, hold out 10% of train for val (§4.2.2)
        try:
            train, val = holdout(Cityscapes(root, "train"))
            return {"train": train, "val": val, "test": Cityscapes(root, "val")}, len(Cityscapes.CLASSES)
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
    if name not in HELP:
        raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    url, folder, content = HELP[name]
    # DTD's download makes ROOT/dtd before it fetches anything: DTD is there when its images/ are
    if not os.path.isdir(os.path.join(dtd_folder(root), "images") if name == "dtd" else os.path.join(root, folder)):
        download(name, root)
    read = READERS[name]
    try:
        if name == "cub":  # no val split: hold out 10% of train
            train, val = holdout(read(root, "train"))
            splits = {"train": train, "val": val, "test": read(root, "test")}
        else:
            splits = {s: read(root, s) for s in ("train", "val", "test")}
    except (OSError, KeyError, ValueError) as e:
        folder = dtd_folder(root) if name == "dtd" else os.path.join(root, folder)
        raise DataError(f"{folder} is not a complete copy of {name} ({type(e).__name__}: {str(e).strip()[:200]}): it "
                        f"should hold {content}, as unpacked from {url}; delete it and run again to download it "
                        f"again") from None
    return splits, len(splits["test"].classes)


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


def make_loader(dataset, transform, batch_size, train, seed=0, num_workers=0, device="cpu", rank=0, world=1, step_batch=None):
    """A DataLoader over dataset; batch_size is per process. Train loaders shuffle and keep whole steps of
    `step_batch` images over all processes (default batch_size x world)."""
    sampler = EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world=world,
                           batch=(step_batch or batch_size * world) if train else None)
    return DataLoader(Transformed(dataset, transform), batch_size=batch_size, sampler=sampler, drop_last=train,
                      num_workers=num_workers, pin_memory=device.startswith("cuda"),
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)


SEG_BASE_RATIO = 640 / 560  # segmentation resizes around a short side of 640 for a 560 crop (App. C.2)


def make_loaders(name, splits, img_size, batch_size, seed=0, num_workers=0, device="cpu", rank=0, world=1, grad_accum=1):
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
