"""
The datasets of the paper (§4.1) and the augmentations of App. C.2, plus a procedural texture set for
offline runs.

    splits, num_classes = load_splits("dtd", "./data")      # {"train", "val", "test"} of (PIL image, label)
    loader = make_loader(splits["train"], train_transform(518), batch_size=32, train=True, seed=0)

Every sample of an epoch gets its own augmentation seed, drawn from (seed, epoch): the data of an epoch is
the same whatever the number of workers or processes, and after a resume.
"""

import os

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("dtd", "aircraft", "cub", "synthetic")
RESIZE_RATIO = 640 / 512  # the paper resizes to 640, then center-crops 512 (App. C.2)


class DataError(RuntimeError):
    """Data that is missing and could not be downloaded; the message says what to fetch and where to put it."""


# -----------------------------------------------------------------------------
# augmentations (App. C.2); teacher and student see the same augmented batch


def train_transform(img_size, jitter=0.4):
    return T.Compose([
        T.Resize(round(img_size * RESIZE_RATIO)),
        T.CenterCrop(img_size),
        T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(img_size):
    return T.Compose([
        T.Resize(round(img_size * RESIZE_RATIO)),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# -----------------------------------------------------------------------------
# the datasets


class CUB200(Dataset):
    """CUB-200-2011 read from the official CUB_200_2011/ folder (torchvision has no class for it)."""

    URL = "https://data.caltech.edu/records/65de6-vh518/files/CUB_200_2011.tgz"
    MD5 = "97eceeb196236b17998738112f37df78"

    def __init__(self, root, split):
        base = os.path.join(root, "CUB_200_2011")
        read = lambda f: [line.split() for line in open(os.path.join(base, f)) if line.strip()]
        paths = {i: p for i, p in read("images.txt")}
        is_train = {i: t == "1" for i, t in read("train_test_split.txt")}
        labels = {i: int(c) - 1 for i, c in read("image_class_labels.txt")}  # 1-based in the files
        keep = [i for i in paths if is_train[i] == (split == "train")]
        self.samples = [(os.path.join(base, "images", paths[i]), labels[i]) for i in keep]
        self.classes = sorted(set(labels.values()))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return Image.open(path).convert("RGB"), label


class SyntheticTextures(Dataset):
    """Procedural textures, one class each, with random colours, scale, phase and a little rotation and
    noise. Deterministic per (seed, split, index), generated on the fly. Every class is its own mirror
    image, so RandomHorizontalFlip keeps labels right."""

    CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots",
               "rings", "waves", "grid lines", "blobs", "rays")
    SIZES = {"train": 6000, "val": 500, "test": 1000}

    def __init__(self, split, seed=0, size=64, n=None):
        self.split, self.seed, self.size = split, seed, size
        self.n = n or self.SIZES[split]
        self.classes = list(range(len(self.CLASSES)))
        self.grid = np.mgrid[0:size, 0:size].astype(np.float32)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, ("train", "val", "test").index(self.split), i])
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
            val = np.array(Image.fromarray(noise.astype(np.float32)).resize((s, s), Image.BICUBIC)) > 0.5
        else:  # rays
            val = np.sin(np.arctan2(y - cy, x - cx) * rng.integers(4, 9) + phase) > 0
        bg = rng.uniform(0, 255, size=3)
        fg = (bg + rng.choice([-1, 1], size=3) * rng.uniform(80, 160, size=3)) % 256  # never too faint to see
        img = np.where(val[..., None], fg, bg) + 8 * rng.standard_normal(size=(s, s, 1), dtype=np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)


def _open(name, root, split):
    import torchvision.datasets as tvd
    if name == "dtd":
        return tvd.DTD(root, split=split, partition=1)
    if name == "aircraft":
        return tvd.FGVCAircraft(root, split=split, annotation_level="variant")
    if name == "cub":
        return CUB200(root, split)
    raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")


HELP = {  # what is missing, where to get it, where it goes
    "dtd": ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", "dtd/dtd", "images/ and labels/"),
    "aircraft": ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                 "fgvc-aircraft-2013b", "data/"),
    "cub": (CUB200.URL, "CUB_200_2011", "images/, images.txt, train_test_split.txt and image_class_labels.txt"),
}


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
            download_and_extract_archive(url, root, filename="CUB_200_2011.tgz", md5=CUB200.MD5)
    except Exception as e:
        raise DataError(
            f"The {name} dataset is not in {os.path.join(root, folder)} and could not be downloaded "
            f"({type(e).__name__}: {str(e).strip()[:200]}). Download {url} yourself and unpack it into {root}, "
            f"so that {os.path.join(root, folder)} holds {content}; then run again (or point --data_dir at "
            f"the folder that holds it)."
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
    if name not in HELP:
        raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    if not os.path.isdir(os.path.join(root, HELP[name][1])):
        download(name, root)
    try:
        if name == "cub":  # no val split: hold out 10% of train
            train, val = holdout(_open(name, root, "train"))
            splits = {"train": train, "val": val, "test": _open(name, root, "test")}
        else:
            splits = {s: _open(name, root, s) for s in ("train", "val", "test")}
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        url, folder, content = HELP[name]
        raise DataError(f"{os.path.join(root, folder)} is not a complete copy of {name} ({type(e).__name__}: "
                        f"{str(e).strip()[:200]}): it should hold {content}, as unpacked from {url}") from None
    return splits, len(splits["test"].classes)


# -----------------------------------------------------------------------------
# loaders: per-sample augmentation seeds, so an epoch's data is a function of (seed, epoch)


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) for one epoch: a shuffled order (train) or the natural one (eval),
    every world-th item from rank on (rank r of a world of w processes; together they make the batches one
    process would). Call set_epoch(e) before each epoch."""

    def __init__(self, n, seed=0, shuffle=True, rank=0, world=1):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.epoch = n, seed, shuffle, rank, world, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        for i in order[self.rank::self.world].tolist():
            yield i, int(seeds[i])


class Transformed(Dataset):
    """A dataset of (PIL image, label) seen through a transform, each sample with its own RNG seed."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, seed = key
        img, label = self.dataset[i]
        rng = torch.random.default_generator  # torchvision's random transforms draw from it
        state = rng.get_state()
        rng.manual_seed(seed)
        try:
            return self.transform(img), label
        finally:
            rng.set_state(state)  # leave the caller's RNG as it was


def make_loader(dataset, transform, batch_size, train, seed=0, num_workers=0, device="cpu", rank=0, world=1):
    """A DataLoader over dataset; batch_size is per process. Train loaders shuffle and drop the last
    incomplete batch."""
    sampler = EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world=world)
    return DataLoader(Transformed(dataset, transform), batch_size=batch_size, sampler=sampler, drop_last=train,
                      num_workers=num_workers, pin_memory=device.startswith("cuda"),
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
