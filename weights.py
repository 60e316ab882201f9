"""
Weights files: the official DINOv2 and DINOv3 checkpoints, and the toy family's (weights/, toys.py), found,
downloaded into torch.hub's cache, checked against the model they are for and loaded into model.py's ViT by name.
A file that cannot be had or read is one CheckpointError that says what is wrong and what to do; a state dict comes
from a file here (read_weights), so model.py reads no file.

    vit = from_pretrained("vitb14")         # official weights, downloaded into torch.hub's cache the first time
    vit = from_pretrained("dinov3_vitl16", path="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")  # gated: a file
"""

import os
import urllib.error
import urllib.parse

import torch

from model import CONFIGS, ViT

# -----------------------------------------------------------------------------
# a model's official weights, and a run's encoder before adaptation


def from_pretrained(name, path=None, progress=True):
    """The ViT `name` of model.CONFIGS with its official weights, loaded strictly. `path`: a file, or a URL (DINOv3's
    signed one) that is downloaded into torch.hub's cache. Without it: torch.hub's cache, where torch.hub.load puts
    them, for DINOv2 downloading them there first; DINOv3's are gated, so the error says how to get them; a toy's
    come from weights/ (toys.py). Every file that cannot be had or read is a CheckpointError that says what to do."""
    path, remedy = weights_file(name, path, progress)  # before building a model that may have no weights
    model = ViT.from_name(name)
    model.load_state_dict(read_weights(path, model.state_dict(), name, remedy), strict=True)
    return model


def initial_backbone(name, role, init, seed, weights=None):
    """A run's encoder before adaptation: the official weights (from the file or URL `weights` if given), or a
    random init that depends on (seed, role) alone -- 'teacher' or 'student' -- so that cka.py, or anyone, can
    rebuild it."""
    if init == "dinov2":  # --init pretrained, as config.json stores it: the official weights, DINOv2's or DINOv3's
        return from_pretrained(name, path=weights)
    torch.manual_seed(2 * seed + (role == "student"))
    return ViT.from_name(name)


def backbone(args, role):
    """A training run's `role` encoder ('teacher' or 'student') before adaptation, from its flags (initial_backbone)."""
    return initial_backbone(getattr(args, role), role, args.init, args.seed, getattr(args, f"{role}_weights"))


# -----------------------------------------------------------------------------
# where the official files are

# _DINOV2_BASE_URL in facebookresearch/dinov2's dinov2/hub/utils.py; checkpoint_url follows its hub/backbones.py
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
# DINOv3's (dinov3/hub/utils.py, hub/backbones.py: the LVD-1689M weights): gated, these URLs answer only with the
# signature that an access e-mail gives, so we take their file names and nothing is downloaded without one
DINOV3_URL = "https://dl.fbaipublicfiles.com/dinov3"
DINOV3_HASHES = {"dinov3_vits16": "08c60483", "dinov3_vits16plus": "4057cbaa", "dinov3_vitb16": "73cec8be",
                 "dinov3_vitl16": "8aa4cbdd", "dinov3_vitl16plus": "46503df0", "dinov3_vith16plus": "7c1da9a5",
                 "dinov3_vit7b16": "a955f4ea"}
DINOV3_ACCESS = ("DINOv3's weights are gated: request access at https://ai.meta.com/resources/models-and-libraries/"
                 "dinov3-downloads/ (linked from github.com/facebookresearch/dinov3's README), and the e-mail that "
                 "follows lists a signed URL for each file (fetch it with wget); they come under the DINOv3 License, "
                 "not the Apache-2.0 of DINOv2's")
TOY_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # toys.py writes them


def checkpoint_url(name):
    """The URL the official torch.hub entry point loads for `name`, e.g. .../dinov2_vitb14_reg4_pretrain.pth or
    .../dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth (DINOv3's: its file name; the URL needs a signature)."""
    if name in DINOV3_HASHES:
        arch = name.removeprefix("dinov3_")
        return f"{DINOV3_URL}/dinov3_{arch}/dinov3_{arch}_pretrain_lvd1689m-{DINOV3_HASHES[name]}.pth"
    arch = name.removesuffix("_reg")
    reg = "_reg4" if name.endswith("_reg") else ""
    return f"{DINOV2_URL}/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be had or read; the message says what was expected and where."""


