"""The delay pattern (MusicGen, Parler-TTS): K residual codebooks predicted by one decoder.

A DAC frame holds K codes, one per residual codebook, and codebook k refines what codebooks
0..k-1 left over. Predicting all K of a frame at one step makes them independent given the past;
the delay pattern shifts codebook k right by k steps instead, so at step ``t`` the model predicts
codebook 0 of frame ``t``, codebook 1 of frame ``t - 1`` ... and every code is predicted after
the coarser codes of its own frame were already fed back in::

    step         0    1    2    3    4    5
    codebook 0   a0   a1   a2   a3   .    .        (. = the pad the shift opens)
    codebook 1   .    b0   b1   b2   b3   .
    codebook 2   .    .    c0   c1   c2   c3

``T`` frames take ``T + K - 1`` steps. With K = 1 nothing moves: the layout is IndexTTS2's.
"""

from __future__ import annotations

import torch


def delay(codes: torch.Tensor, pad: int | bool = 0, pad_after: int | bool | None = None) -> torch.Tensor:
    """Shift codebook ``k`` right by ``k`` steps.

    Args:
        codes: ``[..., K, T]`` (any dtype; the codebook axis is second to last).
        pad: value of the ``k`` positions opened before codebook ``k`` starts.
        pad_after: value of the ``K - 1 - k`` positions opened after it ends (default ``pad``).

    Returns:
        ``[..., K, T + K - 1]``; ``out[..., k, k + t] == codes[..., k, t]``.
    """
    K, T = codes.shape[-2], codes.shape[-1]
    after = pad if pad_after is None else pad_after
    out = codes.new_full((*codes.shape[:-1], T + K - 1), pad)
    for k in range(K):
        out[..., k, k : k + T] = codes[..., k, :]
        out[..., k, k + T :] = after
    return out


def undelay(delayed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`delay`: ``undelay(delay(x)) == x`` for any pad values.

    Args:
        delayed: ``[..., K, L]`` with ``L >= K`` (``L = T + K - 1``).

    Returns:
        ``[..., K, L - K + 1]``; ``out[..., k, t] == delayed[..., k, k + t]``.

    Raises:
        ValueError: ``L < K`` (not a delayed sequence of at least one frame).
    """
    K, L = delayed.shape[-2], delayed.shape[-1]
    T = L - K + 1
    if T < 1:
        raise ValueError(f"undelay: {L} steps cannot hold {K} delayed codebooks (need at least {K})")
    return torch.stack([delayed[..., k, k : k + T] for k in range(K)], dim=-2)
