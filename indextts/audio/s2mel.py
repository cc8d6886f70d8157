"""IndexTTS2's s2mel model: semantic features to an 80-band mel, by conditional flow matching.

IndexTTS2 (release b6fe850, ``indextts/infer_v2.py``) turns the GPT's codes into a mel in four steps:

1. ``gpt_layer`` (three Linear layers, no activation) projects the GPT latent (1280) to 1024 and adds
   it to the semantic codec's embedding of the codes (done by the caller);
2. the length regulator (:meth:`S2Mel.regulate`) maps those 50 Hz frames onto mel frames
   (``floor(1.72 * N)`` of them, :func:`target_mel_lengths`) by nearest-neighbour stretching and a
   small conv stack; the prompt's quantized features go through it too, at its mel length;
3. the prompt's condition is put in front of the generated one, and a DiT (13 transformer blocks with
   RoPE and UViT skips, then a WaveNet post-net) is integrated by 25 Euler steps with classifier-free
   guidance (:meth:`S2Mel.generate`), the prompt's mel given as an in-context prefix;
4. the prompt's frames are cut off the front.

Everything runs in fp32 (upstream disables autocast for this stage).

Names and shapes are those of the released ``s2mel.pth`` (``state["net"]["cfm" | "length_regulator" |
"gpt_layer"]``); ``tests/data/indextts2_s2mel_state_dict.tsv`` lists them. Tensors the released code
builds but never reads at inference (``x_embedder``, ``cond_embedder``, ``content_mask_embedder``, the
``skip_in_linear`` of blocks that receive no skip, the regulator's ``embedding`` and ``mask_token``) are
held as parameters all the same, so the file loads strictly, key for key. Weight norm keeps PyTorch's
old names (``weight_g``, ``weight_v``, dim 0) and is computed on every call, as the old wrapper did.

Exact batching
    Rows of a batch may have different prompt and total lengths. Everything is per frame except
    attention (a key-padding mask), the WaveNet's reflect-padded convolutions (each row is reflected
    at its own end, by a gather) and the length regulator (GroupNorm over time: run row by row). So a
    row of a batch equals the row run alone, up to float rounding of the batched matmuls.

Upstream quirks kept on purpose (see the reference traps): legacy ``nearest`` interpolation with a
float32 scale, the time variable accumulated step by step, the prompt region of ``x`` zeroed after every
step, the unconditional half zeroing prompt, style and condition but keeping ``x`` and ``t``.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SUBMODELS = ("cfm", "length_regulator", "gpt_layer")


@dataclass(frozen=True)
class S2MelConfig:
    """Every size of the s2mel model and its mel. The defaults are the released IndexTTS2
    ``config.yaml`` ``s2mel`` section (with the code's own overrides noted)."""

    # --- mel (preprocess_params): the prompt's mel and BigVGAN's input.
    sample_rate: int = 22050
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    fmin: float = 0.0
    # The released config says the string "None", which infer_v2 turns into librosa's default sr/2
    # (11025 Hz); any other value there would become 8000. None here means sr/2.
    fmax: float | None = None

    # --- inputs.
    # Width of the GPT's final-LayerNormed hidden state that gpt_layer projects.
    gpt_latent_dim: int = 1280
    # gpt_layer's two inner widths (1280 -> 256 -> 128 -> semantic_dim).
    gpt_hidden: tuple[int, int] = (256, 128)
    # Semantic codec embedding width (w2v-BERT's hidden size): the regulator's input.
    semantic_dim: int = 1024
    # CAM++ speaker embedding.
    style_dim: int = 192

    # --- length regulator.
    regulator_channels: int = 512
    # One Conv-GroupNorm-Mish block per entry of the config's sampling_ratios ([1, 1, 1, 1]).
    regulator_blocks: int = 4
    # Rows of the regulator's unused discrete-content embedding.
    regulator_codebook_size: int = 2048

    # --- DiT estimator.
    hidden_dim: int = 512
    num_heads: int = 8
    depth: int = 13
    # SwiGLU width: gpt-fast's find_multiple(int(2 * 4 * dim / 3), 256) = 1536 for dim 512.
    ffn_dim: int = 1536
    # RoPE table and input_pos length: the code hard-codes 16384 (config block_size 8192 is ignored).
    block_size: int = 16384
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # Sinusoid size of both time embedders.
    time_embed_dim: int = 256
    # Rows of the unused discrete-content embedding (cond_embedder).
    content_codebook_size: int = 1024

    # --- WaveNet post-net.
    wavenet_hidden: int = 512
    wavenet_layers: int = 8
    wavenet_kernel: int = 5
    wavenet_dilation_rate: int = 1

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("fmin", "fmax", "rope_base", "norm_eps", "gpt_hidden"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{f.name}={v!r} must be a positive int")
        if not problems:
            if self.hidden_dim % self.num_heads or (self.hidden_dim // self.num_heads) % 2:
                problems.append(f"hidden_dim={self.hidden_dim} must split into num_heads={self.num_heads} "
                                "heads of even size (RoPE pairs)")
            if self.wavenet_kernel % 2 == 0:
                problems.append(f"wavenet_kernel={self.wavenet_kernel} must be odd (same-length reflect padding)")
            if self.time_embed_dim % 2:
                problems.append(f"time_embed_dim={self.time_embed_dim} must be even (cos and sin halves)")
            if self.win_length > self.n_fft or self.hop_length > self.n_fft:
                problems.append("win_length and hop_length must not exceed n_fft")
        if len(self.gpt_hidden) != 2 or not all(isinstance(h, int) and h > 0 for h in self.gpt_hidden):
            problems.append(f"gpt_hidden={self.gpt_hidden!r} must be two positive ints")
        if problems:
            raise ValueError("S2MelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @classmethod
    def tiny(cls) -> "S2MelConfig":
        """A model of ~42k parameters with every code path of the released one (two UViT skips and a
        middle block, WaveNet, weight norm, unused tensors); the mel stays 80-band at 22.05 kHz."""
        return cls(gpt_latent_dim=32, gpt_hidden=(16, 8), semantic_dim=24, style_dim=8, regulator_channels=16,
                   regulator_blocks=2, regulator_codebook_size=8, hidden_dim=16, num_heads=2, depth=5, ffn_dim=32,
                   time_embed_dim=16, content_codebook_size=8, wavenet_hidden=16, wavenet_layers=2)


class S2MelLoadError(ValueError):
    """An s2mel file cannot be used; the message names the file, the sub-model, the keys and what to do."""


# --------------------------------------------------------------------------------------------
# Building blocks (attribute names are the released file's)


class WeightNormLinear(nn.Module):
    """``Linear`` with its weight stored as ``weight_v`` (direction) and ``weight_g`` (per output row)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        # Registered bias, g, v: the order the old wrapper leaves in the state dict.
        self.bias = nn.Parameter(torch.zeros(out_features))
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0), self.bias)


class WeightNormConv1d(nn.Module):
    """``Conv1d`` (no padding of its own) with weight norm stored as ``weight_g``/``weight_v``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = dilation
        self.bias = nn.Parameter(torch.zeros(out_channels))
        v = torch.empty(out_channels, in_channels, kernel_size)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).reshape(out_channels, 1, 1))
        self.weight_v = nn.Parameter(v)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, torch._weight_norm(self.weight_v, self.weight_g, 0), self.bias, dilation=self.dilation)


class _Nest(nn.Module):
    """One level of naming: upstream's conv wrappers nest as ``<layer>.conv.conv.*``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv


class ReflectConv1d(nn.Module):
    """Same-length weight-normed conv that reflect-pads each row at its own ends (upstream's
    ``SConv1d``, which ignores the ``padding=`` it is given and reflect-pads by (k-1)*d/2 each side)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = _Nest(WeightNormConv1d(in_channels, out_channels, kernel_size, dilation))
        self.pad = (kernel_size - 1) * dilation // 2

    def forward(self, x: Tensor, reflect: "_RowReflect") -> Tensor:
        return self.conv.conv(reflect(x, self.pad) if self.pad else x)


class _RowReflect:
    """Reflect padding of ``(B, C, T)`` where row ``b`` is valid for ``lengths[b]`` frames: the
    frames just past a row's end are its own reflection, as if the row were alone. Index maps are
    built once per forward and shared by every layer with the same padding."""

    def __init__(self, lengths: Tensor, T: int) -> None:
        self.lengths, self.T = lengths, T
        self.full = bool((lengths == T).all())
        self._index: dict[int, Tensor] = {}

    def __call__(self, x: Tensor, pad: int) -> Tensor:
        if self.full:
            return F.pad(x, (pad, pad), mode="reflect")
        if pad not in self._index:
            q = torch.arange(-pad, self.T + pad, device=x.device)[None, :]  # (1, T + 2 pad)
            L = self.lengths.to(x.device)[:, None]
            src = torch.where(q < 0, -q, torch.where(q >= L, 2 * (L - 1) - q, q))
            # Past a row's reflected edge lie padding frames; any in-range index does, they are masked.
            self._index[pad] = src.clamp(0, self.T - 1)
        idx = self._index[pad]
        return torch.gather(x, 2, idx[:, None, :].expand(x.shape[0], x.shape[1], idx.shape[1]))


class TimestepEmbedder(nn.Module):
    """``t`` in [0, 1] -> sinusoids of ``1000 t`` (cos half first) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int) -> None:
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        args = (1000 * t.float())[:, None] * self.freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class AdaptiveRMSNorm(nn.Module):
    """``w * RMSNorm(x) + b`` with ``(w, b)`` a Linear of the conditioning: no "1 +"."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.project_layer = nn.Linear(dim, 2 * dim)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        w, b = self.project_layer(c).chunk(2, dim=-1)
        return w * self.norm(x) + b


def rope_table(n_pos: int, head_dim: int, base: float, device: torch.device | str | None = None) -> Tensor:
    """``(n_pos, head_dim / 2, 2)`` cos and sin of ``pos * base^(-2i / head_dim)`` in fp32."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(n_pos, device=device), inv)
    # Through polar (not cos/sin directly): bit for bit the table the released code builds.
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).contiguous()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate the interleaved pairs ``(x[2i], x[2i+1])`` of ``x (B, T, H, D)`` (gpt-fast's layout)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]  # (1, T, 1, D/2)
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)  # q | k | v
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, keep: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.wqkv(x).split(D, dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rope(k.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # keep: (B, 1, 1, T) key padding
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inner, bias=False)
        self.w3 = nn.Linear(dim, inner, bias=False)
        self.w2 = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: S2MelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg.hidden_dim, cfg.num_heads)
        self.feed_forward = FeedForward(cfg.hidden_dim, cfg.ffn_dim)
        self.ffn_norm = AdaptiveRMSNorm(cfg.hidden_dim, cfg.norm_eps)
        self.attention_norm = AdaptiveRMSNorm(cfg.hidden_dim, cfg.norm_eps)
        # Every block has one; only the blocks past the middle read it (the rest are unused weights).
        self.skip_in_linear = nn.Linear(2 * cfg.hidden_dim, cfg.hidden_dim)

    def forward(self, x: Tensor, c: Tensor, rope: Tensor, keep: Tensor, skip: Tensor | None) -> Tensor:
        if skip is not None:
            x = self.skip_in_linear(torch.cat([x, skip], dim=-1))
        h = x + self.attention(self.attention_norm(x, c), rope, keep)
        return h + self.feed_forward(self.ffn_norm(h, c))


class Transformer(nn.Module):
    """Non-causal blocks with UViT long skips used as a stack: the outputs of blocks ``i < depth // 2``
    are pushed, blocks ``i > depth // 2`` pop one each (7<-5, ..., 12<-0 for 13), the middle takes none."""

    def __init__(self, cfg: S2MelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.depth))
        self.norm = AdaptiveRMSNorm(cfg.hidden_dim, cfg.norm_eps)

    def forward(self, x: Tensor, c: Tensor, rope: Tensor, keep: Tensor) -> Tensor:
        mid, stack = len(self.layers) // 2, []
        for i, layer in enumerate(self.layers):
            x = layer(x, c, rope, keep, stack.pop() if i > mid else None)
            if i < mid:
                stack.append(x)
        return self.norm(x, c)


