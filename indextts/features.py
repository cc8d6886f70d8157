"""Conditioning features for the speaker and emotion conditioners, and audio loading.

The released IndexTTS2 conditions on 1024-dim w2v-BERT 2.0 hidden states (layer 17, normalised
by fixed statistics). No model hub is reachable from this pipeline, so the default is a log-mel
spectrogram computed with torchaudio; the conformer's input size follows the feature size
(``ModelConfig.cond_feat_dim``), and the pretrained conformer input projection is then
re-initialised by the checkpoint import (the transfer report lists it).

Shapes: :func:`log_mel` returns ``[..., frames, n_mels]``, time before features, which is the
layout ``UnifiedVoice.forward`` takes for ``cond_feats`` (the original's ``(b, s, d)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

# Width of the w2v-BERT 2.0 hidden states the released conditioners were trained on.
W2V_BERT_DIM = 1024


@dataclass(frozen=True)
class FeatureConfig:
    """How conditioning features are computed from a reference waveform.

    ``kind="log_mel"`` is computed here by :func:`log_mel`. ``kind="w2v_bert"`` declares the
    released model's 1024-dim semantic features, which the caller must supply itself (they
    need the w2v-BERT 2.0 weights); :func:`log_mel` refuses that kind.
    """

    # log_mel: computed here, needs nothing but torchaudio. w2v_bert: the released input.
    kind: Literal["log_mel", "w2v_bert"] = "log_mel"
    # 16 kHz is what the original feeds its conditioning front end; speech needs no more.
    sample_rate: int = 16000
    # 64 ms window at 16 kHz: fine enough in frequency for 80 mel bands.
    n_fft: int = 1024
    win_length: int = 1024
    # 20 ms hop = 50 frames/s, the frame rate of the w2v-BERT features the released
    # conformers were trained on, so sequence lengths (and the 5000-entry pe table) match.
    hop_length: int = 320
    # 80 bands is the common TTS choice (BigVGAN, Tortoise); it sets the conformer input size.
    n_mels: int = 80
    f_min: float = 0.0
    # None means sample_rate / 2.
    f_max: float | None = 8000.0
    # Floor before the log so silence gives log(1e-5) = -11.5 rather than -inf.
    log_floor: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate <= 0:
            problems.append(f"sample_rate must be positive, got {self.sample_rate}")
        if self.hop_length <= 0 or self.win_length <= 0 or self.n_fft <= 0:
            problems.append("n_fft, win_length and hop_length must be positive")
        if self.win_length > self.n_fft:
            problems.append(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if self.n_mels < 3:
            problems.append(f"n_mels must be at least 3 (the conformer subsamples it by 2), got {self.n_mels}")
        if self.f_max is not None and not (self.f_min < self.f_max <= self.sample_rate / 2):
            problems.append(f"need f_min < f_max <= sample_rate/2, got f_min={self.f_min}, f_max={self.f_max}")
        if problems:
            raise ValueError("features: " + "; ".join(problems))

    @property
    def dim(self) -> int:
        """Feature size per frame: the conformer input size."""
        return self.n_mels if self.kind == "log_mel" else W2V_BERT_DIM


def feature_frames(num_samples: int | torch.Tensor, cfg: FeatureConfig) -> int | torch.Tensor:
    """Number of frames :func:`log_mel` gives for ``num_samples`` samples (centred STFT)."""
    return num_samples // cfg.hop_length + 1


def log_mel(wave: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Log-mel spectrogram of ``wave``.

    Args:
        wave: float waveform ``[..., T]`` at ``cfg.sample_rate``.
        cfg: the feature settings; ``cfg.kind`` must be ``"log_mel"``.

    Returns:
        ``[..., frames, n_mels]`` float32 with ``frames = T // hop_length + 1``.

    Raises:
        ValueError: for ``kind="w2v_bert"`` (those features come from outside) or an empty wave.
    """
    if cfg.kind != "log_mel":
        raise ValueError(
            f"features.kind is {cfg.kind!r}: those features must be computed by the caller "
            "(w2v-BERT 2.0 hidden states); set features.kind to 'log_mel' to compute them here"
        )
    if wave.shape[-1] == 0:
        raise ValueError("log_mel: the waveform is empty")
    import torchaudio.functional as AF

    lead = wave.shape[:-1]
    x = wave.reshape(-1, wave.shape[-1]).float()
    window = torch.hann_window(cfg.win_length, device=x.device)
    # reflect padding needs more samples than n_fft // 2; very short clips fall back to zeros.
    pad_mode = "reflect" if x.shape[-1] > cfg.n_fft // 2 else "constant"
    spec = torch.stft(
        x,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window=window,
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    ).abs()  # (N, n_fft//2+1, frames), magnitude
    fb = AF.melscale_fbanks(
        n_freqs=cfg.n_fft // 2 + 1,
        f_min=cfg.f_min,
        f_max=cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2,
        n_mels=cfg.n_mels,
        sample_rate=cfg.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    ).to(x.device)  # (n_freqs, n_mels)
    mel = torch.matmul(spec.transpose(1, 2), fb)  # (N, frames, n_mels)
    out = torch.log(torch.clamp(mel, min=cfg.log_floor))
    return out.reshape(*lead, out.shape[-2], out.shape[-1])


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform at ``sample_rate``.

    Args:
        path: any format libsndfile reads (wav, flac, ogg ...).
        sample_rate: the rate to return; the file is resampled when it differs.

    Returns:
        ``[T]`` float32 tensor; channels are averaged.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: libsndfile cannot read it, or it holds no samples.
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise ValueError(f"{path}: cannot read audio ({e}); convert it to wav or flac") from e
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples")
    wave = torch.from_numpy(data).mean(dim=1)  # (T,) mono downmix
    if sr != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, orig_freq=sr, new_freq=sample_rate)
    return wave.contiguous()
