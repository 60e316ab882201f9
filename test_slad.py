"""
Tests for the SLAD repo, grouped by concept. All offline, CPU, toy sizes: `pytest test_slad.py`.
"""

import os
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import lora
import model
from lora import LoRALinear, add_lora, layer_mapping, merge_lora, share_lora, trainable_parameters
from model import CONFIGS, CheckpointError, ViT, ViTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(4, os.cpu_count() or 1))


def randomize_(module, std=0.05, seed=0):
    """Fill every parameter with noise, so that a zero-init or identity never hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


# -----------------------------------------------------------------------------
# model.py: the ViT is DINOv2

# The golden fixture fixtures/dinov2_golden.pt was made with the official code
# (github.com/facebookresearch/dinov2 at commit b8931f7, run on the CPU with XFORMERS_DISABLED=1, torch 2.15):
# three tiny DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=16, depth=2, num_heads=2,
# init_values=1.0, block_chunks=0, MemEffAttention blocks) covering the hub models' three code paths --
# "mlp" (vit{s,b,l}14), "mlp_reg4" (the *_reg models: 4 registers, interpolate_antialias=True,
# interpolate_offset=0.0) and "swiglu" (vitg14: ffn_layer="swiglufused") -- with every tensor of their
# state dicts filled with seeded Gaussian noise (torch.manual_seed(2026)). Three random uint8 images,
# 224x224, 98x154 (non-square) and 532x532 (larger than the 518 the pos-embed was made for), are fed as
# img.float() / 255; stored are the official forward_features outputs (x_norm_clstoken, x_norm_regtokens,
# x_norm_patchtokens concatenated) and get_intermediate_layers(x, n=[0], return_class_token=True) of block 0.
GOLDEN = torch.load(os.path.join(HERE, "fixtures", "dinov2_golden.pt"), weights_only=True)


@pytest.mark.parametrize("variant", ["mlp", "mlp_reg4", "swiglu"])
def test_golden_parity_with_official_dinov2(variant):
    fix = GOLDEN["models"][variant]
    vit = ViT(ViTConfig(**fix["config"])).eval()
    vit.load_state_dict(fix["state_dict"], strict=True)  # the official keys load with no remapping
    sizes = [tuple(img.shape[-2:]) for img in GOLDEN["images"]]
    assert any(h != w for h, w in sizes) and any(h > 518 for h, w in sizes)
    R = vit.config.num_register_tokens
    with torch.no_grad():
        for img, want, want0 in zip(GOLDEN["images"], fix["features"], fix["block0_cls_patches"]):
            x = img.float() / 255
            got = vit.forward_features(x)
            assert got.shape == want.shape == (1, 1 + R + (x.shape[2] // 14) * (x.shape[3] // 14), 16)
            assert (got - want).abs().max() <= 1e-4
            got0 = vit.forward_blocks(x, [0])[0]
            got0 = torch.cat([got0[:, :1], got0[:, 1 + R:]], 1)  # drop the registers, as the official call does
            assert (got0 - want0).abs().max() <= 1e-4


# Parameter counts of the official hub models (dinov2.hub.backbones.dinov2_*(pretrained=False)).
OFFICIAL_NUMEL = {"vits14": 22056576, "vitb14": 86580480, "vitl14": 304368640, "vitg14": 1136480768,
                  "vits14_reg": 22058112, "vitb14_reg": 86583552, "vitl14_reg": 304372736, "vitg14_reg": 1136486912}


@pytest.mark.parametrize("name", list(OFFICIAL_NUMEL))
def test_configs_have_official_shapes(name):
    with torch.device("meta"):  # no memory, no time: shapes only
        vit = ViT.from_name(name)
    sd = vit.state_dict()
    assert sum(v.numel() for v in sd.values()) == OFFICIAL_NUMEL[name]
    c = vit.config
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, c.embed_dim) and sd["mask_token"].shape == (1, c.embed_dim)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * c.embed_dim, c.embed_dim)
    assert f"blocks.{c.depth - 1}.ls2.gamma" in sd and "patch_embed.proj.weight" in sd
    assert ("register_tokens" in sd) == name.endswith("_reg")
    assert ("blocks.0.mlp.w12.weight" in sd) == name.startswith("vitg")


def test_toy_configs_teacher_wider_and_deeper():
    s, b = CONFIGS["toy-s"], CONFIGS["toy-b"]
    assert s.patch_size == b.patch_size == 14
    assert b.embed_dim > s.embed_dim and b.depth > s.depth
    assert b.embed_dim // b.num_heads == s.embed_dim // s.num_heads  # same head width: heads line up


def test_forward_shapes_and_block_outputs():
    vit = ViT.from_name("toy-s", num_register_tokens=4).eval()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        feats = vit.forward_features(x)
        blocks = vit.forward_blocks(x, range(vit.config.depth))
    assert feats.shape == (2, 1 + 4 + 2 * 3, 64)
    assert len(blocks) == vit.config.depth and torch.equal(blocks[-1], feats)  # the last block, normed
    assert not torch.allclose(blocks[0], blocks[1])


def test_bad_image_size_is_a_clear_error():
    vit = ViT.from_name("toy-s")
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        vit(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="unknown model 'vitx14'"):
        ViT.from_name("vitx14")


def test_checkpoint_urls_are_the_hub_ones():
    assert model.checkpoint_url("vitb14") == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
    assert model.checkpoint_url("vitg14_reg") == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"


@pytest.fixture(scope="module")
def vits14_file(tmp_path_factory):
    vit = randomize_(ViT.from_name("vits14"), seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_vits14_pretrain.pth"
    torch.save(vit.state_dict(), path)
    return path, vit


def test_from_pretrained_local_file(vits14_file):
    path, vit = vits14_file
    loaded = ViT.from_pretrained("vits14", path=str(path))
    for (k, a), b in zip(vit.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_from_pretrained_truncated_file_is_a_clear_error(vits14_file, tmp_path):
    path, _ = vits14_file
    bad = tmp_path / "dinov2_vits14_pretrain.pth"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        ViT.from_pretrained("vits14", path=str(bad))
    msg = str(e.value)
    assert str(bad) in msg and model.checkpoint_url("vits14") in msg and "384 wide" in msg
    assert "\n" not in msg
    assert bad.stat().st_size == path.stat().st_size // 2  # nothing deleted or rewritten


def test_from_pretrained_wrong_architecture_is_a_clear_error(vits14_file):
    path, _ = vits14_file
    with pytest.raises(CheckpointError, match="not a valid checkpoint of vitb14 \\(768 wide"):
        ViT.from_pretrained("vitb14", path=str(path))


def test_from_pretrained_downloads_into_hub_cache_and_fails_clearly_offline(vits14_file, tmp_path, monkeypatch):
    path, vit = vits14_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth"

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as e:
        ViT.from_pretrained("vits14")
    assert model.checkpoint_url("vits14") in str(e.value) and str(cached) in str(e.value)
    assert not cached.exists()

    calls = []
    def fake_download(url, dst, progress=True):
        calls.append(url)
        with open(dst, "wb") as f:
            f.write(path.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    loaded = ViT.from_pretrained("vits14")
    assert calls == [model.checkpoint_url("vits14")] and cached.exists()
    assert torch.equal(loaded.pos_embed, vit.pos_embed)
    ViT.from_pretrained("vits14")  # second time from the cache: no download
    assert len(calls) == 1


def test_toy_has_no_pretrained_weights():
    with pytest.raises(CheckpointError, match="toy config"):
        ViT.from_pretrained("toy-s")


# -----------------------------------------------------------------------------
# lora.py: LoRA, merge and SLAD's sharing (Fig. 4)


def toy_pair(mapping="even", rank=4, seed=0):
    torch.manual_seed(seed)
    teacher, student = ViT.from_name("toy-b").eval(), ViT.from_name("toy-s").eval()
    add_lora(teacher, rank=rank)
    g = share_lora(student, teacher, mapping)
    return teacher, student, g


def test_lora_zero_init_leaves_outputs_unchanged():
    vit = ViT.from_name("toy-b").eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = vit(x)
        add_lora(vit, rank=8, targets=("attn.qkv", "mlp.fc1"))
        after = vit(x)
    assert torch.equal(before, after)
    adapters = [m for m in vit.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2 * vit.config.depth
    assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in adapters)  # A Kaiming, B zeros


def test_lora_freezes_base_and_trains_only_adapters():
    vit = add_lora(ViT.from_name("toy-b"), rank=16)
    names = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    assert all(".attn.qkv." in n for n in names)  # qkv by default, as the paper
    qkv = vit.blocks[0].attn.qkv
    assert qkv.lora_A.shape == (16, 128) and qkv.lora_B.shape == (3 * 128, 16)


def test_lora_forward_is_eq3():
    vit = add_lora(ViT.from_name("toy-s"), rank=4, alpha=8)
    layer = randomize_(vit.blocks[0].attn.qkv)
    x = torch.randn(5, 64)
    W = layer.base.weight + (8 / 4) * layer.lora_B @ layer.lora_A
    assert torch.allclose(layer(x), F.linear(x, W, layer.base.bias), atol=1e-5)


def test_lora_bad_target_is_a_clear_error():
    with pytest.raises(ValueError, match="no linear layer 'mlp.w12'"):
        add_lora(ViT.from_name("toy-s"), targets=("mlp.w12",))


def test_merge_equivalence_and_official_layout():
    vit = add_lora(ViT.from_name("toy-b"), rank=4, targets=("attn.qkv", "attn.proj", "mlp.fc2")).eval()
    randomize_(vit, seed=3)
    x = torch.randn(2, 3, 42, 28)
    merged = merge_lora(vit).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert list(merged.state_dict()) == list(ViT.from_name("toy-b").state_dict())
    with torch.no_grad():
        assert (merged(x) - vit(x)).abs().max() <= 1e-5
        plain = ViT.from_name("toy-b")
        plain.load_state_dict(merged.state_dict(), strict=True)  # what a user deploys loads in model.py alone
        assert (plain.eval()(x) - vit(x)).abs().max() <= 1e-5


def test_sharing_uses_the_same_parameter_objects():
    teacher, student, g = toy_pair()
    for i, j in enumerate(g):
        s, t = student.blocks[i].attn.qkv, teacher.blocks[j].attn.qkv
        assert s.lora_A is t.lora_A and s.lora_B is t.lora_B
    n_unique = sum(p.numel() for p in trainable_parameters(teacher, student))
    n_teacher = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    assert n_unique == n_teacher  # every student adapter is a teacher one: listed once
    params = trainable_parameters(teacher, student, teacher)
    assert len(params) == len({id(p) for p in params})
    assert not any(p.requires_grad for n, p in student.named_parameters() if "lora" not in n)


def test_shared_delta_is_the_teachers_sliced_per_q_k_v():
    teacher, student, g = toy_pair(rank=4)
    randomize_(teacher, seed=5)
    dt, ds = teacher.embed_dim, student.embed_dim
    for i, j in enumerate(g):
        dW_t = teacher.blocks[j].attn.qkv.delta_weight()
        dW_s = student.blocks[i].attn.qkv.delta_weight()
        assert dW_s.shape == (3 * ds, ds)
        for c in range(3):  # q, k, v: the first d_s rows of each, the first d_s input columns
            assert torch.allclose(dW_s[c * ds:(c + 1) * ds], dW_t[c * dt:c * dt + ds, :ds])
        # Fig. 4 in terms of A and B: A_s = A_t[:, :d_s]
        A_s, B_s = student.blocks[i].attn.qkv.sliced()
        assert torch.equal(A_s, teacher.blocks[j].attn.qkv.lora_A[:, :ds])


def test_student_loss_trains_the_teacher_through_shared_adapters():
    teacher, student, g = toy_pair(rank=4)
    randomize_(teacher, seed=7)
    x = torch.randn(2, 3, 28, 28)
    student(x).square().mean().backward()
    for j, block in enumerate(teacher.blocks):
        grad = block.attn.qkv.lora_A.grad
        if j in g:
            assert grad is not None and grad.abs().sum() > 0
        else:  # teacher blocks that no student block maps to keep adapters of their own
            assert grad is None
    with torch.no_grad():
        before = teacher(x)
    opt = torch.optim.SGD(trainable_parameters(teacher, student), lr=1.0)
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(teacher(x), before)


def test_mappings():
    assert layer_mapping(12, 24, "even") == [2 * i for i in range(12)]  # g(i) = 2i, §5.2.1
    assert layer_mapping(12, 24, "first") == list(range(12))
    assert layer_mapping(12, 24, "last") == list(range(12, 24))
    for m in lora.MAPPINGS:
        assert layer_mapping(12, 12, m) == list(range(12))
    g = layer_mapping(12, 40, "even")
    steps = [b - a for a, b in zip(g, g[1:])]
    assert g[0] == 0 and g[-1] < 40 and len(set(g)) == 12 and min(steps) >= 3 and max(steps) <= 4
    assert layer_mapping(12, 40, "last")[-1] == 39
    with pytest.raises(ValueError, match="more than its teacher"):
        layer_mapping(24, 12, "even")
    with pytest.raises(ValueError, match="unknown mapping"):
        layer_mapping(12, 24, "odd")


def test_sharing_refuses_deeper_or_wider_student():
    t = add_lora(ViT.from_name("toy-s"))
    with pytest.raises(ValueError, match="deeper|more than its teacher"):
        share_lora(ViT.from_name("toy-s", depth=4), t)
    with pytest.raises(ValueError, match="wider than its teacher"):
        share_lora(ViT.from_name("toy-b", depth=2), t)
    with pytest.raises(ValueError, match="add_lora"):
        share_lora(ViT.from_name("toy-s"), ViT.from_name("toy-b"))


def test_sharing_mapping_last_on_real_depths():
    with torch.device("meta"):
        teacher, student = add_lora(ViT.from_name("vitl14")), ViT.from_name("vitb14")
        g = share_lora(student, teacher, "last")
    assert g == list(range(12, 24))
    assert student.blocks[0].attn.qkv.lora_A is teacher.blocks[12].attn.qkv.lora_A