class WaveNet(nn.Module):
    """Gated dilated convs conditioned on a global vector (here the second time embedding), with
    residual and skip outputs; the last layer's output is all skip."""

    def __init__(self, hidden: int, kernel: int, dilation_rate: int, n_layers: int) -> None:
        super().__init__()
        self.hidden = hidden
        # Registered before cond_layer: the released file lists in_layers, res_skip_layers, cond_layer.
        self.in_layers = nn.ModuleList(
            ReflectConv1d(hidden, 2 * hidden, kernel, dilation_rate**i) for i in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            ReflectConv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1) for i in range(n_layers)
        )
        self.cond_layer = ReflectConv1d(hidden, 2 * hidden * n_layers, 1)

    def forward(self, x: Tensor, mask: Tensor, g: Tensor, reflect: _RowReflect) -> Tensor:
        """``x (B, C, T)``, ``mask (B, 1, T)`` float, ``g (B, C, 1)`` -> ``(B, C, T)``."""
        H = self.hidden
        g = self.cond_layer(g, reflect)
        out = torch.zeros_like(x)
        for i, (inl, rsl) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = inl(x, reflect) + g[:, 2 * H * i : 2 * H * (i + 1)]
            acts = torch.tanh(a[:, :H]) * torch.sigmoid(a[:, H:])
            rs = rsl(acts, reflect)
            if i < len(self.in_layers) - 1:
                x = (x + rs[:, :H]) * mask
                out = out + rs[:, H:]
            else:
                out = out + rs
        return out * mask


