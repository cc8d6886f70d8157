"""IndexTTS2's voice for semantic codes: from a GPT's codes and latents to a 22.05 kHz waveform.

This is the path ``infer_v2`` walks after the GPT, built from the released files the user has on
disk (``pretrained.s2mel``, ``pretrained.campplus``, ``pretrained.bigvgan`` and the ``codec``
section's semantic codec and w2v-BERT):

1. the prompt, loaded at 22.05 kHz as librosa does (``librosa.load`` with its default rate) and
   resampled to 16 kHz by torchaudio's default sinc: its w2v-BERT features (the GPT's speaker
   conditioning), their semantic embedding ``S_ref`` (codec encoder, quantizer, ``out_project``),
   its 80-band log-mel (the CFM's prefix) and its CAM++ style vector (Kaldi fbank of the 16 kHz
   audio);
2. the generated codes' semantic embedding (``vq2emb``) plus ``gpt_layer`` of the GPT latents
   (:meth:`indextts.model.UnifiedVoice.code_latents`), stretched by the length regulator to
   ``floor(1.72 x codes)`` mel frames, after the prompt's own regulated ``S_ref``;
3. the flow-matching DiT (25 Euler steps, classifier-free guidance 0.7) from seeded noise;
4. BigVGAN v2, mel to waveform.

Every model is loaded strictly (a missing or reshaped tensor is an error naming it). The emotion
prompt's features come from a direct 16 kHz load, as ``infer_v2`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The rate librosa.load gives by default, which infer_v2 relies on, and BigVGAN's output rate.
VOICE_SAMPLE_RATE = 22050
PROMPT_SAMPLE_RATE = 16000


class VoiceError(ValueError):
    """The semantic voice cannot be built or used; the message names the file or key."""


@dataclass(frozen=True)
class VoiceFiles:
    """The released files after the GPT (the ``pretrained`` section's ``s2mel``, ``campplus``,
    ``bigvgan``)."""

    s2mel: Path
    campplus: Path
    bigvgan: Path  # a folder: config.json + bigvgan_generator.pt

    @classmethod
    def from_record(cls, rec: dict, where: str) -> "VoiceFiles":
        missing = [f"pretrained.{k}" for k in ("s2mel", "campplus", "bigvgan") if not rec.get(k)]
        if missing:
            raise VoiceError(
                f"{where}: a semantic-code model speaks through IndexTTS2's s2mel, CAM++ and BigVGAN; set "
                f"{', '.join(missing)} to the released files (s2mel.pth, campplus_cn_common.bin, the "
                "bigvgan_v2_22khz_80band_256x folder), or pass --s2mel/--campplus/--bigvgan")
        return cls(Path(rec["s2mel"]), Path(rec["campplus"]), Path(rec["bigvgan"]))

    def record(self) -> dict:
        return {"s2mel": str(self.s2mel), "campplus": str(self.campplus), "bigvgan": str(self.bigvgan)}


@dataclass
class Prompt:
    """What a speaker prompt gives the semantic voice (batch dimension 1 throughout)."""

    features: torch.Tensor  # [T50, dim] normalised w2v-BERT features (the GPT's conditioning)
    s_ref: torch.Tensor  # [1, T50, dim] its semantic embedding
    mel: torch.Tensor  # [1, 80, T_ref] log-mel at 22.05 kHz
    style: torch.Tensor  # [1, 192] CAM++ style vector


def load_audio_22k(path: str | Path, seconds: float | None = None) -> np.ndarray:
    """Mono float32 at 22.05 kHz the way ``librosa.load(path)`` reads it, cut to ``seconds``."""
    import librosa

    try:
        audio, _ = librosa.load(str(path), sr=VOICE_SAMPLE_RATE, mono=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise VoiceError(f"{path}: cannot read the prompt audio ({e})") from e
    if seconds is not None:
        audio = audio[: int(seconds * VOICE_SAMPLE_RATE)]
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio_16k(path: str | Path, seconds: float | None = None) -> np.ndarray:
    """Mono float32 loaded directly at 16 kHz (``librosa.load(path, sr=16000)``, infer_v2's emotion
    prompt), cut to ``seconds``."""
    import librosa

    try:
        audio, _ = librosa.load(str(path), sr=PROMPT_SAMPLE_RATE, mono=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise VoiceError(f"{path}: cannot read the prompt audio ({e})") from e
    if seconds is not None:
        audio = audio[: int(seconds * PROMPT_SAMPLE_RATE)]
    return np.ascontiguousarray(audio, dtype=np.float32)


class SemanticVoice:
    """The released s2mel, CAM++ and BigVGAN with the semantic codec and w2v-BERT they read.

    Args:
        codec_cfg: the ``codec`` section (:class:`indextts.codes.CodecConfig`, ``kind: semantic``).
        files: the three released files after the GPT.
        device: where everything runs (fp32, as infer_v2 runs s2mel and BigVGAN).
    """

    def __init__(self, codec_cfg, files: VoiceFiles, device: torch.device | str = "cpu") -> None:
        from indextts.audio.bigvgan import load_bigvgan
        from indextts.audio.campplus import load_campplus
        from indextts.audio.s2mel import load_s2mel
        from indextts.audio.semantic_codec import load_semantic_encoder

        self.device = torch.device(device)
        self.files = files
        self.encoder = load_semantic_encoder(codec_cfg, self.device)
        self.codec = self.encoder.codec
        self.s2mel, s2mel_notes = load_s2mel(files.s2mel, device=self.device)
        self.campplus, campplus_notes = load_campplus(files.campplus, device=self.device)
        self.bigvgan, self.bigvgan_config, bigvgan_notes = load_bigvgan(files.bigvgan, device=self.device)
        self.notes = [*s2mel_notes, *campplus_notes, *bigvgan_notes]
        sem_dim = int(self.codec.cfg.hidden_size)
        want = int(self.s2mel.cfg.semantic_dim)
        if sem_dim != want:
            raise VoiceError(f"{files.s2mel}: s2mel reads {want}-dim semantic embeddings, but {codec_cfg.weights} "
                             f"gives {sem_dim}; pretrained.s2mel and codec.weights are not from one release")
        style = int(self.campplus.cfg.embedding_size)
        if style != self.s2mel.cfg.style_dim:
            raise VoiceError(f"{files.campplus}: CAM++ gives {style}-dim style vectors, {files.s2mel} reads "
                             f"{self.s2mel.cfg.style_dim}; pretrained.campplus and pretrained.s2mel are not a pair")
        sr = int(self.bigvgan_config.get("sampling_rate", VOICE_SAMPLE_RATE))
        if sr != VOICE_SAMPLE_RATE or int(self.bigvgan_config.get("num_mels", 80)) != self.s2mel.cfg.n_mels:
            raise VoiceError(f"{files.bigvgan}: BigVGAN is {sr} Hz with {self.bigvgan_config.get('num_mels')} mels; "
                             f"s2mel makes {self.s2mel.cfg.n_mels}-band mels at {VOICE_SAMPLE_RATE} Hz")
        self._prompts: dict[tuple[str, float], Prompt] = {}
        self._emotions: dict[tuple[str, float], torch.Tensor] = {}

    @property
    def sample_rate(self) -> int:
        return VOICE_SAMPLE_RATE

    @property
    def gpt_dim(self) -> int:
        """Width of the GPT latents ``gpt_layer`` reads."""
        return int(self.s2mel.gpt_layer[0].in_features)

    @torch.no_grad()
    def prompt(self, path: str | Path, seconds: float) -> Prompt:
        """Everything the speaker prompt gives (cached per clip and length)."""
        import torchaudio

        from indextts.audio.campplus import style_vector
        from indextts.audio.s2mel import mel_spectrogram

        key = (str(Path(path).resolve()), float(seconds))
        if key not in self._prompts:
            a22 = torch.from_numpy(load_audio_22k(path, seconds))
            # transforms.Resample, as infer_v2: it builds its sinc kernel in float64 (the functional
            # form in the input's float32 differs by ~4e-6, enough to move a near-tied code).
            a16 = torchaudio.transforms.Resample(VOICE_SAMPLE_RATE, PROMPT_SAMPLE_RATE)(a22)
            feats = self._features(a16, path)
            codes = self.codec.quantize(feats[None].to(self.device))  # (n_q, 1, T)
            s_ref = self.codec.embed(codes)  # (1, T, dim)
            mel = mel_spectrogram(a22[None].to(self.device), self.s2mel.cfg)
            style = style_vector(self.campplus, a16[None].to(self.device))
            self._prompts[key] = Prompt(features=feats, s_ref=s_ref, mel=mel, style=style)
        return self._prompts[key]

    @torch.no_grad()
    def emotion_features(self, path: str | Path, seconds: float) -> torch.Tensor:
        """w2v-BERT features of an emotion prompt, loaded directly at 16 kHz as infer_v2 does."""
        key = (str(Path(path).resolve()), float(seconds))
        if key not in self._emotions:
            self._emotions[key] = self._features(torch.from_numpy(load_audio_16k(path, seconds)), path)
        return self._emotions[key]

    def _features(self, audio_16k: torch.Tensor, path) -> torch.Tensor:
        from indextts.audio.w2v_bert import W2V_BERT_MIN_SAMPLES

        if audio_16k.shape[0] < W2V_BERT_MIN_SAMPLES:
            raise VoiceError(f"{path}: the prompt is too short ({audio_16k.shape[0] / PROMPT_SAMPLE_RATE:.3f} s) for "
                             "one w2v-BERT frame; use a clip of at least 0.1 s")
        return self.encoder.w2v.features([audio_16k.numpy()])[0].to(self.device)

    @torch.no_grad()
    def codes_of(self, audio_16k: np.ndarray) -> torch.Tensor:
        """Semantic codes ``[T]`` of a 16 kHz waveform (extraction's own computation)."""
        feats = self._features(torch.from_numpy(np.asarray(audio_16k, dtype=np.float32)), "<audio>")
        return self.codec.quantize(feats[None])[0, 0]

    @torch.no_grad()
    def speak(self, codes: torch.Tensor, latents: torch.Tensor, prompt: Prompt, *, n_steps: int = 25,
              cfg_rate: float = 0.7, generator: torch.Generator | None = None) -> np.ndarray:
        """The waveform of ``codes [T]`` with their GPT ``latents [T, gpt_dim]`` in the prompt's voice.

        Returns:
            float32 ``[samples]`` at 22.05 kHz, in [-1, 1].
        """
        from indextts.audio.bigvgan import vocode
        from indextts.audio.s2mel import target_mel_lengths

        T = int(codes.shape[0])
        if T < 1 or latents.shape[0] != T:
            raise VoiceError(f"speak: {T} codes with {latents.shape[0]} latents")
        dev = self.device
        s_infer = self.codec.embed(codes.to(dev)[None]) + self.s2mel.gpt_layer(latents.to(dev).float()[None])
        target = target_mel_lengths(torch.tensor([T], device=dev))
        cond = self.s2mel.regulate(s_infer, target)
        prompt_cond = self.s2mel.regulate(prompt.s_ref, torch.tensor([prompt.mel.shape[-1]], device=dev))
        cat = torch.cat([prompt_cond, cond], dim=1)
        mel = self.s2mel.generate(cat, torch.tensor([cat.shape[1]], device=dev), prompt.mel, prompt.style,
                                  n_steps=n_steps, cfg_rate=cfg_rate, generator=generator)
        wave = vocode(self.bigvgan, mel.float())[0]
        return np.clip(wave.cpu().numpy(), -1.0, 1.0).astype(np.float32)


def make_tiny_voice(root: str | Path, *, gpt_dim: int, semantic_dim: int, seed: int = 0) -> dict:
    """Random tiny s2mel, CAM++ and BigVGAN in the released file layouts under ``root``, for tests
    and benchmarks: s2mel reads ``gpt_dim``-wide GPT latents and ``semantic_dim``-wide semantic
    embeddings (a tiny GPT's and a tiny semantic codec's).

    Returns:
        The ``pretrained`` section's ``s2mel``, ``campplus`` and ``bigvgan`` for them.
    """
    import dataclasses

    from indextts.audio.bigvgan import make_random_bigvgan, tiny_bigvgan_config
    from indextts.audio.campplus import CampplusConfig, make_random_campplus
    from indextts.audio.s2mel import S2MelConfig, make_random_s2mel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    campplus = CampplusConfig.tiny()
    cfg = dataclasses.replace(S2MelConfig.tiny(), gpt_latent_dim=int(gpt_dim), semantic_dim=int(semantic_dim),
                              style_dim=campplus.embedding_size)
    make_random_s2mel(root / "s2mel.pth", cfg, seed=seed)
    make_random_campplus(root / "campplus_cn_common.bin", campplus, seed=seed)
    make_random_bigvgan(root / "bigvgan", tiny_bigvgan_config(), seed=seed)
    return {"s2mel": str(root / "s2mel.pth"), "campplus": str(root / "campplus_cn_common.bin"),
            "bigvgan": str(root / "bigvgan")}
