"""
The datasets in one table (DATASETS: each one's reader, archive and checksum, folder, what it holds, whether it has
its own val split, the runs' defaults): the paper's (§4.1), read here; your own folders (own_data.py) and the
procedural tasks for offline runs (synthetic.py), read there. Then the augmentations of App. C.2, and seeded loaders.

    splits, num_classes = load_splits("dtd", "./data")      # {"train", "val", "test"} of (PIL image, label)
    splits["test"].classes                                  # the class names, in label order
    loader = make_loader(splits["train"], train_transform(518), batch_size=32, train=True, seed=0)

A new dataset is one entry of DATASETS and a reader. Every sample of an epoch gets its own augmentation seed,
drawn from (seed, epoch): the data of an epoch is the same whatever the number of workers or processes, and
after a resume.
"""

import os
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from images import (IGNORE, SPLITS, DataError, ImageFiles, cityscapes_missing, fetch_archive, incomplete_copy,
                    no_archive, open_image)
from own_data import read_image_folder, read_mask_folder
from synthetic import SyntheticFine, SyntheticShapes, SyntheticTextures
from weights import satellite

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SAT493M_MEAN, SAT493M_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # DINOv3's satellite weights (its README)
RESIZE_RATIO = 640 / 512  # the paper resizes to 640, then center-crops 512 (App. C.2)


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


def pixel_stats(name, weights=None):
    """(mean, std) of the images model `name` was pretrained on, those its inputs are normalised with: SAT-493M's for
    DINOv3's satellite weights (dinov3_vitl16_sat493m; the 7B by its file's name, weights.satellite), ImageNet's for
    every other. A run normalises with its teacher's: the student sees the same batch (docs/weights.md)."""
    return (SAT493M_MEAN, SAT493M_STD) if satellite(name, weights) else (IMAGENET_MEAN, IMAGENET_STD)


_STATS = {}  # (device, mean, std) -> tensors, made once: no host-to-device copy in a training step


def normalize(x, stats=(IMAGENET_MEAN, IMAGENET_STD)):
    """uint8 images (B, 3, H, W) -> float, normalised by `stats` (mean, std; pixel_stats), on x's device."""
    key = (x.device, *map(tuple, stats))
    if key not in _STATS:
        _STATS[key] = [torch.tensor(s, device=x.device).view(1, 3, 1, 1) for s in stats]
    mean, std = _STATS[key]
    return (x.float() / 255 - mean) / std


def next_batch(batches, device, stats=(IMAGENET_MEAN, IMAGENET_STD)):
    """The next (images, labels) of a loader's iterator, on `device`, the images normalised by `stats`."""
    x, y = next(batches)
    return normalize(x.to(device, non_blocking=True), stats), y.to(device, non_blocking=True)


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
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:  # torchvision unpacks the zips on the first run
        raise cityscapes_missing(os.path.join(root, "cityscapes"), e) from None


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
    img_size: int = 518  # the runs' defaults (flags.resolve_flags): 518 = 37 x 14, the patch-14 size nearest
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
    """Fetch a dataset's archive, check its MD5 and unpack it into root (images.fetch_archive); refuses a dataset
    it has no archive for."""
    source = DATASETS.get(name)
    if source is None or source.url is None:
        raise no_archive(name, source is None, [n for n, s in DATASETS.items() if s.url])
    fetch_archive(name, source.url, source.md5, root, os.path.join(root, source.folder), source.holds)


def hold_out(dataset, frac=0.1, seed=0):
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
        raise incomplete_copy(folder, name, e, source.holds, source.url) from None
    if not source.own_val:
        splits["train"], splits["val"] = hold_out(splits["train"])
        splits["val"].held_out = "10 % of train, fixed seed 0"
    return {s: splits[s] for s in SPLITS}, len(splits["test"].classes)


def held_out_splits(splits):
    """{split: how} of the splits held out of train, the data having none of its own."""
    return {s: splits[s].held_out for s in SPLITS if getattr(splits[s], "held_out", None)}


def describe_splits(splits):
    """One line for a run's log: each split's size, and how any was held out of train."""
    held = held_out_splits(splits)
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
    labels or masks, which evaluation.evaluate takes one at a time."""
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