class FinalLayer(nn.Module):
    """``LayerNorm(no affine, eps 1e-6) * (1 + scale) + shift`` from the time embedding, then a
    weight-normed Linear."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = WeightNormLinear(hidden, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class DiT(nn.Module):
    """The velocity estimator: ``(x, prompt_x, lengths, t, style, cond) -> v``, all mels ``(N, n_mels, T)``,
    ``cond (N, T, regulator_channels)``, ``style (N, style_dim)``, ``t (N,)``."""

    def __init__(self, cfg: S2MelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, W = cfg.hidden_dim, cfg.wavenet_hidden
        self.transformer = Transformer(cfg)
        self.x_embedder = WeightNormLinear(cfg.n_mels, D)  # unused at inference
        self.cond_embedder = nn.Embedding(cfg.content_codebook_size, D)  # unused at inference
        self.cond_projection = nn.Linear(cfg.regulator_channels, D)
        self.t_embedder = TimestepEmbedder(D, cfg.time_embed_dim)
        self.register_buffer("input_pos", torch.arange(cfg.block_size))
        self.t_embedder2 = TimestepEmbedder(W, cfg.time_embed_dim)
        self.conv1 = nn.Linear(D, W)  # a Linear, whatever its name says
        self.conv2 = nn.Conv1d(W, cfg.n_mels, 1)
        self.wavenet = WaveNet(W, cfg.wavenet_kernel, cfg.wavenet_dilation_rate, cfg.wavenet_layers)
        self.final_layer = FinalLayer(W)
        self.res_projection = nn.Linear(D, W)
        self.content_mask_embedder = nn.Embedding(1, D)  # unused at inference
        self.skip_linear = nn.Linear(D + cfg.n_mels, D)
        self.cond_x_merge_linear = nn.Linear(D + 2 * cfg.n_mels + cfg.style_dim, D)
        # RoPE table: not in the state dict; rebuilt by setup_caches (after a meta-device build).
        self.register_buffer("freqs_cis", rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base), persistent=False)

    def setup_caches(self) -> None:
        """(Re)compute the RoPE table on the model's device."""
        device = self.cond_projection.weight.device
        self.freqs_cis = rope_table(self.cfg.block_size, self.cfg.head_dim, self.cfg.rope_base, device)

    def forward(self, x: Tensor, prompt_x: Tensor, lengths: Tensor, t: Tensor, style: Tensor, cond: Tensor) -> Tensor:
        N, _, T = x.shape
        if T > self.input_pos.shape[0]:
            raise ValueError(f"s2mel: {T} frames exceed the model's {self.input_pos.shape[0]} positions (block_size)")
        t1 = self.t_embedder(t)  # (N, D)
        xt = x.transpose(1, 2)  # (N, T, n_mels)
        h = torch.cat([xt, prompt_x.transpose(1, 2), self.cond_projection(cond), style[:, None, :].expand(N, T, -1)], -1)
        h = self.cond_x_merge_linear(h)  # (N, T, D)
        valid = torch.arange(T, device=x.device)[None, :] < lengths.to(x.device)[:, None]  # (N, T)
        rope = self.freqs_cis[self.input_pos[:T]]
        h = self.transformer(h, t1[:, None, :], rope, valid[:, None, None, :])
        h = self.skip_linear(torch.cat([h, xt], dim=-1))  # long skip from the noisy input
        mask = valid[:, None, :].to(h.dtype)  # (N, 1, T)
        w = self.wavenet(self.conv1(h).transpose(1, 2), mask, self.t_embedder2(t)[:, :, None], _RowReflect(lengths, T))
        w = w.transpose(1, 2) + self.res_projection(h)
        return self.conv2(self.final_layer(w, t1).transpose(1, 2))  # (N, n_mels, T)


