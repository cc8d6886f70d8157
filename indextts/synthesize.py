"""Speech from a trained stage: ``indextts synthesize`` and the fixed sample set of every stage.

A stage's checkpoint folder is all synthesis needs besides the codec weights: ``model.json``
names the model, the text normaliser and the codec, and the folder holds its own ``bpe.model``.
Text is normalised with the checkpoint's ``text`` settings and tokenised with its vocabulary;
the speaker prompt gives the timbre (the speaker conditioner) and the emotion prompt, when it is
another clip, the ``emo_vec``, mixed with the speaker prompt's own by ``emo_alpha`` as IndexTTS2's
inference does (``base + alpha * (emo - base)``). Codes are sampled with the KV cache
(:meth:`~indextts.model.UnifiedVoice.generate_codes`) and decoded by the codec named in the
checkpoint: DAC codes by DAC (:func:`indextts.audio.dac.decode_codes`), IndexTTS2's semantic codes by
the released s2mel, CAM++ and BigVGAN (:class:`indextts.voice.SemanticVoice`, after a teacher-forced
pass for the GPT latents, exactly as ``infer_v2``).

Batch mode reads a list (TSV/CSV with a header, or JSONL) of ``name``, ``text``,
``speaker_prompt`` and optionally ``emotion_prompt`` (other columns are carried into the result
table). Rows of different lengths are batched with left padding, and every row draws from its own
generator seeded by ``(seed, name)``, so a row's WAV does not depend on the batch it lands in.

:func:`select_samples` picks the fixed set every stage speaks (``samples`` section): val texts
with a held-out prompt of the same speaker, and cross pairs (speaker A's timbre, speaker B's
emotion prompt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch

from indextts.config import ConfigError, get_section, load_config_arg, merge_runtime, parse_section

if TYPE_CHECKING:
    import pandas as pd

    from indextts.voice import VoiceFiles

# Columns a request list must have; emotion_prompt is optional.
REQUIRED_COLUMNS = ("name", "text", "speaker_prompt")
# Columns synthesis adds to the result table.
RESULT_COLUMNS = ("frames", "seconds", "stop_reached", "rtf")


class SynthesisError(ValueError):
    """Synthesis cannot run as asked; the message names the file, row or key and what to do."""


@dataclass(frozen=True)
class SynthesizeConfig:
    """The ``synthesize`` config section: sampling and prompts. The sampling defaults are those
    of IndexTTS2's own inference (``infer_v2``: do_sample, top_p 0.8, top_k 30, temperature 0.8,
    repetition_penalty 10.0, max_mel_tokens 1500)."""

    temperature: float = 0.8  # 0 is greedy
    top_k: int = 30  # keep the k most likely codes per codebook (0: all)
    top_p: float = 0.8  # nucleus: the smallest set of codes reaching this probability (1: all)
    repetition_penalty: float = 10.0  # HF's penalty on codes a codebook already produced (1: off)
    # HF beam search/sampling; infer_v2 uses 3 for its one-stream codes; beams need one code stream.
    num_beams: int = 1
    length_penalty: float = 0.0  # HF's, with beams: hypothesis score / length ** this (infer_v2's 0)
    # Cap on generated code frames; the model's position table caps it further (tiny: 398).
    max_frames: int = 1500
    # Weight of the emotion prompt against the speaker prompt's own emotion (1: the emotion
    # prompt alone, 0: ignore it).
    emo_alpha: float = 1.0
    # Prompts are cut to their first this-many seconds (training crops prompts to 6 s too).
    prompt_seconds: float = 6.0
    seed: int = 0  # each row samples from (seed, row name)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees it
    # Rows generated together; a speed knob only (a row's output does not depend on its batch).
    batch_size: int = 8
    # Semantic codes only (s2mel's flow matching, infer_v2's defaults): Euler steps and the
    # classifier-free guidance rate.
    diffusion_steps: int = 25
    cfg_rate: float = 0.7

    def __post_init__(self) -> None:
        p = []
        if self.temperature < 0:
            p.append(f"synthesize.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            p.append(f"synthesize.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            p.append(f"synthesize.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            p.append(f"synthesize.repetition_penalty must be positive, got {self.repetition_penalty}")
        for name in ("max_frames", "batch_size", "diffusion_steps", "num_beams"):
            if getattr(self, name) < 1:
                p.append(f"synthesize.{name} must be at least 1, got {getattr(self, name)}")
        if self.prompt_seconds <= 0:
            p.append(f"synthesize.prompt_seconds must be positive, got {self.prompt_seconds}")
        if self.cfg_rate < 0:
            p.append(f"synthesize.cfg_rate must be >= 0, got {self.cfg_rate}")
        if p:
            raise ConfigError("invalid config:\n  " + "\n  ".join(p))


@dataclass(frozen=True)
class SamplesConfig:
    """The ``samples`` config section: the fixed set of utterances every stage speaks."""

    n_same: int = 4  # val texts, each spoken with another held-out utterance of its speaker as prompt
    n_cross: int = 2  # val texts in speaker A's timbre with an utterance of speaker B as emotion prompt
    stages: tuple[int, ...] = (1, 2, 3)  # training stages that get samples
    seed: int = 0  # which utterances are drawn
    n_novel: int = 0  # val texts never in train (clean.val_text_fraction), with a same-speaker prompt
    # Base-language val texts (data.replay rows), with a same-speaker prompt: whether the languages
    # the pretrained model already speaks still work after each stage.
    n_base: int = 0

    def __post_init__(self) -> None:
        p = []
        counts = (self.n_same, self.n_cross, self.n_novel, self.n_base)
        if min(counts) < 0 or sum(counts) < 1:
            p.append(f"samples.n_same, n_cross, n_novel and n_base must be >= 0 with at least one sample, got "
                     f"{self.n_same}, {self.n_cross}, {self.n_novel} and {self.n_base}")
        bad = [s for s in self.stages if s not in (1, 2, 3)]
        if bad or len(set(self.stages)) != len(self.stages):
            p.append(f"samples.stages must be distinct stages among 1, 2, 3, got {list(self.stages)}")
        if p:
            raise ConfigError("invalid config:\n  " + "\n  ".join(p))

    def names(self) -> list[str]:
        """The sample names, in order: ``same-00`` ..., ``cross-00`` ..., ``novel-00`` ...,
        ``base-00`` ... (the WAV file stems)."""
        return sample_names(self.n_same, self.n_cross, self.n_novel, self.n_base)


# The sample kinds, in the order of their names; the headline scores are those of the new
# language's kinds (every kind but ``base``).
SAMPLE_KINDS = ("same", "cross", "novel", "base")


def sample_names(n_same: int, n_cross: int, n_novel: int = 0, n_base: int = 0) -> list[str]:
    """``same-00 .. same-{n_same-1}``, then ``cross-00 ..``, ``novel-00 ..`` and ``base-00 ..``;
    rules/common.smk builds the same list."""
    counts = dict(zip(SAMPLE_KINDS, (n_same, n_cross, n_novel, n_base)))
    return [f"{kind}-{i:02d}" for kind in SAMPLE_KINDS for i in range(counts[kind])]


@dataclass(frozen=True)
class Request:
    """One utterance to speak. ``columns`` carries the list's other columns into the result table."""

    name: str
    text: str
    speaker_prompt: Path
    emotion_prompt: Path | None = None
    columns: tuple[tuple[str, str], ...] = ()


