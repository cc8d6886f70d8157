"""Score a stage's samples the way the field does: ``indextts evaluate`` and ``indextts evaluate-reference``.

Every sample of the fixed sample set (``indextts sample-list``) speaks the text of a val utterance
whose real recording exists, so each generated clip is scored against that recording:

* **reference measures**, always on (:mod:`indextts.evaluation.acoustic`): MCD after DTW, log-F0
  RMSE and voicing error on the DTW path, duration ratio, and *text retrieval*: is the right text's
  recording the nearest (MCD-DTW) among about ten real recordings of the same speaker with other
  texts? Plus the stop-token rate from the synthesis table.
* **model-based measures**, when ``eval.asr.path`` / ``eval.speaker.path`` name local folders:
  CER (and WER for space-separated languages) against the text, both sides through the
  pipeline's text normaliser; speaker similarity to the speaker prompt (and, for cross samples,
  to the emotion prompt's speaker, which should stay low).

A score never stands alone (seed-tts-eval, ESPnet): ``evaluate-reference`` scores, once for all
stages, the **topline** (the real recording through the codec, with the codebooks training used:
the best any GPT on these codes can do), the **floor** (a real recording of the same speaker with
another text: what a model that learned nothing of the text scores) and the real recording itself
(the ASR's own error on real speech, the speaker model's ceiling). ``evaluate`` puts them beside
the stage's numbers in ``summary.json`` and says plainly when a stage does not yet speak the text.

Candidate recordings for retrieval, and the floor clip, are drawn by :func:`candidate_sets` from
``(eval.seed, sample name)``, so the stage runs and the reference run see the same sets.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np

from indextts.config import ConfigError, get_section, load_config_arg, section_dict
from indextts.evaluation.acoustic import AcousticConfig, FeatureCache
from indextts.evaluation.asr import AsrConfig
from indextts.evaluation.speaker import SpeakerConfig

if TYPE_CHECKING:
    import pandas as pd

# Columns a sample table must have; the others (speaker, kind, stop_reached, prompts) are used
# when present.
REQUIRED = ("name", "text", "reference")

# Every measure: (column, what it is, the better direction). ``near1``: best at 1.
MEASURES: dict[str, tuple[str, str]] = {
    "mcd": ("MCD-DTW (dB)", "lower"),
    "log_f0_rmse": ("log-F0 RMSE", "lower"),
    "vuv_error": ("voicing error", "lower"),
    "duration_ratio": ("duration ratio (generated / real)", "near1"),
    "retrieval_hit": ("text retrieval top-1", "higher"),
    "stop_reached": ("stop token reached", "higher"),
    "cer": ("CER", "lower"),
    "wer": ("WER", "lower"),
    "sim": ("speaker similarity to the prompt", "higher"),
    "sim_emotion": ("similarity to the emotion prompt's speaker (cross)", "lower"),
}
# Shares (0/1 per sample), summarised as rates.
RATES = ("retrieval_hit", "stop_reached")


class EvaluationError(ValueError):
    """Evaluation cannot run as asked; the message names the file, row or key and what to do."""


@dataclass(frozen=True)
class ProbeConfig:
    """``eval.probe``: the linear probes on the frozen model's ``emo_vec`` and speaker latents."""

    split: Literal["val", "train", "all"] = "val"  # held-out utterances by default
    max_utterances: int = 2000  # a seeded sample beyond that (the probe's cost grows with it)
    folds: int = 5  # cross-validation folds (fewer when a class has fewer utterances)
    seconds: float = 6.0  # prompt crop, as training crops prompts

    def __post_init__(self) -> None:
        p = []
        if self.max_utterances < 4:
            p.append(f"eval.probe.max_utterances must be at least 4, got {self.max_utterances}")
        if self.folds < 2:
            p.append(f"eval.probe.folds must be at least 2, got {self.folds}")
        if self.seconds <= 0:
            p.append(f"eval.probe.seconds must be positive, got {self.seconds}")
        if p:
            raise ConfigError("invalid config:\n  " + "\n  ".join(p))


