"""Token losses normalised by the number of real (non-padding) targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where ``mask`` is true.

    Args:
        logits: ``[B, L, V]`` (any float dtype; computed in float32).
        targets: ``[B, L]`` class ids; ids at masked-out positions are never read as classes.
        mask: ``[B, L]`` bool, True for real targets.

    Returns:
        A scalar: sum of per-token losses over real targets divided by their count (0 when
        there are none, so an empty batch gives a zero loss rather than NaN).
    """
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"mask {tuple(mask.shape)}")
    # ignore_index keeps padded positions out of the sum, whatever id they hold.
    safe_targets = targets.masked_fill(~mask, -100)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), safe_targets.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / mask.sum().clamp(min=1)


def codebook_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`masked_cross_entropy` of each codebook on its own.

    Args:
        logits: ``[B, L, K, V]`` (the K output heads of one position side by side).
        targets: ``[B, K, L]`` class ids.
        mask: ``[B, K, L]`` bool, True for real targets.

    Returns:
        ``[K]``: codebook k's summed loss over its real targets divided by their count. With one
        codebook this is exactly ``masked_cross_entropy`` (the single-stream loss, bit for bit).
    """
    B, L, K, V = logits.shape
    if targets.shape != (B, K, L) or mask.shape != (B, K, L):
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} ([B, L, K, V]), targets {tuple(targets.shape)}, "
                         f"mask {tuple(mask.shape)} ([B, K, L])")
    if K == 1:
        return masked_cross_entropy(logits[:, :, 0], targets[:, 0], mask[:, 0])[None]
    # One cross-entropy over all K heads (no per-codebook copy of the logits), summed per codebook.
    safe_targets = targets.masked_fill(~mask, -100).transpose(1, 2)  # (B, L, K)
    per_token = F.cross_entropy(logits.float().reshape(-1, V), safe_targets.reshape(-1), ignore_index=-100,
                                reduction="none").view(B, L, K)
    return per_token.sum((0, 1)) / mask.sum((0, 2)).clamp(min=1)
