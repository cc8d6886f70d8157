"""Speaker similarity: cosine between x-vectors of a local speaker-verification model.

The model is a ``WavLMForXVector`` (e.g. ``microsoft/wavlm-base-plus-sv``) read from a local folder
with ``local_files_only=True``; its ``embeddings`` output, L2-normalised, is the x-vector, and the
cosine of two of them is the speaker similarity (SIM) that seed-tts-eval reports. Its numbers come
from another verification model (WavLM-large with an ECAPA-TDNN head), so SIM is comparable only
between runs that name the same model.

Exact batching
    A clip must get the same embedding in any batch. WavLM's convolutional feature encoder is
    group-normalised over time in the base models (``feat_extract_norm: group``), padding included,
    so those embed one clip at a time. A layer-normalised encoder with an attention mask
    (``feat_extract_norm: layer``, the large models) pads exactly, provided the x-vector's
    statistics pooling stops at each clip's own frames; ``WavLMForXVector.forward`` gets that
    length wrong in a batch (it leaves out the TDNN's dilation), so :meth:`SpeakerModel._xvectors`
    runs the same modules with the right lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from indextts.config import ConfigError
from indextts.evaluation.asr import load_pretrained, load_processor, model_folder, mono_clips, save_pretrained_quietly

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SpeakerConfig:
    """``eval.speaker``: the speaker-verification model behind speaker similarity."""

    path: str | None = None  # local WavLMForXVector folder (save_pretrained layout); null turns SIM off
    batch_size: int = 8  # clips per forward pass, for a model that batches exactly (module docstring)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"invalid config:\n  eval.speaker.batch_size must be at least 1, got {self.batch_size}")


class SpeakerModel:
    """A local x-vector model that maps clips to unit-length speaker embeddings.

    Attributes:
        sample_rate: the rate ``embed`` expects (the feature extractor's, 16000).
        name: what a report prints: the folder's name.
        min_samples: the shortest clip that yields an embedding.
    """

    def __init__(self, cfg: SpeakerConfig, device: str = "cpu") -> None:
        """Load the feature extractor and model from ``cfg.path``; nothing is downloaded.

        Args:
            cfg: the ``eval.speaker`` section.
            device: where the model runs.

        Raises:
            EvalModelError: a missing folder, a folder without ``config.json`` or
                ``preprocessor_config.json``, a model other than ``WavLMForXVector``, or missing tensors.
        """
        import torch
        from transformers import AutoFeatureExtractor, WavLMForXVector

        key = "eval.speaker.path"
        folder, _ = model_folder(cfg.path, key, model_type="wavlm", architecture="WavLMForXVector",
                                 what="a local WavLMForXVector folder (e.g. wavlm-base-plus-sv)")
        self.cfg = cfg
        self.device = torch.device(device)
        self.extractor = load_processor(AutoFeatureExtractor, folder, key)
        self.model = load_pretrained(WavLMForXVector, folder, key).to(self.device)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.name = folder.resolve().name
        config = self.model.config
        self._exact_batches = (config.feat_extract_norm == "layer"
                               and bool(getattr(self.extractor, "return_attention_mask", False)))
        # The x-vector's TDNN layers are unpadded (dilated) convolutions over frames, each shortening
        # the sequence by (kernel - 1) * dilation; the pooling's standard deviation needs two frames
        # left, or the embedding is NaN.
        self._tdnn_span = sum((k - 1) * d for k, d in zip(config.tdnn_kernel, config.tdnn_dilation))
        n = self._tdnn_span + 2
        for k, s in reversed(list(zip(config.conv_kernel, config.conv_stride))):
            n = (n - 1) * s + k  # the shortest input giving n outputs of this convolution
        self.min_samples = n

    def _frames(self, n_samples: Sequence[int]) -> list[int]:
        import torch

        return self.model._get_feat_extract_output_lengths(torch.tensor(list(n_samples))).tolist()

    def _embed_batch(self, clips: list[np.ndarray]) -> np.ndarray:
        import torch

        inputs = self.extractor(clips, sampling_rate=self.sample_rate, padding=True, return_tensors="pt",
                                return_attention_mask=self._exact_batches)
        mask = inputs.get("attention_mask")
        # Frames the TDNN leaves of each clip on its own: the pooling must stop there.
        lengths = [n - self._tdnn_span for n in self._frames([len(c) for c in clips])]
        with torch.inference_mode():
            emb = self._xvectors(inputs["input_values"].to(self.device),
                                 mask.to(self.device) if mask is not None else None, lengths)
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy()

    def _xvectors(self, values: "torch.Tensor", mask: "torch.Tensor | None", lengths: list[int]) -> "torch.Tensor":
        # WavLMForXVector.forward, step for step, but its statistics pooling takes each row's length
        # from _get_tdnn_output_lengths, which ignores the TDNN's dilation: in a padded batch a
        # shorter clip's mean and std would take in frames computed from padding. Here each row
        # pools exactly the frames it has alone. A test checks that a single clip gets the
        # model's own embedding.
        import torch

        m = self.model
        out = m.wavlm(values, attention_mask=mask, output_hidden_states=m.config.use_weighted_layer_sum)
        if m.config.use_weighted_layer_sum:
            weights = torch.nn.functional.softmax(m.layer_weights, dim=-1)
            h = (torch.stack(out.hidden_states, dim=1) * weights.view(-1, 1, 1)).sum(dim=1)
        else:
            h = out.last_hidden_state
        h = m.projector(h)
        for layer in m.tdnn:
            h = layer(h)  # (B, T - span so far, tdnn_dim[i]): unpadded, dilated
        stats = [torch.cat([row[:n].mean(dim=0), row[:n].std(dim=0)]) for row, n in zip(h, lengths)]
        return m.feature_extractor(torch.stack(stats))  # (B, xvector_output_dim)

    def embed(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """Unit-length x-vectors of ``audios``; a clip gets the same vector in any batch.

        Args:
            audios: mono float waveforms at :attr:`sample_rate`, each at least :attr:`min_samples`
                long (about 0.3 s for WavLM's x-vector head: two frames after its TDNN).

        Returns:
            ``[N, D]`` float32, each row of L2 norm 1.

        Raises:
            ValueError: a clip that is not 1-D, holds NaN/inf, or is too short, named by its index.
        """
        clips = mono_clips(audios)
        for i, c in enumerate(clips):
            if len(c) < self.min_samples:
                raise ValueError(f"audios[{i}]: {len(c)} samples is shorter than the {self.min_samples} "
                                 f"({self.min_samples / self.sample_rate:.3f} s) {self.name} needs for an embedding")
        dim = int(self.model.config.xvector_output_dim)
        out = np.zeros((len(clips), dim), dtype=np.float32)
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))  # similar lengths, less padding
        size = self.cfg.batch_size if self._exact_batches else 1
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            out[batch] = self._embed_batch([clips[i] for i in batch])
        return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (symmetric; 1.0 for a vector with itself, to rounding).

    Raises:
        ValueError: shapes differ, a vector is not 1-D, or one has zero length.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"cosine needs two 1-D vectors of one size, got shapes {a.shape} and {b.shape}")
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        raise ValueError("cosine of a zero vector is undefined")
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


# --- a tiny random model, for tests and the demo --------------------------------------------------

TINY_XVECTOR: dict[str, Any] = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 32, "conv_dim": (8, 8), "conv_kernel": (10, 3),
                                "conv_stride": (5, 2),
                                "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2, "num_buckets": 16,
                                "max_bucket_distance": 32, "tdnn_dim": (8, 8, 8, 8, 16), "xvector_output_dim": 8,
                                "feat_extract_norm": "group", "use_weighted_layer_sum": True}


def make_random_xvector(folder: str | Path, *, seed: int = 0, **config: Any) -> Path:
    """Write a randomly initialised ``WavLMForXVector`` folder with its feature extractor (as
    wavlm-base-plus-sv's: no normalisation, attention mask returned), for tests.

    Args:
        folder: where to write.
        seed: the same arguments give the same weights.
        config: ``WavLMConfig`` fields over :data:`TINY_XVECTOR` (``feat_extract_norm: layer`` gives
            a model that batches).

    Returns:
        ``folder``.
    """
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WavLMForXVector(WavLMConfig(**{**TINY_XVECTOR, **config})).eval()
    save_pretrained_quietly(model, folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=True).save_pretrained(str(folder))
    return folder
