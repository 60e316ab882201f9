"""
Weights files: the official DINOv2 and DINOv3 checkpoints, their ungated copies on the Hugging Face Hub in timm's
and transformers' layouts (safetensors files or model folders), and the toy family's (weights/, toys.py): found,
downloaded into torch.hub's cache, converted to the official layout, checked against the model they are for and
loaded into model.py's ViT by name. A file that cannot be had or read is one CheckpointError that says what is wrong
and what to do; a state dict comes from a file here (read_weights), so model.py reads no file. Where to get each
copy, and what differs between them: docs/weights.md.

    vit = from_pretrained("vitb14")         # official weights, downloaded into torch.hub's cache the first time
    vit = from_pretrained("dinov3_vitl16", path="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")  # gated: a file
    vit = from_pretrained("dinov3_vits16", path="dinov3-vits16-pretrain-lvd1689m")  # a Hub folder, timm's or HF's
"""

import json
import math
import os
import re
import urllib.error
import urllib.parse

import torch

from model import CONFIGS, ViT

# -----------------------------------------------------------------------------
# a model's official weights, and a run's encoder before adaptation


def from_pretrained(name, path=None, progress=True):
    """The ViT `name` of model.CONFIGS with its official weights, loaded strictly. `path`: a file or model folder
    (the official one, or timm's or transformers' copy), or a URL (DINOv3's signed one) that is downloaded into
    torch.hub's cache. Without it: torch.hub's cache, where torch.hub.load puts them, for DINOv2 downloading them
    there first; DINOv3's are gated, so the error says how to get them; a toy's come from weights/ (toys.py). Every
    file that cannot be had or read is a CheckpointError that says what to do."""
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
# where the official files are, and which images their weights were pretrained on

# _DINOV2_BASE_URL in facebookresearch/dinov2's dinov2/hub/utils.py; checkpoint_url follows its hub/backbones.py
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
# DINOv3's (dinov3/hub/utils.py, hub/backbones.py: the LVD-1689M weights, and the ViT-L's SAT-493M ones): gated,
# these URLs answer only with the signature that an access e-mail gives, so we take their file names and nothing is
# downloaded without one. The SAT-493M 7B (a6675841) is the 7B's architecture: loaded as dinov3_vit7b16 (satellite).
DINOV3_URL = "https://dl.fbaipublicfiles.com/dinov3"
DINOV3_HASHES = {"dinov3_vits16": "08c60483", "dinov3_vits16plus": "4057cbaa", "dinov3_vitb16": "73cec8be",
                 "dinov3_vitl16": "8aa4cbdd", "dinov3_vitl16plus": "46503df0", "dinov3_vith16plus": "7c1da9a5",
                 "dinov3_vit7b16": "a955f4ea", "dinov3_vitl16_sat493m": "eadcf0ff"}
DINOV3_ACCESS = ("DINOv3's weights are gated: request access at https://ai.meta.com/resources/models-and-libraries/"
                 "dinov3-downloads/ (linked from github.com/facebookresearch/dinov3's README), and the e-mail that "
                 "follows lists a signed URL for each file (fetch it with wget); they come under the DINOv3 License, "
                 "not the Apache-2.0 of DINOv2's. timm's copies on the Hugging Face Hub are not gated: a "
                 "model.safetensors or its folder loads too (docs/weights.md)")
TOY_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # toys.py writes them


def checkpoint_url(name):
    """The URL the official torch.hub entry point loads for `name`, e.g. .../dinov2_vitb14_reg4_pretrain.pth or
    .../dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth (DINOv3's: its file name; the URL needs a signature)."""
    if name in DINOV3_HASHES:
        arch, _, data = name.removeprefix("dinov3_").partition("_")  # "vitl16", "sat493m" or ""
        return (f"{DINOV3_URL}/dinov3_{arch}/dinov3_{arch}_pretrain_{data or 'lvd1689m'}-"
                f"{DINOV3_HASHES[name]}.pth")
    arch = name.removesuffix("_reg")
    reg = "_reg4" if name.endswith("_reg") else ""
    return f"{DINOV2_URL}/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"


