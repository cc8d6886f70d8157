"""Intelligibility: transcripts from a local ASR model, and their CER/WER against the text.

Two kinds of model, each read from a local folder in ``save_pretrained`` layout with
``local_files_only=True`` (nothing is downloaded, and no code path here opens a socket):

* ``whisper``: ``WhisperForConditionalGeneration`` with its feature extractor, tokenizer and
  ``generation_config.json``; greedy decoding with the language and task from config. Clips up to
  the model's window (30 s) are padded to it and decoded in batches; longer clips go through
  Whisper's sequential long-form decoding (timestamps on, as that mode needs), in batches of their
  own, so that a short clip never gets the long-form mode because of a neighbour.
* ``ctc``: ``Wav2Vec2ForCTC`` with ``Wav2Vec2FeatureExtractor`` and ``Wav2Vec2CTCTokenizer``;
  greedy CTC (argmax, merge repeats, drop blanks). A multi-language MMS folder (``vocab.json`` with
  one vocabulary per language, ``adapter.<lang>.safetensors`` per language) needs ``language``: its
  adapter is loaded with ``load_adapter`` and its vocabulary with ``target_lang``.

Exact batching
    A clip must get the same transcript in any batch. Whisper pads every clip to its window, so
    batches are exact. A CTC model is batched only when its convolutional feature encoder is
    normalised per frame (``feat_extract_norm: layer``, MMS and the large wav2vec2 models) and its
    feature extractor returns an attention mask; then padded frames are masked and each row's
    frames past its own length are dropped before decoding. Models with a group-normalised
    encoder (``wav2vec2-base``) normalise over time, padding included, so they run one clip at a time.

Error rates (:func:`error_rates`)
    Hypothesis and reference go through the same normaliser (the pipeline's own, from the
    ``text`` section), then punctuation (Unicode category P*) becomes a space, since ASR models
    differ in whether and how they punctuate and a TTS model is not asked to speak commas. CER is
    counted on the remaining characters with *all spaces removed*: spacing is word segmentation,
    not pronunciation (Korean spacing in particular differs between writers and ASR models), it
    makes CER comparable between scripts with and without word spaces (seed-tts-eval and ESPnet
    score Chinese and Japanese this way), and it is the length ``text.count_chars`` measures.
    WER is on whitespace-separated words, for languages that have them (:func:`space_separated`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import unicodedata
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

from indextts.config import ConfigError

# Weight files transformers reads from a folder; one of them must be there.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Tensors that only serve training (SpecAugment's mask vector); missing ones change no output.
TRAINING_ONLY_KEYS = frozenset({"masked_spec_embed"})


class EvalModelError(ValueError):
    """An evaluation model's folder is missing, incomplete or of another architecture. The message
    names the folder and its config key and says what to put there."""


@dataclass(frozen=True)
class AsrConfig:
    """``eval.asr``: the ASR model that transcribes generated and real speech."""

    path: str | None = None  # local folder (save_pretrained layout); null turns CER/WER off
    kind: Literal["whisper", "ctc"] = "whisper"  # WhisperForConditionalGeneration or Wav2Vec2ForCTC
    # whisper: the generation language ("ko" or "korean"); null lets Whisper detect it per clip,
    # which on TTS output can pick the wrong language, so set it. ctc: the MMS adapter and
    # vocabulary ("amh", "kor"); needed when the folder has one per language, else only a label.
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"  # whisper only; CER needs transcribe
    batch_size: int = 8  # clips per forward pass (whisper pads each to 30 s: memory grows fast)
    # Whisper's decoding budget: about 2-3 tokens per second of Korean or English speech, more for
    # scripts its byte-level BPE splits finely (Ge'ez); 200 covers 30 s clips of most languages.
    max_new_tokens: int = 200

    def __post_init__(self) -> None:
        p = []
        if self.kind not in ("whisper", "ctc"):
            p.append(f"eval.asr.kind must be 'whisper' or 'ctc', got {self.kind!r}")
        if self.task not in ("transcribe", "translate"):
            p.append(f"eval.asr.task must be 'transcribe' or 'translate', got {self.task!r}")
        if self.batch_size < 1:
            p.append(f"eval.asr.batch_size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            p.append(f"eval.asr.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if p:
            raise ConfigError("invalid config:\n  " + "\n  ".join(p))


# --- loading, shared with indextts.evaluation.speaker --------------------------------------------


def model_folder(path: str | Path | None, key: str, *, model_type: str, architecture: str, what: str,
                 files: Iterable[str] = ("preprocessor_config.json",)) -> tuple[Path, dict]:
    """Check that ``path`` is a local folder holding a model of ``architecture`` before loading it.

    Args:
        path: the folder from config.
        key: its config key, e.g. ``eval.asr.path``, for the messages.
        model_type: the ``model_type`` its ``config.json`` must give (``whisper``, ``wav2vec2``...).
        architecture: the class that will load it; when ``config.json`` lists ``architectures``,
            this must be among them (a pretraining-only checkpoint has no CTC or x-vector head).
        what: what to point ``key`` at, for the messages (e.g. "a local Whisper folder").
        files: other files the folder must have.

    Returns:
        (folder, parsed ``config.json``).

    Raises:
        EvalModelError: no path, a missing folder, no ``config.json`` (or unreadable), another
            model type or architecture, a missing file, or no weights.
    """
    if not path:
        raise EvalModelError(f"{key} is not set; point it at {what}")
    folder = Path(path)
    hint = f"point it at {what} (save_pretrained layout)"
    if not folder.is_dir():
        raise EvalModelError(f"{key}: {folder} is not a folder; {hint}")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise EvalModelError(f"{key}: {folder} has no config.json; {hint}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalModelError(f"{key}: {cfg_file} is not readable JSON ({e}); {hint}") from e
    found = config.get("model_type")
    archs = config.get("architectures") or []
    if found != model_type or (archs and architecture not in archs):
        raise EvalModelError(
            f"{key}: {folder} holds a {'/'.join(archs) or found or 'model of unknown type'} (model_type "
            f"{found!r}), not a {architecture}; {hint}")
    for name in files:
        if not (folder / name).is_file():
            raise EvalModelError(f"{key}: {folder} has no {name}; {hint}, with its processor files")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise EvalModelError(f"{key}: {folder} has no weights (one of {', '.join(WEIGHT_FILES)}); {hint}")
    return folder, config


def load_pretrained(cls: Any, folder: Path, key: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, local_files_only=True)`` in eval mode, frozen, float32.

    Every tensor the model needs must come from the folder: a missing or mis-shaped one would be
    silently random. Tensors the folder has and the model does not take are printed.

    Raises:
        EvalModelError: transformers cannot load the folder, or tensors are missing or mis-shaped.
    """
    import torch
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise EvalModelError(f"{key}: {cls.__name__} cannot load {folder}: {e}") from e
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    missing = sorted(set(info.get("missing_keys", ())) - TRAINING_ONLY_KEYS)
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise EvalModelError(
            f"{key}: the weights in {folder} do not fill the {cls.__name__} its config.json describes: missing "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, mismatched {mismatched[:6]}; the folder is "
            "incomplete or holds another model")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        print(f"{folder}: {cls.__name__} did not take {len(unexpected)} tensors: {unexpected[:6]}"
              f"{' ...' if len(unexpected) > 6 else ''}", file=sys.stderr)
    return model.eval().requires_grad_(False)


