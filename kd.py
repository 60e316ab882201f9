"""
The distillation objectives, each next to the equation it implements. Logits are (B, C) for classification
or (B, C, H, W) for segmentation, where every term is per pixel and pixels labelled IGNORE (255) count for
nothing.

    task_loss(logits, y)                  eq. 1's l_task: cross-entropy
    kl_term(s, t, T)                      T^2 KL(p_t || p_s) at temperature T (Hinton et al. 2015)
    distill_loss(s, t, y)                 eq. 2, two-step distillation:   a_s CE(s) + a_KL T^2 KL
    slad_loss(s, t, y)                    eq. 4, SLAD's joint objective:  a_s CE(s) + a_t CE(t) + a_KL T^2 KL

Logits may come out of autocast in half precision: the softmaxes are taken in float32.
"""

import torch.nn.functional as F

IGNORE = 255


def task_loss(logits, labels):
    """eq. 1: cross-entropy, per image or per pixel, ignoring pixels labelled IGNORE."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


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


def distill_loss(student_logits, teacher_logits, labels, T=2.0, alpha_s=0.5, alpha_kl=0.5):
    """eq. 2: alpha_s CE(f_s, y) at T = 1 + alpha_KL T^2 KL(f_t || f_s) at T > 1. The teacher is a fixed
    target (its logits carry no gradient)."""
    return alpha_s * task_loss(student_logits, labels) + alpha_kl * kl_term(student_logits, teacher_logits.detach(), T, labels)


def slad_loss(student_logits, teacher_logits, labels, T=2.0, alpha_s=1.0, alpha_t=1.0, alpha_kl=1.0,
              kl_into_teacher=False):
    """eq. 4: alpha_s CE(f_s, y) + alpha_t CE(f_t, y) + alpha_KL T^2 KL(f_t || f_s). By default the KL term
    treats the teacher's logits as a target, as in eq. 2 (the teacher still feels the student through the
    shared adapters); kl_into_teacher=True lets it pull the teacher's logits towards the student's too."""
    target = teacher_logits if kl_into_teacher else teacher_logits.detach()
    return (alpha_s * task_loss(student_logits, labels) + alpha_t * task_loss(teacher_logits, labels)
            + alpha_kl * kl_term(student_logits, target, T, labels))
