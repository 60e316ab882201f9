"""
The distillation objectives, each next to the equation it implements. Logits are (B, C) for classification
or (B, C, H, W) for segmentation, where every term is per pixel and pixels labelled IGNORE (255) count for
nothing.

    task_loss(logits, y)                  eq. 1's l_task: cross-entropy
    kl_term(s, t, T)                      T^2 KL(p_t || p_s) at temperature T (Hinton et al. 2015)
    distill_loss(s, t, y)                 eq. 2, two-step distillation:   a_s CE(s) + a_KL T^2 KL
    slad_loss(s, t, y)                    eq. 4, SLAD's joint objective:  a_s CE(s) + a_t CE(t) + a_KL T^2 KL

Two other objectives, to compare with (--kd taid, --feat ted):

    TAID(total_steps)                     TAID (Shing et al. 2025): the KL term towards p_t, an interpolation of
                                          student and teacher whose t rises adaptively to 1; replaces eq. 2/4's KL
    distill_term(kd, total_steps, device) --kd's term, kl_term or a TAID: the losses' kd_term
    TaskFilters, ted_loss                 TED (Liang et al. 2023): task-aware filters on chosen blocks, and the
                                          MSE between filtered student and teacher blocks, added to eq. 2

Logits may come out of autocast in half precision: the softmaxes are taken in float32.
"""

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

from images import IGNORE


def task_loss(logits, labels):
    """eq. 1: cross-entropy, per image or per pixel, ignoring pixels labelled IGNORE (an image's label 255 is a
    class: your own folder may have 256 classes or more)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE if logits.ndim > 2 else -100)


def kl_term(student_logits, teacher_logits, T=2.0, labels=None):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over images, or over the pixels whose label is not
    IGNORE. The T^2 keeps its gradients on the scale of the CE term's as T changes (Hinton et al.)."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(1)  # (B,) or (B, H, W)
    if labels is None or kl.ndim == 1:
        return T * T * kl.mean()
    valid = labels != IGNORE  # a masked mean, not kl[valid]: boolean indexing would sync with the host
    return T * T * (kl * valid).sum() / valid.sum().clamp(min=1)


def distill_loss(student_logits, teacher_logits, labels, T=2.0, alpha_s=0.5, alpha_kl=0.5, kd_term=kl_term):
    """eq. 2: alpha_s CE(f_s, y) at T = 1 + alpha_KL T^2 KL(f_t || f_s) at T > 1. The teacher is a fixed
    target (its logits carry no gradient). kd_term: the KL's, or another in its place (distill_term)."""
    return (alpha_s * task_loss(student_logits, labels)
            + alpha_kl * kd_term(student_logits, teacher_logits.detach(), T, labels))


def slad_loss(student_logits, teacher_logits, labels, T=2.0, alpha_s=1.0, alpha_t=1.0, alpha_kl=1.0,
              kl_into_teacher=False, kd_term=kl_term):
    """eq. 4: alpha_s CE(f_s, y) + alpha_t CE(f_t, y) + alpha_KL T^2 KL(f_t || f_s). By default the KL term
    treats the teacher's logits as a target, as in eq. 2 (the teacher still feels the student through the
    shared adapters); kl_into_teacher=True lets it pull the teacher's logits towards the student's too.
    kd_term: the KL's, or another in its place (distill_term)."""
    target = teacher_logits if kl_into_teacher else teacher_logits.detach()
    return (alpha_s * task_loss(student_logits, labels) + alpha_t * task_loss(teacher_logits, labels)
            + alpha_kl * kd_term(student_logits, target, T, labels))


# -----------------------------------------------------------------------------
# TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025)


def taid_target(student_logits, teacher_logits, t):
    """TAID's intermediate distribution, as logits: p_t = softmax((1 - t) stopgrad(s) + t teacher). At
    t = 0 it is the student's own distribution, at t = 1 the teacher's; no gradient flows through the
    student's part."""
    return (1 - t) * student_logits.detach().float() + t * teacher_logits.float()