class CFM(nn.Module):
    """Flow matching from noise (t=0) to mel (t=1) with a fixed-step Euler solver."""

    def __init__(self, cfg: S2MelConfig) -> None:
        super().__init__()
        self.estimator = DiT(cfg)

    def solve(self, z: Tensor, lengths: Tensor, prompt_lengths: Tensor, prompt_x: Tensor, mu: Tensor, style: Tensor,
              n_steps: int, cfg_rate: float) -> Tensor:
        """Integrate from ``z (B, n_mels, T)``; returns ``x`` at t=1, zero in each row's prompt region.

        ``prompt_x`` holds each row's prompt mel in its first ``prompt_lengths[b]`` frames and zeros after.
        """
        B, _, T = z.shape
        frames = torch.arange(T, device=z.device)[None, None, :]
        outside = (frames < prompt_lengths.to(z.device)[:, None, None]) | (frames >= lengths.to(z.device)[:, None, None])
        x = z.masked_fill(outside, 0.0)
        if cfg_rate > 0:
            # One batched call: [cond; uncond], the uncond half without prompt, style and condition.
            prompt2 = torch.cat([prompt_x, torch.zeros_like(prompt_x)])
            style2 = torch.cat([style, torch.zeros_like(style)])
            mu2 = torch.cat([mu, torch.zeros_like(mu)])
            lengths2 = torch.cat([lengths, lengths])
        t_span = torch.linspace(0, 1, n_steps + 1, device=z.device)
        t = t_span[0]
        for step in range(1, n_steps + 1):
            dt = t_span[step] - t_span[step - 1]
            if cfg_rate > 0:
                v = self.estimator(torch.cat([x, x]), prompt2, lengths2, t.expand(2 * B), style2, mu2)
                v_cond, v_uncond = v.chunk(2)
                v = (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond
            else:
                v = self.estimator(x, prompt_x, lengths, t.expand(B), style, mu)
            x = (x + dt * v).masked_fill(outside, 0.0)
            t = t + dt  # accumulated, as upstream does (not t_span[step])
        return x


class LengthRegulator(nn.Module):
    """Linear in -> legacy nearest stretch to the target length -> [Conv3 -> GroupNorm(1) -> Mish] x n
    -> Conv1. ``(1, T_in, semantic_dim) -> (1, T_out, channels)``; batches go row by row (GroupNorm
    normalises over time)."""

    def __init__(self, cfg: S2MelConfig) -> None:
        super().__init__()
        C = cfg.regulator_channels
        layers: list[nn.Module] = []
        for _ in range(cfg.regulator_blocks):
            layers += [nn.Conv1d(C, C, 3, 1, 1), nn.GroupNorm(1, C), nn.Mish()]
        layers.append(nn.Conv1d(C, C, 1))
        self.model = nn.Sequential(*layers)
        self.embedding = nn.Embedding(cfg.regulator_codebook_size, C)  # unused: discrete content
        self.mask_token = nn.Parameter(torch.zeros(1, C))  # unused at inference
        self.content_in_proj = nn.Linear(cfg.semantic_dim, C)

    def forward(self, x: Tensor, length: int) -> Tensor:
        h = self.content_in_proj(x).transpose(1, 2)  # (1, C, T_in)
        # PyTorch's legacy 'nearest': source index floor(i * float32(T_in / T_out)), not nearest-exact.
        h = F.interpolate(h, size=int(length), mode="nearest")
        return self.model(h).transpose(1, 2)


class S2Mel(nn.Module):
    """IndexTTS2's s2mel: ``cfm`` (the DiT estimator), ``length_regulator``, ``gpt_layer``."""

    def __init__(self, cfg: S2MelConfig = S2MelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.cfm = CFM(cfg)
        self.length_regulator = LengthRegulator(cfg)
        h1, h2 = cfg.gpt_hidden
        # Three Linear layers with no activation between them, as released.
        self.gpt_layer = nn.Sequential(nn.Linear(cfg.gpt_latent_dim, h1), nn.Linear(h1, h2), nn.Linear(h2, cfg.semantic_dim))

    def setup_caches(self) -> None:
        """Build the RoPE table on the model's device (needed after a meta-device build)."""
        self.cfm.estimator.setup_caches()

    @torch.inference_mode()
    def regulate(self, x: Tensor, lengths: Tensor, input_lengths: Tensor | None = None) -> Tensor:
        """The length regulator's condition for semantic features.

        Args:
            x: ``(B, T, semantic_dim)`` features (codec embedding, plus ``gpt_layer(latent)`` for GPT codes).
            lengths: ``(B,)`` target mel frames per row (:func:`target_mel_lengths`, or the prompt mel's length).
            input_lengths: ``(B,)`` valid input frames per row; None: all ``T``.

        Returns:
            ``(B, max(lengths), regulator_channels)`` fp32; row ``b`` is valid for ``lengths[b]`` frames,
            zero after, and equals the row regulated alone.
        """
        B, T, _ = x.shape
        lengths = _lengths(lengths, B, "lengths")
        input_lengths = torch.full((B,), T) if input_lengths is None else _lengths(input_lengths, B, "input_lengths")
        if int(input_lengths.max()) > T or int(input_lengths.min()) < 1 or int(lengths.min()) < 1:
            raise ValueError(f"regulate: input_lengths must be in 1..{T} and lengths >= 1, "
                             f"got {input_lengths.tolist()}, {lengths.tolist()}")
        with torch.autocast(x.device.type, enabled=False):
            out = x.new_zeros(B, int(lengths.max()), self.cfg.regulator_channels, dtype=torch.float32)
            for b in range(B):
                n, m = int(input_lengths[b]), int(lengths[b])
                out[b, :m] = self.length_regulator(x[b : b + 1, :n].float(), m)[0]
        return out

    @torch.inference_mode()
    def generate(self, cond: Tensor, cond_lengths: Tensor, prompt_mel: Tensor, style: Tensor, *, n_steps: int = 25,
                 cfg_rate: float = 0.7, temperature: float = 1.0, noise: Tensor | None = None,
                 generator: torch.Generator | None = None, prompt_lengths: Tensor | None = None) -> Tensor:
        """The generated mel after the prompt (infer_v2's ``cfm.inference(...)[..., T_ref:]``).

        Args:
            cond: ``(B, T, regulator_channels)``: ``regulate(prompt)`` followed by ``regulate(generated)``.
            cond_lengths: ``(B,)`` valid frames of ``cond`` per row (prompt + generated).
            prompt_mel: ``(B, n_mels, T_ref)`` the prompt's :func:`mel_spectrogram`.
            style: ``(B, style_dim)`` CAM++ embedding of the prompt.
            n_steps: Euler steps (upstream: 25).
            cfg_rate: guidance ``r``: ``v = (1 + r) v_cond - r v_uncond`` (upstream: 0.7; 0 skips the uncond pass).
            temperature: scale of the start noise.
            noise: ``(B, n_mels, >= max(cond_lengths))`` standard-normal start noise to use instead of
                drawing (times ``temperature``, like a drawn one); row ``b`` reads its first ``cond_lengths[b]`` frames.
            generator: draws the noise when ``noise`` is None, row by row as ``randn(1, n_mels, cond_lengths[b])``
                on ``cond``'s device, so a batch gets what the rows called one after another get (None: the
                global RNG, as upstream; for one row the same numbers as upstream's draw).
            prompt_lengths: ``(B,)`` prompt frames per row; None: all ``T_ref``.

        Returns:
            ``(B, n_mels, max(cond_lengths - prompt_lengths))`` fp32; row ``b`` is valid for
            ``cond_lengths[b] - prompt_lengths[b]`` frames, zero after.

        Raises:
            ValueError: shapes or lengths that do not fit together.
        """
        cfg = self.cfg
        B = cond.shape[0]
        cond_lengths = _lengths(cond_lengths, B, "cond_lengths")
        T_ref = prompt_mel.shape[-1]
        prompt_lengths = torch.full((B,), T_ref) if prompt_lengths is None else _lengths(prompt_lengths, B, "prompt_lengths")
        T = int(cond_lengths.max())
        problems = []
        if cond.ndim != 3 or cond.shape[2] != cfg.regulator_channels or cond.shape[1] < T:
            problems.append(f"cond {tuple(cond.shape)} must be (B, >= {T}, {cfg.regulator_channels})")
        if prompt_mel.shape[:2] != (B, cfg.n_mels) or prompt_mel.ndim != 3:
            problems.append(f"prompt_mel {tuple(prompt_mel.shape)} must be (B={B}, {cfg.n_mels}, T_ref)")
        if tuple(style.shape) != (B, cfg.style_dim):
            problems.append(f"style {tuple(style.shape)} must be ({B}, {cfg.style_dim})")
        if int(prompt_lengths.max()) > T_ref or bool((prompt_lengths < 0).any()):
            problems.append(f"prompt_lengths {prompt_lengths.tolist()} must be in 0..{T_ref}")
        if bool((prompt_lengths >= cond_lengths).any()):
            problems.append(f"each row needs frames after its prompt: cond_lengths {cond_lengths.tolist()}, "
                            f"prompt_lengths {prompt_lengths.tolist()}")
        # Reflect padding needs more frames than it pads (upstream pads short inputs another way).
        min_frames = (cfg.wavenet_kernel - 1) * cfg.wavenet_dilation_rate ** (cfg.wavenet_layers - 1) // 2 + 1
        if int(cond_lengths.min()) < min_frames:
            problems.append(f"each row needs at least {min_frames} frames in all, got cond_lengths {cond_lengths.tolist()}")
        if noise is not None and (noise.ndim != 3 or noise.shape[:2] != (B, cfg.n_mels) or noise.shape[2] < T):
            problems.append(f"noise {tuple(noise.shape)} must be ({B}, {cfg.n_mels}, >= {T})")
        if n_steps < 1 or cfg_rate < 0:
            problems.append(f"n_steps={n_steps} must be >= 1 and cfg_rate={cfg_rate} >= 0")
        if problems:
            raise ValueError("s2mel generate: " + "; ".join(problems))

        device = cond.device
        with torch.autocast(device.type, enabled=False):
            if noise is None:
                z = torch.zeros(B, cfg.n_mels, T, device=device)
                for b in range(B):
                    n = int(cond_lengths[b])
                    z[b, :, :n] = torch.randn((1, cfg.n_mels, n), generator=generator, device=device)[0]
            else:
                z = noise[:, :, :T].to(device, torch.float32)
            z = z * temperature
            frames = torch.arange(T, device=device)[None, None, :]
            in_prompt = frames < prompt_lengths.to(device)[:, None, None]
            prompt_x = torch.zeros(B, cfg.n_mels, T, device=device)
            n_ref = min(T_ref, T)
            prompt_x[:, :, :n_ref] = prompt_mel[:, :, :n_ref].float()
            prompt_x = prompt_x.masked_fill(~in_prompt, 0.0)
            mu = cond[:, :T].float().masked_fill(frames.transpose(1, 2) >= cond_lengths.to(device)[:, None, None], 0.0)
            x = self.cfm.solve(z, cond_lengths, prompt_lengths, prompt_x, mu, style.float(), n_steps, cfg_rate)
            gen = cond_lengths - prompt_lengths
            out = x.new_zeros(B, cfg.n_mels, int(gen.max()))
            for b in range(B):
                out[b, :, : int(gen[b])] = x[b, :, int(prompt_lengths[b]) : int(cond_lengths[b])]
        return out


def _lengths(v: Tensor | list[int], B: int, name: str) -> Tensor:
    v = torch.as_tensor(v).reshape(-1).long().cpu()
    if v.shape[0] != B:
        raise ValueError(f"{name} has {v.shape[0]} entries for a batch of {B}")
    return v


def target_mel_lengths(code_lengths: Tensor) -> Tensor:
    """Mel frames for ``N`` GPT codes: ``(N * 1.72).long()`` in float32, as infer_v2 computes it
    (= ``floor(172 N / 100)`` for N < 5000; 1.72 ~ (22050 / 256) / 50). Never rounded."""
    return (torch.as_tensor(code_lengths).long() * 1.72).long()


# --------------------------------------------------------------------------------------------
# Mel spectrogram (the prompt mel; BigVGAN's training mel)


@lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None):
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)  # Slaney scale and norm


