"""
The procedural tasks, drawn on the fly (no download), for the toy family (docs/miniature.md): textures in DTD's
role, a fine-grained task in CUB's and Aircraft's, shapes over textures in Cityscapes'. Item i of a split depends on
(seed, split, i) alone.

    splits = SyntheticTextures.read()                       # {"train", "val", "test"}: (PIL image, label)
    img, mask = SyntheticShapes("val")[0]                   # a segmentation sample
"""

import itertools

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from images import SPLITS


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
        return np.random.default_rng([self.seed, SPLITS.index(self.split), i, *self.STREAM])


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
