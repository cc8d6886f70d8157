"""A small DAC trained from scratch on the demo corpus, so that the demo's codes carry speech.

The demo cannot ship a real codec (no model hub here), and a randomly initialised DAC decodes any
codes into broadband noise. This module trains DAC's own model (``dac.DAC``) with DAC's own
reconstruction losses (its multi-scale mel loss and the VQ commitment and codebook losses, with
``conf/base.yml``'s weights) and no GAN: on a CPU the discriminator costs 4-5x per step and did
not pay off at these budgets (issue 17). Then it scores the result on held-out utterances.

Data
    A clean manifest (``clean.parquet``, whose ``split`` column is honoured: only ``train`` rows
    are trained on, and the scored utterances are drawn from ``val``) or the demo corpus's
    ``manifest.jsonl`` (its dirty rows skipped; the scored utterances are drawn by seed and left
    out of training). Audio is resampled to the codec's rate by :func:`indextts.codes.read_audio`,
    the same reader the codes stage uses (espeak-ng writes 22.05 kHz, the codec runs at 16 kHz).
    Each step takes ``batch_size`` random crops of one random length in ``crop_seconds``, rounded
    to whole hops so that the decoder returns exactly the input's length (DAC's mel loss needs it).

Outputs, beside ``<name>.pth`` (DAC's own ``save(package=False)`` format, read by
:func:`indextts.audio.dac.load_codec` like any DAC weights; fp16 by default, about 1 MB)
    ``<name>.log.jsonl``     one record per ``log_every`` steps (``kind: train``: each loss term
                             averaged over the interval, grad norm, lr, seconds) and per scored
                             checkpoint (``kind: eval``: the scores below at that step)
    ``<name>.scores.json``   the codec scored on the held-out utterances (:func:`score_codec`):
                             topline (its reconstruction of the original) and floor (another
                             utterance of the same speaker, other text), both frame-aligned MCD
                             and the evaluation stage's MCD-DTW / log-F0 RMSE / voicing error,
                             with the test set's ids, the training data, steps, seed and time
    ``<name>.resume.pt``     while training: model, optimizer, step and both RNG states; the
                             run resumes from it and deletes it when the weights are written

Determinism
    Same seed, same data, same torch version and thread count: the same weights file bytes. The
    model is built and trained under ``torch.random.fork_rng`` seeded with ``seed`` (DAC draws its
    quantizer dropout from torch's global generator), crops come from a numpy generator of the
    same seed, and the weights are saved to an in-memory buffer (``torch.save`` names the zip
    folder after the file name). A resumed run restores both generators, so N steps give the same
    bytes as N/2, a kill, and N/2 more. CPU convolutions may sum in another order with another
    thread count, so the CLI pins one thread by default and the scores record the count.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from indextts.audio.dac import _import_dac, decode_codes, encode_batch, load_codec, make_demo_codec
from indextts.config import ConfigError
from indextts.demo import MIN_SECONDS
from indextts.files import atomic_path, sha256_file, write_json

# The committed demo codec (package data), trained once by the command its .scores.json records;
# the demo installs it (`indextts demo-codec --packaged`) unless told to retrain.
PACKAGED_WEIGHTS = Path(__file__).parent / "data" / "demo_codec" / "dac_demo_16khz.pth"

# DAC's multi-scale mel loss exactly as its conf/base.yml sets it: seven STFTs from 2 ms to 128 ms
# windows at 16 kHz, log10 magnitudes (pow 1) under an L1, no linear-magnitude term.
MEL_LOSS_KWARGS: dict = {
    "n_mels": [5, 10, 20, 40, 80, 160, 320],
    "window_lengths": [32, 64, 128, 256, 512, 1024, 2048],
    "mel_fmin": [0.0] * 7,
    "mel_fmax": [None] * 7,
    "pow": 1.0,
    "clamp_eps": 1e-5,
    "mag_weight": 0.0,
}

# 10 / ln(10) * sqrt(2): the MCD constant applied to a Euclidean distance of mel-cepstra (the one
# indextts.evaluation.acoustic applies on its DTW path).
_MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


@dataclass(frozen=True)
class DemoCodecConfig:
    """The trained demo codec: DAC's architecture arguments, then how it is trained and scored.

    The defaults are issue 17's recipe, except AdamW's betas, which are DAC's (0.8, 0.99): at 1000
    steps they gave a held-out MCD-DTW of 1.01 x the floor's against 1.08 with torch's (0.9, 0.999).

    Raises:
        ConfigError: from ``__post_init__``, naming every bad field at once.
    """

    # --- dac.DAC(**kwargs); saved in the weights file's metadata ---
    # 8 -> 128 encoder channels after four doublings: the encoder is cheap, the decoder is where
    # a small codec spends its parameters (436k in all).
    encoder_dim: int = 8
    # Strides multiply to a hop of 320 (50 frames/s at 16 kHz, like the official 16 kHz DAC). Each
    # stride s gives a conv of kernel 2s, padding ceil(s/2): odd strides (5) lose samples, so
    # [2, 4, 5, 8] returns 8 samples fewer than it is given and the mel loss fails on the length.
    encoder_rates: tuple[int, ...] = (2, 4, 4, 10)
    latent_dim: int = 32
    decoder_dim: int = 64
    decoder_rates: tuple[int, ...] = (10, 4, 4, 2)
    # 4 x 8 bits per frame: 1.6 kbit/s, enough for espeak-ng's clean voices.
    n_codebooks: int = 4
    codebook_size: int = 256
    codebook_dim: int = 8
    # Half of each batch uses a random number of codebooks (DAC's quantizer dropout), so the first
    # codebooks alone already decode to speech (the GPT's codebook 0 then means something).
    quantizer_dropout: float = 0.5
    sample_rate: int = 16000
    # --- training ---
    # 800: about 10 CPU-minutes, a retrain inside the demo's budget; the committed codec took 3000
    # (39 min; the scores against steps are in indextts/data/demo_codec/README.md).
    steps: int = 800
    batch_size: int = 8
    # Crop length range (s): long enough for the 2048-sample window of the mel loss (0.128 s).
    crop_seconds: tuple[float, float] = (0.4, 1.0)
    # 10x DAC's 1e-4: a tiny model from scratch on a CPU budget; constant (DAC's exponential decay,
    # 0.999996 per step, is flat over a few thousand steps).
    lr: float = 1e-3
    # constant, or cosine: lr * (min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * step / steps)) / 2),
    # annealed to the end of the run (the committed codec; its curve was still falling at constant lr).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.8, 0.99)  # DAC's conf/base.yml
    grad_clip: float = 1e3  # DAC's scripts/train.py: a guard against rare spikes, not a regulariser
    # DAC's lambdas: mel/loss, vq/commitment_loss, vq/codebook_loss.
    mel_weight: float = 15.0
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    seed: int = 0
    log_every: int = 50
    # Save the resume state every this many steps.
    save_every: int = 200
    # Score a checkpoint on the held-out set every this many steps (0: only the final weights),
    # so the log shows quality against training minutes. Scoring 20 utterances costs ~45 s (WORLD's
    # Harvest F0 dominates) and is not counted in the training time.
    eval_every: int = 0
    # --- scoring ---
    n_heldout: int = 20
    # fp16 halves the file (the committed one is ~0.9 MB); the scores are of the saved weights.
    dtype: Literal["fp32", "fp16"] = "fp16"

    def __post_init__(self) -> None:
        bad = []

        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad.append(f"{name}: expected a positive integer, got {v!r}")

        for name in ("encoder_dim", "latent_dim", "decoder_dim", "n_codebooks", "codebook_size", "codebook_dim",
                     "sample_rate", "steps", "batch_size", "log_every", "save_every", "n_heldout"):
            positive_int(name)
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            bad.append(f"eval_every: expected an integer >= 0, got {self.eval_every!r}")
        if tuple(self.decoder_rates) != tuple(reversed(self.encoder_rates)):
            bad.append(f"decoder_rates: expected the encoder's rates reversed, {list(reversed(self.encoder_rates))}, "
                       f"got {list(self.decoder_rates)}")
        odd = [r for r in self.encoder_rates if r % 2]
        if odd:
            bad.append(f"encoder_rates: odd strides {odd} make the decoder return fewer samples than it is given; "
                       "use even strides (e.g. [2, 4, 4, 10] for a hop of 320)")
        lo, hi = self.crop_seconds
        if not 0.13 <= lo <= hi:
            bad.append(f"crop_seconds: expected [min, max] with 0.13 <= min <= max (the mel loss's longest window "
                       f"is 0.128 s), got {list(self.crop_seconds)}")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            bad.append(f"quantizer_dropout: expected a share in [0, 1], got {self.quantizer_dropout!r}")
        if not self.lr > 0:
            bad.append(f"lr: expected a positive number, got {self.lr!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            bad.append(f"lr_schedule: expected 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad.append(f"min_lr_ratio: expected a share of lr in [0, 1], got {self.min_lr_ratio!r}")
        if self.dtype not in ("fp32", "fp16"):
            bad.append(f"dtype: expected 'fp32' or 'fp16', got {self.dtype!r}")
        if bad:
            raise ConfigError("invalid demo codec config:\n  " + "\n  ".join(bad))

    def dac_kwargs(self) -> dict:
        """``dac.DAC``'s constructor arguments."""
        return {
            "encoder_dim": self.encoder_dim, "encoder_rates": list(self.encoder_rates),
            "latent_dim": self.latent_dim, "decoder_dim": self.decoder_dim,
            "decoder_rates": list(self.decoder_rates), "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size, "codebook_dim": self.codebook_dim,
            "quantizer_dropout": self.quantizer_dropout, "sample_rate": self.sample_rate,
        }

    @property
    def hop_length(self) -> int:
        return int(np.prod(self.encoder_rates))

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (1-based; a function of the step alone, so a
        resumed run follows the same schedule)."""
        if self.lr_schedule == "constant":
            return self.lr
        done = min(max(step - 1, 0), self.steps) / self.steps  # 0 at the first step, (steps - 1) / steps at the last
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done)))


@dataclass(frozen=True)
class Utterance:
    """One manifest row, as far as the codec needs it."""

    utt_id: str
    audio_path: str
    text: str
    speaker: str
    split: str = ""  # train / val from clean.parquet; "" from a manifest without a split


@dataclass(frozen=True)
class DataSplit:
    """Which utterances train the codec and which score it (never both)."""

    train: tuple[Utterance, ...]
    heldout: tuple[Utterance, ...]  # scored, sorted by utt_id
    floors: tuple[Utterance | None, ...]  # per held-out: same speaker, other text (None: none exists)
    how: str  # one line saying how the held-out set was chosen


def output_paths(weights: str | os.PathLike) -> dict[str, Path]:
    """The files written beside ``weights``: ``log``, ``scores`` and ``resume``."""
    w = Path(weights)
    stem = w.name[:-len(w.suffix)] if w.suffix else w.name
    return {"log": w.with_name(f"{stem}.log.jsonl"), "scores": w.with_name(f"{stem}.scores.json"),
            "resume": w.with_name(f"{stem}.resume.pt")}


# --- data ---------------------------------------------------------------------------------------

def read_utterances(manifest: str | os.PathLike, log: Callable[[str], None] = print) -> list[Utterance]:
    """The rows of a clean manifest (``.parquet``: ``utt_id``, ``audio_path``, ``text``, ``speaker``,
    optional ``split``) or of the demo corpus's ``manifest.jsonl`` (``id``, ``audio`` relative to
    its folder, ``text``, ``speaker``; what the cleaner would reject is skipped and counted: lines
    that are not such an object, rows without text, repeated ids, and audio that is missing,
    unreadable or shorter than the demo's 1 s).

    Raises:
        FileNotFoundError: no such manifest.
        ValueError: a Parquet file without the needed columns, or no usable row; names the file.
    """
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (the clean manifest clean.parquet, or the demo "
                                "corpus's manifest.jsonl)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        need = {"utt_id", "audio_path", "text", "speaker"}
        missing = sorted(need - set(table.column_names))
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected a clean manifest (clean-manifest's "
                             "clean.parquet)")
        rows = table.to_pylist()
        out = [Utterance(str(r["utt_id"]), str(r["audio_path"]), str(r["text"]), str(r["speaker"]),
                         str(r.get("split") or "")) for r in rows]
    else:
        out, seen, skipped = [], set(), 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if (not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k].strip()
                                                   for k in ("id", "audio", "text", "speaker"))
                    or r["id"] in seen or _seconds(path.parent / r["audio"]) < MIN_SECONDS):
                skipped += 1
                continue
            seen.add(r["id"])
            out.append(Utterance(r["id"], str(path.parent / r["audio"]), r["text"], r["speaker"]))
        if skipped:
            log(f"{path}: skipped {skipped} rows that are not usable (malformed, no text, repeated id, audio "
                f"missing, unreadable or under {MIN_SECONDS:g} s)")
    if not out:
        raise ValueError(f"{path}: no usable rows")
    return sorted(out, key=lambda u: u.utt_id)


def _seconds(audio: Path) -> float:
    """The file's duration from its header; 0 when it is missing or unreadable."""
    import soundfile as sf

    try:
        return sf.info(str(audio)).duration
    except Exception:  # missing file, libsndfile errors
        return 0.0


