"""The MaskGCT semantic codec that IndexTTS2's GPT predicts: a RepCodec over w2v-BERT 2.0 features.

IndexTTS2 turns speech into one stream of 8192 codes at 50 frames/s: the normalised hidden
states of layer 17 of w2v-BERT 2.0 (1024-dim, see :mod:`indextts.features`) go through this
codec's encoder (a Vocos backbone of ConvNeXt blocks, then a linear map back to 1024) and a
factorised vector quantizer (a 1x1 projection to 8 dims, then the nearest of 8192 L2-normalised
codebook rows by cosine). Its s2mel stage reads the codes back through :meth:`SemanticCodec.embed`
(codebook row, then the projection back to 1024), which is why a model trained on these codes
is a drop-in for the released one.

Parameter names and shapes are those of the released ``semantic_codec/model.safetensors``
(Amphion's MaskGCT release, which IndexTTS2 loads); ``tests/data/maskgct_semantic_codec_state_dict.tsv``
lists them. The quantizer's projections keep the names of PyTorch's old weight-norm wrapper
(``weight_g``, ``weight_v``), so :class:`WeightNormConv1d` stores exactly those tensors and
combines them the way that wrapper does. The decoder is built too: it is in the file, and a strict
load wants every key; extraction does not run it.

Exact batching
    The backbone's convolutions (kernel 7) are zero-padded and non-causal, so in a padded batch the
    last frames of a shorter utterance would see the padding frames' values. :meth:`SemanticCodec.quantize`
    takes the valid lengths and zeroes every convolution's input past them: exactly the zeros the
    convolution pads with when the utterance is encoded alone. Everything else is per frame.

Weights are read with safetensors only, and the architecture is read off the file's shapes
(:meth:`SemanticCodecConfig.from_state_dict`), so the released file and the tests' tiny random
codecs load through the same strict code path.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class SemanticCodecConfig:
    """Sizes of a semantic codec. The defaults are the released MaskGCT codec (IndexTTS2's
    ``config.yaml`` ``semantic_codec`` section)."""

    # 8192 codes: the GPT's mel vocabulary is this + start/stop = 8194.
    codebook_size: int = 8192
    # Width of the features in and out: w2v-BERT 2.0's hidden size.
    hidden_size: int = 1024
    # The factorised quantizer compares codes in 8 dimensions (cosine over L2-normalised rows).
    codebook_dim: int = 8
    # The Vocos backbone of the encoder and the decoder.
    vocos_dim: int = 384
    vocos_intermediate_dim: int = 2048
    vocos_num_layers: int = 12
    # One quantizer: a single code stream.
    num_quantizers: int = 1

    @staticmethod
    def from_state_dict(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> "SemanticCodecConfig":
        """The sizes a state dict was saved with, read off its tensor shapes.

        Raises:
            SemanticCodecLoadError: a tensor needed to read a size is missing or has an odd shape.
        """
        need = ("encoder.0.embed.weight", "encoder.0.convnext.0.pwconv1.weight", "quantizer.quantizers.0.codebook.weight")
        missing = [k for k in need if k not in state]
        if missing:
            raise SemanticCodecLoadError(
                f"{source}: not a MaskGCT semantic codec (no {', '.join(missing)}); codec.weights must be "
                "semantic_codec/model.safetensors of the amphion/MaskGCT release"
            )
        embed = state["encoder.0.embed.weight"]  # (vocos_dim, hidden, 7)
        inter = state["encoder.0.convnext.0.pwconv1.weight"]  # (intermediate, vocos_dim)
        book = state["quantizer.quantizers.0.codebook.weight"]  # (codebook_size, codebook_dim)
        if embed.ndim != 3 or inter.ndim != 2 or book.ndim != 2:
            raise SemanticCodecLoadError(f"{source}: unexpected tensor ranks for a semantic codec")
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"^encoder\.0\.convnext\.(\d+)\.", k))}
        quantizers = {int(m.group(1)) for k in state if (m := re.match(r"^quantizer\.quantizers\.(\d+)\.", k))}
        return SemanticCodecConfig(
            codebook_size=int(book.shape[0]),
            hidden_size=int(embed.shape[1]),
            codebook_dim=int(book.shape[1]),
            vocos_dim=int(embed.shape[0]),
            vocos_intermediate_dim=int(inter.shape[0]),
            vocos_num_layers=max(blocks) + 1,
            num_quantizers=max(quantizers) + 1,
        )


class SemanticCodecLoadError(ValueError):
    """A semantic codec file cannot be used; the message names the file and what to do."""


# --------------------------------------------------------------------------------------------
# Modules (names as in the released file)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (kernel 7) -> LayerNorm -> Linear -> GELU -> Linear -> layer scale, residual.
    Input and output ``(B, C, T)``."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        h = self.dwconv(x if keep is None else x.masked_fill(~keep, 0.0))
        h = self.norm(h.transpose(1, 2))  # (B, T, C)
        h = self.pwconv2(self.act(self.pwconv1(h)))
        return x + (self.gamma * h).transpose(1, 2)


class VocosBackbone(nn.Module):
    """Conv embed (kernel 7) -> LayerNorm -> ConvNeXt blocks -> LayerNorm. ``(B, C_in, T)`` in,
    ``(B, T, dim)`` out."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Layer scale starts at 1 / depth (Vocos' default); the released values replace it.
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 1.0 / num_layers) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x if keep is None else x.masked_fill(~keep, 0.0))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x, keep)
        return self.final_layer_norm(x.transpose(1, 2))