@dataclass(frozen=True)
class EvalConfig:
    """The ``eval`` config section. Every value here can change a score, so all of it is in the
    evaluation rules' params."""

    acoustic: AcousticConfig = field(default_factory=AcousticConfig)
    # Real recordings of the sample's speaker in the retrieval set, the right text's among them
    # (chance is 1 / candidates).
    candidates: int = 10
    seed: int = 0  # candidate draws and bootstrap resampling
    n_boot: int = 2000  # bootstrap resamples for the 95% intervals
    device: Literal["auto", "cpu", "cuda"] = "auto"  # for the ASR, speaker and probe models
    asr: AsrConfig = field(default_factory=AsrConfig)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        p = []
        if self.candidates < 2:
            p.append(f"eval.candidates must be at least 2 (the right text and one other), got {self.candidates}")
        if self.n_boot < 100:
            p.append(f"eval.n_boot must be at least 100, got {self.n_boot}")
        if p:
            raise ConfigError("invalid config:\n  " + "\n  ".join(p))


def resolve_device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("eval.device is 'cuda' but torch sees no CUDA device; set it to auto or cpu")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# --- inputs -------------------------------------------------------------------------------------


def read_samples(path: str | Path) -> "pd.DataFrame":
    """A sample table (``samples.tsv`` of a stage, or the request list ``list.tsv``): TSV/CSV with
    a header, at least ``name``, ``text`` and ``reference`` (the real recording of the text).

    Raises:
        EvaluationError: a missing file or column, or a reference that does not exist, naming the row.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: sample table not found")
    table = pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t", dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {missing}; a sample table needs {list(REQUIRED)} "
                              "(reference: the real recording of the text)")
    problems = []
    for i, r in enumerate(table.to_dict("records")):
        ref = Path(r["reference"])
        if not ref.is_absolute():
            table.loc[i, "reference"] = str(path.parent / ref)
        if not Path(table.loc[i, "reference"]).is_file():
            problems.append(f"{path}: row {i + 1} ({r['name']!r}): reference {table.loc[i, 'reference']} does not exist")
    if problems:
        raise EvaluationError("bad sample table:\n  " + "\n  ".join(problems))
    if table.empty:
        raise EvaluationError(f"{path}: no rows")
    return table


@dataclass(frozen=True)
class Candidates:
    """The retrieval set of one sample: ``paths[0]`` is the right text's recording (the sample's
    reference); the others are real recordings of the same speaker with other texts. ``floor``
    is the first of those, scored as the floor."""

    paths: tuple[str, ...]
    floor: str | None


def _seed_of(seed: int, name: str) -> int:
    from indextts.synthesize import row_seed

    return row_seed(seed, name)


def candidate_sets(table: "pd.DataFrame", clean: str | Path | None, n: int, seed: int) -> dict[str, Candidates]:
    """Draw each sample's retrieval set and floor clip.

    Args:
        table: the sample table (``name``, ``text``, ``reference``, optionally ``speaker``).
        clean: ``clean.parquet``: candidates are other recordings of the sample's speaker, one
            per distinct text other than the sample's. Without it, the table's own references
            (same speaker when there is a ``speaker`` column).
        n: the set's size, the right text's recording included.
        seed: with the sample's name, decides the draw (so every stage sees the same sets).

    Returns:
        name -> :class:`Candidates`; a sample whose speaker has no other text gets a set of one
        and no floor (its retrieval is then not scored).
    """
    import pandas as pd

    has_spk = "speaker" in table.columns
    if clean is not None:
        speakers = sorted(set(table["speaker"])) if has_spk else None
        filters = [("speaker", "in", speakers)] if speakers else None
        pool = pd.read_parquet(clean, columns=["utt_id", "audio_path", "text", "speaker"], filters=filters)
    else:
        pool = pd.DataFrame({"utt_id": table["name"], "audio_path": table["reference"], "text": table["text"],
                             "speaker": table["speaker"] if has_spk else ""})
    pool = pool.sort_values("utt_id")
    by_spk = {s: g for s, g in pool.groupby("speaker", sort=True)} if has_spk else {"": pool}
    out = {}
    for r in table.to_dict("records"):
        group = by_spk.get(r.get("speaker", "") if has_spk else "")
        others = group[group["text"] != r["text"]] if group is not None else pool.iloc[:0]
        texts = sorted(set(others["text"]))
        rng = np.random.default_rng(_seed_of(seed, r["name"]))
        picked = [texts[i] for i in rng.permutation(len(texts))[: n - 1]]
        paths = []
        for text in picked:
            rows = others[others["text"] == text]["audio_path"].tolist()
            paths.append(rows[int(rng.integers(len(rows)))])
        out[r["name"]] = Candidates(paths=(r["reference"], *paths), floor=paths[0] if paths else None)
    return out


# --- scoring ------------------------------------------------------------------------------------


class ModelMeasures:
    """The model-based measures configured in ``eval``: ASR (CER/WER) and speaker similarity.
    Loaded once; each is ``None`` when its folder is not configured."""

    def __init__(self, cfg: EvalConfig, normalize: Callable[[str], str], language: str, log=print) -> None:
        from indextts.evaluation.asr import AsrModel, space_separated
        from indextts.evaluation.speaker import SpeakerModel

        device = resolve_device(cfg.device) if (cfg.asr.path or cfg.speaker.path) else "cpu"
        self.normalize = normalize
        self.words = space_separated(language)
        self.asr = AsrModel(cfg.asr, device=device) if cfg.asr.path else None
        self.speaker = SpeakerModel(cfg.speaker, device=device) if cfg.speaker.path else None
        self._audio: dict[tuple[str, int], np.ndarray] = {}
        self._emb: dict[str, np.ndarray] = {}
        for m, what in ((self.asr, "ASR"), (self.speaker, "speaker model")):
            if m is not None:
                log(f"{what}: {m.name} on {device}")

    def names(self) -> dict[str, str | None]:
        return {"asr": self.asr.name if self.asr else None, "speaker": self.speaker.name if self.speaker else None}

    def _load(self, path: str, sr: int) -> np.ndarray:
        from indextts.evaluation.acoustic import load_audio

        key = (str(Path(path).resolve()), sr)
        if key not in self._audio:
            self._audio[key] = np.asarray(load_audio(path, sr), dtype=np.float32)
        return self._audio[key]

    def transcribe(self, paths: Sequence[str]) -> list[str]:
        assert self.asr is not None
        return self.asr.transcribe([self._load(p, self.asr.sample_rate) for p in paths])

    def error_rates(self, hyps: Sequence[str], refs: Sequence[str]) -> list[dict]:
        from indextts.evaluation.asr import error_rates

        return [error_rates(h, r, self.normalize, words=self.words) for h, r in zip(hyps, refs)]

    def embed(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """Speaker embeddings of ``paths`` (cached per file)."""
        assert self.speaker is not None
        todo = sorted({str(Path(p).resolve()) for p in paths if p} - set(self._emb))
        clips = {p: self._load(p, self.speaker.sample_rate) for p in todo}
        # A clip shorter than the model's receptive field has no embedding (NaN similarity).
        ok = [p for p in todo if clips[p].shape[0] >= self.speaker.min_samples]
        for p in set(todo) - set(ok):
            print(f"WARNING {p}: {clips[p].shape[0] / self.speaker.sample_rate:.3f} s is shorter than the speaker "
                  "model takes; no similarity for it", file=sys.stderr)
            self._emb[p] = None
        if ok:
            self._emb.update(zip(ok, self.speaker.embed([clips[p] for p in ok])))
        return {p: self._emb[str(Path(p).resolve())] for p in paths if p}

    def similarity(self, a: str, b: str) -> float:
        from indextts.evaluation.speaker import cosine

        e = self.embed([a, b])
        return math.nan if e[a] is None or e[b] is None else float(cosine(e[a], e[b]))


def score_clips(clips: Sequence[str], table: "pd.DataFrame", cands: Mapping[str, Candidates], cfg: EvalConfig,
                models: ModelMeasures | None, *, retrieval: bool = True, cache=None) -> "pd.DataFrame":
    """Score one clip per sample row against the row's real recording.

    Args:
        clips: the clip to score for each row of ``table`` (generated, topline or floor).
        table: the sample table.
        cands: :func:`candidate_sets` of the table.
        retrieval: score text retrieval (not for the floor, which is itself a candidate).
        cache: an acoustic :class:`~indextts.evaluation.acoustic.FeatureCache` to share.

    Returns:
        One row per sample: ``name`` and every measure that applies (NaN where it does not).
    """
    import pandas as pd

    from indextts.evaluation.acoustic import compare, retrieve

    cache = cache if cache is not None else FeatureCache(cfg.acoustic)
    rows = []
    for clip, r in zip(clips, table.to_dict("records")):
        gen, ref = cache(clip), cache(r["reference"])
        row = {"name": r["name"], **compare(gen, ref)}
        c = cands[r["name"]]
        if retrieval and len(c.paths) > 1:
            got = retrieve(gen, [cache(p) for p in c.paths], 0)
            row.update(retrieval_hit=float(got["hit"]), retrieval_rank=int(got["rank"]), retrieval_n=int(got["n"]))
        else:
            row.update(retrieval_hit=math.nan, retrieval_rank=-1, retrieval_n=len(c.paths))
        rows.append(row)
    out = pd.DataFrame(rows)
    if models is not None and models.asr is not None:
        hyps = models.transcribe(list(clips))
        rates = models.error_rates(hyps, table["text"].tolist())
        out["asr_text"] = hyps
        out["cer"] = [e["cer"] for e in rates]
        out["wer"] = [e["wer"] if e["wer"] is not None else math.nan for e in rates]
    if models is not None and models.speaker is not None and "speaker_prompt" in table.columns:
        out["sim"] = [models.similarity(c, p) if p else math.nan for c, p in zip(clips, table["speaker_prompt"])]
        if "emotion_prompt" in table.columns:
            emo = [p if k == "cross" else "" for p, k in zip(table["emotion_prompt"], table.get("kind", [""] * len(table)))]
            out["sim_emotion"] = [models.similarity(c, p) if p else math.nan for c, p in zip(clips, emo)]
    return out


def summarize(scores: "pd.DataFrame", seed: int, n_boot: int) -> dict[str, dict]:
    """Mean, median, 95% bootstrap interval and n of every measure column present."""
    from indextts.evaluation.stats import bootstrap_summary, rate_summary

    out = {}
    for col in MEASURES:
        if col not in scores.columns:
            continue
        values = scores[col].astype(float).tolist()
        if col in RATES:
            flags = [bool(v) for v in values if not math.isnan(v)]
            out[col] = rate_summary(flags, seed=seed, n_boot=n_boot)
        else:
            out[col] = bootstrap_summary(values, seed=seed, n_boot=n_boot)
    return out


# Sample kinds scored and shown per kind, never in a stage's headline measures: base-language texts
# (is the old language still there?) and texts training never saw (reading new text, no goal).
OUTSIDE_HEADLINE = ("base", "novel")


def verdict(summary: Mapping[str, Any]) -> list[str]:
    """Why a stage does not yet speak the text, if it does not: its retrieval interval reaches
    chance, or its MCD-DTW is no better than the floor's. Empty when neither holds."""
    gen, floor = summary["measures"], summary.get("floor") or {}
    why = []
    hit = gen.get("retrieval_hit") or {}
    chance = summary.get("retrieval_chance")
    if hit.get("n") and chance is not None and (hit.get("ci_low") or 0.0) <= chance:
        why.append(f"text retrieval top-1 {hit['mean']:.2f} (95% CI {hit['ci_low']:.2f}-{hit['ci_high']:.2f}) "
                   f"does not clear chance ({chance:.2f})")
    mcd, fmcd = gen.get("mcd") or {}, floor.get("mcd") or {}
    if mcd.get("mean") is not None and fmcd.get("mean") is not None and mcd["mean"] >= fmcd["mean"]:
        why.append(f"MCD-DTW {mcd['mean']:.2f} dB is no better than the floor's {fmcd['mean']:.2f} dB "
                   "(a real recording of the same speaker with another text)")
    return why