def load_processor(cls: Any, folder: Path, key: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, local_files_only=True)`` for a feature extractor or tokenizer.

    Raises:
        EvalModelError: transformers cannot read the folder's processor files.
    """
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise EvalModelError(f"{key}: {cls.__name__} cannot load {folder}: {e}") from e


def mono_clips(audios: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The clips as 1-D float32 arrays.

    Raises:
        ValueError: a clip that is not 1-D or holds NaN/inf, named by its index.
    """
    out = []
    for i, a in enumerate(audios):
        x = np.asarray(a, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"audios[{i}]: expected a mono 1-D waveform, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"audios[{i}]: holds NaN or inf samples")
        out.append(x)
    return out


def _batches(indices: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


# --- the model ------------------------------------------------------------------------------------


class AsrModel:
    """A local Whisper or CTC model that turns clips into text (see the module docstring).

    Attributes:
        sample_rate: the rate ``transcribe`` expects (the feature extractor's, 16000).
        name: what a report prints: the folder's name, the kind and the language.
    """

    def __init__(self, cfg: AsrConfig, device: str = "cpu", key: str = "eval.asr") -> None:
        """Load the processor and model from ``cfg.path``; nothing is downloaded.

        Args:
            cfg: the ``eval.asr`` section (or another section of the same shape).
            device: where the model runs (``cpu``, ``cuda``, ``cuda:1``).
            key: the config section ``cfg`` came from, named in error messages
                (``asr_filter.asr`` for the ASR filter's own model).

        Raises:
            EvalModelError: a missing folder, a folder without ``config.json`` or of another
                architecture, missing files or tensors, or a language/task the model lacks.
        """
        import torch

        self.cfg = cfg
        self._key = key
        self.device = torch.device(device)
        if cfg.kind == "whisper":
            self._load_whisper(cfg)
        else:
            self._load_ctc(cfg)
        self.model.to(self.device)
        self.sample_rate = int(self.extractor.sampling_rate)
        folder = Path(cfg.path).resolve().name  # type: ignore[arg-type]
        self.name = f"{folder} ({cfg.kind}{', ' + cfg.language if cfg.language else ''})"

    # whisper

    def _load_whisper(self, cfg: AsrConfig) -> None:
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

        key = f"{self._key}.path"
        what = "a local Whisper folder (e.g. whisper-large-v3)"
        folder, _ = model_folder(cfg.path, key, model_type="whisper",
                                 architecture="WhisperForConditionalGeneration", what=what)
        if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            raise EvalModelError(f"{key}: {folder} has no tokenizer.json or vocab.json; point it at {what}")
        self.extractor = load_processor(WhisperFeatureExtractor, folder, key)
        self.tokenizer = load_processor(WhisperTokenizer, folder, key)
        self.model = load_pretrained(WhisperForConditionalGeneration, folder, key)
        gen = self.model.generation_config
        multilingual = bool(getattr(gen, "is_multilingual", hasattr(gen, "lang_to_id")))
        self._language: str | None = None
        if cfg.language is not None:
            if not multilingual:
                raise EvalModelError(f"{self._key}.language: {folder} is an English-only Whisper; set "
                                     f"{self._key}.language to null, or point {self._key}.path at a multilingual Whisper")
            lang_to_id = getattr(gen, "lang_to_id", None) or {}
            self._language = _whisper_language_token(cfg.language, lang_to_id, folder, self._key)
        if multilingual and not hasattr(gen, "task_to_id"):
            raise EvalModelError(f"{key}: {folder}'s generation_config.json has no task_to_id; copy the "
                                 "generation_config.json of the model's release into the folder")
        self._task = cfg.task if multilingual else None
        if not multilingual and cfg.task != "transcribe":
            raise EvalModelError(f"{self._key}.task: {folder} is an English-only Whisper, which only transcribes")
        # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|> come before the text.
        limit = int(self.model.config.max_target_positions) - 4
        if cfg.max_new_tokens > limit:
            raise EvalModelError(f"{self._key}.max_new_tokens: {cfg.max_new_tokens} is more than {folder} can decode "
                                 f"({limit}: its max_target_positions less the 4 prompt tokens); lower it")

    def _whisper_generate(self, clips: list[np.ndarray], long_form: bool) -> list[str]:
        import torch

        if long_form:
            # Features of the whole clip, not one window: generate() then walks it window by window.
            inputs = self.extractor(clips, sampling_rate=self.sample_rate, truncation=False, padding="longest",
                                    return_attention_mask=True, return_tensors="pt")
        else:
            inputs = self.extractor(clips, sampling_rate=self.sample_rate, return_attention_mask=True,
                                    return_tensors="pt")
        with torch.inference_mode(), _transformers_errors_only():
            ids = self.model.generate(
                inputs["input_features"].to(self.device, torch.float32),
                attention_mask=inputs["attention_mask"].to(self.device),
                language=self._language, task=self._task, max_new_tokens=self.cfg.max_new_tokens,
                do_sample=False, num_beams=1,
            )
        if not isinstance(ids, torch.Tensor):  # long-form returns a dict in some versions
            ids = ids["sequences"]
        return [t.strip() for t in self.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)]

    # ctc

    def _load_ctc(self, cfg: AsrConfig) -> None:
        from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

        key = f"{self._key}.path"
        what = "a local Wav2Vec2ForCTC folder (e.g. mms-1b-all)"
        folder, config = model_folder(cfg.path, key, model_type="wav2vec2", architecture="Wav2Vec2ForCTC",
                                      what=what, files=("preprocessor_config.json", "vocab.json"))
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EvalModelError(f"{key}: {folder / 'vocab.json'} is not readable JSON ({e})") from e
        # MMS keeps one vocabulary per language in vocab.json: {"amh": {...}, "kor": {...}}.
        per_language = bool(vocab) and all(isinstance(v, dict) for v in vocab.values())
        lang = cfg.language
        if per_language:
            if lang is None or lang not in vocab:
                some = ", ".join(sorted(vocab)[:12])
                raise EvalModelError(
                    f"{self._key}.language: {folder} is a multi-language CTC model (one vocabulary per language in "
                    f"vocab.json); set {self._key}.language to one of its {len(vocab)} languages ({some}"
                    f"{' ...' if len(vocab) > 12 else ''}), got {lang!r}")
        self.extractor = load_processor(Wav2Vec2FeatureExtractor, folder, key)
        self.tokenizer = load_processor(Wav2Vec2CTCTokenizer, folder, key,
                                        **({"target_lang": lang} if per_language else {}))
        self.model = load_pretrained(Wav2Vec2ForCTC, folder, key)
        adapter = folder / f"adapter.{lang}.safetensors"
        if lang is not None and adapter.is_file():
            if config.get("adapter_attn_dim") is None:
                raise EvalModelError(f"{key}: {folder} has {adapter.name} but its config.json sets no "
                                     "adapter_attn_dim; the folder mixes files of two models")
            try:
                self.model.load_adapter(lang, local_files_only=True, use_safetensors=True)
            except (OSError, ValueError) as e:
                raise EvalModelError(f"{key}: cannot load {adapter}: {e}") from e
        elif per_language and config.get("adapter_attn_dim") is not None:
            have = sorted(p.name[len("adapter."):-len(".safetensors")] for p in folder.glob("adapter.*.safetensors"))
            raise EvalModelError(
                f"{self._key}.language: {folder} has no adapter.{lang}.safetensors (adapters for: "
                f"{', '.join(have[:12]) or 'none'}{' ...' if len(have) > 12 else ''}); set {self._key}.language to "
                "one of them or copy the adapter in")
        rows, chars = int(self.model.lm_head.out_features), len(self.tokenizer.encoder)
        if rows < chars:
            raise EvalModelError(f"{key}: {folder}'s CTC head has {rows} outputs for a vocabulary of {chars}; the "
                                 "vocab.json (or adapter) is not the one this model was trained with")
        self._blank = int(self.tokenizer.pad_token_id)  # HF's CTC models use the pad token as the blank
        # Padding is exact only with a per-frame-normalised encoder and a mask (module docstring).
        self._exact_batches = (getattr(self.model.config, "feat_extract_norm", None) == "layer"
                               and bool(getattr(self.extractor, "return_attention_mask", False)))

    def _ctc_frames(self, n_samples: Sequence[int]) -> list[int]:
        import torch

        # The model's own arithmetic (convolution sizes, plus its adapter's strides if it has one).
        return self.model._get_feat_extract_output_lengths(torch.tensor(list(n_samples))).tolist()

    def _ctc_decode(self, clips: list[np.ndarray]) -> list[str]:
        import torch

        inputs = self.extractor(clips, sampling_rate=self.sample_rate, padding=True, return_tensors="pt",
                                return_attention_mask=self._exact_batches)
        mask = inputs.get("attention_mask")
        with torch.inference_mode():
            mask = mask.to(self.device) if mask is not None else None
            logits = self.model(inputs["input_values"].to(self.device), attention_mask=mask).logits  # (B, T, V)
        best = logits.argmax(dim=-1).cpu()  # (B, T)
        out = []
        for row, frames in zip(best, self._ctc_frames([len(c) for c in clips])):
            # Merge repeats, then drop blanks: the order CTC defines. (The tokenizer's own
            # skip_special_tokens drops the blank first, which merges "a <blank> a" into "a".)
            ids = [i for i, _ in groupby(row[:frames].tolist()) if i != self._blank]
            text = self.tokenizer.decode(ids, skip_special_tokens=True, group_tokens=False)
            out.append(" ".join(text.split()))
        return out

    # both

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        """Greedy transcripts of ``audios``, in order; deterministic and independent of batching.

        Args:
            audios: mono float waveforms at :attr:`sample_rate`. A clip with no samples, or one
                shorter than a CTC model's receptive field (25 ms for wav2vec2), gets ``""``.

        Returns:
            One transcript per clip, stripped (unknown-character tokens of a CTC vocabulary dropped).

        Raises:
            ValueError: a clip that is not 1-D or holds NaN/inf.
        """
        clips = mono_clips(audios)
        out = [""] * len(clips)
        if self.cfg.kind == "whisper":
            window = int(self.extractor.n_samples)
            todo = [i for i, c in enumerate(clips) if len(c) > 0]
            for long_form in (False, True):
                group = [i for i in todo if (len(clips[i]) > window) == long_form]
                for batch in _batches(group, self.cfg.batch_size):
                    for i, text in zip(batch, self._whisper_generate([clips[i] for i in batch], long_form)):
                        out[i] = text
            return out
        frames = self._ctc_frames([len(c) for c in clips])
        todo = sorted((i for i in range(len(clips)) if frames[i] > 0), key=lambda i: len(clips[i]))
        for batch in _batches(todo, self.cfg.batch_size if self._exact_batches else 1):
            for i, text in zip(batch, self._ctc_decode([clips[i] for i in batch])):
                out[i] = text
        return out


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    # Whisper's generate() warns on every call about max_length and suppress_tokens settings that
    # it makes itself; nothing a user can act on, and one line per batch buries the real messages.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _whisper_language_token(language: str, lang_to_id: Mapping[str, int], folder: Path, key: str = "eval.asr") -> str:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    lang = language.strip().lower()
    code = lang[2:-2] if lang.startswith("<|") and lang.endswith("|>") else TO_LANGUAGE_CODE.get(lang, lang)
    token = f"<|{code}|>"
    if token not in lang_to_id:
        codes = sorted(t[2:-2] for t in lang_to_id)
        raise EvalModelError(
            f"{key}.language: {language!r} is not a language of {folder} (its generation_config.json has "
            f"{len(codes)}: {', '.join(codes[:20])}{' ...' if len(codes) > 20 else ''}); give a code such as 'ko' "
            "or a name such as 'korean'")
    return token


# --- scoring ----------------------------------------------------------------------------------------

# Scripts written without spaces between words (ISO 639-1 and 639-3 codes): Chinese, Japanese,
# Thai, Lao, Khmer, Burmese, Tibetan, Dzongkha. A WER there would score the ASR's segmenter.
_UNSPACED = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo", "dz", "zho", "cmn", "yue", "wuu", "nan", "hak",
                       "jpn", "tha", "lao", "khm", "mya", "bod", "dzo"})