def pretrained_on(path):
    """Which images the weights at `path` were pretrained on, "sat493m" or "lvd1689m", where their name says it, as
    the official files, timm's names and the Hub's repositories do: the file's or folder's own name, the folder of a
    file named as the Hub names them all (model.safetensors), a Hub cache's models--ORG--NAME; else None."""
    if not path:
        return None
    if urllib.parse.urlparse(path).scheme in ("http", "https"):
        path = urllib.parse.urlparse(path).path
    parts = os.path.abspath(path).lower().split(os.sep)
    names = parts[-1:]
    if re.fullmatch(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)", parts[-1]):
        names += parts[-2:-1]  # a model folder's file: the folder says
    names += [part for part in reversed(parts) if part.startswith("models--")]  # huggingface_hub's cache
    for name in names:
        for data in ("sat493m", "lvd1689m"):
            if data in name:
                return data
    return None


def satellite(name, path=None):
    """Whether model `name` with the weights at `path` is DINOv3's satellite one (SAT-493M): by its name
    (dinov3_vitl16_sat493m), or for the 7B, whose two weights share one architecture, by its file's name."""
    return name.endswith("_sat493m") or pretrained_on(path) == "sat493m"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be had or read; the message says what was expected and where."""


def weights_file(name, path=None, progress=True):
    """(the weights file or model folder of `name`, what to do if it turns out unreadable): `path`, a URL's
    download, or the file in torch.hub's cache (a DINOv2 one downloaded there first); a CheckpointError if there is
    none, or if its name says other pretraining images than `name` was (SAT-493M's or LVD-1689M's)."""
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
    data = pretrained_on(path)
    if (name.endswith("_sat493m") and data == "lvd1689m") or (f"{name}_sat493m" in CONFIGS and data == "sat493m"):
        other = name.removesuffix("_sat493m") if data == "lvd1689m" else f"{name}_sat493m"
        images = {"sat493m": "SAT-493M's satellite images", "lvd1689m": "LVD-1689M's web images"}[data]
        raise CheckpointError(f"{path} is named as weights pretrained on {images}, not those of {describe(name)}: "
                              f"load it as {other} (--teacher or --student {other}, from_pretrained({other!r}, ...))")
    if path and urllib.parse.urlparse(path).scheme in ("http", "https"):  # a URL (DINOv3's signed one): downloaded
        url, path = path, None
    if path:
        if not os.path.exists(path):
            raise CheckpointError(f"no file or folder {path}: expected the {family.upper()} weights of "
                                  f"{describe(name)}, {file} or a copy of it (docs/weights.md)")
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
# a file read, in any of the three layouts, and what is wrong with one that does not load


def read_weights(path, expected, name, remedy):
    """The state dict in `path`, in the official layout, checked against `expected` (the model's, for its keys and
    shapes) before loading: a torch.save'd file (weights_only stays on), a safetensors file, or a model folder
    holding them. Its layout -- the official, timm's or transformers' -- is told from its keys and converted
    (to_official); every tensor of the file must be used and every key of the model found, else a CheckpointError
    in one line that names the file, the first key that differs, what the file looks like, and `remedy`."""
    tensors = read_tensors(path, name, remedy)
    layout = layout_of(tensors)
    state = to_official(tensors, layout)
    complete = restore(dict(state), expected, layout)
    difference = first_difference(expected, complete)
    if difference:
        raise CheckpointError(f"{path} is not a valid checkpoint of {describe(name)}: {difference}; "
                              f"{looks_like(state, layout, tensors)}; {remedy}")
    return complete


def read_tensors(path, name, remedy):
    """{key: tensor} of a weights file, or of the file(s) of a model folder (folder_files); a CheckpointError in one
    line if there is none or one cannot be read as tensors."""
    files = folder_files(path) if os.path.isdir(path) else [path]
    if not files:
        held = ", ".join(sorted(os.listdir(path))[:6]) or "nothing"
        raise CheckpointError(f"{path} is a folder with no weights file (model.safetensors, its shards' "
                              f"model.safetensors.index.json, pytorch_model.bin, or one .safetensors, .pth, .pt or "
                              f".bin file): it holds {held}; {remedy}")
    tensors = {}
    for file in files:
        if os.path.getsize(file) == 0:  # what an interrupted download or copy leaves
            raise CheckpointError(f"{file} is empty (0 bytes; an interrupted download?): {remedy}")
        try:
            if is_safetensors(file):
                from safetensors.torch import load_file  # the Hub's format, a small package (requirements.txt)
                state_dict = load_file(file)
            else:
                state_dict = torch.load(file, map_location="cpu", weights_only=True)
        except ImportError:
            raise CheckpointError(f"{file} is a safetensors file: `pip install safetensors` to read it") from None
        except Exception as e:  # a truncated zip, another format, pickled Python objects
            raise CheckpointError(f"{file} is not a valid checkpoint of {describe(name)}: it cannot be read as "
                                  f"tensors ({type(e).__name__}: {load_error(e)}), truncated or not a weights file; "
                                  f"{remedy}") from None
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{file} is not a valid checkpoint of {describe(name)}: it holds a "
                                  f"{type(state_dict).__name__}, not a state dict; {remedy}")
        tensors.update(state_dict)
    return tensors


def folder_files(folder):
    """The weights file(s) of a model folder as timm and transformers write them (save_pretrained, the Hub):
    model.safetensors, its shards (named by model.safetensors.index.json) or pytorch_model.bin; or the one weights
    file a folder holds. A Hub cache's repository folder (models--ORG--NAME) is read at the snapshot refs/main names.
    [] if none."""
    ref = os.path.join(folder, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            folder = os.path.join(folder, "snapshots", f.read().strip())
        if not os.path.isdir(folder):
            return []
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = json.load(f).get("weight_map", {}).values()
        return [os.path.join(folder, file) for file in sorted(set(shards))]
    for file in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, file)):
            return [os.path.join(folder, file)]
    found = [f for f in sorted(os.listdir(folder)) if f.endswith((".safetensors", ".pth", ".pt", ".bin"))]
    return [os.path.join(folder, found[0])] if len(found) == 1 else []


def is_safetensors(path):
    """A safetensors file starts with its header's length (8 bytes) and the header, a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{"