def split_utterances(rows: Sequence[Utterance], n_heldout: int, seed: int) -> DataSplit:
    """Hold out ``n_heldout`` utterances to score the codec, and pick each one's floor.

    With a ``split`` column that has val rows, every val row is kept out of training (the
    pipeline's evaluation scores the codec on val recordings too) and the scored ones are a seeded
    draw of them; otherwise a seeded draw of all rows is held out. Each floor is a seeded draw among the same
    speaker's rows with another text, from any split (it is only listened to, never trained on).

    Raises:
        ValueError: no row to score or fewer than two to train on.
    """
    rng = np.random.default_rng(seed)
    if any(u.split not in ("", "train") for u in rows):
        val = [u for u in rows if u.split != "train"]
        train = [u for u in rows if u.split == "train"]
        pick = sorted(rng.choice(len(val), size=min(n_heldout, len(val)), replace=False).tolist())
        heldout = [val[i] for i in pick]
        how = (f"{len(heldout)} of the {len(val)} utterances outside the train split (seed {seed}); "
               f"trained on the {len(train)} train-split utterances only")
    else:
        pick = set(rng.choice(len(rows), size=min(n_heldout, len(rows) - 2), replace=False).tolist())
        heldout = [u for i, u in enumerate(rows) if i in pick]
        train = [u for i, u in enumerate(rows) if i not in pick]
        how = f"{len(heldout)} of {len(rows)} utterances drawn with seed {seed} and left out of training"
    if len(train) < 2 or not heldout:
        raise ValueError(f"{len(rows)} utterances: too few to hold {n_heldout} out for scoring and train the codec "
                         "on at least 2 others; the manifest needs more rows")
    floors = []
    for u in heldout:
        others = [o for o in rows if o.speaker == u.speaker and o.text != u.text]
        floors.append(others[int(rng.integers(len(others)))] if others else None)
    return DataSplit(tuple(train), tuple(heldout), tuple(floors), how)