def space_separated(language: str) -> bool:
    """Whether ``language`` writes spaces between words, so that a WER means something.

    Args:
        language: an ISO 639-1 or 639-3 code, optionally with a region (``ko``, ``ja-JP``, ``amh``).

    Returns:
        False for Chinese, Japanese, Thai, Lao, Khmer, Burmese, Tibetan and Dzongkha; True for any
        other code (Amharic, Korean, English ...), including codes this list does not know.
    """
    return language.replace("_", "-").split("-")[0].strip().lower() not in _UNSPACED


def _strip_punctuation(text: str) -> str:
    return "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)


def error_rates(hyp: str, ref: str, normalize: Callable[[str], str], *, words: bool,
                strip_punctuation: bool = True) -> dict:
    """CER (and WER) of one transcript against its text, after normalising both the same way.

    Both strings go through ``normalize``, then (by default) every punctuation character becomes a
    space and runs of whitespace collapse. CER counts character edits with all spaces removed,
    over the reference's characters other than spaces (module docstring).

    Args:
        hyp: the ASR transcript.
        ref: the text the clip should say.
        normalize: the pipeline's text normaliser, e.g. ``functools.partial(normalize_text, cfg=text_cfg)``.
        words: also score WER (for languages with word spaces, :func:`space_separated`).
        strip_punctuation: turn Unicode punctuation (category P*) into spaces on both sides.

    Returns:
        ``{"cer", "wer" (None unless words), "ref_chars", "edits", "ref_words", "word_edits"
        (both None unless words)}``; ``edits`` and ``ref_chars`` (and the word counts) let a corpus
        CER be pooled as ``sum(edits) / sum(ref_chars)`` (:func:`pool_error_rates`).

    Raises:
        ValueError: the reference is empty after normalisation (nothing to score against).
    """
    import jiwer

    def prepare(text: str) -> str:
        text = normalize(text)
        return " ".join((_strip_punctuation(text) if strip_punctuation else text).split())

    h, r = prepare(hyp), prepare(ref)
    r_chars, h_chars = r.replace(" ", ""), h.replace(" ", "")
    if not r_chars:
        raise ValueError(f"reference {ref!r} is empty after normalisation; it cannot score a transcript")
    c = jiwer.process_characters(r_chars, h_chars)
    out: dict[str, Any] = {"cer": float(c.cer), "wer": None, "ref_chars": len(r_chars),
                           "edits": int(c.substitutions + c.deletions + c.insertions), "ref_words": None,
                           "word_edits": None}
    if words:
        w = jiwer.process_words(r, h)
        out.update(wer=float(w.wer), ref_words=len(r.split()),
                   word_edits=int(w.substitutions + w.deletions + w.insertions))
    return out