def _reference_summaries(reference: "pd.DataFrame | None", names: Sequence[str], seed: int, n_boot: int) -> dict:
    if reference is None:
        return {}
    out = {}
    for system, part in reference.groupby("system", sort=True):
        part = part[part["name"].isin(set(names))]
        out[system] = summarize(part, seed, n_boot)
    return out


def evaluate_stage(cfg: EvalConfig, samples: Path, *, out_dir: Path, clean: Path | None = None,
                   wav_dir: Path | None = None, reference: Path | None = None, features: Path | None = None,
                   topline_dir: Path | None = None, normalize: Callable[[str], str] = str, language: str = "",
                   label: str = "", log=print) -> dict:
    """Score a folder of generated WAVs (``<name>.wav``) against their real recordings.

    Args:
        samples: the sample table (a stage's ``samples.tsv``).
        out_dir: gets ``scores.parquet`` (one row per sample) and ``summary.json``.
        clean: ``clean.parquet`` for the retrieval candidates (else the table's own references).
        wav_dir: where ``<name>.wav`` are (default: the table's folder).
        reference: ``evaluate-reference``'s ``scores.parquet`` (topline, floor, real), put beside.
        features: ``evaluate-reference``'s ``features.npz``: the real recordings' analyses, reused
            (every stage scores against the same references and candidates).
        topline_dir: this stage's own topline, ``<name>.wav`` (semantic codes: the real
            recording's codes voiced through the stage), scored as the ``topline`` system in
            place of the reference's.
        normalize: the text normaliser applied to ASR hypotheses and texts before scoring.
        language: the text's language (whether WER is meaningful).
        label: what was scored, for the summary (``stage3``).

    Returns:
        The summary (also written to ``summary.json``).
    """
    import pandas as pd

    from indextts.files import write_json, write_parquet

    t0 = time.perf_counter()
    table = read_samples(samples)
    wav_dir = Path(wav_dir or Path(samples).parent)
    clips = [str(wav_dir / f"{n}.wav") for n in table["name"]]
    missing = [c for c in clips if not Path(c).is_file()]
    if missing:
        raise EvaluationError(f"{samples}: {len(missing)} generated WAV(s) missing, e.g. {missing[0]}")
    cands = candidate_sets(table, clean, cfg.candidates, cfg.seed)
    models = ModelMeasures(cfg, normalize, language, log=log)
    cache = FeatureCache(cfg.acoustic)
    if features is not None:
        try:
            taken = cache.load(features)
        except ValueError as e:
            raise EvaluationError(str(e)) from e
        log(f"{features}: {taken} real recordings' features reused")
    scores = score_clips(clips, table, cands, cfg, models, cache=cache)
    if "stop_reached" in table.columns:
        scores["stop_reached"] = [float(v == "True") if v in ("True", "False") else math.nan
                                  for v in table["stop_reached"]]
    for col in ("kind", "speaker", "text"):
        if col in table.columns:
            scores.insert(1, col, table[col].tolist())
    ref = pd.read_parquet(reference) if reference else None
    if topline_dir is not None:
        top = [str(Path(topline_dir) / f"{n}.wav") for n in table["name"]]
        missing = [c for c in top if not Path(c).is_file()]
        if missing:
            raise EvaluationError(f"{topline_dir}: {len(missing)} topline WAV(s) missing, e.g. {missing[0]}")
        own = score_clips(top, table, cands, cfg, models, cache=cache).assign(system="topline")
        ref = own if ref is None else pd.concat([ref[ref["system"] != "topline"], own], ignore_index=True)
    # The headline is the new language's texts that training has: base-language samples (kind base)
    # and texts training never saw (kind novel) count in by_kind only.
    head = scores[~scores["kind"].isin(OUTSIDE_HEADLINE)] if "kind" in scores.columns else scores
    head = head if len(head) else scores
    n_cands = [len(cands[n].paths) for n in head["name"] if len(cands[n].paths) > 1]
    summary = {
        "what": label or str(samples), "samples": str(samples), "n": len(head),
        "measures": summarize(head, cfg.seed, cfg.n_boot),
        "retrieval_chance": float(np.mean([1.0 / k for k in n_cands])) if n_cands else None,
        **_reference_summaries(ref, head["name"].tolist(), cfg.seed, cfg.n_boot),
        "by_kind": {k: summarize(part, cfg.seed, cfg.n_boot) for k, part in scores.groupby("kind", sort=True)}
        if "kind" in scores.columns else {},
        "models": models.names(), "acoustic": section_dict(cfg.acoustic), "seed": cfg.seed,
    }
    summary["does_not_speak"] = verdict(summary)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    out_dir = Path(out_dir)
    write_parquet(pa_table(scores), out_dir / "scores.parquet")
    write_json(out_dir / "summary.json", summary)
    return summary