class TAID(nn.Module):
    """TAID's term and the schedule of its t. The term is T^2 KL(p_t || q_s) at temperature T, p_t given by
    taid_target (TAID's objective, the KL towards p_t), so that at t = 1 it is eq. 2's KL term exactly. (The
    official code works at T = 1, i.e. --temperature 1, and takes the cross-entropy H(p_t, q_s): it differs
    by p_t's entropy, which carries no gradient to the student.) After each step t rises, by TAID's adaptive
    update with the official code's linear floor and defaults:

        delta_n = (J_{n-1} - J_n) / J_{n-1}                   relative change of the objective J
        m_n     = beta m_{n-1} + (1 - beta) delta_n           its momentum
        t_{n+1} = min(t_end, max(t_start + (t_end - t_start) n / N, t_n + alpha sigmoid(m_n) (1 - t_n)))

    over N = total_steps steps: t never decreases, and after the run's last step it is within
    (t_end - t_start) / N of t_end. t, m and J_{n-1} are buffers on the device, updated with tensor ops (no
    host sync per step), checkpointed with the models (run_folder.trained_keys)."""

    def __init__(self, total_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
        super().__init__()
        self.total_steps, self.t_start, self.t_end, self.alpha, self.beta = total_steps, t_start, t_end, alpha, beta
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("momentum", torch.tensor(0.0))
        self.register_buffer("prev_loss", torch.tensor(float("inf")))  # none yet: the first step only records J
        self.register_buffer("steps_done", torch.tensor(0))
        self.objective = []  # the term's values since the last step()

    def forward(self, student_logits, teacher_logits, T, labels=None):
        """The term at the current t; its value is kept for step()."""
        loss = kl_term(student_logits, taid_target(student_logits, teacher_logits, self.t), T, labels)
        self.objective.append(loss.detach())
        return loss

    def step(self):
        """Once after each optimizer step (as the official code): t moves on from the step's objective J, the
        mean over its micro-batches (--grad_accum)."""
        if self.objective:
            self.update(torch.stack(self.objective).mean())
            self.objective = []

    @torch.no_grad()
    def update(self, loss):
        if dist.is_initialized():  # under torchrun, every process follows the objective of the global batch
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        first = torch.isinf(self.prev_loss)
        skip = first | ~torch.isfinite(loss)  # a non-finite loss (an fp16 overflow) leaves the state as it is
        delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        momentum = torch.where(skip, self.momentum, self.beta * self.momentum + (1 - self.beta) * delta)
        t_linear = self.t_start + (self.t_end - self.t_start) * self.steps_done / self.total_steps
        t_adaptive = self.t + self.alpha * torch.sigmoid(momentum) * (1 - self.t)
        t = torch.clamp(torch.maximum(t_adaptive, t_linear), max=self.t_end)
        # new tensors rather than in-place updates: the step's graph still holds the t it was computed with
        self.t = torch.where(skip, self.t, t)
        self.momentum = momentum
        self.prev_loss = torch.where(torch.isfinite(loss), loss.float(), self.prev_loss)
        self.steps_done = self.steps_done + 1


def distill_term(kd, total_steps, device):
    """The distillation term of --kd, called as term(student_logits, teacher_logits, T, labels): "kl", eq. 2's and
    eq. 4's T^2 KL (kl_term); "taid", a TAID on `device` whose t rises over total_steps optimizer steps (a module
    with a state: the scripts step it, log its t and checkpoint it with the models)."""
    return TAID(total_steps).to(device) if kd == "taid" else kl_term


# -----------------------------------------------------------------------------
# TED: Task-aware layEr-wise Distillation (Liang et al., ICML 2023)


class TaskFilters(nn.Module):
    """TED's task-aware filters on n chosen blocks of one model: filter k is a linear map of block k's tokens,
    (B, N, D) -> (B, N, d_f). In TED's Stage I each filter learns the task through a head of its own, the
    model frozen, by the task loss averaged over filters: what the filter keeps of its block is what the task
    needs. The heads are linear (TED's put a dense + GELU pooler first): on the filtered CLS token, or for
    segmentation on each filtered patch token, upsampled to the pixels as Segmenter's. Without num_classes,
    no heads: Stage II's student filters, which ted_loss alone trains."""

    def __init__(self, n, dim, d_f, num_classes=None, patch_size=None):  # patch_size: for segmentation heads
        super().__init__()
        self.filters = nn.ModuleList(nn.Linear(dim, d_f) for _ in range(n))
        self.heads = nn.ModuleList(nn.Linear(d_f, num_classes) for _ in range(n)) if num_classes else None
        self.patch_size = patch_size

    def forward(self, blocks):  # [(B, N, D)] * n -> [(B, N, d_f)] * n
        return [f(h) for f, h in zip(self.filters, blocks)]

    def task_loss(self, filtered, labels):
        """TED Stage I: the mean over filters of CE(head_k(filter_k(block_k)), y)."""
        losses = [task_loss(self.head_logits(head, z, labels), labels) for head, z in zip(self.heads, filtered)]
        return sum(losses) / len(losses)

    def head_logits(self, head, z, labels):
        if labels.ndim == 1:
            return head(z[:, 0])
        (H, W), p = labels.shape[-2:], self.patch_size
        patches = z[:, -(H // p) * (W // p):]  # the patch tokens come last, after CLS and registers
        logits = head(patches).transpose(1, 2).unflatten(2, (H // p, W // p))
        return F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False)


def ted_loss(student_filtered, teacher_filtered):
    """TED Stage II's layer-wise term: the mean over mapped pairs (i, g(i)) of
    MSE(filter_s,i(student block i), filter_t,g(i)(teacher block g(i))), over every token (CLS, registers,
    patches) and dimension. The teacher's side is a fixed target."""
    pairs = list(zip(student_filtered, teacher_filtered))
    return sum(F.mse_loss(s.float(), t.detach().float()) for s, t in pairs) / len(pairs)