def pool_error_rates(rates: Sequence[Mapping[str, Any]]) -> dict:
    """Corpus CER/WER of :func:`error_rates` results: total edits over total reference length (so a
    long utterance weighs by its length, as jiwer scores a list of sentences).

    Returns:
        ``{"cer", "wer" (None when any item has no word counts), "n", "ref_chars", "edits"}``;
        ``cer`` is None for no items.
    """
    chars = sum(int(r["ref_chars"]) for r in rates)
    edits = sum(int(r["edits"]) for r in rates)
    with_words = bool(rates) and all(r.get("ref_words") is not None for r in rates)
    ref_words = sum(int(r["ref_words"]) for r in rates) if with_words else 0
    return {"cer": edits / chars if chars else None,
            "wer": sum(int(r["word_edits"]) for r in rates) / ref_words if with_words and ref_words else None,
            "n": len(rates), "ref_chars": chars, "edits": edits}


# --- tiny random models, for tests and the demo ---------------------------------------------------

# Sizes that build and run in milliseconds; outputs are meaningless but follow the real code paths.
TINY_CTC: dict[str, Any] = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 32, "conv_dim": (8, 8), "conv_kernel": (10, 3), "conv_stride": (5, 2),
                            "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2,
                            "feat_extract_norm": "layer", "do_stable_layer_norm": True}
