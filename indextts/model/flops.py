"""FLOP accounting for MFU logging (nanoGPT / PaLM appendix B formula).

Per GPT position, forward + backward costs about ``6 N + 12 L d T`` FLOPs: ``6 N`` for the
matmuls of the ``N`` parameters every position passes through (2 forward, 4 backward), and
``12 L d T`` for the attention scores and weighted sums over a context of ``T`` positions.

``N`` counts the trunk (all blocks and ``ln_f``), ``final_norm`` and the code heads (``mel_head``
and, with the delay pattern, ``extra_mel_head.*``): the parameters each position multiplies
through. Embedding lookups cost no matmul and are left out, as are the
conditioners, which run once per utterance rather than per token (with 1024-dim w2v-BERT input
they add roughly 10-20% on top for IndexTTS2-sized batches, so MFU from this formula is a lower
bound). Trainers log tokens/s over *non-pad* text+code tokens, which makes MFU lower still
(padding and the prefix cost compute too); the numbers are honest, not flattering.
"""

from __future__ import annotations

from indextts.model.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_BF16: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 6000 Ada", 365e12),
    ("A6000", 155e12),
]


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its ``torch.cuda.get_device_name()``; None if unknown."""
    return next((v for k, v in PEAK_BF16 if k in device_name), None)


def per_token_params(cfg: ModelConfig) -> int:
    """``N``: parameters a GPT position passes through (trunk, ln_f, final_norm, the K code heads)."""
    d = cfg.model_dim
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * (2 * d)
    heads = cfg.n_codebooks * (d * cfg.number_mel_codes + cfg.number_mel_codes)  # mel_head + extra_mel_head.*
    return cfg.layers * block + 2 * d + 2 * d + heads


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per GPT position at context length ``seq_len``."""
    return 6.0 * per_token_params(cfg) + 12.0 * cfg.layers * cfg.model_dim * seq_len


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over ``peak_flops``.

    Args:
        tokens_per_s: GPT positions (or non-pad tokens, for a conservative figure) per second,
            summed over all devices whose peaks ``peak_flops`` sums.
        cfg: the model config.
        seq_len: mean GPT sequence length (prefix + text + codes) of the batches.
        peak_flops: e.g. ``peak_bf16("NVIDIA H100 80GB HBM3") * world_size``.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token(cfg, seq_len) / peak_flops
