"""Knowledge distillation (Hinton et al., 2015): a student learns a teacher's soft targets.

`soft_cross_entropy` is the loss every distillation in slmkit uses (PET's final classifier learns its
ensemble's soft labels with it).
"""

from __future__ import annotations


def soft_cross_entropy(student_logits, teacher_probs, temperature: float = 1.0):
    """Cross-entropy of the student's distribution at `temperature` against the teacher's probabilities
    (already computed at that temperature), scaled by T^2 so gradients keep their size as T changes."""
    import torch

    log_p = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher_probs * log_p).sum(-1).mean() * temperature ** 2
