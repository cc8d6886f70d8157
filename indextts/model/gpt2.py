"""The GPT-2 trunk of UnifiedVoice: pre-LayerNorm blocks with HuggingFace parameter names.

Names mirror HF ``GPT2Model`` (``h.N.ln_1``, ``h.N.attn.c_attn``, ``h.N.attn.c_proj``,
``h.N.ln_2``, ``h.N.mlp.c_fc``, ``h.N.mlp.c_proj``, ``ln_f``) so the released ``gpt.pth`` loads
without a renaming table. There is no ``wte`` / ``wpe``: UnifiedVoice feeds embeddings in and
keeps its own learned text/mel position tables.

Layout note: the projections are ``nn.Linear`` and store ``[out, in]``; HF (and the official
file) store them as Conv1D ``[in, out]``. Exactly the keys for which :func:`is_conv1d_weight` is
true must be transposed on import and export; nothing else differs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Key suffixes that HF Conv1D stores transposed relative to nn.Linear.
CONV1D_WEIGHT_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_conv1d_weight(key: str) -> bool:
    """True for a UnifiedVoice state-dict key stored ``[in, out]`` in the official file
    (``gpt.h.N.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}.weight``)."""
    return key.startswith("gpt.h.") and key.endswith(CONV1D_WEIGHT_SUFFIXES)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)  # q, k, v in one matmul, HF order
        self.c_proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # With a cache, T new queries sit at the end of the keys; T == 1 needs no mask.
        causal = cache is None or T > 1
        if key_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_padded_causal_mask(key_mask, T))
        elif cache is not None and T > 1 and k.shape[2] != T:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, dropout_p=self.attn_dropout if self.training else 0.0
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def _padded_causal_mask(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Boolean SDPA mask ``[B, 1, T, S]`` for the last ``T`` of ``S`` positions: causal, padded
    keys hidden. A padded query still sees itself, so its (never used) row is finite rather than
    the NaN of an all-masked softmax, which would leak into real rows through 0 * NaN."""
    S = key_mask.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=key_mask.device).tril(S - T)  # (T, S)
    own = torch.zeros(T, S, dtype=torch.bool, device=key_mask.device)
    own[torch.arange(T), torch.arange(S - T, S)] = True
    return ((causal[None] & key_mask[:, None, :]) | own[None])[:, None]  # (B, 1, T, S)


class MLP(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate="tanh")  # HF "gelu_new"
        self.c_proj = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLP(dim, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, key_mask)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding."""

    def __init__(self, layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search / finished sequences)."""
        self.k = [t.index_select(0, index) if t is not None else None for t in self.k]
        self.v = [t.index_select(0, index) if t is not None else None for t in self.v]


class GPT2(nn.Module):
    """Stack of GPT-2 blocks over input embeddings, with HF's final ``ln_f``.

    ``forward(x)`` takes ``[B, T, dim]`` embeddings (no positions added here) and returns the
    ``[B, T, dim]`` hidden states after ``ln_f``, like ``GPT2Model(inputs_embeds=x)`` with
    ``wpe`` replaced by zeros, as the original does.
    """

    def __init__(self, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)  # HF's embd_pdrop on inputs_embeds
        self.h = nn.ModuleList([Block(dim, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HF GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections
        scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(self.h)))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask [B, S]`` (True = real position) marks left padding of a ragged batch over
        all ``S`` positions so far (cached ones included); padded keys get no attention."""
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, cache, i, key_mask)
        return self.ln_f(x)
