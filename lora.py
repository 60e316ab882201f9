"""
LoRA (Hu et al. 2022; paper eq. 3) and SLAD's sharing of the teacher's adapters with the student (Fig. 4).

    add_lora(teacher.vit)                  # adapters on every block's attn.qkv, the backbone frozen
    share_lora(student.vit, teacher.vit)   # student block i uses teacher block g(i)'s adapters, sliced
    merge_lora(student.vit)                # a plain ViT with the adapters folded in, official layout
    adapt(model, "lora" | "finetune" | "probe", rank)   # what of a Classifier or Segmenter trains

In the style of minLoRA: one small module and plain functions to add, share and merge.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MAPPINGS = ("even", "first", "last")


class LoRALinear(nn.Module):
    """y = W0 x + scale B A x (eq. 3, scale = alpha / r), W0 frozen, A (r, in) Kaiming-uniform, B (out, r) zeros.

    A and B may belong to a wider layer (the teacher's): this layer then uses the slice that fits it,
    A[:, :d_in] and the first rows of B (Fig. 4). They are the same Parameter objects as the teacher's,
    so both models train them. `chunks` is the number of outputs fused in one matrix (3 for q|k|v). With one
    adapter per output (add_lora's separate=True), A stacks the chunks' own A's, (chunks r, in): output chunk c
    reads only its rank-r part, as three LoRA adapters on separate q, k and v matrices would."""

    def __init__(self, base: nn.Linear, lora_A: nn.Parameter, lora_B: nn.Parameter, scale: float, chunks=1):
        super().__init__()
        self.base, self.lora_A, self.lora_B, self.scale, self.chunks = base, lora_A, lora_B, scale, chunks
        self.separate = lora_A.shape[0] != lora_B.shape[1]  # one A per output chunk

    def sliced(self):
        """(A, B) cut to this layer: the whole of them for the teacher, a top-left part for the student."""
        A = self.lora_A[:, : self.base.in_features]  # Fig. 4: the student's d_s input dims are the first d_s
        # fused q|k|v: take the first d_s rows of each of q, k and v, so that student head h meets teacher
        # head h's rows (heads are contiguous 64-dim slices; one flat slice would give the student q only)
        B = self.lora_B.unflatten(0, (self.chunks, -1))[:, : self.base.out_features // self.chunks].flatten(0, 1)
        return A, B

    def delta_weight(self):  # Delta W = scale B A, (out, in)
        A, B = self.sliced()
        if self.separate:  # chunk c: B_c A_c
            per_chunk = torch.bmm(B.unflatten(0, (self.chunks, -1)), A.unflatten(0, (self.chunks, -1)))
            return self.scale * per_chunk.flatten(0, 1)
        return self.scale * B @ A

    def forward(self, x):
        A, B = self.sliced()
        bias = self.base.bias
        if bias is not None and hasattr(self.base, "bias_mask"):  # DINOv3's qkv: no bias on the k rows
            bias = bias * self.base.bias_mask.to(bias.dtype)
        return FoldedLoRA.apply(x, self.base.weight, bias, A, B, self.scale)


class FoldedLoRA(torch.autograd.Function):
    """F.linear(x, W0 + scale B A, bias): eq. 3 folded into the weight, one matmul in place of three, with LoRA's
    backward: dx by the folded weight, dA and dB through the rank-r factors. (Autograd of the folded F.linear would
    form the (out, in) weight gradient, as costly as fine-tuning's.) A (k r, in), B (k o, r): k = 1 for one
    adapter, k = chunks for one per output chunk, where chunk c reads its own r rows of A."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        k = A.shape[0] // B.shape[1]
        # W0 + scale B_c A_c, chunk by chunk; under autocast a bf16 baddbmm that rounds the sum once
        folded = torch.baddbmm(weight.unflatten(0, (k, -1)), B.unflatten(0, (k, -1)), A.unflatten(0, (k, -1)),
                               alpha=scale).flatten(0, 1)
        y = F.linear(x, folded, bias)
        ctx.scale = scale
        ctx.save_for_backward(*(t.to(y.dtype) for t in (x, folded, A, B)))  # as autocast gave them to the matmul
        return y

    @staticmethod
    def backward(ctx, dy):
        x, folded, A, B = ctx.saved_tensors
        k = A.shape[0] // B.shape[1]
        x2, dy2 = x.flatten(0, -2), dy.flatten(0, -2)  # (tokens, in), (tokens, out)
        dx = dy @ folded if ctx.needs_input_grad[0] else None  # not in block 0: nothing below it trains
        h = (x2 @ A.T).unflatten(-1, (k, -1))  # (tokens, k, r): the rank-r input, recomputed
        dyk = dy2.unflatten(-1, (k, -1))  # (tokens, k, o)
        dB = ctx.scale * torch.einsum("nko,nkr->kor", dyk, h).flatten(0, 1)
        dA = ctx.scale * torch.einsum("nko,kor->nkr", dyk, B.unflatten(0, (k, -1))).flatten(1).T @ x2
        dW = dy2.T @ x2 if ctx.needs_input_grad[1] else None  # only if someone unfroze W0
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dW, db, dA, dB, None


def _chunks(target):
    return {"attn.qkv": 3, "mlp.w12": 2}.get(target, 1)  # fused matrices: q|k|v, and SwiGLU's two inputs


def _swap(block, target, make):
    """Replace the nn.Linear at `target` (e.g. 'attn.qkv') inside `block` by make(linear)."""
    parent_name, _, attr = target.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    base = getattr(parent, attr, None)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"no linear layer {target!r} in {type(block).__name__}: LoRA targets are e.g. attn.qkv, "
                         f"attn.proj, mlp.fc1, mlp.fc2 (SwiGLU: mlp.w12, mlp.w3; DINOv3's mlp.w1, mlp.w2, mlp.w3)")
    setattr(parent, attr, make(base))


def add_lora(vit, rank=16, alpha=None, targets=("attn.qkv",), separate=False, init_width=None):
    """Freeze the whole backbone and put fresh adapters on `targets` of every block. alpha defaults to
    the rank, i.e. W = W0 + B A exactly as eq. 3. separate=True: a fused matrix (q|k|v) gets one rank-r adapter
    per output (its own A) instead of one for all (a shared A), as LoRA on separate q, k, v layers would.
    init_width: draw A as for a layer that wide (Kaiming's bound 1/sqrt(width)) rather than its own input's."""
    for p in vit.parameters():
        p.requires_grad_(False)
    for block in vit.blocks:
        for target in targets:
            def make(base):
                w, chunks = base.weight, _chunks(target)
                A = nn.Parameter(torch.empty((chunks if separate else 1) * rank, base.in_features, device=w.device,
                                             dtype=w.dtype))
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear's init, as Hu et al.'s code
                if init_width:
                    A.data.mul_(math.sqrt(base.in_features / init_width))
                B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))  # Delta W = 0
                return LoRALinear(base, A, B, (alpha or rank) / rank, chunks)
            _swap(block, target, make)
    return vit