def pa_table(frame: "pd.DataFrame"):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


def topline_clips(table: "pd.DataFrame", codec_weights: Path, out_dir: Path, *, n_codebooks: int | None,
                  n_quantizers: int | None, device: str = "cpu") -> list[str]:
    """Each sample's real recording through the codec (encode, then decode with the codebooks the
    model trains on), written as ``out_dir/<name>.wav`` at the codec's rate."""
    import torch

    from indextts.audio.dac import decode_codes, encode_batch, load_codec
    from indextts.codes import read_audio
    from indextts.synthesize import write_wav

    model, info = load_codec(codec_weights, device=device, n_quantizers=n_quantizers)
    k = min(n_codebooks or info.n_q, info.n_q)
    out = []
    for r in table.to_dict("records"):
        audio = torch.from_numpy(read_audio(r["reference"], info.sample_rate))
        codes = encode_batch(model, audio.to(device)[None, None], [audio.shape[0]], n_quantizers=k)[0]
        wave = decode_codes(model, codes, n_codebooks_ok=k < int(model.n_codebooks)).cpu().numpy()
        out.append(str(write_wav(out_dir / f"{r['name']}.wav", np.clip(wave, -1, 1), info.sample_rate)))
    return out


def evaluate_reference(cfg: EvalConfig, samples: Path, *, out_dir: Path, codec_weights: Path | None,
                       clean: Path | None = None, n_codebooks: int | None = None, n_quantizers: int | None = None,
                       normalize: Callable[[str], str] = str, language: str = "", log=print) -> Path:
    """Score what every stage is compared with: the topline (codec resynthesis of the real
    recording, its WAVs in ``out_dir/topline/``), the floor (a real recording of the same
    speaker with another text) and, for the model-based measures, the real recording itself.

    Returns:
        ``out_dir/scores.parquet``: one row per (sample, ``system``).
    """
    import pandas as pd

    from indextts.files import write_json, write_parquet

    t0 = time.perf_counter()
    table = read_samples(samples)
    cands = candidate_sets(table, clean, cfg.candidates, cfg.seed)
    models = ModelMeasures(cfg, normalize, language, log=log)
    cache = FeatureCache(cfg.acoustic)
    parts = []
    if codec_weights is not None:
        top = topline_clips(table, codec_weights, Path(out_dir) / "topline", n_codebooks=n_codebooks,
                            n_quantizers=n_quantizers)
        parts.append(score_clips(top, table, cands, cfg, models, cache=cache).assign(system="topline"))
    has_floor = [cands[n].floor is not None for n in table["name"]]
    if any(has_floor):
        sub = table[has_floor].reset_index(drop=True)
        floor = [cands[n].floor for n in sub["name"]]
        parts.append(score_clips(floor, sub, cands, cfg, models, retrieval=False, cache=cache)
                     .assign(system="floor", clip=floor))
    if models.asr is not None or models.speaker is not None:
        real = score_clips(table["reference"].tolist(), table, cands, cfg, models, retrieval=False, cache=cache)
        parts.append(real.assign(system="real"))
    scores = pd.concat(parts, ignore_index=True)
    path = write_parquet(pa_table(scores), Path(out_dir) / "scores.parquet")
    # The real recordings' analyses (references, candidates, floors), for every stage to reuse.
    topline_dir = (Path(out_dir) / "topline").resolve()
    cache.save(Path(out_dir) / "features.npz", keep=lambda p: topline_dir not in p.parents)
    summary = {system: summarize(part, cfg.seed, cfg.n_boot) for system, part in scores.groupby("system", sort=True)}
    write_json(Path(out_dir) / "summary.json", {"samples": str(samples), "n": len(table), "systems": summary,
                                               "models": models.names(), "seconds": round(time.perf_counter() - t0, 2)})
    return path


