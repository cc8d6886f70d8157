"""BigVGAN v2, the vocoder IndexTTS2 runs on s2mel's mel spectrograms (22.05 kHz, 80 bands, hop 256).

IndexTTS2 loads ``nvidia/bigvgan_v2_22khz_80band_256x`` (a folder with ``config.json`` and
``bigvgan_generator.pt``, the latter ``{"generator": state_dict}``), removes weight norm and runs it
in fp32 on ``(B, 80, T)`` log-mel frames; the output ends in a clamp to [-1, 1]. This module builds
the same generator from ``config.json`` and loads the file strictly (:func:`load_bigvgan`).

The generator (NVIDIA's BigVGAN v2 with ``resblock "1"``):

- ``conv_pre``: Conv1d(num_mels, C, 7);
- per upsampling stage i: a ConvTranspose1d to C / 2^(i+1) channels by ``upsample_rates[i]``, then
  one AMP block per ``resblock_kernel_sizes`` entry, their outputs averaged;
- an AMP block: for each dilation d, ``x += conv2(act(conv1_d(act(x))))``, where ``act`` is
  anti-aliased Snake/SnakeBeta: x2 upsampling by a 12-tap Kaiser-windowed sinc (replicate
  padding), the activation, then the same low-pass filter and x2 decimation;
- ``activation_post`` (anti-aliased), ``conv_post`` Conv1d(ch, 1, 7), then clamp or tanh.

Every conv is stored the way PyTorch's old ``weight_norm`` stores it (``weight_g``, the norm over all
dims but 0, and ``weight_v``); :meth:`BigVGAN.remove_weight_norm` fuses them into ``weight`` with the
same op that wrapper uses, so outputs match the upstream model after its own ``remove_weight_norm``.
Names and order are the released file's (``tests/data/bigvgan_22khz_80band_state_dict.tsv``).

Why not the PyPI ``bigvgan`` package: it declares training-only dependencies (auraloss, nnAudio,
pesq, ninja), imports matplotlib and librosa on import, and its ``from_pretrained`` fails with
huggingface_hub >= 1.0; the generator itself is what is below.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_FILE = "config.json"
GENERATOR_FILE = "bigvgan_generator.pt"

# config.json of nvidia/bigvgan_v2_22khz_80band_256x (as IndexTTS2 vendors it,
# indextts/s2mel/modules/bigvgan/config.json at b6fe850). Only the generator and audio keys are
# read here; the rest (training, discriminators) is kept so a written folder has the released keys.
RELEASED_BIGVGAN_CONFIG: dict[str, Any] = {
    "resblock": "1", "num_gpus": 0, "batch_size": 32, "learning_rate": 0.0001, "adam_b1": 0.8, "adam_b2": 0.99,
    "lr_decay": 0.9999996, "seed": 1234,
    "upsample_rates": [4, 4, 2, 2, 2, 2], "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4], "upsample_initial_channel": 1536,
    "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "use_tanh_at_final": False, "use_bias_at_final": False, "activation": "snakebeta", "snake_logscale": True,
    "use_cqtd_instead_of_mrd": True, "cqtd_filters": 128, "cqtd_max_filters": 1024, "cqtd_filters_scale": 1,
    "cqtd_dilations": [1, 2, 4], "cqtd_hop_lengths": [512, 256, 256], "cqtd_n_octaves": [9, 9, 9],
    "cqtd_bins_per_octaves": [24, 36, 48], "mpd_reshapes": [2, 3, 5, 7, 11], "use_spectral_norm": False,
    "discriminator_channel_mult": 1, "use_multiscale_melloss": True, "lambda_melloss": 15, "clip_grad_norm": 500,
    "segment_size": 65536, "num_mels": 80, "num_freq": 1025, "n_fft": 1024, "hop_size": 256, "win_size": 1024,
    "sampling_rate": 22050, "fmin": 0, "fmax": None, "fmax_for_loss": None, "normalize_volume": True, "num_workers": 4,
    "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54321", "world_size": 1},
}


class BigVGANLoadError(ValueError):
    """A BigVGAN folder cannot be used; the message names the file, the key and what to do."""


@dataclass(frozen=True)
class BigVGANConfig:
    """The generator keys of a BigVGAN ``config.json`` (defaults: the released 22 kHz 80-band model)."""

    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"
    # alpha (and beta) are stored as logs and exponentiated in the forward.
    snake_logscale: bool = True
    # The released model clamps its output and has no bias on conv_post; BigVGAN's code defaults
    # (for v1 configs, which lack these keys) are tanh and a bias.
    use_tanh_at_final: bool = False
    use_bias_at_final: bool = False
    sampling_rate: int = 22050
    hop_size: int = 256

    @staticmethod
    def from_dict(config: Mapping[str, Any], source: str = "<config>") -> "BigVGANConfig":
        """The generator settings of a ``config.json`` dict.

        Raises:
            BigVGANLoadError: a generator key is missing or of the wrong type, an AMP block other
                than ``"1"`` or an unknown activation, or upsampling rates whose product is not
                ``hop_size``.
        """
        need = ("resblock", "num_mels", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                "resblock_kernel_sizes", "resblock_dilation_sizes", "activation", "snake_logscale", "sampling_rate", "hop_size")
        missing = [k for k in need if k not in config]
        if missing:
            raise BigVGANLoadError(f"{source}: BigVGAN config lacks {', '.join(missing)}; use the config.json that came "
                                   "with bigvgan_generator.pt (nvidia/bigvgan_v2_22khz_80band_256x)")
        if str(config["resblock"]) != "1":
            raise BigVGANLoadError(f"{source}: resblock {config['resblock']!r} is not supported (only \"1\", AMPBlock1, which "
                                   "the released 22 kHz model uses)")
        if config["activation"] not in ("snake", "snakebeta"):
            raise BigVGANLoadError(f"{source}: activation {config['activation']!r} is not 'snake' or 'snakebeta'")
        try:
            cfg = BigVGANConfig(
                num_mels=int(config["num_mels"]),
                upsample_rates=tuple(int(u) for u in config["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(k) for k in config["upsample_kernel_sizes"]),
                upsample_initial_channel=int(config["upsample_initial_channel"]),
                resblock_kernel_sizes=tuple(int(k) for k in config["resblock_kernel_sizes"]),
                resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in config["resblock_dilation_sizes"]),
                activation=str(config["activation"]),
                snake_logscale=bool(config["snake_logscale"]),
                use_tanh_at_final=bool(config.get("use_tanh_at_final", True)),
                use_bias_at_final=bool(config.get("use_bias_at_final", True)),
                sampling_rate=int(config["sampling_rate"]),
                hop_size=int(config["hop_size"]),
            )
        except (TypeError, ValueError) as e:
            raise BigVGANLoadError(f"{source}: a BigVGAN generator key has the wrong type ({e})") from e
        if (len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes)
                or len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes)):
            raise BigVGANLoadError(f"{source}: upsample_rates/upsample_kernel_sizes or resblock_kernel_sizes/"
                                   "resblock_dilation_sizes differ in length")
        if math.prod(cfg.upsample_rates) != cfg.hop_size:
            raise BigVGANLoadError(f"{source}: upsample_rates {list(cfg.upsample_rates)} multiply to "
                                   f"{math.prod(cfg.upsample_rates)}, not hop_size {cfg.hop_size}")
        return cfg


def tiny_bigvgan_config() -> dict[str, Any]:
    """A ``config.json`` dict with the released keys and audio settings (22050 Hz, 80 mels, hop 256)
    and a generator of about 50 thousand parameters: three upsampling stages (8 x 8 x 4 = 256) from 32
    channels, two AMP blocks per stage. Every code path of the released generator runs."""
    cfg = copy.deepcopy(RELEASED_BIGVGAN_CONFIG)
    cfg.update(upsample_rates=[8, 8, 4], upsample_kernel_sizes=[16, 16, 8], upsample_initial_channel=32,
               resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]])
    return cfg


# --------------------------------------------------------------------------------------------
# Weight-normed convolutions (the old torch.nn.utils.weight_norm layout, dim 0)


class _WeightNorm:
    """Mixin: ``weight`` stored as ``weight_g`` (norm over every dim but 0) and ``weight_v`` until
    :meth:`remove_weight_norm` fuses them. Registered after ``bias``, as the old wrapper does."""

    def _split_weight(self) -> None:
        w = self.weight
        del self.weight
        self.weight_g = nn.Parameter(torch.norm_except_dim(w, 2, 0).detach())
        self.weight_v = nn.Parameter(w.detach())

    def current_weight(self) -> torch.Tensor:
        if "weight_v" in self._parameters:
            # The op the old wrapper runs before every forward: v * (g / ||v||) along dim 0.
            return torch._weight_norm(self.weight_v, self.weight_g, 0)
        return self.weight

    def remove_weight_norm(self) -> None:
        """Replace ``weight_g``/``weight_v`` by the fused ``weight`` (no-op once fused)."""
        if "weight_v" not in self._parameters:
            return
        w = torch._weight_norm(self.weight_v, self.weight_g, 0).detach()
        del self.weight_g, self.weight_v
        self.weight = nn.Parameter(w)


class WNConv1d(_WeightNorm, nn.Conv1d):
    """``nn.Conv1d`` under weight norm; keys ``bias``, ``weight_g`` (out, 1, 1), ``weight_v``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.current_weight(), self.bias)