class WeightNormConv1d(nn.Module):
    """A 1x1 ``Conv1d`` whose weight is stored as direction ``weight_v`` and per-output-channel
    magnitude ``weight_g`` (PyTorch's old ``weight_norm`` names, which the released file uses)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Registered in the order the old wrapper leaves them (bias, then g, then v), so the
        # state dict lists keys in the released file's order.
        self.bias = nn.Parameter(torch.zeros(out_channels))
        v = torch.empty(out_channels, in_channels, 1)
        nn.init.kaiming_uniform_(v, a=5**0.5)
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).reshape(out_channels, 1, 1))
        self.weight_v = nn.Parameter(v)

    def weight(self) -> torch.Tensor:
        # The same op the old wrapper ran before every forward: v * (g / ||v||) per output channel.
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias)


class FactorizedVectorQuantizer(nn.Module):
    """Project ``(B, hidden, T)`` to ``codebook_dim``, pick the codebook row of highest cosine
    similarity; the embedding of a code is its (unnormalised) row projected back to ``hidden``."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_project = WeightNormConv1d(input_dim, codebook_dim)
        self.out_project = WeightNormConv1d(codebook_dim, input_dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, hidden, T)`` -> ``(B, T)`` int64."""
        latents = self.in_project(z)  # (B, d, T)
        B, d, T = latents.shape
        enc = F.normalize(latents.transpose(1, 2).reshape(B * T, d))
        book = F.normalize(self.codebook.weight)
        # Squared distance between unit vectors, written out as the released code computes it
        # (not as 2 - 2cos), so near-ties break the same way and the codes are the same.
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(1)[1].reshape(B, T)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` codes -> ``(B, hidden, T)``."""
        return self.out_project(self.codebook(codes).transpose(1, 2))


class ResidualQuantizer(nn.Module):
    """A stack of factorised quantizers over the residual (the released codec has one)."""

    def __init__(self, input_dim: int, num_quantizers: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(
            FactorizedVectorQuantizer(input_dim, codebook_size, codebook_dim) for _ in range(num_quantizers)
        )

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, hidden, T)`` -> ``(n_q, B, T)``."""
        out, residual = [], z
        for q in self.quantizers:
            c = q.codes(residual)
            out.append(c)
            if len(out) < len(self.quantizers):
                residual = residual - q.embed(c)
        return torch.stack(out)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """``(n_q, B, T)`` -> ``(B, hidden, T)``: the sum of each quantizer's embedding."""
        return sum(q.embed(codes[i]) for i, q in enumerate(self.quantizers))