def adapt(model, how, rank, separate=False):
    """Choose what of a Classifier or Segmenter trains (--teacher_adapt, --student_adapt): the head always; the
    encoder's LoRA adapters ("lora"), all of it ("finetune"), or nothing ("probe")."""
    if how == "lora":
        add_lora(model.vit, rank=rank, separate=separate)  # freezes the encoder, adds trainable adapters
    else:
        model.vit.requires_grad_(how == "finetune")
        model.vit.mask_token.requires_grad_(False)  # unused here (iBOT's masking): nothing would train it


def layer_mapping(n_student, n_teacher, mapping="even"):
    """g: student block i -> teacher block g(i) (§5.2.1). even: uniformly spaced, g(i) = 2i for 24 -> 12;
    first: the first n_student teacher blocks; last: the last ones."""
    if n_student > n_teacher:
        raise ValueError(f"the student has {n_student} blocks, more than its teacher's {n_teacher}: "
                         f"SLAD needs a student no deeper than its teacher")
    if mapping == "even":
        return [i * n_teacher // n_student for i in range(n_student)]
    if mapping == "first":
        return list(range(n_student))
    if mapping == "last":
        return list(range(n_teacher - n_student, n_teacher))
    raise ValueError(f"unknown mapping {mapping!r}; one of {', '.join(MAPPINGS)}")


def share_lora(student, teacher, mapping="even", init_width=None):
    """Give student block i the adapters of teacher block g(i), sliced to the student's width (Fig. 4). The teacher
    must carry adapters already (add_lora); teacher blocks that no student block maps to keep theirs to themselves.
    The student's backbone is frozen. init_width: each shared A drawn as for a layer that wide. Returns g."""
    if student.embed_dim > teacher.embed_dim:
        raise ValueError(f"the student is {student.embed_dim} wide, wider than its teacher's {teacher.embed_dim}: "
                         f"SLAD slices the teacher's adapters, so it needs a student no wider than its teacher")
    head_s, head_t = (m.embed_dim // m.config.num_heads for m in (student, teacher))
    if head_s != head_t:  # DINOv3's 7B: 128, the others 64
        raise ValueError(f"the student's heads are {head_s} wide, its teacher's {head_t}: SLAD slices the teacher's "
                         f"adapters head by head (Fig. 4), so it needs one head width")
    g = layer_mapping(len(student.blocks), len(teacher.blocks), mapping)
    for p in student.parameters():
        p.requires_grad_(False)
    for i, j in enumerate(g):
        adapters = {n: m for n, m in teacher.blocks[j].named_modules() if isinstance(m, LoRALinear)}
        if not adapters:
            raise ValueError(f"teacher block {j} has no LoRA adapters: call add_lora(teacher) first")
        for target, t in adapters.items():
            if init_width and j not in g[:i]:  # once a teacher block, however many student blocks share it
                t.lora_A.data.mul_(math.sqrt(t.lora_A.shape[1] / init_width))
            _swap(student.blocks[i], target, lambda base: LoRALinear(base, t.lora_A, t.lora_B, t.scale, t.chunks))
    return g


def merge_lora(vit):
    """A new plain ViT with every adapter folded into its weight, W0 + Delta W: the official DINOv2 or DINOv3
    state-dict layout (biases and DINOv3's bias_mask as they were), what one deploys. `vit` is left as it is."""
    state = {k.replace(".base.", "."): v for k, v in vit.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    with torch.no_grad():
        for name, m in vit.named_modules():
            if isinstance(m, LoRALinear):
                state[f"{name}.weight"] = m.base.weight + m.delta_weight().to(m.base.weight.dtype)
    merged = type(vit)(vit.config, name=vit.name).to(next(vit.parameters()).device)
    merged.load_state_dict(state, strict=True)
    return merged


def trainable_parameters(*modules, named=False):
    """Every parameter that requires grad across `modules`, each once: the shared adapters appear in both
    the teacher and the student, and an optimizer must not see a tensor twice. named=True: (name, parameter)
    pairs, the name as the first module that holds it calls it."""
    seen, params = set(), []
    for m in modules:
        for n, p in m.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append((n, p) if named else p)
    return params