TINY_WHISPER: dict[str, Any] = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                                "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
                                "max_target_positions": 64}
_CTC_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "|")  # MMS's order: the blank (pad) is id 0


def save_pretrained_quietly(model: Any, folder: Path) -> None:
    """``model.save_pretrained(folder)`` without transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder))
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def make_random_ctc(folder: str | Path, *, vocab: str | Mapping[str, str] = "abcdefgh", seed: int = 0,
                    **config: Any) -> Path:
    """Write a randomly initialised ``Wav2Vec2ForCTC`` folder with its processor, for tests.

    Args:
        folder: where to write (model, ``preprocessor_config.json``, ``vocab.json``, tokenizer files).
        vocab: the characters of a one-language model; or ``{language: characters}`` for an MMS-style
            folder: ``vocab.json`` with one vocabulary per language, ``adapter.<lang>.safetensors``
            per language, and the first language's adapter in the model's own weights.
        seed: the same arguments give the same weights.
        config: ``Wav2Vec2Config`` fields over :data:`TINY_CTC`.

    Returns:
        ``folder``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_language = not isinstance(vocab, str)
    chars = dict(vocab) if per_language else {"": vocab}  # type: ignore[arg-type]
    vocabs = {lang: {t: i for i, t in enumerate((*_CTC_SPECIALS, *dict.fromkeys(cs)))} for lang, cs in chars.items()}
    (folder / "vocab.json").write_text(json.dumps(vocabs if per_language else vocabs[""], ensure_ascii=False),
                                       encoding="utf-8")
    first = next(iter(vocabs))
    settings = {**TINY_CTC, "vocab_size": len(vocabs[first]), "pad_token_id": 0,
                **({"adapter_attn_dim": 8} if per_language else {}), **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**settings)).eval()
        save_pretrained_quietly(model, folder)
        if per_language:
            for n, (lang, v) in enumerate(vocabs.items()):
                if n:  # the first language's adapter is the one in the model's weights
                    torch.manual_seed(seed + n)
                    model.lm_head = torch.nn.Linear(model.config.output_hidden_size, len(v))
                    model.init_adapter_layers()
                save_file({k: t.detach().contiguous() for k, t in model._get_adapters().items()},
                          str(folder / f"adapter.{lang}.safetensors"))
    tok = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                               eos_token="</s>", word_delimiter_token="|",
                               **({"target_lang": first} if per_language else {}))
    tok.save_pretrained(str(folder))  # rewrites the same vocab.json, beside its tokenizer_config.json
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(folder))
    return folder