def load_waves(rows: Sequence[Utterance], sample_rate: int) -> list[torch.Tensor]:
    """Each row's audio as a ``[N]`` float32 tensor at ``sample_rate``.

    Raises:
        ValueError: a file that cannot be read, naming its utterance id.
    """
    from indextts.codes import AudioFault, read_audio

    resamplers: dict = {}
    out = []
    for u in rows:
        try:
            out.append(torch.from_numpy(read_audio(u.audio_path, sample_rate, resamplers)))
        except AudioFault as e:
            raise ValueError(f"{u.utt_id}: {u.audio_path}: {e}; remove the row from the manifest") from None
    return out


def sample_batch(waves: Sequence[torch.Tensor], cfg: DemoCodecConfig, rng: np.random.Generator) -> torch.Tensor:
    """``batch_size`` random crops of one random whole-hop length: ``(B, 1, T)``, ``T % hop == 0``.

    Utterances are drawn with replacement; one shorter than the crop is zero-padded at the end.
    """
    hop = cfg.hop_length
    lo, hi = (max(1, round(s * cfg.sample_rate / hop)) for s in cfg.crop_seconds)
    n = int(rng.integers(lo, hi + 1)) * hop
    batch = torch.zeros(cfg.batch_size, 1, n)
    for b, i in enumerate(rng.integers(len(waves), size=cfg.batch_size).tolist()):
        w = waves[i]
        start = int(rng.integers(max(1, len(w) - n + 1)))
        piece = w[start:start + n]
        batch[b, 0, :len(piece)] = piece
    return batch