# --- CLI ------------------------------------------------------------------------------------------


def _sections(arg: str | None) -> tuple[EvalConfig, dict]:
    config = load_config_arg(arg) if arg else {}
    return get_section(EvalConfig, config, "eval"), config


def _normaliser(config: Mapping[str, Any]) -> tuple[Callable[[str], str], str]:
    from indextts.text import TextConfig, normalize_text

    text_cfg = get_section(TextConfig, config, "text")
    return (lambda s: normalize_text(s, text_cfg)), text_cfg.language


def _print_summary(summary: Mapping[str, Any]) -> None:
    for col, s in summary["measures"].items():
        if s.get("n"):
            top = (summary.get("topline") or {}).get(col, {}).get("mean")
            floor = (summary.get("floor") or {}).get(col, {}).get("mean")
            extra = "".join(f", {k} {v:.3f}" for k, v in (("topline", top), ("floor", floor)) if v is not None)
            print(f"  {MEASURES[col][0]}: {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] (n={s['n']}{extra})")
    by_kind = summary.get("by_kind") or {}
    if len(by_kind) > 1:
        for kind, m in sorted(by_kind.items()):
            cells = [f"{MEASURES[col][0]} {m[col]['mean']:.3f}" for col in ("retrieval_hit", "mcd", "duration_ratio")
                     if (m.get(col) or {}).get("n")]
            n = max((v.get("n") or 0 for v in m.values() if isinstance(v, dict)), default=0)
            note = " (not in the headline)" if kind in OUTSIDE_HEADLINE else ""
            print(f"  {kind}{note}, n={n}: " + ", ".join(cells))
    for why in summary.get("does_not_speak") or []:
        print(f"WARNING {summary['what']} does not yet speak the text: {why}", file=sys.stderr)


