"""CAM++, the speaker model whose 192-dim embedding is IndexTTS2's s2mel ``style`` vector.

IndexTTS2 loads 3D-Speaker's CAM++ (``funasr/campplus``, ``campplus_cn_common.bin``) as
``CAMPPlus(feat_dim=80, embedding_size=192)`` and feeds it the 80-bin Kaldi fbank of the 16 kHz
prompt, mean-subtracted over time (:func:`campplus_fbank`); the raw embedding, not L2-normalised,
is the style (:func:`style_vector`).

The network (shapes for the released sizes; B batch, T fbank frames):

- ``head`` (FCM): the fbank as a one-channel image ``(B, 1, 80, T)``; Conv2d + BN + ReLU, two
  stages of two residual blocks whose first block strides 2 in frequency only, and a last
  frequency-strided Conv2d: ``(B, 32, 10, T)`` read as ``(B, 320, T)``.
- ``xvector``: a TDNN layer (kernel 5, **stride 2** in time) to 128 channels; three densely
  connected blocks of CAM layers (12, 24, 16 layers, each adding 32 channels) with a halving
  1x1 transition after each; BN + ReLU; mean and unbiased std over time (1024); a 1x1 conv to 192
  and a BatchNorm without affine.
- A CAM layer is a local conv times a sigmoid gate computed from the utterance mean plus the mean
  of the 100-frame segment the frame falls in.

Parameter names and order are those of the released file (``tests/data/campplus_state_dict.tsv``),
so loading needs no renaming; :func:`load_campplus` checks every key and shape. Inference only:
BatchNorm uses its running statistics, so the model must be in eval mode (the loader sets it).
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

# The fbank IndexTTS2 computes (infer_v2.py L345-350): 80 mel bins at 16 kHz, no dither; every
# other option is torchaudio's Kaldi default (25 ms povey window, 10 ms shift, pre-emphasis 0.97).
CAMPPLUS_SAMPLE_RATE = 16000
CAMPPLUS_MEL_BINS = 80
_FBANK_WINDOW, _FBANK_SHIFT = 400, 160
# The statistics pooling takes an unbiased std over time after the stride-2 TDNN: it needs two
# frames there, so three fbank frames, so this many samples.
CAMPPLUS_MIN_SAMPLES = _FBANK_WINDOW + 2 * _FBANK_SHIFT


@dataclass(frozen=True)
class CampplusConfig:
    """Sizes of a CAM++ model. The defaults are the released ``campplus_cn_common.bin`` as IndexTTS2
    builds it (3D-Speaker's CAM++ with a 192-dim embedding)."""

    # Kaldi fbank bins in; the head halves frequency once per stage and once more, so a multiple of 8.
    feat_dim: int = 80
    # The style vector's width: s2mel's ``style_encoder.dim``.
    embedding_size: int = 192
    # Channels each CAM layer adds to its dense block.
    growth_rate: int = 32
    # A CAM layer's bottleneck is bn_size * growth_rate channels.
    bn_size: int = 4
    # Channels out of the TDNN layer, into the first dense block.
    init_channels: int = 128
    # Width of the 2-D convolutional head (FCM) and its residual blocks per stage.
    head_channels: int = 32
    head_blocks: tuple[int, ...] = (2, 2)
    # Layers, kernel and dilation of each CAM dense block. The file records the first two, not the
    # dilations.
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    # Frames per segment of the CAM gate's segment average.
    segment_frames: int = 100

    def __post_init__(self) -> None:
        if self.feat_dim % 2 ** (len(self.head_blocks) + 1):
            raise ValueError(f"CampplusConfig.feat_dim {self.feat_dim}: the head halves frequency {len(self.head_blocks) + 1} "
                             "times; use a multiple of that power of two")
        if not len(self.block_layers) == len(self.block_kernels) == len(self.block_dilations):
            raise ValueError("CampplusConfig: block_layers, block_kernels and block_dilations must have one entry per block")
        if any(k % 2 == 0 for k in self.block_kernels):
            raise ValueError(f"CampplusConfig.block_kernels {self.block_kernels}: odd kernels only (same padding)")

    @classmethod
    def tiny(cls) -> "CampplusConfig":
        """About nine thousand parameters and every code path of the released model (residual
        shortcuts, three dense blocks with dilation, segment gate, statistics pooling). The
        embedding stays 192 wide so it can stand in for the released style vector, and the segment
        length stays the released one (the file does not record it), so audio over 2 s has two."""
        return cls(growth_rate=4, bn_size=2, init_channels=8, head_channels=4, head_blocks=(2, 1), block_layers=(2, 3, 2))

    @staticmethod
    def from_state_dict(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> "CampplusConfig":
        """The sizes a CAM++ state dict was saved with, read off its shapes. Dilations and the
        segment length are not in the file; they are the released ones.

        Raises:
            CampplusLoadError: the tensors that give the sizes are missing or of odd ranks.
        """
        need = ("head.conv1.weight", "xvector.tdnn.linear.weight", "xvector.block1.tdnnd1.cam_layer.linear_local.weight",
                "xvector.block1.tdnnd1.linear1.weight", "xvector.dense.linear.weight")
        missing = [k for k in need if k not in state]
        if missing:
            raise CampplusLoadError(
                f"{source}: not a CAM++ state dict (no {', '.join(missing)}); the speaker model must be "
                "campplus_cn_common.bin of funasr/campplus (the file IndexTTS2 loads)"
            )
        head, tdnn = state["head.conv1.weight"], state["xvector.tdnn.linear.weight"]  # (C, 1, 3, 3), (init, C*F/8, 5)
        local = state["xvector.block1.tdnnd1.cam_layer.linear_local.weight"]  # (growth, bottleneck, k)
        bottleneck = state["xvector.block1.tdnnd1.linear1.weight"]  # (bn_size * growth, in, 1)
        dense = state["xvector.dense.linear.weight"]  # (embedding, 2*C, 1)
        if head.ndim != 4 or tdnn.ndim != 3 or local.ndim != 3 or bottleneck.ndim != 3 or dense.ndim != 3:
            raise CampplusLoadError(f"{source}: unexpected tensor ranks for CAM++")

        def count(pattern: str) -> int:
            return len({m.group(1) for k in state if (m := re.match(pattern, k))})

        stages = count(r"^head\.layer(\d+)\.")
        blocks = count(r"^xvector\.block(\d+)\.")
        growth = int(local.shape[0])
        return CampplusConfig(
            feat_dim=2 ** (stages + 1) * int(tdnn.shape[1]) // int(head.shape[0]),
            embedding_size=int(dense.shape[0]),
            growth_rate=growth,
            bn_size=int(bottleneck.shape[0]) // growth,
            init_channels=int(tdnn.shape[0]),
            head_channels=int(head.shape[0]),
            head_blocks=tuple(count(rf"^head\.layer{s + 1}\.(\d+)\.") for s in range(stages)),
            block_layers=tuple(count(rf"^xvector\.block{b + 1}\.tdnnd(\d+)\.") for b in range(blocks)),
            block_kernels=tuple(int(state[f"xvector.block{b + 1}.tdnnd1.cam_layer.linear_local.weight"].shape[-1])
                                for b in range(blocks)),
            # Not in the file: the released pattern, 1 for the first block and 2 after it.
            block_dilations=(1,) + (2,) * (blocks - 1),
        )


class CampplusLoadError(ValueError):
    """A CAM++ file cannot be used; the message names the file, the key and what to do."""


# --------------------------------------------------------------------------------------------
# Modules (names as in the released file)


def _bn_relu(channels: int) -> nn.Sequential:
    # 3D-Speaker's "batchnorm-relu" config string: the names are the released file's.
    return nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(channels), relu=nn.ReLU(inplace=True)))