# --- model --------------------------------------------------------------------------------------

def build_codec(cfg: DemoCodecConfig) -> torch.nn.Module:
    """A freshly initialised ``dac.DAC`` of ``cfg`` (from torch's global generator: seed it)."""
    dac = _import_dac()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # DAC's use of the old weight_norm API
        return dac.DAC(**cfg.dac_kwargs())


def codec_bytes(model: torch.nn.Module, cfg: DemoCodecConfig) -> bytes:
    """The model as a DAC weights file (``save(package=False)``), in ``cfg.dtype``.

    fp16 goes through a fresh copy, so the training model stays fp32. The file is still DAC's own
    format: ``DAC.load`` and :func:`indextts.audio.dac.load_codec` cast the tensors back to fp32.
    """
    if cfg.dtype == "fp16":
        with torch.random.fork_rng(devices=[]):  # the copy's random init must not move the run's generator
            copy = build_codec(cfg)
        copy.load_state_dict(model.state_dict())
        model = copy.half()
    buf = io.BytesIO()
    model.save(buf, package=False)
    return buf.getvalue()


class ReconstructionLoss(torch.nn.Module):
    """DAC's generator loss without the GAN: ``mel_weight * mel + commitment_weight * commitment
    + codebook_weight * codebook``, each term returned too."""

    def __init__(self, cfg: DemoCodecConfig) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from dac.nn.loss import MelSpectrogramLoss

        self.cfg = cfg
        self.mel = MelSpectrogramLoss(**MEL_LOSS_KWARGS)

    def forward(self, model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from audiotools import AudioSignal

        out = model(x, self.cfg.sample_rate)  # audio (B, 1, T), the VQ losses
        if out["audio"].shape != x.shape:
            raise RuntimeError(f"the decoder returned {tuple(out['audio'].shape)} for input {tuple(x.shape)}: "
                               "the rates do not give exact lengths")
        with warnings.catch_warnings():
            # audiotools caches one STFT per signal and warns each time the next window size
            # replaces it; that is how DAC's own training runs this loss too.
            warnings.filterwarnings("ignore", message="stft_data changed shape")
            mel = self.mel(AudioSignal(out["audio"], self.cfg.sample_rate), AudioSignal(x, self.cfg.sample_rate))
        c = self.cfg
        loss = (c.mel_weight * mel + c.commitment_weight * out["vq/commitment_loss"]
                + c.codebook_weight * out["vq/codebook_loss"])
        return {"loss": loss, "mel": mel, "commitment": out["vq/commitment_loss"],
                "codebook": out["vq/codebook_loss"]}


# --- scoring ------------------------------------------------------------------------------------

def frame_mcd(a: np.ndarray, b: np.ndarray) -> float:
    """Frame-aligned mel-cepstral distortion (dB, c0 excluded) of two ``[T, D+1]`` mel-cepstra,
    over the frames both have (no DTW: for a reconstruction the frames are the same instants)."""
    n = min(len(a), len(b))
    diff = a[:n, 1:] - b[:n, 1:]
    return float(_MCD_SCALE * np.sqrt((diff ** 2).sum(axis=1)).mean())


def score_codec(weights: str | os.PathLike, heldout: Sequence[Utterance], floors: Sequence[Utterance | None],
                *, acoustic=None, cache: dict | None = None) -> dict:
    """Score a DAC weights file on held-out utterances: the topline (the codec's reconstruction
    of each original, all codebooks) against the floor (another utterance of the same speaker).

    Both are measured against the original recording with :mod:`indextts.evaluation.acoustic`
    (WORLD/SPTK mel-cepstra at the codec's rate): frame-aligned MCD (:func:`frame_mcd`; the floor
    over the frames both clips have) and :func:`~indextts.evaluation.acoustic.compare`'s MCD-DTW,
    log-F0 RMSE and voicing error.

    Args:
        weights: the file to score (loaded by :func:`indextts.audio.dac.load_codec`).
        heldout, floors: from :func:`split_utterances`.
        acoustic: an ``AcousticConfig`` (default: the evaluation stage's defaults at the codec's rate).
        cache: features of the originals and floors by utt_id, reused across calls (checkpoints).

    Returns:
        ``{"n", "n_floor", "topline": {measure: mean}, "floor": {...}, "mcd_dtw_ratio"
        (topline / floor MCD-DTW; issue 17's goal is at most 0.8), "per_utterance": [...]}``.
    """
    from indextts.evaluation.acoustic import AcousticConfig, compare, extract

    model, info = load_codec(weights)
    acfg = acoustic or AcousticConfig(sample_rate=info.sample_rate)
    cache = {} if cache is None else cache
    original = load_waves(heldout, info.sample_rate)
    floor_rows = [f for f in floors if f is not None]
    floor_waves = dict(zip((f.utt_id for f in floor_rows), load_waves(floor_rows, info.sample_rate)))

    def feats(key: str, wave: np.ndarray):
        if key not in cache:
            cache[key] = extract(wave.astype(np.float64), acfg)
        return cache[key]

    per = []
    for u, wave, floor in zip(heldout, original, floors):
        codes = encode_batch(model, wave[None, None], [len(wave)])[0]
        recon = decode_codes(model, codes)[: len(wave)].numpy()
        ref = feats(u.utt_id, wave.numpy())
        rec = extract(np.clip(recon, -1, 1).astype(np.float64), acfg)
        row = {"utt_id": u.utt_id, "speaker": u.speaker, "topline": {"mcd_frame": frame_mcd(rec.mcep, ref.mcep),
                                                                      **_measures(compare(rec, ref))}}
        if floor is not None:
            fl = feats(floor.utt_id, floor_waves[floor.utt_id].numpy())
            row["floor_utt_id"] = floor.utt_id
            row["floor"] = {"mcd_frame": frame_mcd(fl.mcep, ref.mcep), **_measures(compare(fl, ref))}
        per.append(row)
    top = _means([r["topline"] for r in per])
    flo = _means([r["floor"] for r in per if "floor" in r])
    ratio = top["mcd_dtw"] / flo["mcd_dtw"] if flo.get("mcd_dtw") else math.nan
    return {"n": len(per), "n_floor": sum("floor" in r for r in per), "topline": top, "floor": flo,
            "mcd_dtw_ratio": ratio, "per_utterance": per}


def _measures(c: dict) -> dict:
    return {"mcd_dtw": c["mcd"], "log_f0_rmse": c["log_f0_rmse"], "vuv_error": c["vuv_error"]}


def _means(rows: list[dict]) -> dict:
    """Per measure, the mean over the rows where it is defined (log-F0 RMSE is NaN with no frame
    voiced in both clips); NaN when it is defined nowhere."""
    out = {}
    for k in rows[0] if rows else ():
        v = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else math.nan
    return out


# --- training -----------------------------------------------------------------------------------

def _fingerprint(cfg: DemoCodecConfig, split: DataSplit) -> dict:
    """What a resume state must agree with: the config except the scoring/logging cadence and
    the step count (a longer run may continue a shorter one), and the training utterances."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "log_every", "save_every", "eval_every")}
    return json.loads(json.dumps({"config": keep, "train": [u.utt_id for u in split.train]}))


def _load_resume(path: Path, fingerprint: dict, steps: int, log: Callable[[str], None]) -> dict | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if json.loads(state["fingerprint"]) != fingerprint:
        log(f"{path}: made with another config or other training data; starting from step 0")
        return None
    if int(state["step"]) >= steps:
        log(f"{path}: at step {int(state['step'])}, not before the {steps} asked for; starting from step 0")
        return None
    return state


def _save_resume(path: Path, model, opt, rng: np.random.Generator, step: int, fingerprint: dict,
                 clock: "_Clock") -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(rng.bit_generator.state),
             "fingerprint": json.dumps(fingerprint), "clock": [clock.wall, clock.cpu]}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class _Clock:
    """Seconds spent training, wall and this process's CPU, without scoring. On a shared machine
    the CPU time is the cost and the wall time also counts waiting for a core."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.wall, self.cpu = wall, cpu
        self.skip()

    def add(self) -> None:
        """Count the time since the last mark, and mark now."""
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu
        self.skip()

    def skip(self) -> None:
        """Mark now without counting the time since the last mark."""
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def minutes(self) -> dict:
        return {"train_minutes": round(self.wall / 60, 3), "cpu_minutes": round(self.cpu / 60, 3)}


def _keep_log_until(path: Path, step: int) -> None:
    """Drop log records past ``step`` (a resumed run writes them again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _score_checkpoint(model, cfg: DemoCodecConfig, split: DataSplit, cache: dict) -> dict:
    """Score the model as it would be saved now (same dtype), through a temporary file."""
    with tempfile.TemporaryDirectory(prefix="demo_codec_") as tmp:
        path = Path(tmp) / "checkpoint.pth"
        path.write_bytes(codec_bytes(model, cfg))
        return score_codec(path, split.heldout, split.floors, cache=cache)


def _show(record: dict, steps: int, bar, log: Callable[[str], None]) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", mel=f"{record['mel']:.3f}")
    else:
        log(f"step {record['step']}/{steps}: loss {record['loss']:.4f} (mel {record['mel']:.4f}, commitment "
            f"{record['commitment']:.4f}, codebook {record['codebook']:.4f}), grad_norm {record['grad_norm']:.2f}, "
            f"{record['s_per_step']:.2f} s/step, {record['train_minutes']:.1f} train min "
            f"({record['cpu_minutes']:.1f} CPU)")


def train_demo_codec(manifest: str | os.PathLike, output: str | os.PathLike, cfg: DemoCodecConfig = DemoCodecConfig(),
                     *, log_path: str | os.PathLike | None = None, progress: bool = True,
                     log: Callable[[str], None] = print, command: str = "") -> dict:
    """Train the demo codec, write it as a DAC weights file, and score it on held-out utterances.

    Resumes from ``<output>.resume.pt`` when a killed run left one (same config and data).

    Args:
        manifest: ``clean.parquet`` (its split honoured) or the demo corpus's ``manifest.jsonl``.
        output: the ``.pth`` to write (atomically), in ``cfg.dtype``.
        cfg: architecture, training and scoring settings.
        log_path: the JSONL log (default ``<output stem>.log.jsonl`` beside it).
        progress: a tqdm bar when stderr is a terminal, else a line per ``log_every`` steps.
        log: where progress lines go.
        command: the command line that ran this, recorded in the scores so the file can be remade.

    Returns:
        The scores dict, also written to ``<output stem>.scores.json`` (see :func:`score_codec`;
        plus the weights' sha256, the data split, the training time and every checkpoint's scores).

    Raises:
        FileNotFoundError, ValueError: a missing or unusable manifest or audio file (named).
    """
    output = Path(output)
    paths = output_paths(output)
    log_path = Path(log_path) if log_path else paths["log"]
    rows = read_utterances(manifest, log=log)
    split = split_utterances(rows, cfg.n_heldout, cfg.seed)
    waves = load_waves(split.train, cfg.sample_rate)
    seconds = sum(len(w) for w in waves) / cfg.sample_rate
    log(f"demo codec: {len(waves)} utterances ({seconds / 60:.1f} min) to train on; held out: {split.how}")
    fingerprint = _fingerprint(cfg, split)
    state = _load_resume(paths["resume"], fingerprint, cfg.steps, log)
    rng = np.random.default_rng(cfg.seed)
    loss_fn = ReconstructionLoss(cfg)
    cache: dict = {}
    checkpoints: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_codec(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas)
        start, clock = 0, _Clock()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            rng.bit_generator.state = json.loads(state["numpy_rng"])
            start, clock = int(state["step"]), _Clock(*state["clock"])
            checkpoints = [r for r in _read_log(log_path) if r["kind"] == "eval" and r["step"] <= start]
            log(f"demo codec: resuming at step {start} from {paths['resume']}")
        _keep_log_until(log_path, start)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"demo codec: dac.DAC({cfg.dac_kwargs()}), {n_params:,} parameters, {cfg.steps} steps of "
            f"{cfg.batch_size} crops, {torch.get_num_threads()} torch threads")
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc="demo codec", unit="step", dynamic_ncols=True)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        mark = (clock.wall, start)  # the log interval's start
        for step in range(start + 1, cfg.steps + 1):
            x = sample_batch(waves, cfg, rng)  # (B, 1, T)
            lr = cfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            terms = loss_fn(model, x)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            for k, v in (*terms.items(), ("grad_norm", grad_norm)):
                sums[k] = sums.get(k, 0.0) + v.detach()
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                clock.add()
                n = step - mark[1]
                record = {"kind": "train", "step": step, **{k: round(float(v) / n, 6) for k, v in sums.items()},
                          "lr": lr, **clock.minutes(), "s_per_step": round((clock.wall - mark[0]) / n, 4)}
                _append(log_path, record)
                if progress:
                    _show(record, cfg.steps, bar, log)
                sums, mark = {}, (clock.wall, step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                clock.add()
                model.eval()
                s = _score_checkpoint(model, cfg, split, cache)
                model.train()
                record = {"kind": "eval", "step": step, **clock.minutes(), **_summary(s)}
                checkpoints.append(record)
                _append(log_path, record)
                log(f"step {step}: held-out MCD {s['topline']['mcd_frame']:.2f} dB frame-aligned "
                    f"(floor {s['floor'].get('mcd_frame', math.nan):.2f}), MCD-DTW ratio {s['mcd_dtw_ratio']:.3f}")
                clock.skip()
            if step % cfg.save_every == 0 and step != cfg.steps:
                _save_resume(paths["resume"], model, opt, rng, step, fingerprint, clock)
        if bar is not None:
            bar.close()
        clock.add()
        model.eval()
        blob = codec_bytes(model, cfg)
    with atomic_path(output) as tmp:
        tmp.write_bytes(blob)
    scores = score_codec(output, split.heldout, split.floors, cache=cache)
    final = {"kind": "eval", "step": cfg.steps, **clock.minutes(), **_summary(scores)}
    _append(log_path, final)
    report = {
        "weights": output.name, "weights_sha256": sha256_file(output), "bytes": output.stat().st_size,
        "command": command,
        "dtype": cfg.dtype, "dac_kwargs": cfg.dac_kwargs(), "n_parameters": n_params,
        "config": json.loads(json.dumps(asdict(cfg))), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "data": {"manifest": str(manifest), "n_train": len(split.train), "train_minutes_of_audio": round(seconds / 60, 2),
                 "heldout": split.how, "heldout_ids": [u.utt_id for u in split.heldout]},
        **clock.minutes(),
        "measures": ("vs the original recording, WORLD/SPTK mel-cepstra (indextts.evaluation.acoustic defaults) "
                     "at the codec's rate: mcd_frame = frame-aligned MCD (dB, c0 excluded; the floor over the "
                     "frames both clips have), mcd_dtw / log_f0_rmse / vuv_error = acoustic.compare on a DTW path. "
                     "topline: the codec's reconstruction (all codebooks); floor: another utterance of the same "
                     "speaker with another text"),
        **{k: scores[k] for k in ("n", "n_floor", "topline", "floor", "mcd_dtw_ratio")},
        "checkpoints": [{k: v for k, v in r.items() if k != "kind"} for r in (*checkpoints, final)],
        "per_utterance": scores["per_utterance"],
    }
    write_json(paths["scores"], report)
    paths["resume"].unlink(missing_ok=True)
    return report


def _summary(s: dict) -> dict:
    return {"topline": s["topline"], "floor": s["floor"], "mcd_dtw_ratio": s["mcd_dtw_ratio"]}


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --- the packaged codec -------------------------------------------------------------------------

def install_packaged_codec(output: str | os.PathLike, weights: str | os.PathLike = PACKAGED_WEIGHTS) -> dict:
    """Copy the committed demo codec to ``output`` after checking it, with its log and scores
    beside it (the files a training run writes, named after ``output``; each written atomically).

    The file's sha256 must equal the one its ``.scores.json`` records, it must load through
    :func:`indextts.audio.dac.load_codec`, and its topline must beat its floor.

    Returns:
        The scores dict.

    Raises:
        CodecLoadError: the file does not load; ValueError: its scores are missing, of another
            file, or show no codec (topline MCD not below the floor's).
    """
    weights = Path(weights)
    scores_path = output_paths(weights)["scores"]
    if not scores_path.is_file():
        raise ValueError(f"{scores_path}: the committed codec's scores are missing; reinstall the package")
    scores = json.loads(scores_path.read_text(encoding="utf-8"))
    sha = sha256_file(weights)
    if scores.get("weights_sha256") != sha:
        raise ValueError(f"{weights}: sha256 {sha[:12]} is not the {str(scores.get('weights_sha256'))[:12]} its scores "
                         f"were measured on ({scores_path}); the file was changed or truncated")
    load_codec(weights)
    if not scores["topline"]["mcd_frame"] < scores["floor"]["mcd_frame"]:
        raise ValueError(f"{scores_path}: topline MCD {scores['topline']['mcd_frame']:.2f} dB is not below the floor's "
                         f"{scores['floor']['mcd_frame']:.2f}: this codec does not reconstruct speech")
    src, dst = output_paths(weights), output_paths(output)
    for a, b in ((src["log"], dst["log"]), (src["scores"], dst["scores"]), (weights, Path(output))):
        with atomic_path(b) as tmp:
            tmp.write_bytes(a.read_bytes())
    return scores


# --- CLI ----------------------------------------------------------------------------------------

def cli_demo_codec(argv: list[str]) -> int:
    """``indextts demo-codec --output PATH (--manifest M [--steps N --seed S ...] | --packaged)``."""
    d = DemoCodecConfig()
    p = argparse.ArgumentParser(prog="indextts demo-codec",
                                description="Train the demo's small DAC on the demo corpus and score it on held-out "
                                            "utterances, or (--packaged) install the committed one.")
    p.add_argument("--output", required=True, type=Path, help="the .pth to write; .log.jsonl and .scores.json go beside it")
    p.add_argument("--manifest", type=Path, help="clean.parquet (train split trained on) or the demo corpus manifest.jsonl")
    p.add_argument("--packaged", action="store_true",
                   help=f"copy the committed codec ({PACKAGED_WEIGHTS.name}), its log and scores after checking "
                        "its sha256 and scores")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"initialisation, crops and held-out draw (default {d.seed})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"crops per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule,
                   help=f"constant, or cosine annealing to --min-lr-ratio x lr at the last step (default {d.lr_schedule})")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help=f"cosine's floor as a share of --lr (default {d.min_lr_ratio:g})")
    p.add_argument("--n-heldout", type=int, default=d.n_heldout, help=f"utterances scored (default {d.n_heldout})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="score a checkpoint every N steps too (default 0: only the final weights)")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"log line every N steps (default {d.log_every})")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=d.dtype, help=f"saved weights (default {d.dtype})")
    p.add_argument("--log", type=Path, help="the JSONL loss log (default <output stem>.log.jsonl)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the bytes are reproducible for one thread count)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        return _run_cli(p, args, argv)
    except (FileNotFoundError, ValueError) as e:  # CodecLoadError is a ValueError
        print(f"indextts demo-codec: {e}", file=sys.stderr)
        return 1


def _run_cli(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    if args.packaged:
        scores = install_packaged_codec(args.output)
        print(f"wrote {args.output}: the committed demo codec ({scores['bytes']:,} bytes, sha256 "
              f"{scores['weights_sha256'][:12]}), held-out MCD {scores['topline']['mcd_frame']:.2f} dB "
              f"(floor {scores['floor']['mcd_frame']:.2f})")
        return 0
    if args.manifest is None:
        p.error("--manifest is required unless --packaged")
    cfg = DemoCodecConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                          lr_schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio, n_heldout=args.n_heldout, eval_every=args.eval_every, log_every=args.log_every,
                          dtype=args.dtype)
    torch.set_num_threads(args.threads)
    report = train_demo_codec(args.manifest, args.output, cfg, log_path=args.log, progress=not args.no_progress,
                              log=lambda m: print(m, file=sys.stderr, flush=True),
                              command=shlex.join(["indextts", "demo-codec", *argv]))
    t, f = report["topline"], report["floor"]
    print(f"wrote {args.output} ({report['bytes']:,} bytes, sha256 {report['weights_sha256'][:12]}) after "
          f"{report['train_minutes']:.1f} train min: held-out MCD {t['mcd_frame']:.2f} dB frame-aligned, "
          f"{t['mcd_dtw']:.2f} DTW (floor {f.get('mcd_frame', math.nan):.2f}, {f.get('mcd_dtw', math.nan):.2f}); "
          f"scores in {output_paths(args.output)['scores']}")
    return 0


def cli_make_demo_codec(argv: list[str]) -> int:
    """``indextts make-demo-codec --output PATH [--seed N] [--sample-rate HZ]``."""
    p = argparse.ArgumentParser(prog="indextts make-demo-codec", description=make_demo_codec.__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="the .pth file to write (the demo config's codec.weights)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--sample-rate", type=int, default=16000, help="codec sample rate in Hz (default 16000)")
    args = p.parse_args(argv)
    path = make_demo_codec(args.output, seed=args.seed, sample_rate=args.sample_rate)
    _, info = load_codec(path)
    print(
        f"wrote {path}: tiny random DAC, {info.sample_rate} Hz, hop {info.hop_length} "
        f"({info.frame_rate:g} frames/s), {info.n_q} codebooks of {info.codebook_size}, sha256 {info.weights_sha256[:12]}"
    )
    return 0