def cli_evaluate(argv: list[str]) -> int:
    """``indextts evaluate``: score generated WAVs against their real recordings."""
    p = argparse.ArgumentParser(prog="indextts evaluate", description=cli_evaluate.__doc__)
    p.add_argument("--samples", required=True, help="sample table: name, text, reference[, speaker, kind, "
                   "speaker_prompt, emotion_prompt, stop_reached] (a stage's samples.tsv)")
    p.add_argument("--wav-dir", help="where <name>.wav are (default: the table's folder)")
    p.add_argument("--clean", help="clean.parquet: other recordings of each speaker for text retrieval")
    p.add_argument("--reference", help="evaluate-reference's scores.parquet (topline, floor), put beside the scores")
    p.add_argument("--features", help="evaluate-reference's features.npz: the real recordings' analyses, reused")
    p.add_argument("--topline-dir", help="this stage's own topline <name>.wav (semantic codes), in place of the "
                   "reference's")
    p.add_argument("--out-dir", required=True, help="gets scores.parquet and summary.json")
    p.add_argument("--label", default="", help="what is scored, e.g. stage3")
    p.add_argument("--config", help="config file or inline JSON with the eval and text sections")
    a = p.parse_args(argv)
    cfg, config = _sections(a.config)
    normalize, language = _normaliser(config)
    from indextts.evaluation.asr import EvalModelError

    try:
        summary = evaluate_stage(cfg, Path(a.samples), out_dir=Path(a.out_dir), clean=Path(a.clean) if a.clean else None,
                                 wav_dir=Path(a.wav_dir) if a.wav_dir else None,
                                 reference=Path(a.reference) if a.reference else None,
                                 features=Path(a.features) if a.features else None,
                                 topline_dir=Path(a.topline_dir) if a.topline_dir else None, normalize=normalize,
                                 language=language, label=a.label)
    except (EvaluationError, EvalModelError) as e:
        print(f"indextts evaluate: {e}", file=sys.stderr)
        return 1
    print(f"{summary['what']}: {summary['n']} samples scored in {summary['seconds']:.1f} s -> {a.out_dir}")
    _print_summary(summary)
    return 0