class WNConvTranspose1d(_WeightNorm, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` under weight norm; the weight is (in, out, k), so ``weight_g`` is per
    input channel (in, 1, 1)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.current_weight(), self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)


# --------------------------------------------------------------------------------------------
# Anti-aliased periodic activations


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A low-pass FIR ``(1, 1, kernel_size)``: a Kaiser-windowed sinc (Kaiser's beta for the
    transition width ``half_width``), normalised to sum 1 so DC passes unchanged."""
    half = kernel_size // 2
    # Kaiser's formula for the attenuation reachable with this many taps, and the beta for it.
    atten = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    # Taps sit at half-integer times for an even length, so the filter is symmetric about 0.
    t = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    taps /= taps.sum()
    return taps.view(1, 1, kernel_size)


class LowPassFilter1d(nn.Module):
    """Depthwise FIR low-pass with replicate padding, optionally strided (decimation)."""

    def __init__(self, cutoff: float, half_width: float, stride: int, kernel_size: int) -> None:
        super().__init__()
        even = kernel_size % 2 == 0
        self.pad_left, self.pad_right = kernel_size // 2 - int(even), kernel_size // 2
        self.stride = stride
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(C, -1, -1), stride=self.stride, groups=C)


class UpSample1d(nn.Module):
    """x``ratio`` upsampling: zero-stuffing and the Kaiser-sinc low-pass (a strided transposed
    conv times ``ratio``), replicate padding at the ends, trimmed to ``ratio * T`` samples."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.ratio = ratio
        self.pad = kernel_size // ratio - 1
        self.trim_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.trim_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.expand(C, -1, -1), stride=self.ratio, groups=C)
        return x[..., self.trim_left : -self.trim_right]


class DownSample1d(nn.Module):
    """x``ratio`` decimation after the Kaiser-sinc low-pass."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.lowpass = LowPassFilter1d(0.5 / ratio, 0.6 / ratio, ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """``x + 1/(beta + 1e-9) * sin(alpha x)^2`` per channel; with ``beta=False`` it is Snake
    (``1/alpha``). With ``logscale`` the stored parameters are logs (initialised to 0)."""

    def __init__(self, channels: int, logscale: bool, beta: bool = True) -> None:
        super().__init__()
        init = torch.zeros if logscale else torch.ones
        self.alpha = nn.Parameter(init(channels))
        if beta:
            self.beta = nn.Parameter(init(channels))
        self.logscale = logscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)  # (1, C, 1)
        beta = self.beta.unsqueeze(0).unsqueeze(-1) if "beta" in self._parameters else alpha
        if self.logscale:
            alpha, beta = torch.exp(alpha), torch.exp(beta)
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class Activation1d(nn.Module):
    """Anti-aliased activation: x2 upsample, activation, x2 low-pass decimation; ``(B, C, T)`` kept."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.upsample = UpSample1d(2, 12)
        self.downsample = DownSample1d(2, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class AMPBlock1(nn.Module):
    """For each dilation d: ``x += convs2[i](act(convs1[i](act(x))))`` (convs2 undilated)."""

    def __init__(self, cfg: BigVGANConfig, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations)
        self.activations = nn.ModuleList(
            Activation1d(SnakeBeta(channels, cfg.snake_logscale, beta=cfg.activation == "snakebeta"))
            for _ in range(2 * len(dilations))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations[::2], self.activations[1::2]):
            x = c2(a2(c1(a1(x)))) + x
        return x

    def remove_weight_norm(self) -> None:
        for conv in [*self.convs1, *self.convs2]:
            conv.remove_weight_norm()


class BigVGAN(nn.Module):
    """BigVGAN v2 generator: ``(B, num_mels, T)`` log-mel -> ``(B, 1, T * hop_size)`` in [-1, 1]."""

    def __init__(self, cfg: BigVGANConfig = BigVGANConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.upsample_initial_channel
        self.conv_pre = WNConv1d(cfg.num_mels, C, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ModuleList([WNConvTranspose1d(C // 2**i, C // 2 ** (i + 1), k, u, padding=(k - u) // 2)])
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            AMPBlock1(cfg, C // 2 ** (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        ch = C // 2 ** len(cfg.upsample_rates)
        self.activation_post = Activation1d(SnakeBeta(ch, cfg.snake_logscale, beta=cfg.activation == "snakebeta"))
        self.conv_post = WNConv1d(ch, 1, 7, 1, padding=3, bias=cfg.use_bias_at_final)

    @property
    def sample_rate(self) -> int:
        return self.cfg.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.cfg.hop_size

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        n = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            # The stage's AMP blocks see the same input; their outputs are averaged.
            xs = self.resblocks[i * n](x)
            for j in range(1, n):
                xs += self.resblocks[i * n + j](x)
            x = xs / n
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if self.cfg.use_tanh_at_final else torch.clamp(x, min=-1.0, max=1.0)

    def remove_weight_norm(self) -> "BigVGAN":
        """Fuse every conv's ``weight_g``/``weight_v`` into ``weight`` (IndexTTS2 does before inference)."""
        for m in self.modules():
            if isinstance(m, _WeightNorm):
                m.remove_weight_norm()
        return self


def vocode(model: BigVGAN, mel: torch.Tensor) -> torch.Tensor:
    """Waveforms of log-mel spectrograms, as IndexTTS2 runs the vocoder: fp32, no gradients.

    Args:
        model: a BigVGAN (:func:`load_bigvgan`).
        mel: ``(B, num_mels, T)`` natural-log mel frames (s2mel's output layout).

    Returns:
        ``(B, T * hop)`` float32 in [-1, 1] (the generator's final clamp) on the model's device.
        Each row equals that row vocoded alone.

    Raises:
        ValueError: ``mel`` is not ``(B, num_mels, T)``.
    """
    from indextts.audio.dac import exact_fp32

    if mel.ndim != 3 or mel.shape[1] != model.cfg.num_mels:
        raise ValueError(f"vocode: mel must be (B, {model.cfg.num_mels}, T), got shape {tuple(mel.shape)}")
    device = next(model.parameters()).device
    with torch.no_grad(), exact_fp32():
        return model(mel.to(device, torch.float32)).squeeze(1)


# --------------------------------------------------------------------------------------------
# Loading and the random vocoders of tests and benchmarks


def _few(items: list[str]) -> str:
    return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """config.json and the generator state dict of a BigVGAN folder, plus report lines."""
    config_path, weights_path = folder / CONFIG_FILE, folder / GENERATOR_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise BigVGANLoadError(f"{p}: not found. The vocoder folder must hold config.json and bigvgan_generator.pt of "
                                   "nvidia/bigvgan_v2_22khz_80band_256x, downloaded by hand.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BigVGANLoadError(f"{config_path}: not valid JSON ({e}); re-download config.json") from e
    if not isinstance(config, dict):
        raise BigVGANLoadError(f"{config_path}: not a JSON object; re-download config.json")
    try:
        ckpt = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise BigVGANLoadError(f"{weights_path}: not a readable torch file ({e}); re-download bigvgan_generator.pt") from e
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("generator"), Mapping):
        raise BigVGANLoadError(f"{weights_path}: no 'generator' state dict; bigvgan_generator.pt holds "
                               "{'generator': state_dict} (BigVGAN's own save layout)")
    report = []
    others = sorted(k for k in ckpt if k != "generator")
    if others:
        report.append(f"{weights_path}: top-level entries not used: {', '.join(map(str, others))}")
    state = dict(ckpt["generator"])
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel/DDP
        report.append(f"{weights_path}: keys carry a 'module.' prefix; stripped")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BigVGANLoadError(f"{weights_path}: 'generator' holds non-tensors; re-download bigvgan_generator.pt")
    return config, state, report


def load_bigvgan(folder: str | Path, device: torch.device | str = "cpu") -> tuple[BigVGAN, dict[str, Any], list[str]]:
    """Load a BigVGAN folder strictly and make it ready for inference.

    The generator is built from ``config.json`` (PyTorch activations, no CUDA kernel) and
    ``bigvgan_generator.pt`` is read with ``torch.load(weights_only=True)``. The file may store
    weight-normed (``weight_g``/``weight_v``) or fused (``weight``) convolutions, as upstream
    accepts both; either way every tensor of that layout, anti-aliasing filters included, must be
    there with its shape. Weight norm is then removed.

    Args:
        folder: holds ``config.json`` and ``bigvgan_generator.pt`` (the released layout, or
            :func:`make_random_bigvgan`'s).
        device: where the model goes.

    Returns:
        ``(model, config, report)``: the generator in eval mode, fp32, weight norm removed, without
        gradients; the ``config.json`` dict; one report line per thing not taken as is (unused
        entries, a fused-weights file, a stripped prefix, a non-released generator) for the caller
        to log; nothing in it changes the output.

    Raises:
        BigVGANLoadError: a missing or unreadable file, an unusable config, or a tensor missing or
            of another shape.
    """
    folder = Path(folder)
    config, state, report = _read_folder(folder)
    weights_path = folder / GENERATOR_FILE
    cfg = BigVGANConfig.from_dict(config, str(folder / CONFIG_FILE))
    with torch.device("meta"):
        model = BigVGAN(cfg)
    fused = "conv_pre.weight" in state and "conv_pre.weight_v" not in state
    if fused:
        model.remove_weight_norm()
        report.append(f"{weights_path}: convolutions stored fused (no weight_g/weight_v); loaded as such")
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(want[k].shape)}"
              for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or shapes:
        lines = [f"{weights_path}: the weights do not fit the generator {folder / CONFIG_FILE} describes ({cfg})"]
        if missing:
            lines.append(f"missing keys: {_few(missing)}")
        if shapes:
            lines.append(f"shape mismatches: {_few(shapes)}")
        lines.append("config.json and bigvgan_generator.pt are not from the same release, or the file is truncated; "
                     "download both from nvidia/bigvgan_v2_22khz_80band_256x again.")
        raise BigVGANLoadError("\n  ".join(lines))
    unused = sorted(set(state) - set(want))
    if unused:
        report.append(f"{weights_path}: {len(unused)} entries not used by the generator: {_few(unused)}")
    if cfg != BigVGANConfig():
        report.append(f"{folder}: BigVGAN of non-released generator settings {cfg}")
    model.load_state_dict({k: state[k].float() for k in want}, strict=True, assign=True)
    model.remove_weight_norm()
    return model.eval().requires_grad_(False).to(device), config, report


def make_random_bigvgan(folder: str | Path, config: Mapping[str, Any], seed: int = 0) -> Path:
    """Write a random BigVGAN folder in the released layout: ``config.json`` and
    ``bigvgan_generator.pt`` = ``{"generator": state_dict}`` with weight norm, filters included.

    Conv directions get PyTorch's default init and their norms a random scale around the
    direction's own norm; Snake parameters are drawn around 0 (log scale), so every parameter
    matters. The same ``config`` and ``seed`` give the same bytes.

    Returns:
        The folder.
    """
    from indextts.files import atomic_path, write_json

    folder = Path(folder)
    cfg = BigVGANConfig.from_dict(config, "make_random_bigvgan config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BigVGAN(cfg)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, _WeightNorm):
                    m.weight_g.mul_(torch.empty_like(m.weight_g).uniform_(0.8, 1.2))
                    if m.bias is not None:
                        m.bias.uniform_(-0.05, 0.05)
                elif isinstance(m, SnakeBeta):
                    for p in m.parameters():
                        p.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, dict(config))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / GENERATOR_FILE) as tmp, open(tmp, "wb") as f:
        torch.save({"generator": state}, f)  # through a file object the archive is named "archive", not the temporary name
    return folder