def mel_spectrogram(audio: Tensor, cfg: S2MelConfig = S2MelConfig()) -> Tensor:
    """Natural-log mel magnitudes as IndexTTS2 computes the prompt mel.

    Reflect-pad ``(n_fft - hop) / 2`` each side, STFT without centring (periodic Hann),
    ``sqrt(re^2 + im^2 + 1e-9)``, Slaney mel filters (librosa), ``log(clamp(., 1e-5))``, no normalisation.

    Args:
        audio: ``(B, N)`` float waveform at ``cfg.sample_rate``, in [-1, 1].

    Returns:
        ``(B, n_mels, floor(N / hop))`` float32.
    """
    if audio.ndim != 2:
        raise ValueError(f"mel_spectrogram: audio must be (B, N), got {tuple(audio.shape)}")
    pad = (cfg.n_fft - cfg.hop_length) // 2
    if audio.shape[1] <= pad:
        raise ValueError(f"mel_spectrogram: {audio.shape[1]} samples are too few; reflect padding needs more than {pad}")
    basis = torch.from_numpy(_mel_basis(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)).float().to(audio.device)
    with torch.autocast(audio.device.type, enabled=False):
        y = F.pad(audio.float()[:, None, :], (pad, pad), mode="reflect")[:, 0]
        window = torch.hann_window(cfg.win_length, device=audio.device)
        spec = torch.stft(y, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
                          center=False, normalized=False, onesided=True, return_complex=True)
        mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
        return torch.log(torch.clamp(basis @ mag, min=1e-5))