def load_error(e):
    """torch.load's reason, in one line, without its advice to trust the file: weights_only=False or
    add_safe_globals would run or allow what a weights file should never hold."""
    lines = [line.strip().removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
             for line in str(e).splitlines()]
    advice = ("weights_only", "Weights only", "trust", "safe_globals", "documentation")
    return next((line for line in lines if line and not any(a in line for a in advice)), "")[:200]


# -----------------------------------------------------------------------------
# the three layouts: the official keys (model.py's), timm's and transformers' (q, k, v apart), told from the keys


def layout_of(tensors):
    """The layout of a state dict, from its keys: "transformers" (embeddings.cls_token), "official" or "timm" (which
    drops the mask token that both official families keep); None if none."""
    if "embeddings.cls_token" in tensors:
        return "transformers"
    if "cls_token" in tensors:
        return "official" if "mask_token" in tensors else "timm"
    return None


def to_official(tensors, layout):
    """`tensors` under the official keys: timm's and transformers' renamed, q, k and v fused into qkv (fuse_qkv); a
    key that no rule maps keeps its name, so a check names it as the file does. What these layouts leave out is not
    here: restore puts it back."""
    if layout == "timm":
        return from_timm(tensors)
    if layout == "transformers":
        return from_transformers(tensors)
    return dict(tensors)