@dataclass
class Synthesis:
    """What came out for one request. ``rtf`` is the wall time of the request's batch
    (conditioning, generation, decoding) over the audio seconds that batch produced."""

    request: Request
    audio: np.ndarray  # float32 [samples] at sample_rate
    sample_rate: int
    frames: int
    seconds: float
    stop_reached: bool
    rtf: float
    codes: torch.Tensor = field(repr=False, default=None)  # [K, frames], on the CPU


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when torch sees it, else the CPU; ``cuda`` without CUDA is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SynthesisError("synthesize.device is 'cuda' but torch sees no CUDA device; set it to auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def row_seed(seed: int, name: str) -> int:
    """The sampling seed of one row: from (seed, name), so it does not depend on batching or order."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Synthesizer:
    """A checkpoint folder loaded for synthesis: model, vocabulary, normaliser and codec.

    Args:
        checkpoint: a stage folder (``model.safetensors``, ``model.json``, ``bpe.model``).
        codec_weights: the codec weights; default the path ``model.json``'s codec section names
            (relative paths resolve against the working directory, as in the pipeline).
        device: ``auto``, ``cpu`` or ``cuda``.
        voice: semantic codes only: the released s2mel, CAM++ and BigVGAN files; default those the
            stage folder records (``model.json`` ``extra.voice``, the ``pretrained`` section training ran with).

    Raises:
        SynthesisError: the prompt features are not the codes' kind, or the codec weights are
            not the ones its codes were made with.
        VoiceError: a semantic-code model without its s2mel, CAM++ or BigVGAN files.
        CheckpointError: a missing or damaged folder.
    """

    def __init__(self, checkpoint: str | Path, *, codec_weights: str | Path | None = None,
                 device: str | torch.device = "auto", voice: "VoiceFiles | None" = None) -> None:
        import sentencepiece as spm

        from indextts.checkpoint import checkpoint_vocab, load_checkpoint, read_meta
        from indextts.audio.dac import load_codec
        from indextts.codes import CodecConfig
        from indextts.files import sha256_file
        from indextts.text import TextConfig

        self.checkpoint = Path(checkpoint)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        meta = read_meta(self.checkpoint)
        where = self.checkpoint / "model.json"
        codec_rec = dict(meta.get("codec") or {})
        self.semantic = codec_rec.get("kind", "dac") == "semantic"
        weights = Path(codec_weights or codec_rec.get("weights") or "")
        if not weights.is_file():
            raise SynthesisError(f"{where}: the codec weights {str(weights) or '(none recorded)'} are not there; pass "
                                 "--codec-weights with the codec weights this model's codes were made with")
        vocab = checkpoint_vocab(self.checkpoint)
        self.model, self.meta = load_checkpoint(self.checkpoint, vocab_path=vocab, device=str(self.device))
        self.cfg = self.model.cfg
        want_features = "w2v_bert" if self.semantic else "log_mel"
        if self.cfg.features.kind != want_features:
            raise SynthesisError(
                f"{where}: the model's prompts are {self.cfg.features.kind} features; synthesis computes "
                f"{want_features} prompts for {'semantic' if self.semantic else 'DAC'} codes (w2v-BERT with the "
                "semantic codec, log-mel with DAC)")
        want = (meta.get("extra") or {}).get("codes_codec", {}).get("weights_sha256")
        got = sha256_file(weights)
        if want and got != want:
            raise SynthesisError(
                f"{weights}: not the codec this model's codes were made with (sha256 {got[:16]}..., the checkpoint's "
                f"codes came from {want[:16]}...); pass the codec weights the codes were extracted with")
        codec_cfg = parse_section(CodecConfig, {**codec_rec, "weights": str(weights)}, f"{where}:codec")
        self.voice = None
        if self.semantic:
            from indextts.voice import SemanticVoice, VoiceFiles

            files = voice or VoiceFiles.from_record(dict((meta.get("extra") or {}).get("voice") or {}), str(where))
            self.voice = SemanticVoice(codec_cfg, files, device=self.device)
            self.codec, self.codec_info = None, self.voice.encoder.info
            if self.voice.gpt_dim != self.cfg.model_dim:
                from indextts.voice import VoiceError

                raise VoiceError(f"{files.s2mel}: its gpt_layer reads {self.voice.gpt_dim}-dim GPT latents, this "
                                 f"model's are {self.cfg.model_dim}; pretrained.s2mel is not this model's release")
        else:
            self.codec, self.codec_info = load_codec(weights, device=self.device, n_quantizers=codec_cfg.n_quantizers)
        self.text_cfg = parse_section(TextConfig, meta.get("text") or {}, f"{where}:text")
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(str(vocab))
        self._features: dict[tuple[str, float], torch.Tensor] = {}

    @property
    def sample_rate(self) -> int:
        """The output's rate: the DAC's, or BigVGAN's 22.05 kHz for semantic codes."""
        return int(self.voice.sample_rate if self.voice is not None else self.codec_info.sample_rate)

    @property
    def frame_rate(self) -> float:
        return float(self.codec_info.frame_rate)

    def tokenize(self, text: str, where: str = "text") -> list[int]:
        """Normalise ``text`` with the checkpoint's settings and tokenise it with its vocabulary.

        Raises:
            SynthesisError: nothing left after normalisation, or more tokens than the model holds.
        """
        from indextts.text import normalize_text

        norm = normalize_text(text, self.text_cfg)
        ids = self.sp.encode(norm, out_type=int)
        if not ids:
            raise SynthesisError(f"{where}: the text is empty after normalisation ({text!r})")
        if len(ids) > self.cfg.max_text_tokens:
            raise SynthesisError(f"{where}: {len(ids)} text tokens, the model holds {self.cfg.max_text_tokens}; "
                                 "split the text into shorter sentences")
        unk = ids.count(self.sp.unk_id())
        if unk:
            print(f"WARNING {where}: {unk} of {len(ids)} tokens are <unk> (characters the vocabulary does not "
                  f"cover) in {norm!r}", file=sys.stderr)
        return ids

    def prompt_features(self, path: str | Path, seconds: float, *, emotion: bool = False) -> torch.Tensor:
        """The conditioning features ``[frames, F]`` of the first ``seconds`` of a prompt clip:
        log-mel, or for semantic codes w2v-BERT as ``infer_v2`` computes them (the speaker prompt
        through a 22.05 kHz load, an emotion prompt loaded at 16 kHz). Cached per clip."""
        from indextts.features import load_audio, log_mel

        if self.voice is not None:
            if emotion:
                return self.voice.emotion_features(path, seconds)
            return self.voice.prompt(path, seconds).features
        key = (str(Path(path).resolve()), float(seconds))
        if key not in self._features:
            fcfg = self.cfg.features
            wave = load_audio(path, fcfg.sample_rate)[: int(seconds * fcfg.sample_rate)]
            feats = log_mel(wave, fcfg)
            if feats.shape[0] < 3:
                raise SynthesisError(f"{path}: the prompt is too short ({wave.shape[0] / fcfg.sample_rate:.3f} s); "
                                     "use a clip of at least 0.1 s")
            self._features[key] = feats
        return self._features[key]

    def synthesize(self, requests: Sequence[Request], cfg: SynthesizeConfig, *, use_cache: bool = True,
                   log: Callable[[str], None] | None = None) -> Iterator[Synthesis]:
        """Speak ``requests`` in batches of ``cfg.batch_size`` (similar text lengths together).

        Yields:
            One :class:`Synthesis` per request as its batch finishes (batch order, not input
            order). A row that reaches the maximum length without its stop token is reported
            (``stop_reached`` false) and warned about.

        Raises:
            SynthesisError: a bad text or prompt, naming the row.
        """
        from indextts.audio.dac import decode_codes

        log = log or (lambda msg: print(msg, flush=True))
        tokens = {r.name: self.tokenize(r.text, f"row {r.name!r}") for r in requests}
        order = sorted(requests, key=lambda r: (len(tokens[r.name]), r.name))
        limit = self.model.frame_limit(cfg.max_frames)
        if limit < cfg.max_frames:
            log(f"max_frames {cfg.max_frames} capped at {limit}, the longest utterance the model's position "
                "table holds")
        K = self.cfg.n_codebooks
        if cfg.num_beams > 1 and K != 1:
            raise SynthesisError(f"synthesize.num_beams is {cfg.num_beams} but this model predicts {K} codebooks per "
                                 "step; beams need one code stream: set synthesize.num_beams: 1")
        decode_all = self.codec is None or K == int(self.codec.n_codebooks)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            t0 = time.perf_counter()
            text, text_len = _pad([torch.tensor(tokens[r.name]) for r in batch], 0)
            spk, spk_len = _pad([self.prompt_features(r.speaker_prompt, cfg.prompt_seconds) for r in batch], 0.0)
            emo_kw: dict[str, Any] = {}
            if any(r.emotion_prompt is not None for r in batch):
                emo, emo_len = _pad([self.prompt_features(r.emotion_prompt, cfg.prompt_seconds, emotion=True)
                                     if r.emotion_prompt is not None else self.prompt_features(r.speaker_prompt, cfg.prompt_seconds)
                                     for r in batch], 0.0)
                emo_kw = dict(emo_feats=emo.to(self.device), emo_lengths=emo_len.to(self.device),
                              emo_alpha=cfg.emo_alpha)
            gens = [torch.Generator(device=self.device).manual_seed(row_seed(cfg.seed, r.name)) for r in batch]
            codes, lengths = self.model.generate_codes(
                text.to(self.device), spk.to(self.device), spk_len.to(self.device), **emo_kw,
                text_lengths=text_len.to(self.device), max_new_tokens=cfg.max_frames, min_new_tokens=1,
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                repetition_penalty=cfg.repetition_penalty, num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                generator=gens, use_cache=use_cache)
            if self.voice is not None:
                audio = [self._speak(r, tokens[r.name], codes[b, 0, : int(lengths[b])], cfg)
                         for b, r in enumerate(batch)]
            else:
                audio = [decode_codes(self.codec, codes[b, :, : int(n)], n_codebooks_ok=not decode_all).cpu().numpy()
                         for b, n in enumerate(lengths.tolist())]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - t0
            total = sum(a.shape[0] for a in audio) / self.sample_rate
            log(f"batch of {len(batch)}: {int(lengths.sum())} frames, {total:.2f} s of audio in {wall:.2f} s")
            for b, r in enumerate(batch):
                n = int(lengths[b])
                stopped = n < limit
                if not stopped:
                    print(f"WARNING row {r.name!r}: reached the maximum length ({n} frames, {n / self.frame_rate:.1f} s) "
                          "without its stop token; the audio is cut there. The model may need more training, or "
                          "raise synthesize.max_frames", file=sys.stderr)
                yield Synthesis(request=r, audio=np.clip(audio[b], -1.0, 1.0).astype(np.float32),
                                sample_rate=self.sample_rate, frames=n, seconds=round(audio[b].shape[0] / self.sample_rate, 4),
                                stop_reached=stopped, rtf=round(wall / max(total, 1e-9), 4),
                                codes=codes[b, :, :n].cpu())


    def _speak(self, r: Request, tokens: list[int], codes: torch.Tensor, cfg: SynthesizeConfig) -> np.ndarray:
        """Semantic codes ``[T]`` of one row to a waveform: the teacher-forced GPT latents with the
        row's own prompts, then s2mel and BigVGAN. The CFM noise comes from a generator of its own,
        seeded by (seed, row name): how many draws the GPT's sampling took (more when a row waits in
        a batch for longer rows) does not move it."""
        dev = self.device
        generator = torch.Generator(device=dev).manual_seed(row_seed(cfg.seed, f"{r.name}\0s2mel"))
        spk = self.prompt_features(r.speaker_prompt, cfg.prompt_seconds)
        emo_kw: dict[str, Any] = {}
        if r.emotion_prompt is not None:
            emo = self.prompt_features(r.emotion_prompt, cfg.prompt_seconds, emotion=True)
            emo_kw = dict(emo_feats=emo[None].to(dev), emo_lengths=torch.tensor([emo.shape[0]], device=dev),
                          emo_alpha=cfg.emo_alpha)
        latents = self.model.code_latents(torch.tensor([tokens], device=dev), codes[None].to(dev), spk[None].to(dev),
                                          torch.tensor([spk.shape[0]], device=dev), **emo_kw)
        return self.voice.speak(codes, latents, self.voice.prompt(r.speaker_prompt, cfg.prompt_seconds),
                                n_steps=cfg.diffusion_steps, cfg_rate=cfg.cfg_rate, generator=generator)

    def resynthesize(self, requests: Sequence[Request], references: Sequence[str | Path], cfg: SynthesizeConfig,
                     ) -> Iterator[Synthesis]:
        """Semantic codes only: each request's real recording (``references``) as this stage would
        voice it if the GPT had predicted its codes exactly: the recording's own codes (extraction's
        computation), the GPT latents teacher-forced on them with the request's text and prompts,
        then s2mel and BigVGAN. The evaluation's topline for this stage.
        """
        from indextts.codes import read_audio

        if self.voice is None:
            raise SynthesisError("resynthesize: only semantic-code checkpoints have a per-stage topline; a DAC "
                                 "topline is the codec alone (indextts evaluate-reference)")
        rate = int(self.codec_info.sample_rate)
        for r, ref in zip(requests, references, strict=True):
            t0 = time.perf_counter()
            codes = self.voice.codes_of(read_audio(str(ref), rate))
            audio = self._speak(r, self.tokenize(r.text, f"row {r.name!r}"), codes, cfg)
            seconds = audio.shape[0] / self.sample_rate
            yield Synthesis(request=r, audio=audio, sample_rate=self.sample_rate, frames=int(codes.shape[0]),
                            seconds=round(seconds, 4), stop_reached=True,
                            rtf=round((time.perf_counter() - t0) / max(seconds, 1e-9), 4), codes=codes[None].cpu())


def _pad(seqs: Sequence[torch.Tensor], value: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[L, ...]`` tensors into ``[B, L_max, ...]`` plus lengths ``[B]``."""
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    out = seqs[0].new_full((len(seqs), int(lengths.max()), *seqs[0].shape[1:]), value)
    for b, s in enumerate(seqs):
        out[b, : s.shape[0]] = s
    return out, lengths


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM WAV, written atomically; same samples, same bytes."""
    import soundfile as sf

    from indextts.files import atomic_path

    with atomic_path(path) as tmp:
        sf.write(str(tmp), audio, sample_rate, subtype="PCM_16", format="WAV")
    return Path(path)


# --- request lists ------------------------------------------------------------------------------


def read_requests(path: str | Path) -> list[Request]:
    """Read a request list: TSV/CSV with a header or JSONL, one utterance per row.

    Columns ``name`` (the WAV's file stem), ``text``, ``speaker_prompt`` and optionally
    ``emotion_prompt`` (empty: the speaker prompt); relative prompt paths resolve against the
    list's folder. Other columns are kept for the result table.

    Raises:
        SynthesisError: naming the file and row of a missing column, a duplicate or unsafe name,
            or a prompt that does not exist.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SynthesisError(f"{path}: request list not found")
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        frame = pd.DataFrame(rows).fillna("").astype(str)
    else:
        frame = pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t", dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise SynthesisError(f"{path}: missing column(s) {missing}; a request list needs {list(REQUIRED_COLUMNS)} "
                             "and may have emotion_prompt")
    problems, out, seen = [], [], set()
    base = path.parent
    for i, rec in enumerate(frame.to_dict("records")):
        where = f"{path}: row {i + 1} ({rec.get('name')!r})"
        name = str(rec["name"]).strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            problems.append(f"{where}: name must be a plain file stem")
            continue
        if name in seen:
            problems.append(f"{where}: duplicate name")
        seen.add(name)
        prompts = []
        for col in ("speaker_prompt", "emotion_prompt"):
            value = str(rec.get(col) or "").strip()
            p = None if not value else (Path(value) if Path(value).is_absolute() else base / value)
            if col == "speaker_prompt" and p is None:
                problems.append(f"{where}: speaker_prompt is empty")
            elif p is not None and not p.is_file():
                problems.append(f"{where}: {col} {p} does not exist")
            prompts.append(p)
        extra = tuple((k, str(v)) for k, v in rec.items() if k not in (*REQUIRED_COLUMNS, "emotion_prompt"))
        out.append(Request(name=name, text=str(rec["text"]), speaker_prompt=prompts[0], emotion_prompt=prompts[1],
                           columns=extra))
    if problems:
        raise SynthesisError("bad request list:\n  " + "\n  ".join(problems))
    if not out:
        raise SynthesisError(f"{path}: no rows")
    return out


def result_table(results: Sequence[Synthesis]) -> "pd.DataFrame":
    """The result table in request order given: the request's columns, then frames, seconds,
    stop_reached and rtf."""
    import pandas as pd

    rows = []
    for s in results:
        r = s.request
        rows.append({"name": r.name, "text": r.text, "speaker_prompt": str(r.speaker_prompt),
                     "emotion_prompt": str(r.emotion_prompt or ""), **dict(r.columns), "frames": s.frames,
                     "seconds": s.seconds, "stop_reached": s.stop_reached, "rtf": s.rtf})
    return pd.DataFrame(rows)


def write_table(frame: "pd.DataFrame", path: str | Path) -> Path:
    """A TSV with a header, written atomically."""
    from indextts.files import atomic_path

    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)
    return Path(path)


# --- the sample set ---------------------------------------------------------------------------


def select_samples(cfg: SamplesConfig, clean_path: str | Path) -> "pd.DataFrame":
    """The fixed sample set: ``cfg.n_same`` val texts spoken with another held-out (val) utterance
    of the same speaker as prompt, ``cfg.n_cross`` val texts in speaker A's timbre with a
    held-out utterance of speaker B (another emotion where there is one) as emotion prompt, and
    ``cfg.n_novel`` val texts that never occur in train, with a same-speaker prompt, and
    ``cfg.n_base`` base-language val texts (``data.replay`` rows), with a same-speaker prompt of
    that language. Every other kind draws from the new language's rows only.

    With ``n_novel`` > 0 the same and cross texts are val utterances whose text does occur in
    train (spoken there by another voice or prosody), so the kinds measure two things: speaking
    a known text in a new voice, and reading a new text. Without, they are any val utterances
    (as on a real corpus, where most texts are unique).

    Returns:
        A request table (``name``, ``kind``, ``text``, ``speaker``, ``speaker_prompt``,
        ``emotion_prompt``, ``emotion_speaker``, ``emotion``, ``reference``, ``utt_id``;
        ``reference`` is the real recording of the text). Drawn from ``cfg.seed``, speakers in
        turn so the set covers as many as it can.

    Raises:
        SynthesisError: too few val utterances for what is asked, saying what to lower.
    """
    import pandas as pd

    import pyarrow.parquet as pq

    columns = ["utt_id", "audio_path", "text", "speaker", "emotion", "split"]
    has_replay = "replay" in pq.read_schema(clean_path).names
    clean = pd.read_parquet(clean_path, columns=columns + (["replay"] if has_replay else []))
    base_val = clean.iloc[:0]
    if has_replay:  # base-language rows (data.replay) are not the new language's samples
        replay = clean["replay"].astype(bool)
        base_val = clean[replay & (clean["split"] == "val")].sort_values("utt_id")
        clean = clean[~replay]
    base_by_spk = {s: g.to_dict("records") for s, g in base_val.groupby("speaker", sort=True)}
    base_eligible = [s for s, rows in base_by_spk.items() if len(rows) >= 2]
    if cfg.n_base and not base_eligible:
        raise SynthesisError(f"{clean_path}: samples.n_base asks for base-language samples, but no base-language "
                             "(data.replay) speaker has two val utterances (a text and a held-out prompt); add "
                             "data.replay manifests, raise clean.val_fraction or set samples.n_base: 0")
    val = clean[clean["split"] == "val"].sort_values("utt_id")
    by_spk = {s: g.to_dict("records") for s, g in val.groupby("speaker", sort=True)}
    trained = set(clean.loc[clean["split"] == "train", "text"])
    seen = {s: [r for r in rows if not cfg.n_novel or r["text"] in trained] for s, rows in by_spk.items()}
    novel = {s: [r for r in rows if r["text"] not in trained] for s, rows in by_spk.items()}
    eligible = [s for s, rows in by_spk.items() if len(rows) >= 2 and seen[s]]
    if cfg.n_same + cfg.n_cross and not eligible:
        raise SynthesisError(f"{clean_path}: no speaker has two val utterances (a text and a held-out prompt); "
                             "raise clean.val_fraction or set samples.n_same and n_cross lower")
    if cfg.n_cross and len(eligible) < 2:
        raise SynthesisError(f"{clean_path}: cross samples need two speakers with two val utterances each, found "
                             f"{len(eligible)}; set samples.n_cross: 0")
    novel_eligible = [s for s, rows in by_spk.items() if len(rows) >= 2 and novel[s]]
    if cfg.n_novel and not novel_eligible:
        raise SynthesisError(f"{clean_path}: no val text is absent from train, so there is nothing novel to read; "
                             "raise clean.val_text_fraction or set samples.n_novel: 0")
    rng = np.random.default_rng(cfg.seed)
    speakers = [eligible[i] for i in rng.permutation(len(eligible))]
    used: set[str] = set()

    def draw(rows: list[dict], avoid: set[str]) -> dict:
        fresh = [r for r in rows if r["utt_id"] not in avoid and r["utt_id"] not in used]
        pool = fresh or [r for r in rows if r["utt_id"] not in avoid]
        return pool[int(rng.integers(len(pool)))]

    def row(name: str, kind: str, spk: str, target: dict, prompt: dict, emo_row: dict, emo_spk: str) -> dict:
        return {
            "name": name, "kind": kind, "text": target["text"], "speaker": spk,
            "speaker_prompt": prompt["audio_path"],
            "emotion_prompt": emo_row["audio_path"] if kind == "cross" else "", "emotion_speaker": emo_spk,
            "emotion": str(emo_row["emotion"] or ""), "reference": target["audio_path"], "utt_id": target["utt_id"],
        }

    out = []
    names = cfg.names()
    for i in range(cfg.n_same + cfg.n_cross):
        spk = speakers[i % len(speakers)]
        target = draw(seen[spk], set())
        used.add(target["utt_id"])
        prompt = draw(by_spk[spk], {target["utt_id"]})
        used.add(prompt["utt_id"])
        emo_row, emo_spk = prompt, spk
        if i >= cfg.n_same:
            others = [s for s in speakers if s != spk]
            emo_spk = others[(i - cfg.n_same) % len(others)]
            rows = by_spk[emo_spk]
            differ = [r for r in rows if r["emotion"] and r["emotion"] != prompt["emotion"]]
            pool = differ or rows
            emo_row = pool[int(rng.integers(len(pool)))]
        out.append(row(names[i], "same" if i < cfg.n_same else "cross", spk, target, prompt, emo_row, emo_spk))
    def same_speaker(kind: str, n: int, eligible: list[str], targets: dict, prompts: dict) -> None:
        """``n`` samples of ``kind``: a target of ``targets[spk]``, a held-out prompt of ``prompts[spk]``."""
        order = [eligible[i] for i in rng.permutation(len(eligible))]
        for j in range(n):
            spk = order[j % len(order)]
            target = draw(targets[spk], set())
            used.add(target["utt_id"])
            prompt = draw(prompts[spk], {target["utt_id"]})
            used.add(prompt["utt_id"])
            out.append(row(names[len(out)], kind, spk, target, prompt, prompt, spk))

    if cfg.n_novel:
        same_speaker("novel", cfg.n_novel, novel_eligible, novel, by_spk)
    if cfg.n_base:
        same_speaker("base", cfg.n_base, base_eligible, base_by_spk, base_by_spk)
    return pd.DataFrame(out)


# --- CLI ------------------------------------------------------------------------------------------


def _config(a) -> SynthesizeConfig:
    config = load_config_arg(a.config) if a.config else {}
    if a.runtime:
        config = merge_runtime(config, load_config_arg(a.runtime))
    section = dict(config.get("synthesize") or {})
    for key in ("temperature", "top_k", "top_p", "repetition_penalty", "num_beams", "length_penalty", "max_frames",
                "emo_alpha", "prompt_seconds", "seed", "device", "batch_size", "diffusion_steps", "cfg_rate"):
        value = getattr(a, key)
        if value is not None:
            section[key] = value
    return parse_section(SynthesizeConfig, section, "synthesize")


def cli_synthesize(argv: list[str]) -> int:
    """``indextts synthesize``: text in, WAV out, from one checkpoint folder (one text, or a list)."""
    p = argparse.ArgumentParser(prog="indextts synthesize", description=cli_synthesize.__doc__)
    p.add_argument("--checkpoint", required=True, help="a stage folder, e.g. results/train/stage3")
    p.add_argument("--codec-weights", help="the codec weights (default: the path the checkpoint's model.json names)")
    voice = p.add_argument_group("semantic codes: the released files after the GPT (default: those model.json records)")
    voice.add_argument("--s2mel", help="IndexTTS2's s2mel.pth")
    voice.add_argument("--campplus", help="campplus_cn_common.bin (CAM++)")
    voice.add_argument("--bigvgan", help="the bigvgan_v2_22khz_80band_256x folder (config.json, bigvgan_generator.pt)")
    voice.add_argument("--topline-dir", help="batch mode: also write each row's real recording (column reference) "
                       "voiced by this stage from its own codes, <name>.wav (the evaluation's topline)")
    one = p.add_argument_group("one utterance")
    one.add_argument("--text", help="the text to speak")
    one.add_argument("--speaker-prompt", help="a clip of the voice to speak in")
    one.add_argument("--emotion-prompt", help="a clip whose emotion to take (default: the speaker prompt)")
    one.add_argument("--out", help="the WAV to write")
    many = p.add_argument_group("batch mode")
    many.add_argument("--list", help="TSV/CSV/JSONL of name, text, speaker_prompt[, emotion_prompt]")
    many.add_argument("--out-dir", help="where <name>.wav go")
    many.add_argument("--table", help="result table to write (default: <out-dir>/samples.tsv)")
    p.add_argument("--config", help="config file or inline JSON with a synthesize section")
    p.add_argument("--runtime", help="inline JSON of runtime knobs laid over --config (what the rules pass)")
    for key, tp in (("temperature", float), ("top_k", int), ("top_p", float), ("repetition_penalty", float),
                    ("num_beams", int), ("length_penalty", float), ("max_frames", int), ("emo_alpha", float), ("prompt_seconds", float), ("seed", int),
                    ("batch_size", int), ("diffusion_steps", int), ("cfg_rate", float)):
        p.add_argument("--" + key.replace("_", "-"), type=tp, help=f"override synthesize.{key}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override synthesize.device")
    p.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache (slow; a reference)")
    a = p.parse_args(argv)
    if bool(a.list) == bool(a.text):
        p.error("give either --text (with --speaker-prompt and --out) or --list (with --out-dir)")
    if a.text and not (a.speaker_prompt and a.out):
        p.error("--text needs --speaker-prompt and --out")
    if a.list and not a.out_dir:
        p.error("--list needs --out-dir")
    if a.topline_dir and not a.list:
        p.error("--topline-dir needs --list (with a reference column)")
    given = [a.s2mel, a.campplus, a.bigvgan]
    if any(given) and not all(given):
        p.error("give --s2mel, --campplus and --bigvgan together")
    cfg = _config(a)
    from indextts.audio.bigvgan import BigVGANLoadError
    from indextts.audio.campplus import CampplusLoadError
    from indextts.audio.dac import CodecLoadError
    from indextts.audio.s2mel import S2MelLoadError
    from indextts.audio.semantic_codec import SemanticCodecLoadError
    from indextts.audio.w2v_bert import W2VBertLoadError
    from indextts.checkpoint import CheckpointError
    from indextts.voice import VoiceError, VoiceFiles

    try:
        if a.text:
            for path in (a.speaker_prompt, a.emotion_prompt):
                if path and not Path(path).is_file():
                    raise SynthesisError(f"{path}: prompt clip not found")
            # A fixed name: the seed, not the output file's name, decides what is sampled.
            requests = [Request(name="utterance", text=a.text, speaker_prompt=Path(a.speaker_prompt),
                                emotion_prompt=Path(a.emotion_prompt) if a.emotion_prompt else None)]
        else:
            requests = read_requests(a.list)
        files = VoiceFiles(Path(a.s2mel), Path(a.campplus), Path(a.bigvgan)) if all(given) else None
        synth = Synthesizer(a.checkpoint, codec_weights=a.codec_weights, device=cfg.device, voice=files)
        print(f"{a.checkpoint}: {synth.meta.get('stage')} step {synth.meta.get('step')}, {synth.cfg.n_codebooks} "
              f"codebook(s), codec at {synth.sample_rate} Hz, on {synth.device}; {len(requests)} utterance(s)")
        results = []
        for s in synth.synthesize(requests, cfg, use_cache=not a.no_cache):
            out = Path(a.out) if a.text else Path(a.out_dir) / f"{s.request.name}.wav"
            write_wav(out, s.audio, s.sample_rate)
            results.append(s)
        by_name = {s.request.name: s for s in results}
        table = result_table([by_name[r.name] for r in requests])
        if a.list:
            path = write_table(table, a.table or Path(a.out_dir) / "samples.tsv")
            print(f"wrote {len(results)} WAVs to {a.out_dir} and {path}")
            if a.topline_dir:
                refs = [dict(r.columns).get("reference") for r in requests]
                if not all(refs):
                    raise SynthesisError(f"{a.list}: --topline-dir needs a reference column (each row's real recording)")
                for s in synth.resynthesize(requests, refs, cfg):
                    write_wav(Path(a.topline_dir) / f"{s.request.name}.wav", s.audio, s.sample_rate)
                print(f"wrote {len(requests)} topline WAVs to {a.topline_dir}")
        else:
            print(f"wrote {a.out}: {results[0].seconds:.2f} s, {results[0].frames} frames, stop reached "
                  f"{results[0].stop_reached}, RTF {results[0].rtf:.3f}")
    except (SynthesisError, CheckpointError, CodecLoadError, VoiceError, S2MelLoadError, CampplusLoadError,
            BigVGANLoadError, SemanticCodecLoadError, W2VBertLoadError) as e:
        print(f"indextts synthesize: {e}", file=sys.stderr)
        return 1
    return 0


def cli_sample_list(argv: list[str]) -> int:
    """``indextts sample-list``: the fixed sample set every stage speaks, as a request list."""
    p = argparse.ArgumentParser(prog="indextts sample-list", description=cli_sample_list.__doc__)
    p.add_argument("--config", required=True, help="config file or inline JSON with a samples section")
    p.add_argument("--clean", required=True, help="results/clean/clean.parquet")
    p.add_argument("--out", required=True, help="the request list (TSV) to write")
    a = p.parse_args(argv)
    cfg = get_section(SamplesConfig, load_config_arg(a.config), "samples")
    try:
        table = select_samples(cfg, a.clean)
    except SynthesisError as e:
        print(f"indextts sample-list: {e}", file=sys.stderr)
        return 1
    write_table(table, a.out)
    print(f"wrote {a.out}: {len(table)} samples over {table['speaker'].nunique()} speakers")
    return 0


__all__ = [
    "Request",
    "SamplesConfig",
    "Synthesis",
    "SynthesisError",
    "SynthesizeConfig",
    "Synthesizer",
    "read_requests",
    "result_table",
    "row_seed",
    "sample_names",
    "select_samples",
    "write_table",
    "write_wav",
]