# --------------------------------------------------------------------------------------------
# Files: the released layout {"net": {"cfm": ..., "length_regulator": ..., "gpt_layer": ...}}


def _few(items: list[str]) -> str:
    return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")


def load_s2mel(path: str | Path, cfg: S2MelConfig | None = None, device: torch.device | str = "cpu") -> tuple[S2Mel, list[str]]:
    """Load ``s2mel.pth`` strictly.

    Args:
        path: the released ``s2mel.pth`` or a file from :func:`save_s2mel`; read with
            ``torch.load(weights_only=True)``, tensors at ``state["net"][submodel][key]``, a leading
            ``module.`` (DDP) stripped.
        cfg: the sizes the file was built with; None: those :func:`save_s2mel` recorded in the
            file's ``config`` entry, else (the released file has none) the released ones.
        device: where the model goes.

    Returns:
        ``(model, notes)``: the model in eval mode, fp32, RoPE table built; ``notes`` are report lines
        for what the file holds and the model does not use (training state, ``num_batches_tracked``,
        unknown keys or sub-models, stripped prefixes). Nothing the model uses is left out.

    Raises:
        S2MelLoadError: missing or unreadable file, not the layout above, or any tensor of the model
            missing from the file or of another shape (all named at once, per sub-model).
    """
    path = Path(path)
    if not path.is_file():
        raise S2MelLoadError(f"{path}: s2mel weights not found; point to IndexTTS2's s2mel.pth (checkpoints/s2mel.pth of the release)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise S2MelLoadError(
            f"{path}: not loadable with torch.load(weights_only=True) ({type(e).__name__}: {e}). If it holds pickled "
            "training objects, load it once with weights_only=False in a trusted place and keep only state['net'] "
            "(save_s2mel writes that layout)"
        ) from e
    if not isinstance(state, dict) or not isinstance(state.get("net"), dict):
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise S2MelLoadError(f"{path}: not an s2mel checkpoint: expected a dict with a 'net' dict of sub-models, found {found}")
    if cfg is None:
        cfg = _recorded_config(path, state.get("config"))
    notes = [f"{path}: ignored top-level entry '{k}' (training state; inference reads only 'net')" for k in state
             if k not in ("net", "config")]
    net = state["net"]
    notes += [f"{path}: ignored sub-model net['{k}'] (not part of s2mel inference)" for k in net if k not in SUBMODELS]

    with torch.device("meta"):
        model = S2Mel(cfg)
    problems, loaded = [], {}
    for sub in SUBMODELS:
        want = getattr(model, sub).state_dict()
        have = net.get(sub)
        if not isinstance(have, dict):
            problems.append(f"net['{sub}'] is missing ({'absent' if have is None else type(have).__name__})")
            continue
        stripped = {}
        n_prefixed = 0
        for k, v in have.items():
            if isinstance(k, str) and k.startswith("module."):
                k, n_prefixed = k[len("module."):], n_prefixed + 1
            stripped[k] = v
        if n_prefixed:
            notes.append(f"{path}: net['{sub}']: stripped the DDP prefix 'module.' from {n_prefixed} keys")
        missing = [k for k in want if k not in stripped]
        shapes = [f"{k}: file {tuple(stripped[k].shape)}, model {tuple(want[k].shape)}"
                  for k in want if k in stripped and (not isinstance(stripped[k], Tensor) or stripped[k].shape != want[k].shape)]
        extra = [k for k in stripped if k not in want]
        if missing:
            problems.append(f"net['{sub}'] misses {len(missing)} tensors: {_few(missing)}")
        if shapes:
            problems.append(f"net['{sub}'] has {len(shapes)} tensors of another shape: {_few(shapes)}")
        unused_bn = [k for k in extra if k.endswith("num_batches_tracked")]
        if unused_bn:
            notes.append(f"{path}: net['{sub}']: ignored {len(unused_bn)} BatchNorm counters: {_few(unused_bn)}")
        other = [k for k in extra if k not in unused_bn]
        if other:
            notes.append(f"{path}: net['{sub}']: ignored {len(other)} tensors the model does not have: {_few(other)}")
        loaded[sub] = {k: stripped[k].to(want[k].dtype) for k in want
                       if isinstance(stripped.get(k), Tensor) and stripped[k].shape == want[k].shape}
    if problems:
        raise S2MelLoadError(
            "\n  ".join([f"{path}: the weights do not fit the s2mel architecture {cfg}", *problems,
                         "The file is truncated, from another model, or built with other sizes: use IndexTTS2's "
                         "s2mel.pth, or pass the S2MelConfig it was made with."])
        )
    for sub in SUBMODELS:
        getattr(model, sub).load_state_dict(loaded[sub], strict=True, assign=True)
    model.setup_caches()  # on the CPU, then moved, as upstream does
    return model.to(device).eval(), notes