def from_timm(tensors):
    """timm's DINOv2 (its vision_transformer.py) and DINOv3 (eva.py), as their checkpoint_filter_fn convert the
    official files: the registers / storage tokens are reg_token, eva's LayerScale gamma_1 and gamma_2, DINOv3's
    SwiGLU fc1_g, fc1_x and fc2, DINOv2's fused one fc1 and fc2, DINOv3's qkv bias q_bias and v_bias (none at all
    in the models without _qkvb), and the *_reg4 DINOv2 models keep no position for the CLS token (added to it)."""
    state = {}
    for k, v in tensors.items():
        if k == "reg_token":
            k = "register_tokens" if "pos_embed" in tensors else "storage_tokens"
        elif k == "pos_embed" and math.isqrt(v.shape[1]) ** 2 == v.shape[1]:  # patches only (1 + n^2 is no square)
            v = torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)  # the CLS position, a zero: timm's cls_token has it
        k = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k)
        k = k.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
        state[k] = v
    for block in {k.rsplit(".attn.", 1)[0] for k in state if ".attn." in k}:
        fc1, fc2 = state.get(f"{block}.mlp.fc1.weight"), state.get(f"{block}.mlp.fc2.weight")
        fused = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]  # DINOv2's SwiGLU: w1 | w2
        swiglu = fused or f"{block}.mlp.w1.weight" in state  # DINOv3's: fc1_g, fc1_x (w1, w2 now) and fc2
        for kind in ("weight", "bias"):
            if fused:
                rename(state, f"{block}.mlp.fc1.{kind}", f"{block}.mlp.w12.{kind}")
            if swiglu:
                rename(state, f"{block}.mlp.fc2.{kind}", f"{block}.mlp.w3.{kind}")
        q, v = state.pop(f"{block}.attn.q_bias", None), state.pop(f"{block}.attn.v_bias", None)
        if q is not None and v is not None:  # the k rows have none: masked in the official model
            state[f"{block}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return state


# transformers' names, as its save_pretrained writes them (4.x and 5.x alike; its Dinov2Model, Dinov2WithRegistersModel
# and DINOv3ViTModel) -> the official ones; q, k and v to .attn.q., .attn.k., .attn.v., then fused (fuse_qkv)
TRANSFORMERS_KEYS = [
    (r"^embeddings\.(cls_token|mask_token|register_tokens)$", r"\1"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.(projection\.)?", "patch_embed.proj."),
    (r"^(encoder\.)?layer\.(\d+)\.", r"blocks.\2."),
    (r"\.attention\.attention\.query\.", ".attn.q."), (r"\.attention\.attention\.key\.", ".attn.k."),  # DINOv2
    (r"\.attention\.attention\.value\.", ".attn.v."),
    (r"\.attention\.([qkv])_proj\.", r".attn.\1."),  # DINOv3
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.weights_in\.", ".mlp.w12."), (r"\.mlp\.weights_out\.", ".mlp.w3."),  # DINOv2's SwiGLU, fused
    (r"^layernorm\.", "norm."),
]


def from_transformers(tensors):
    """transformers' DINOv2 and DINOv3 (TRANSFORMERS_KEYS); DINOv3's MLP is up_proj, down_proj, its SwiGLU
    gate_proj, up_proj, down_proj; its mask token is (1, 1, D), the official one (1, D); its k has no bias (the
    official one is masked) and its 7B no qkv bias at all."""
    state = {}
    for k, v in tensors.items():
        for pattern, official in TRANSFORMERS_KEYS:
            k = re.sub(pattern, official, k)
        if k == "register_tokens" and "embeddings.position_embeddings" not in tensors:  # DINOv3: no position
            k = "storage_tokens"
        state[k] = v.reshape(1, -1) if k == "mask_token" else v
    for block in {k.rsplit(".mlp.", 1)[0] for k in state if ".mlp." in k}:
        swiglu = f"{block}.mlp.gate_proj.weight" in state
        for kind in ("weight", "bias"):
            rename(state, f"{block}.mlp.gate_proj.{kind}", f"{block}.mlp.w1.{kind}")
            rename(state, f"{block}.mlp.up_proj.{kind}", f"{block}.mlp.{'w2' if swiglu else 'fc1'}.{kind}")
            rename(state, f"{block}.mlp.down_proj.{kind}", f"{block}.mlp.{'w3' if swiglu else 'fc2'}.{kind}")
    return fuse_qkv(state)


def fuse_qkv(state):
    """Each block's q, k and v as the official qkv: rows q, k, v; a missing bias (transformers' DINOv3 k) as zeros,
    and no bias if none has one (the 7B)."""
    for q in [k for k in state if k.endswith(".attn.q.weight")]:
        block = q.removesuffix("q.weight")
        if not all(f"{block}{c}.weight" in state for c in "kv"):
            continue  # left apart: a check names the qkv weight missing
        weights = [state.pop(f"{block}{c}.weight") for c in "qkv"]
        state[f"{block}qkv.weight"] = torch.cat(weights)
        biases = [state.pop(f"{block}{c}.bias", None) for c in "qkv"]
        if any(b is not None for b in biases):
            state[f"{block}qkv.bias"] = torch.cat([b if b is not None else w.new_zeros(w.shape[0])
                                                   for b, w in zip(biases, weights)])
    return state


def rename(state, old, new):
    if old in state:
        state[new] = state.pop(old)


def restore(state, expected, layout):
    """What timm's and transformers' files leave out, put back as the official files hold it (no output here
    depends on it): the mask token (iBOT's) and local_cls_norm (the local crops of the 7B's and the SAT ViT-L's
    pretraining), unused, as the model initialises them; DINOv3's bias_mask, a constant; the qkv bias of timm's
    DINOv3 models without _qkvb, zeros (as timm computes them); and RoPE's periods, which both recompute in float32,
    as the released files store them, rounded to bfloat16 (timm's eva.py says so; docs/weights.md: the difference)."""
    if layout not in ("timm", "transformers"):
        return state
    for k, v in expected.items():
        if k in state:
            continue
        if k == "mask_token" or k.startswith("local_cls_norm.") or k.endswith(".attn.qkv.bias_mask"):
            state[k] = v.clone()
        elif k.endswith(".attn.qkv.bias") and layout == "timm" and k.removesuffix("bias") + "weight" in state:
            state[k] = torch.zeros_like(v)
        elif k == "rope_embed.periods":
            state[k] = v.to(torch.bfloat16).to(v.dtype)
    return state


# -----------------------------------------------------------------------------
# what a file that does not load looks like


def looks_like(state, layout, tensors):
    """What a file looks like, in words: the config it fits (config_of) and the layout it came in."""
    if layout is None:
        return (f"its keys are in none of the official, timm or transformers layouts (the first of {len(tensors)}: "
                f"{next(iter(tensors), 'none')})")
    like = config_of(state)
    copy = {"official": "", "timm": "timm's copy of ", "transformers": "transformers' copy of "}[layout]
    if like:
        return f"it looks like {copy}{describe(like)}"
    return "it fits none of the DINOv2 or DINOv3 configs" + (f" (in {layout}'s layout)" if copy else "")


def config_of(state_dict):
    """The CONFIGS name a state dict fits, from its family, width, depth, registers, FFN and local_cls_norm; None if
    none does."""
    try:
        blocks = [int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")]
        registers = state_dict.get("register_tokens", state_dict.get("storage_tokens"))
        found = ("dinov2" if "pos_embed" in state_dict else "dinov3", state_dict["cls_token"].shape[-1],
                 1 + max(blocks), registers.shape[1] if registers is not None else 0,
                 "swiglu" if any(re.search(r"\.mlp\.w(12|3)\.", k) for k in state_dict) else "mlp",
                 "local_cls_norm.weight" in state_dict)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        return None
    return next((n for n, c in CONFIGS.items()
                 if (c.family, c.embed_dim, c.depth, c.num_register_tokens, c.ffn, c.local_cls_norm) == found), None)


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