class BasicResBlock(nn.Module):
    """Two 3x3 Conv2d + BN with a residual; ``stride`` applies to frequency only."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class FCM(nn.Module):
    """The 2-D head: ``(B, F, T)`` fbank -> ``(B, C * F/8, T)``."""

    def __init__(self, cfg: CampplusConfig) -> None:
        super().__init__()
        c = cfg.head_channels
        self.conv1 = nn.Conv2d(1, c, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        for s, n in enumerate(cfg.head_blocks):
            # The first block of each stage halves frequency.
            self.add_module(f"layer{s + 1}", nn.Sequential(*(BasicResBlock(c, c, 2 if i == 0 else 1) for i in range(n))))
        self.conv2 = nn.Conv2d(c, c, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.stages = len(cfg.head_blocks)
        self.out_channels = c * (cfg.feat_dim // 2 ** (self.stages + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))  # (B, C, F, T)
        for s in range(self.stages):
            out = getattr(self, f"layer{s + 1}")(out)
        out = F.relu(self.bn2(self.conv2(out)))  # (B, C, F/8, T)
        B, C, Fq, T = out.shape
        return out.reshape(B, C * Fq, T)


class TDNNLayer(nn.Module):
    """Conv1d (no bias) + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False)
        self.nonlinear = _bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Context-aware masking: a local conv gated by the utterance mean plus the segment mean."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int, segment_frames: int) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2 * dilation,
                                      dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)
        self.segment_frames = segment_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_local(x)
        context = x.mean(-1, keepdim=True) + self.segment_mean(x)
        gate = torch.sigmoid(self.linear2(self.relu(self.linear1(context))))
        return y * gate

    def segment_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Each frame gets the mean of its ``segment_frames`` segment; the last segment may be
        shorter (``ceil_mode`` averages only the frames it has)."""
        n = self.segment_frames
        seg = F.avg_pool1d(x, kernel_size=n, stride=n, ceil_mode=True)  # (B, C, ceil(T/n))
        return seg.repeat_interleave(n, dim=-1)[..., : x.shape[-1]]


class CAMDenseTDNNLayer(nn.Module):
    """BN-ReLU, 1x1 bottleneck, BN-ReLU, CAM layer: ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int, dilation: int,
                 segment_frames: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _bn_relu(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, out_channels, kernel_size, dilation, segment_frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleList):
    """Dense block: each layer sees the concatenation of the input and all earlier layers' outputs."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_channels: int, kernel_size: int, dilation: int,
                 segment_frames: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(in_channels + i * growth, growth, bn_channels, kernel_size,
                                                               dilation, segment_frames))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    """BN-ReLU then a 1x1 conv (no bias): halves the channels between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    """``(B, C, T)`` -> ``(B, 2C)``: mean and unbiased std over time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class DenseLayer(nn.Module):
    """The embedding: a 1x1 conv (no bias) and a BatchNorm without affine, on ``(B, C)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(out_channels, affine=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """CAM++: ``(B, T, feat_dim)`` mean-subtracted fbank -> ``(B, embedding_size)`` speaker embedding."""

    def __init__(self, cfg: CampplusConfig = CampplusConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = FCM(cfg)
        channels = self.head.out_channels
        self.xvector = nn.Sequential(OrderedDict(tdnn=TDNNLayer(channels, cfg.init_channels, 5, stride=2)))
        channels = cfg.init_channels
        for i, (n, k, d) in enumerate(zip(cfg.block_layers, cfg.block_kernels, cfg.block_dilations)):
            block = CAMDenseTDNNBlock(n, channels, cfg.growth_rate, cfg.bn_size * cfg.growth_rate, k, d, cfg.segment_frames)
            self.xvector.add_module(f"block{i + 1}", block)
            channels += n * cfg.growth_rate
            self.xvector.add_module(f"transit{i + 1}", TransitLayer(channels, channels // 2))
            channels //= 2
        self.xvector.add_module("out_nonlinear", _bn_relu(channels))
        self.xvector.add_module("stats", StatsPool())
        self.xvector.add_module("dense", DenseLayer(2 * channels, cfg.embedding_size))
        # 3D-Speaker's init: Kaiming normal for the 1-D convs, zero biases (the 2-D head keeps
        # PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """``(B, T, feat_dim)`` -> ``(B, embedding_size)``; T >= 3 (see :data:`CAMPPLUS_MIN_SAMPLES`)."""
        x = self.head(fbank.permute(0, 2, 1))  # (B, C*F/8, T)
        return self.xvector(x)


# --------------------------------------------------------------------------------------------
# Features and the style vector


def campplus_fbank(audio_16k: torch.Tensor) -> torch.Tensor:
    """CAM++'s input as IndexTTS2 computes it: the Kaldi fbank of a float waveform, minus its mean over time.

    ``torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80, dither=0, sample_frequency=16000)``
    (all other options Kaldi's defaults), then ``feat - feat.mean(dim=0)`` per utterance.

    Args:
        audio_16k: ``(N,)`` or ``(B, N)`` float waveform at 16 kHz in [-1, 1] (not int16-scaled).

    Returns:
        ``(T, 80)`` or ``(B, T, 80)`` float32, ``T = 1 + (N - 400) // 160``.

    Raises:
        ValueError: a waveform of more than two dimensions, or shorter than one 25 ms window.
    """
    from torchaudio.compliance import kaldi

    if audio_16k.ndim not in (1, 2):
        raise ValueError(f"campplus_fbank: audio must be (N,) or (B, N), got shape {tuple(audio_16k.shape)}")
    if audio_16k.shape[-1] < _FBANK_WINDOW:
        raise ValueError(f"campplus_fbank: {audio_16k.shape[-1]} samples is shorter than one fbank window "
                         f"({_FBANK_WINDOW} at 16 kHz)")
    rows = audio_16k.float().reshape(-1, audio_16k.shape[-1])
    feats = []
    for row in rows:  # kaldi.fbank reads one channel of its input
        feat = kaldi.fbank(row.unsqueeze(0), num_mel_bins=CAMPPLUS_MEL_BINS, dither=0, sample_frequency=CAMPPLUS_SAMPLE_RATE)
        feats.append(feat - feat.mean(dim=0, keepdim=True))
    out = torch.stack(feats)
    return out[0] if audio_16k.ndim == 1 else out


def style_vector(model: CAMPPlus, audio_16k: torch.Tensor) -> torch.Tensor:
    """The s2mel style of a prompt: CAM++ on :func:`campplus_fbank`, in fp32 without gradients.

    Args:
        model: a CAM++ in eval mode (as :func:`load_campplus` returns it).
        audio_16k: ``(N,)`` or ``(B, N)`` float waveform at 16 kHz in [-1, 1]; rows of a batch
            have one length, and each row's result equals that row run alone.

    Returns:
        ``(B, embedding_size)`` float32 on the model's device (``B = 1`` for a 1-D waveform), the
        raw embedding (IndexTTS2 does not normalise it).

    Raises:
        ValueError: the model is in training mode (BatchNorm would use batch statistics), or the
            audio is shorter than :data:`CAMPPLUS_MIN_SAMPLES`.
    """
    if model.training:
        raise ValueError("style_vector: the CAM++ model is in training mode (BatchNorm would use batch statistics); "
                         "call model.eval() (load_campplus returns it in eval mode)")
    if audio_16k.shape[-1] < CAMPPLUS_MIN_SAMPLES:
        raise ValueError(f"style_vector: {audio_16k.shape[-1]} samples at 16 kHz is too short for CAM++ "
                         f"(at least {CAMPPLUS_MIN_SAMPLES}, {CAMPPLUS_MIN_SAMPLES / CAMPPLUS_SAMPLE_RATE * 1000:.0f} ms)")
    from indextts.audio.dac import exact_fp32

    feats = campplus_fbank(audio_16k)
    if feats.ndim == 2:
        feats = feats.unsqueeze(0)
    device = next(model.parameters()).device
    with torch.no_grad(), exact_fp32():
        return model(feats.to(device, torch.float32))


# --------------------------------------------------------------------------------------------
# Loading and the random models of tests and benchmarks


def _few(items: list[str]) -> str:
    return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")




def load_campplus(path: str | Path, cfg: CampplusConfig | None = None,
                  device: torch.device | str = "cpu") -> tuple[CAMPPlus, list[str]]:
    """Load CAM++ weights strictly (``campplus_cn_common.bin`` or :func:`make_random_campplus`'s file).

    Read with ``torch.load(weights_only=True)``; a leading ``module.`` is stripped. Every tensor of
    the model must be in the file with its shape, except BatchNorm's ``num_batches_tracked``
    counters (unused in eval; set to 0 when absent, as ``load_state_dict`` does).

    Args:
        path: a plain state dict file.
        cfg: the sizes; None reads them off the file's shapes (:meth:`CampplusConfig.from_state_dict`).
        device: where the model goes.

    Returns:
        ``(model, report)``: the model in eval mode, fp32, without gradients; ``report`` has one
        line per thing the load did not take as is (entries the model does not use, absent counters,
        a non-released size, a stripped prefix) for the caller to log; nothing in it changes the
        model's output.

    Raises:
        CampplusLoadError: missing or unreadable file, or a tensor missing or of another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise CampplusLoadError(
            f"{path}: CAM++ weights not found. Download campplus_cn_common.bin of funasr/campplus (the speaker "
            "model IndexTTS2 loads) by hand and point to it."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CampplusLoadError(f"{path}: not a readable torch state dict ({e}); re-download campplus_cn_common.bin") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CampplusLoadError(f"{path}: not a state dict of tensors; the CAM++ file is a plain state dict "
                                "(campplus_cn_common.bin of funasr/campplus)")
    report = []
    if any(k.startswith("module.") for k in state):
        # Saved from DataParallel/DDP; upstream strips the prefix too.
        state = {k.removeprefix("module."): v for k, v in state.items()}
        report.append(f"{path}: keys carry a 'module.' prefix; stripped")
    if cfg is None:
        cfg = CampplusConfig.from_state_dict(state, str(path))
    with torch.device("meta"):
        model = CAMPPlus(cfg)
    want = model.state_dict()
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(want[k].shape)}"
              for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or shapes:
        lines = [f"{path}: the weights do not fit CAM++ of sizes {cfg}"]
        if missing:
            lines.append(f"missing keys: {_few(missing)}")
        if shapes:
            lines.append(f"shape mismatches: {_few(shapes)}")
        lines.append("The file is truncated or not campplus_cn_common.bin of funasr/campplus (re-download it), "
                     "or its sizes are not the ones given (pass cfg=None to read them off the file).")
        raise CampplusLoadError("\n  ".join(lines))
    counters = [k for k in want if k.endswith("num_batches_tracked") and k not in state]
    if counters:
        report.append(f"{path}: {len(counters)} BatchNorm num_batches_tracked counters absent (unused in eval); set to 0")
    unused = sorted(set(state) - set(want))
    if unused:
        report.append(f"{path}: {len(unused)} entries not used by CAM++: {_few(unused)}")
    if cfg != CampplusConfig():
        report.append(f"{path}: CAM++ of non-released sizes {cfg}")

    tensors = {}
    for k, like in want.items():
        if k not in state:  # an absent counter
            tensors[k] = torch.zeros((), dtype=like.dtype)
        else:
            tensors[k] = state[k].float() if like.is_floating_point() else state[k].to(like.dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False).to(device), report


def make_random_campplus(path: str | Path, cfg: CampplusConfig = CampplusConfig(), seed: int = 0) -> Path:
    """Write a randomly initialised CAM++ as a plain state dict, the released file's layout (tests
    and benchmarks).

    Weights follow 3D-Speaker's init; BatchNorm affine parameters and running statistics are drawn
    too, so a model that ignored them would give other outputs. The same ``cfg`` and ``seed`` give
    the same bytes.
    """
    from indextts.files import atomic_path

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CAMPPlus(cfg)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    if m.affine:
                        m.weight.uniform_(0.8, 1.2)
                        m.bias.normal_(0.0, 0.1)
    state = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # through a file object the archive is named "archive", not the temporary name
    return Path(path)
