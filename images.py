"""
Reading image files, as every dataset here does: a photo turned as its EXIF orientation says (as a viewer shows it),
16-bit grayscale scaled to 8 bits, a mask's class indices kept as stored; a file that cannot be read stops the run
with one line (DataError) that names it and says what to do. And the messages of a dataset not there: the archive
that could not be fetched, a copy cut short, Cityscapes' registration.

    img = open_image("photo.jpg")                            # RGB, upright
    mask = open_image("mask.png", mode=None)                 # class indices, IGNORE (255) for none
    dataset = ImageFiles([("a.jpg", 0), ("b.png", 1)], ["cat", "dog"])  # (PIL image, label)
"""

import os
import zipfile

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")  # what every dataset's reader gives (data.load_splits)
IGNORE = 255  # segmentation label of pixels that count for nothing
ARCHIVE_FIX = "unpack it again from the dataset's archive, or delete the dataset's folder and download it again"


# the page Cityscapes' zips are on, after a free registration (linked so by mmsegmentation's dataset_prepare.md)
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"
CITYSCAPES_ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


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


def fetch_archive(name, url, md5, root, folder, holds):
    """Download `url`, check its MD5 and unpack it into root (torchvision's download_and_extract_archive), so that
    `folder` holds `holds`; when that fails, one paragraph that says how to do it by hand."""
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(url, root, md5=md5)
    except Exception as e:
        raise DataError(
            f"The {name} dataset is not in {folder} and could not be downloaded "
            f"({type(e).__name__}: {str(e).strip()[:200]}). Download {url} yourself and unpack it into {root} "
            f"(tar xzf {os.path.basename(url)} -C {root}), so that {folder} holds {holds}; "
            f"then run again (or point --data_dir at the folder that holds it)."
        ) from None


def no_archive(name, unknown, fetched):
    why = "no such dataset" if unknown else "it is not fetched from an archive"
    return DataError(f"download: no archive to fetch for {name!r} ({why}); the datasets fetched are "
                     f"{', '.join(fetched)}")


def incomplete_copy(folder, name, e, holds, url):
    return DataError(f"{folder} is not a complete copy of {name} ({type(e).__name__}: {str(e).strip()[:200]}): it "
                     f"should hold {holds}, as unpacked from {url}; delete it and run again to download it again")


def cityscapes_missing(folder, e):
    """Cityscapes' zips not there, or one cut short: what to download, from where, and where to put it."""
    if isinstance(e, zipfile.BadZipFile):
        zips = [os.path.join(folder, z) for z in CITYSCAPES_ZIPS]
        bad = [z for z in zips if not zipfile.is_zipfile(z)] or zips  # a truncated zip has no central directory
        return DataError(f"incomplete zip file: {' and '.join(bad)} (an interrupted download?); delete it, download "
                         f"it again from {CITYSCAPES_URL} and run again")
    return DataError(
        f"Cityscapes is not in {folder} ({type(e).__name__}: {str(e).strip()[:120]}). "
        f"It needs a (free) registration, so it cannot be downloaded for you: log in at "
        f"{CITYSCAPES_URL}, download {CITYSCAPES_ZIPS[0]} (11 GB) and {CITYSCAPES_ZIPS[1]} (241 MB), and "
        f"put them (or what they unpack to) in {folder}, so that it holds "
        f"leftImg8bit/{{train,val}}/ and gtFine/{{train,val}}/ (the zips are unpacked on the first run).")


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
