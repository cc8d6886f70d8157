"""Perceiver resampler: a fixed number of learned latents cross-attend to a variable-length context.

Parameter names follow the released file: ``latents``, ``proj_context``, ``layers.N.0.{to_q,
to_kv, to_out}`` (attention, no biases), ``layers.N.1.{0,2}`` (GEGLU feed-forward), ``norm.gamma``.
The keys/values are the latents concatenated with the context (the original's
``cross_attn_include_queries``), so the mask covers ``num_latents + T`` positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """``normalize(x) * sqrt(dim) * gamma`` (parameter named ``gamma`` as in the original)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult * 2 / 3)  # GEGLU keeps the parameter count of a mult-x MLP
    return nn.Sequential(nn.Linear(dim, inner * 2), GEGLU(), nn.Linear(inner, dim))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = latents.shape
        kv_in = torch.cat([latents, context], dim=1)  # (B, N + T, dim)
        q = self.to_q(latents)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, *, dh)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N + T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(y.transpose(1, 2).reshape(B, N, -1))


class PerceiverResampler(nn.Module):
    """Maps ``context [B, T, dim_context]`` (+ validity mask ``[B, T]``) to ``[B, num_latents, dim]``."""

    def __init__(self, dim: int, *, dim_context: int, num_latents: int, heads: int, ff_mult: int,
                 depth: int = 2, dim_head: int = 64) -> None:
        super().__init__()
        self.proj_context = nn.Linear(dim_context, dim) if dim_context != dim else nn.Identity()
        self.latents = nn.Parameter(torch.empty(num_latents, dim))
        nn.init.normal_(self.latents, std=0.02)
        self.layers = nn.ModuleList(
            [nn.ModuleList([Attention(dim, heads, dim_head), feed_forward(dim, ff_mult)]) for _ in range(depth)]
        )
        self.norm = RMSNorm(dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B = context.shape[0]
        context = self.proj_context(context)
        latents = self.latents.unsqueeze(0).expand(B, -1, -1)
        if mask is not None:
            # The latents themselves are always visible keys.
            mask = torch.cat([mask.new_ones(B, latents.shape[1]), mask], dim=1)
        for attn, ff in self.layers:
            latents = attn(latents, context, mask) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
