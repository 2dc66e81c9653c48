"""Next-token cross-entropy and z-loss from one logsumexp pass."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def cross_entropy_and_z(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and mean log²Z over the non-ignored tokens.

    logits (B, T, V) in any float dtype, labels (B, T). z-loss (PaLM §5, Chowdhery et al. 2022) is
    coef · log²Z with Z the softmax normaliser: it keeps log Z near 0 so bf16 logits stay precise.
    Both come from one fp32 logsumexp, so the z term costs no second pass over the vocabulary.
    """
    logits = logits.float().flatten(0, 1)  # (N, V)
    labels = labels.flatten()  # (N,)
    valid = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    target = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    count = valid.sum().clamp(min=1)
    ce = ((lse - target) * valid).sum() / count
    z = (lse.square() * valid).sum() / count
    return ce, z

