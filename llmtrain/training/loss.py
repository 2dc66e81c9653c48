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
    target = _target_logits(logits, labels)
    count = valid.sum().clamp(min=1)
    ce = ((lse - target) * valid).sum() / count
    z = (lse.square() * valid).sum() / count
    return ce, z


def _target_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, V), labels (N,) -> each row's logit at its label (any value where the label is ignored)."""
    if torch.compiler.is_compiling():
        # A masked sum, which inductor can fuse into the logsumexp's read of the logits, its backward into the
        # softmax-gradient kernel. gather's backward scatters into a dense fp32 (N, V) buffer that the next kernel
        # reads again (3.6 ms written + 3.6 ms read per step at 124M, micro-batch 64, H200 profile). The gain is
        # measured on CPU only so far (benchmarks/loss_target.py; docs/benchmarks.md, "The loss").
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        return torch.where(vocab == labels.unsqueeze(1), logits, 0.0).sum(-1)
    # Eager, the masked sum would materialise (N, V) tensors: gather reads one logit per row.
    return logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