def weights_file(name, path=None, progress=True):
    """(the weights file of `name`, what to do if it turns out unreadable): `path`, a URL's download, or the file
    in torch.hub's cache (a DINOv2 one downloaded there first); a CheckpointError if there is none."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; one of: {', '.join(CONFIGS)}")
    if name.startswith("toy"):  # the toy family is shipped in the repo, made by toys.py
        path = path or os.path.join(TOY_WEIGHTS, f"{name}.pt")
        rebuild = "rebuild the toy family with `python toys.py` (~20 min on a 2-core CPU), or use --init random"
        if not os.path.exists(path):
            raise CheckpointError(f"no file {path}: the pretrained {describe(name)}; {rebuild}")
        return path, rebuild
    family, url = CONFIGS[name].family, checkpoint_url(name)
    file = os.path.basename(url)
    if path and urllib.parse.urlparse(path).scheme in ("http", "https"):  # a URL (DINOv3's signed one): downloaded
        url, path = path, None
    if path:
        if not os.path.isfile(path):
            raise CheckpointError(f"no file {path}: expected the {family.upper()} weights of {describe(name)}, {file}")
        return path, f"use the file from {url}" if family == "dinov2" else f"use the official {file} ({DINOV3_ACCESS})"
    path = os.path.join(torch.hub.get_dir(), "checkpoints", file)  # where torch.hub.load(..., weights=URL) puts it
    downloadable = family == "dinov2" or url != checkpoint_url(name)  # DINOv3's with a signed URL only
    if not os.path.exists(path):
        if not downloadable:
            raise CheckpointError(f"no weights for {describe(name)}: {DINOV3_ACCESS}. Put {file} in "
                                  f"{os.path.dirname(path)} (where torch.hub.load(..., weights=URL) puts it), or give "
                                  f"its path or signed URL (--teacher_weights / --student_weights, or "
                                  f"weights.from_pretrained(name, path=...))")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:  # writes to a temporary file, then renames: an interrupted download leaves nothing behind
            torch.hub.download_url_to_file(url, path, progress=progress)
        except (urllib.error.URLError, OSError) as e:
            expired = (" (a DINOv3 signed URL expires: a new access request gives new ones)" if family == "dinov3"
                       else "")
            raise CheckpointError(  # a signed URL's signature stays out of the message
                f"could not download the {family.upper()} weights of {describe(name)} from {url.split('?')[0]} ({e}). "
                f"Without network, fetch that file elsewhere and put it at {path}{expired}") from None
    if downloadable:
        return path, "delete it and run again to download it again"
    return path, f"delete it and fetch {file} again ({DINOV3_ACCESS})"


# -----------------------------------------------------------------------------
# a file read, and what is wrong with one that does not load


def read_weights(path, expected, name, remedy):
    """The state dict in `path`, checked against `expected` (the model's, for its keys and shapes) before loading:
    a CheckpointError in one line that names the file, what is wrong and `remedy`; weights_only stays on."""
    if os.path.getsize(path) == 0:  # what an interrupted download or copy leaves
        raise CheckpointError(f"{path} is empty (0 bytes; an interrupted download?): {remedy}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, another format, pickled Python objects
        raise CheckpointError(f"{path} is not a valid checkpoint of {describe(name)}: it cannot be read as "
                              f"tensors ({type(e).__name__}: {load_error(e)}), truncated or not a weights file; "
                              f"{remedy}") from None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} is not a valid checkpoint of {describe(name)}: it holds a "
                              f"{type(state_dict).__name__}, not a state dict; {remedy}")
    difference = first_difference(expected, state_dict)
    if difference:
        like = config_of(state_dict)
        like = f"it looks like {describe(like)}" if like else "it fits none of the DINOv2 or DINOv3 configs"
        raise CheckpointError(f"{path} is not a valid checkpoint of {describe(name)}: {difference}; {like}; {remedy}")
    return state_dict


def load_error(e):
    """torch.load's reason, in one line, without its advice to trust the file: weights_only=False or
    add_safe_globals would run or allow what a weights file should never hold."""
    lines = [line.strip().removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
             for line in str(e).splitlines()]
    advice = ("weights_only", "Weights only", "trust", "safe_globals", "documentation")
    return next((line for line in lines if line and not any(a in line for a in advice)), "")[:200]


def config_of(state_dict):
    """The CONFIGS name a state dict fits, from its family, width, depth, registers and FFN; None if none does."""
    try:
        blocks = [int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")]
        registers = state_dict.get("register_tokens", state_dict.get("storage_tokens"))
        found = ("dinov3" if "rope_embed.periods" in state_dict else "dinov2", state_dict["cls_token"].shape[-1],
                 1 + max(blocks), registers.shape[1] if registers is not None else 0,
                 "swiglu" if any(".mlp.w3." in k for k in state_dict) else "mlp")
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        return None
    return next((n for n, c in CONFIGS.items()
                 if (c.family, c.embed_dim, c.depth, c.num_register_tokens, c.ffn) == found), None)


def first_difference(expected, found):
    """The first missing key, unexpected key or shape mismatch of state dict `found`, in words; None if none."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and getattr(found[k], "shape", None) != expected[k].shape]
    if missing:
        return f"{len(missing)} key(s) missing, the first {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} unexpected key(s), the first {unexpected[0]}"
    if shapes:
        k = shapes[0]
        return f"{k} is {tuple(getattr(found[k], 'shape', ()))}, not {tuple(expected[k].shape)}"
    return None


def describe(name):
    c = CONFIGS[name]
    kind = "registers" if c.family == "dinov2" else "storage tokens"
    extra = f", {c.num_register_tokens} {kind}" if c.num_register_tokens else ""
    return f"{name} ({c.embed_dim} wide, {c.depth} blocks, {c.num_heads} heads, {c.ffn} FFN{extra})"