def cli_eval_summary(argv: list[str]) -> int:
    """``indextts eval-summary SUMMARY...``: print each ``summary.json`` as ``evaluate`` does."""
    p = argparse.ArgumentParser(prog="indextts eval-summary", description=cli_eval_summary.__doc__)
    p.add_argument("summaries", nargs="+", help="results/eval/stageN/summary.json files")
    a = p.parse_args(argv)
    for path in a.summaries:
        try:
            summary = json.loads(Path(path).read_text(encoding="utf-8"))
            print(f"{summary['what']}: {summary['n']} samples ({path})")
            _print_summary(summary)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"indextts eval-summary: {path}: not an evaluate summary.json ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
            return 1
    return 0


def cli_evaluate_reference(argv: list[str]) -> int:
    """``indextts evaluate-reference``: score the codec topline, the floor and the real recordings."""
    p = argparse.ArgumentParser(prog="indextts evaluate-reference", description=cli_evaluate_reference.__doc__)
    p.add_argument("--samples", required=True, help="the sample list (results/samples/list.tsv)")
    p.add_argument("--clean", help="clean.parquet: other recordings of each speaker (retrieval and the floor)")
    p.add_argument("--codec-weights", help="the DAC weights the codes were made with (the topline); none: no topline")
    p.add_argument("--out-dir", required=True,
                   help="gets scores.parquet, summary.json, features.npz and topline/<name>.wav")
    p.add_argument("--config", help="config file or inline JSON with the eval, text, codec and model sections")
    a = p.parse_args(argv)
    cfg, config = _sections(a.config)
    normalize, language = _normaliser(config)
    n_codebooks = (config.get("model") or {}).get("n_codebooks")
    n_quantizers = (config.get("codec") or {}).get("n_quantizers")
    from indextts.audio.dac import CodecLoadError
    from indextts.evaluation.asr import EvalModelError

    try:
        path = evaluate_reference(cfg, Path(a.samples), out_dir=Path(a.out_dir),
                                  codec_weights=Path(a.codec_weights) if a.codec_weights else None,
                                  clean=Path(a.clean) if a.clean else None, n_codebooks=n_codebooks,
                                  n_quantizers=n_quantizers, normalize=normalize, language=language)
    except (EvaluationError, EvalModelError, CodecLoadError) as e:
        print(f"indextts evaluate-reference: {e}", file=sys.stderr)
        return 1
    summary = json.loads((Path(a.out_dir) / "summary.json").read_text(encoding="utf-8"))
    print(f"wrote {path}: {summary['n']} samples in {summary['seconds']:.1f} s")
    for system, measures in summary["systems"].items():
        text = ", ".join(f"{k} {v['mean']:.3f}" for k, v in measures.items() if v.get("n"))
        print(f"  {system}: {text}")
    return 0


__all__ = [
    "Candidates",
    "EvalConfig",
    "EvaluationError",
    "MEASURES",
    "ProbeConfig",
    "candidate_sets",
    "evaluate_reference",
    "evaluate_stage",
    "read_samples",
    "score_clips",
    "summarize",
    "verdict",
]