def make_random_whisper(folder: str | Path, *, seed: int = 0, chunk_length: int = 1, **config: Any) -> Path:
    """Write a randomly initialised multilingual ``WhisperForConditionalGeneration`` folder with its
    feature extractor, a byte-level tokenizer (256 byte tokens, no merges, Whisper's special and
    timestamp tokens) and a ``generation_config.json`` with ``lang_to_id``/``task_to_id``, for tests.

    Args:
        folder: where to write.
        seed: the same arguments give the same weights.
        chunk_length: the window in seconds (30 in real Whisper; 1 keeps the encoder tiny, and a
            clip longer than it takes the long-form path).
        config: ``WhisperConfig`` fields over :data:`TINY_WHISPER`.

    Returns:
        ``folder``.
    """
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = WhisperTokenizer(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    # Whisper's order matters: the language tokens follow <|startoftranscript|> in LANGUAGES order.
    langs = [f"<|{c}|>" for c in LANGUAGES]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *langs, "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_length)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    settings = {**TINY_WHISPER, "vocab_size": len(tok), "num_mel_bins": 80,
                "max_source_positions": fe.nb_max_frames // 2,  # the encoder's two convolutions halve the frames
                "pad_token_id": eot, "bos_token_id": eot, "eos_token_id": eot, "decoder_start_token_id": sot,
                "begin_suppress_tokens": None, "suppress_tokens": None, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(WhisperConfig(**settings)).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        lang_to_id={t: ids[t] for t in langs},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"], is_multilingual=True,
        max_length=settings["max_target_positions"])
    save_pretrained_quietly(model, folder)
    tok.save_pretrained(str(folder))
    fe.save_pretrained(str(folder))
    return folder
