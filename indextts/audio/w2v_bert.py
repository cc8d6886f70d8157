"""w2v-BERT 2.0 features, the released IndexTTS2's conditioning input and the semantic codec's.

The hidden states of layer 17 of ``facebook/w2v-bert-2.0`` (1024-dim, 50 frames/s), normalised by
the mean and variance of the released ``wav2vec2bert_stats.pt``: :class:`W2VBert`, loaded from a
local folder (``transformers``' ``SeamlessM4TFeatureExtractor`` and ``Wav2Vec2BertModel`` with
``local_files_only``; nothing is downloaded). Features are ``[frames, dim]``, time first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

# Width of the w2v-BERT 2.0 hidden states the released conditioners were trained on.
W2V_BERT_DIM = 1024


# SeamlessM4TFeatureExtractor: 25 ms Kaldi fbank windows every 10 ms at 16 kHz, two stacked per
# frame, so 50 frames/s; a frame is one hop of 320 samples.
W2V_BERT_SAMPLE_RATE = 16000
W2V_BERT_HOP = 320
_FBANK_WINDOW, _FBANK_SHIFT, _FBANK_STRIDE = 400, 160, 2
# The shortest audio that gives one frame: two windows.
W2V_BERT_MIN_SAMPLES = _FBANK_WINDOW + _FBANK_SHIFT * (_FBANK_STRIDE - 1)


def w2v_bert_frames(num_samples: int) -> int:
    """Frames the w2v-BERT feature extractor (and so the semantic codec) gives for
    ``num_samples`` at 16 kHz: ``((n - 400) // 160 + 1) // 2``, 0 below one window."""
    if num_samples < _FBANK_WINDOW:
        return 0
    return ((num_samples - _FBANK_WINDOW) // _FBANK_SHIFT + 1) // _FBANK_STRIDE


class W2VBertLoadError(ValueError):
    """The w2v-BERT folder or its statistics cannot be used; the message names the file."""


def load_w2v_bert_stats(path: str | Path, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation of IndexTTS2's ``wav2vec2bert_stats.pt``: ``(mean, std)``, ``std = sqrt(var)``.

    Read with ``torch.load(weights_only=True)``: a dict with 1-D float tensors ``mean`` and ``var``.

    Raises:
        W2VBertLoadError: missing file, refused by ``weights_only``, wrong keys or sizes.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise W2VBertLoadError(
            f"{path}: w2v-BERT statistics not found. Set codec.w2v_bert_stats to wav2vec2bert_stats.pt "
            "from the released IndexTTS2 checkpoint folder."
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise W2VBertLoadError(f"{path}: not readable with torch.load(weights_only=True): {e}") from e
    if not isinstance(blob, dict) or not {"mean", "var"} <= set(blob):
        keys = sorted(blob)[:6] if isinstance(blob, dict) else type(blob).__name__
        raise W2VBertLoadError(f"{path}: expected a dict with 'mean' and 'var' tensors (wav2vec2bert_stats.pt), found {keys}")
    mean, var = blob["mean"], blob["var"]
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or (dim is not None and t.shape[0] != dim):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise W2VBertLoadError(f"{path}: '{name}' is {shape}, expected a vector of the model's hidden size {dim}")
    if not bool((var > 0).all()):
        raise W2VBertLoadError(f"{path}: 'var' has entries <= 0; these are not variance statistics")
    return mean.float(), torch.sqrt(var.float())


def w2v_bert_identity(folder: str | Path) -> str:
    """sha256 over the files that define a w2v-BERT folder's output (configs and safetensors
    weights, each by name and content), for the codes' metadata."""
    import hashlib

    from indextts.files import sha256_file

    folder = Path(folder)
    h = hashlib.sha256()
    names = ["config.json", "preprocessor_config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    for name in names:
        f = folder / name
        if f.is_file():
            h.update(f"{name}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


class W2VBertInputs:
    """The feature extractor of a w2v-BERT folder: waveforms -> padded fbank inputs. Cheap to
    pickle (it loads itself on first use), so DataLoader workers can run it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(folder)
        self._extractor = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_extractor": None}

    def _get(self):
        if self._extractor is None:
            from transformers import SeamlessM4TFeatureExtractor

            self._extractor = SeamlessM4TFeatureExtractor.from_pretrained(self.folder, local_files_only=True)
        return self._extractor

    def __call__(self, waves: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Fbank inputs of mono 16 kHz float32 waveforms, padded to the longest.

        Returns:
            ``input_features`` ``(B, F, 160)`` float32, ``attention_mask`` ``(B, F)`` int32 and
            ``frames`` ``(B,)`` int64, each row's valid frames (:func:`w2v_bert_frames`).
        """
        out = self._get()(
            [np.asarray(w, dtype=np.float32) for w in waves],
            sampling_rate=W2V_BERT_SAMPLE_RATE,
            padding=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        mask = np.asarray(out["attention_mask"], dtype=np.int32)
        return {"input_features": np.asarray(out["input_features"], dtype=np.float32), "attention_mask": mask,
                "frames": mask.sum(axis=1).astype(np.int64)}


class W2VBert:
    """Normalised hidden states of one layer of a local w2v-BERT 2.0: IndexTTS2's ``get_emb``.

    ``(hidden_states[layer] - mean) / sqrt(var)`` of ``Wav2Vec2BertModel`` run on the folder's own
    feature extractor's fbank inputs. Layers above ``layer`` are dropped at load time (they cannot
    change that hidden state), which saves 7/24 of the compute at layer 17.

    Build one with :meth:`load`; call :meth:`inputs` (CPU, any process) then the object itself
    (on its device) on batches, or :meth:`features` for whole waveforms.
    """

    def __init__(self, model, inputs: W2VBertInputs, mean: torch.Tensor, std: torch.Tensor, layer: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.inputs = inputs
        self.mean, self.std = mean.to(device), std.to(device)
        self.layer = layer
        self.device = device
        self.dtype = dtype

    @property
    def dim(self) -> int:
        """Feature width (the model's hidden size)."""
        return int(self.mean.shape[0])

    @classmethod
    def load(cls, folder: str | Path, stats: str | Path, *, layer: int = 17, device: torch.device | str = "cpu",
             dtype: Literal["fp32", "bf16"] = "fp32") -> "W2VBert":
        """Load the model, its feature extractor and the statistics; nothing is downloaded.

        Args:
            folder: a ``facebook/w2v-bert-2.0`` folder (``config.json``, ``preprocessor_config.json``,
                ``model.safetensors``).
            stats: ``wav2vec2bert_stats.pt`` (``mean`` / ``var`` of that layer's hidden states).
            layer: which hidden state: 17 in IndexTTS2 (``hidden_states[17]``, the output of the
                17th of 24 conformer layers).
            device: where the model runs.
            dtype: ``fp32``, or ``bf16`` for speed on a GPU (the features, and so the codes, then
                differ slightly from the fp32 ones IndexTTS2 computes).

        Raises:
            W2VBertLoadError: missing folder or file, weights that are not safetensors, weights
                missing from the file, a layer outside the model, or statistics of another size.
        """
        from transformers import Wav2Vec2BertModel
        from transformers.utils import logging as hf_logging

        folder = Path(folder)
        for name in ("config.json", "preprocessor_config.json"):
            if not (folder / name).is_file():
                raise W2VBertLoadError(
                    f"{folder}: no {name}. Set codec.w2v_bert to a local copy of facebook/w2v-bert-2.0 "
                    "(config.json, preprocessor_config.json, model.safetensors), downloaded by hand."
                )
        if not any(folder.glob("*.safetensors")):
            raise W2VBertLoadError(f"{folder}: no .safetensors weights (only safetensors are read); convert the weights once")
        if dtype not in ("fp32", "bf16"):
            raise W2VBertLoadError(f"codec.w2v_bert_dtype: expected 'fp32' or 'bf16', got {dtype!r}")
        bars_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model, info = Wav2Vec2BertModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, dtype=torch.float32, output_loading_info=True
            )
        except OSError as e:
            raise W2VBertLoadError(f"{folder}: cannot load Wav2Vec2BertModel from this folder: {e}") from e
        finally:
            if bars_on:
                hf_logging.enable_progress_bar()
        # masked_spec_embed only serves SpecAugment in training; any other missing tensor would
        # silently be random.
        missing = sorted(k for k in info.get("missing_keys", ()) if k != "masked_spec_embed")
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if missing or mismatched:
            raise W2VBertLoadError(
                f"{folder}: the weights do not fill the model its config.json describes: missing {missing[:6]}, "
                f"mismatched {mismatched[:6]}; the folder is incomplete or of another model"
            )
        n_layers = len(model.encoder.layers)
        if not 1 <= layer <= n_layers:
            raise W2VBertLoadError(f"codec.w2v_bert_layer: {layer} is outside 1..{n_layers} (the layers in {folder})")
        model.encoder.layers = model.encoder.layers[:layer]
        # The adapter and the intermediate FFN would act after the last kept layer; w2v-BERT 2.0 has
        # neither, and a model that does would not give hidden_states[layer] as last_hidden_state.
        if model.adapter is not None or model.intermediate_ffn is not None:
            raise W2VBertLoadError(f"{folder}: a w2v-BERT with an adapter / intermediate FFN is not the w2v-BERT 2.0 IndexTTS2 uses")
        mean, std = load_w2v_bert_stats(stats, dim=int(model.config.hidden_size))
        device = torch.device(device)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = model.eval().requires_grad_(False).to(device=device, dtype=torch_dtype)
        return cls(model, W2VBertInputs(folder), mean, std, layer, device, torch_dtype)

    @torch.inference_mode()
    def __call__(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised features ``(B, F, dim)`` float32 of a batch from :meth:`inputs`. Frames past
        a row's valid length hold padding's values."""
        out = self.model(
            input_features=input_features.to(self.device, self.dtype),
            attention_mask=attention_mask.to(self.device),
        )
        h = out.last_hidden_state.float()  # (B, F, dim): hidden_states[layer] of the full model
        return (h - self.mean) / self.std

    def features(self, waves: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """One ``(frames, dim)`` float32 tensor per mono 16 kHz waveform (batched together)."""
        batch = self.inputs([w.numpy() if isinstance(w, torch.Tensor) else w for w in waves])
        feats = self(torch.from_numpy(batch["input_features"]), torch.from_numpy(batch["attention_mask"]))
        return [feats[i, : int(n)] for i, n in enumerate(batch["frames"])]


def make_random_w2v_bert(folder: str | Path, *, seed: int = 0, stats_path: str | Path | None = None, **config) -> Path:
    """Write a randomly initialised w2v-BERT folder (``save_pretrained`` of model and feature
    extractor) and, when ``stats_path`` is given, matching random statistics; for tests and
    benchmarks. ``config`` overrides ``Wav2Vec2BertConfig`` fields (its defaults are w2v-BERT 2.0's
    sizes). The same arguments give the same weights."""
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2BertModel(Wav2Vec2BertConfig(**config)).eval()
        bars_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(str(folder))
        finally:
            if bars_on:
                hf_logging.enable_progress_bar()
        # The released preprocessor_config.json pads with 1; the valid frames do not depend on it.
        SeamlessM4TFeatureExtractor(padding_value=1.0).save_pretrained(str(folder))
        if stats_path is not None:
            dim = int(model.config.hidden_size)
            stats = {"mean": 0.1 * torch.randn(dim), "var": 0.5 + torch.rand(dim)}
            import io

            from indextts.files import atomic_path

            # Saved through a buffer: torch.save names its zip folder after the file, and the
            # temporary name would make the bytes differ run to run.
            buf = io.BytesIO()
            torch.save(stats, buf)
            with atomic_path(stats_path) as tmp:
                tmp.write_bytes(buf.getvalue())
    return folder
