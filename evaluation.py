"""
Evaluation (§4.1, App. C.2): top-1 accuracy, or per-pixel accuracy and mIoU by a sliding window for segmentation,
with confusion matrices, in one pass over a split for every model.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import IMAGENET_MEAN, IMAGENET_STD, normalize
from images import IGNORE
from model import slide_inference


def same_size_batches(loader):
    """The loader's batches, those of images of different sizes (lists, data.keep_sizes) cut into batches of one."""
    for x, y in loader:
        if isinstance(x, list):  # photos, portrait and landscape: each predicted at its own size
            yield from ((xi[None], yi[None]) for xi, yi in zip(x, y))
        else:
            yield x, y


@torch.no_grad()
def evaluate(models, loader, device, autocast, window=None, stats=(IMAGENET_MEAN, IMAGENET_STD)):
    """{name: {"acc": %, "miou": % for segmentation, "confusion": (n, n) counts}} of each model in {name: model} on
    loader, in one pass over the data. Accuracy is top-1, or per pixel; with a `window` (segmentation) each image
    is predicted by a sliding window of that side and stride window // 2 (App. C.2), and mIoU is counted at the
    labels' resolution, whatever each image's size. The confusion matrix counts images (pixels) by label (row) and
    prediction (column). The images are normalised with `stats` (mean, std: data.pixel_stats)."""
    for m in models.values():
        m.eval()
    n = next(iter(models.values())).num_classes
    hits = {k: torch.zeros((), device=device, dtype=torch.long) for k in models}
    confusion = {k: torch.zeros(n, n, device=device, dtype=torch.long) for k in models}
    total = torch.zeros((), device=device, dtype=torch.long)
    for x, y in same_size_batches(loader):  # each process evaluates its share of the split
        x, y = normalize(x.to(device, non_blocking=True), stats), y.to(device, non_blocking=True)
        valid = y != IGNORE if window else torch.ones_like(y, dtype=torch.bool)  # an image's label 255 is a class
        total += valid.sum()
        with autocast:
            for k, m in models.items():
                if window:
                    logits = slide_inference(m, x, window, window // 2)
                    pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
                else:
                    pred = m(x).argmax(-1)
                pairs = y * n + pred  # label, prediction; a classifier's are all valid: no boolean indexing, no sync
                confusion[k] += torch.bincount(pairs[valid] if window else pairs, minlength=n * n).view(n, n)
                hits[k] += ((pred == y) & valid).sum()
    if dist.is_initialized():
        for t in [total, *hits.values(), *confusion.values()]:
            dist.all_reduce(t)
    total = max(int(total), 1)
    return {k: {"acc": 100.0 * hits[k].item() / total, **({"miou": miou(confusion[k])} if window else {}),
                "confusion": confusion[k].cpu()} for k in models}


def miou(confusion):
    """Mean intersection over union (%) from a confusion matrix (rows: label, columns: prediction), over the
    classes that occur in the labels or the predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return 100.0 * (tp[union > 0] / union[union > 0]).mean().item()


def flat(metrics, prefix=""):
    """{"teacher": {"acc": a, "miou": m, "confusion": C}} -> {prefix + "teacher_acc": a, prefix + "teacher_miou": m}:
    the numbers of a log line or results.json."""
    return {f"{prefix}{name}_{k}": v for name, ms in metrics.items() for k, v in ms.items() if k != "confusion"}