def _recorded_config(path: Path, rec) -> S2MelConfig:
    """The sizes a file records under ``config`` (plain numbers, written by :func:`save_s2mel`);
    the released sizes when it records none."""
    if rec is None:
        return S2MelConfig()
    names = {f.name for f in fields(S2MelConfig)}
    if not isinstance(rec, dict) or not set(rec) <= names:
        extra = sorted(set(rec) - names) if isinstance(rec, dict) else type(rec).__name__
        raise S2MelLoadError(f"{path}: its 'config' entry is not an s2mel config (unknown {extra}); remove the entry "
                             "to read the file with the released sizes")
    try:
        return S2MelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec.items()})
    except (TypeError, ValueError) as e:
        raise S2MelLoadError(f"{path}: its 'config' entry is invalid: {e}") from e


def save_s2mel(model: S2Mel, path: str | Path) -> Path:
    """Write ``{"net": {"cfm": ..., "length_regulator": ..., "gpt_layer": ...}, "config": sizes}``
    of plain CPU tensors and numbers (the released layout, loadable by upstream, which ignores
    ``config``, and by :func:`load_s2mel`, which builds the model from it), atomically."""
    from indextts.files import atomic_path

    net = {sub: {k: v.detach().cpu().clone().contiguous() for k, v in getattr(model, sub).state_dict().items()} for sub in SUBMODELS}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.cfg).items()}
    # Through a buffer: torch.save names its zip folder after the file, and the temporary name
    # would make the bytes differ run to run.
    buf = io.BytesIO()
    torch.save({"net": net, "config": config}, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def make_random_s2mel(path: str | Path, cfg: S2MelConfig = S2MelConfig(), seed: int = 0) -> Path:
    """Write an s2mel with seeded random weights in the released layout (tests, benchmarks, demos).

    PyTorch's default initialisation; unused and zero-initialised tensors stay as built, the norm
    weights at one. Weight-norm magnitudes start at the direction's norm, so the weight equals ``weight_v``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = S2Mel(cfg)
    return save_s2mel(model, path)
