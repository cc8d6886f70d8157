"""Conformer encoder of the speaker and emotion conditioners (WeNet layout, as IndexTTS2 uses).

Parameter names follow the released file: ``embed.conv.0`` (2x conv2d subsampling),
``embed.out.0``, ``embed.pos_enc.pe`` (a persistent sinusoidal buffer), ``encoders.N.{self_attn,
feed_forward, conv_module, norm_ff, norm_mha, norm_conv, norm_final}``, ``after_norm``.

Behaviour matches IndexTTS2's configuration of WeNet's encoder: pre-norm blocks without the
macaron feed-forward, SiLU activations, relative-position self-attention *without* ``rel_shift``
(the original removed it, so the position term is a learned bias over absolute positions), a
LayerNorm inside the convolution module, and no dropout. Attention runs through SDPA, with the
position term passed as an additive mask.

Shapes: input ``[B, T, idim]`` + lengths ``[B]``; output ``[B, T', odim]`` with
``T' = (T - 1) // 2`` and a boolean validity mask ``[B, T']``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Valid frames after the 2x conv subsampling: ``(length - 1) // 2`` (kernel 3, stride 2)."""
    return torch.div(lengths - 1, 2, rounding_mode="floor").clamp(min=0)


class RelPositionalEncoding(nn.Module):
    """Scales the input by sqrt(d) and returns the sinusoidal table rows for its length."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.xscale = math.sqrt(dim)
        position = torch.arange(0, max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        # Persistent: the released file carries it, and an exact key match needs it.
        self.register_buffer("pe", pe.unsqueeze(0))  # (1, max_len, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = x.shape[1]
        if T >= self.pe.shape[1]:
            raise ValueError(
                f"conditioning input too long: {T} frames after subsampling, the positional table "
                f"holds {self.pe.shape[1] - 1}; trim the reference audio or raise pos_enc_max_len"
            )
        return x * self.xscale, self.pe[:, :T].to(x.dtype)


class Conv2dSubsampling2(nn.Module):
    """Conv2d(1, odim, 3, stride 2) + ReLU over (time, feature), then a linear map to odim."""

    def __init__(self, idim: int, odim: int, max_len: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, odim, 3, 2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(odim * ((idim - 1) // 2), odim))
        self.pos_enc = RelPositionalEncoding(odim, max_len)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv(x.unsqueeze(1))  # (B, odim, T', F')
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))  # (B, T', odim)
        x, pos_emb = self.pos_enc(x)
        # Output frame t reads input frames 2t..2t+2, so it is valid when frame 2t+2 is.
        return x, pos_emb, mask[:, 2::2]


class RelPositionMultiHeadedAttention(nn.Module):
    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.h, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)  # (B, T, h, d_k)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)  # (B, h, T, d_k)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.shape[0], T, self.h, self.d_k).transpose(1, 2)  # (1, h, T, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, h, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        scale = 1.0 / math.sqrt(self.d_k)
        # scores = (q_u k^T + q_v p^T) * scale; SDPA adds the position term as a float mask.
        bias = torch.matmul(q_v, p.transpose(-2, -1)) * scale  # (B, h, T, T)
        bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        y = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias)  # (B, h, T, d_k)
        return self.linear_out(y.transpose(1, 2).reshape(B, T, C))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.activation = nn.SiLU()
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConvolutionModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv, LayerNorm, SiLU, pointwise conv; padding zeroed."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2,
                                        groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        keep = pad_mask.unsqueeze(1)  # (B, 1, T)
        x = x.transpose(1, 2).masked_fill(~keep, 0.0)  # (B, C, T): padding must not leak in
        x = F.glu(self.pointwise_conv1(x), dim=1)
        x = self.depthwise_conv(x)
        x = self.activation(self.norm(x.transpose(1, 2))).transpose(1, 2)
        x = self.pointwise_conv2(x).masked_fill(~keep, 0.0)
        return x.transpose(1, 2)


class ConformerEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, linear_units: int, kernel_size: int) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, dim)
        self.feed_forward = PositionwiseFeedForward(dim, linear_units)
        self.conv_module = ConvolutionModule(dim, kernel_size)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-5)
        self.norm_conv = nn.LayerNorm(dim, eps=1e-5)
        self.norm_final = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        x = x + self.conv_module(self.norm_conv(x), mask)
        x = x + self.feed_forward(self.norm_ff(x))
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    """Conformer over conditioning features.

    Args:
        input_size: feature size per frame (conformer input).
        output_size: model width of the conformer.
        attention_heads, linear_units, num_blocks: per the released ``condition_module``.
        kernel_size: depthwise conv kernel.
        max_len: rows of the ``pe`` buffer.
    """

    def __init__(self, input_size: int, output_size: int, attention_heads: int, linear_units: int,
                 num_blocks: int, kernel_size: int = 15, max_len: int = 5000) -> None:
        super().__init__()
        self.embed = Conv2dSubsampling2(input_size, output_size, max_len)
        self.encoders = nn.ModuleList(
            [ConformerEncoderLayer(output_size, attention_heads, linear_units, kernel_size) for _ in range(num_blocks)]
        )
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``xs [B, T, input_size]`` with valid ``lengths [B]``.

        Returns:
            ``[B, T', output_size]`` and the validity mask ``[B, T']`` (True = real frame).

        Raises:
            ValueError: fewer than 3 frames (nothing survives subsampling).
        """
        T = xs.shape[1]
        if T < 3:
            raise ValueError(f"conditioning features need at least 3 frames, got {T}")
        mask = torch.arange(T, device=xs.device)[None, :] < lengths[:, None]  # (B, T)
        xs, pos_emb, mask = self.embed(xs, mask)
        for layer in self.encoders:
            xs = layer(xs, mask, pos_emb)
        return self.after_norm(xs), mask