class SemanticCodec(nn.Module):
    """The MaskGCT semantic codec (RepCodec): ``encoder``, ``decoder``, ``quantizer``."""

    def __init__(self, cfg: SemanticCodecConfig = SemanticCodecConfig()) -> None:
        super().__init__()
        self.cfg = cfg

        def backbone() -> nn.Sequential:
            return nn.Sequential(
                VocosBackbone(cfg.hidden_size, cfg.vocos_dim, cfg.vocos_intermediate_dim, cfg.vocos_num_layers),
                nn.Linear(cfg.vocos_dim, cfg.hidden_size),
            )

        self.encoder = backbone()
        self.decoder = backbone()
        self.quantizer = ResidualQuantizer(cfg.hidden_size, cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim)

    @staticmethod
    def _keep(lengths: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
        if lengths is None:
            return None
        keep = torch.arange(T, device=device)[None, :] < lengths.to(device)[:, None]
        return keep[:, None, :]  # (B, 1, T) bool

    @torch.inference_mode()
    def quantize(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of normalised w2v-BERT features.

        Args:
            features: ``(B, T, hidden)`` float32 (:func:`indextts.audio.w2v_bert.W2VBert` output).
            lengths: ``(B,)`` valid frames per row of a padded batch; None when no row is padded.

        Returns:
            ``(n_q, B, T)`` int64 codes (``n_q = 1`` for the released codec). Row ``b`` equals the
            codes of ``features[b, :lengths[b]]`` quantized alone, in its first ``lengths[b]``
            frames; the frames after those are padding's codes.
        """
        x = features.transpose(1, 2)  # (B, hidden, T)
        keep = self._keep(lengths, x.shape[-1], x.device)
        vocos, proj = self.encoder[0], self.encoder[1]
        z = proj(vocos(x, keep)).transpose(1, 2)  # (B, hidden, T)
        return self.quantizer.codes(z)

    @torch.inference_mode()
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """The features IndexTTS2's s2mel stage reads for codes (its ``quantizer.vq2emb``).

        Args:
            codes: ``(B, T)`` or ``(n_q, B, T)`` integer codes.

        Returns:
            ``(B, T, hidden)`` float32.
        """
        if codes.ndim == 2:
            codes = codes[None]
        return self.quantizer.embed(codes.long()).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Loading and the random codecs of tests and benchmarks


def _check_state_dict(source: str, model: SemanticCodec, state: Mapping[str, torch.Tensor]) -> None:
    from indextts.audio.dac import state_dict_problems

    problems = state_dict_problems(model, dict(state))
    if problems:
        lines = [f"{source}: the weights do not match the semantic codec architecture their shapes describe ({model.cfg})"]
        lines += problems
        lines.append("The file is truncated or not the MaskGCT semantic codec; download semantic_codec/model.safetensors again.")
        raise SemanticCodecLoadError("\n  ".join(lines))


def load_semantic_codec(path: str | Path, device: torch.device | str = "cpu") -> SemanticCodec:
    """Load a semantic codec from a safetensors file, checking every key and shape.

    Args:
        path: ``semantic_codec/model.safetensors`` (or a file written by :func:`make_random_semantic_codec`).
        device: where the model goes.

    Returns:
        The codec in eval mode, fp32, without gradients.

    Raises:
        SemanticCodecLoadError: missing or unreadable file, not a semantic codec, or any
            missing, unexpected or mis-shaped key.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SemanticCodecLoadError(
            f"{path}: semantic codec weights not found. Set codec.weights to semantic_codec/model.safetensors "
            "of the amphion/MaskGCT release (the file IndexTTS2 downloads), downloaded by hand."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SemanticCodecLoadError(f"{path}: not a readable safetensors file ({e}); semantic codec weights must be safetensors") from e
    cfg = SemanticCodecConfig.from_state_dict(state, str(path))
    if cfg.codebook_size > 32768:
        raise SemanticCodecLoadError(f"{path}: codebook_size {cfg.codebook_size} does not fit the int16 codes format")
    with torch.device("meta"):
        model = SemanticCodec(cfg)
    _check_state_dict(str(path), model, state)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if cfg != SemanticCodecConfig():
        print(f"{path}: semantic codec of non-released sizes {cfg}", file=sys.stderr)
    return model.eval().requires_grad_(False).to(device)


def make_random_semantic_codec(output: str | Path, cfg: SemanticCodecConfig = SemanticCodecConfig(), seed: int = 0) -> Path:
    """Write a randomly initialised semantic codec as safetensors (tests and benchmarks).

    Linear and conv weights are drawn as in Amphion's init (truncated normal, std 0.02); the
    codebook is a standard normal. The same ``cfg`` and ``seed`` give the same bytes.
    """
    from safetensors.torch import save_file

    from indextts.files import atomic_path

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SemanticCodec(cfg)
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(output) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return Path(output)


# --------------------------------------------------------------------------------------------
# w2v-BERT + codec: what extract_codes runs for codec.kind semantic


class SemanticEncoder:
    """Audio -> semantic codes (and the normalised features they came from), batched.

    :attr:`prepare` turns 16 kHz waveforms into padded fbank inputs on the CPU (picklable, so
    DataLoader workers run it); :meth:`encode` runs w2v-BERT and the codec on the device.
    """

    def __init__(self, w2v, codec: SemanticCodec, info) -> None:
        self.w2v = w2v
        self.codec = codec
        self.info = info
        self.prepare = w2v.inputs

    @torch.inference_mode()
    def encode(self, batch: Mapping[str, "np.ndarray | torch.Tensor"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and features of a batch from :attr:`prepare`.

        Returns:
            ``codes (B, n_q, F)`` int64 and ``features (B, F, dim)`` float32, on the device; row
            ``b`` is valid for its first ``batch["frames"][b]`` frames.
        """
        from indextts.audio.dac import exact_fp32

        device = self.w2v.device
        as_tensor = lambda a: torch.as_tensor(a).to(device, non_blocking=True)  # noqa: E731
        inputs = batch["input_features"]
        # Padded rows get the masking that makes them equal to quantizing the row alone.
        padded = int(min(batch["frames"])) < inputs.shape[1]
        with exact_fp32():
            feats = self.w2v(as_tensor(inputs), as_tensor(batch["attention_mask"]))
            codes = self.codec.quantize(feats, as_tensor(batch["frames"]) if padded else None)  # (n_q, B, F)
        return codes.transpose(0, 1), feats


def load_semantic_encoder(codec_cfg, device: torch.device | str = "cpu") -> SemanticEncoder:
    """w2v-BERT 2.0 and the semantic codec named in the ``codec`` section, checked against each other.

    Args:
        codec_cfg: :class:`indextts.codes.CodecConfig` with ``kind="semantic"``.
        device: where both models run.

    Returns:
        A :class:`SemanticEncoder` whose ``info`` (:class:`indextts.audio.dac.CodecInfo`) records the
        kind, 16 kHz, hop 320 (50 frames/s), one codebook of ``codebook_size``, the codec's sha256
        and, in ``extra``, the w2v-BERT folder and stats sha256, the layer and the dtype.

    Raises:
        SemanticCodecLoadError, indextts.audio.w2v_bert.W2VBertLoadError: a file cannot be used.
    """
    from indextts.audio.dac import CodecInfo
    from indextts.audio.w2v_bert import W2V_BERT_HOP, W2V_BERT_SAMPLE_RATE, W2VBert, w2v_bert_identity
    from indextts.files import sha256_file

    device = torch.device(device)
    codec = load_semantic_codec(codec_cfg.weights, device)
    w2v = W2VBert.load(codec_cfg.w2v_bert, codec_cfg.w2v_bert_stats, layer=codec_cfg.w2v_bert_layer, device=device,
                       dtype=codec_cfg.w2v_bert_dtype)
    if w2v.dim != codec.cfg.hidden_size:
        raise SemanticCodecLoadError(
            f"{codec_cfg.weights}: the codec reads {codec.cfg.hidden_size}-dim features, but {codec_cfg.w2v_bert} gives "
            f"{w2v.dim}; codec.weights and codec.w2v_bert are not a pair"
        )
    info = CodecInfo(
        sample_rate=W2V_BERT_SAMPLE_RATE,
        hop_length=W2V_BERT_HOP,
        n_q=codec.cfg.num_quantizers,
        codebook_size=codec.cfg.codebook_size,
        weights_sha256=sha256_file(codec_cfg.weights),
        kind="semantic",
        extra=(
            ("w2v_bert_sha256", w2v_bert_identity(codec_cfg.w2v_bert)),
            ("w2v_bert_stats_sha256", sha256_file(codec_cfg.w2v_bert_stats)),
            ("w2v_bert_layer", int(codec_cfg.w2v_bert_layer)),
            ("w2v_bert_dtype", codec_cfg.w2v_bert_dtype),
            ("feature_dim", int(w2v.dim)),
        ),
    )
    return SemanticEncoder(w2v, codec, info)


# A tiny w2v-BERT (32 wide, 3 layers, features from layer 2) and a tiny semantic codec over it
# (64 codes of 4 dims): every code path of the released pair, in milliseconds on a CPU.
TINY_W2V_BERT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
                 "conv_depthwise_kernel_size": 5, "left_max_position_embeddings": 16, "right_max_position_embeddings": 4}
TINY_W2V_BERT_LAYER = 2
TINY_CODEC = SemanticCodecConfig(codebook_size=64, hidden_size=32, codebook_dim=4, vocos_dim=16,
                                 vocos_intermediate_dim=32, vocos_num_layers=2)


def make_tiny_semantic(root: str | Path, *, seed: int = 0) -> dict:
    """A random tiny w2v-BERT folder (``save_pretrained``), its statistics and a random tiny
    semantic codec (safetensors) under ``root``, for tests, benchmarks and a semantic demo.

    Returns:
        The ``codec`` config section for them (``kind: semantic``, ``device: cpu``).
    """
    from indextts.audio.w2v_bert import make_random_w2v_bert

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    make_random_w2v_bert(root / "w2v-bert", seed=seed, stats_path=root / "wav2vec2bert_stats.pt", **TINY_W2V_BERT)
    make_random_semantic_codec(root / "semantic_codec.safetensors", TINY_CODEC, seed=seed)
    return {"kind": "semantic", "weights": str(root / "semantic_codec.safetensors"), "w2v_bert": str(root / "w2v-bert"),
            "w2v_bert_stats": str(root / "wav2vec2bert_stats.pt"), "w2v_bert_layer": TINY_W2V_BERT_LAYER, "device": "cpu"}
