"""Reference measures: generated speech against the real recording of the same val utterance.

They need nothing but audio, so they always run. The recipe is ESPnet's TTS scoring
(``egs2/TEMPLATE/tts1/pyscripts/utils/evaluate_mcd.py`` and ``evaluate_f0.py``):

* WORLD analysis with pyworld (F0 by Harvest or DIO + StoneMask, spectral envelope by
  CheapTrick), mel-cepstra by ``pysptk.sp2mc`` with ESPnet's (order, alpha) per sample rate;
  one departure: the envelope above ``band_limit`` of Nyquist (7 kHz) is held flat, so that the
  band edge each clip's resampler left under Nyquist does not count as distortion (null restores
  ESPnet);
* an exact DTW (librosa) on the Euclidean distance of the mel-cepstra without c0, so loudness
  does not steer the alignment;
* MCD (dB) = mean over the DTW path of ``10/ln(10) * sqrt(2 * sum_d (c_d - c'_d)^2)``, d >= 1;
* log-F0 RMSE over the path frames voiced in both clips, and the share of path frames whose
  voiced/unvoiced decision differs.

MCD-DTW alone is weak: DTW brings an unrelated utterance of the same speaker close to the
reference. On 20 held-out demo utterances at the defaults, such a floor scores 10.4 dB and the
trained demo codec's resynthesis 9.0 dB (indextts/data/demo_codec/README.md). :func:`retrieve`
turns it into an intelligibility proxy that needs no ASR model: is the right text's recording
the nearest among recordings of the same speaker with other texts?

Both clips are resampled to one rate before analysis, because generated and real audio come at
different rates and mel-cepstra of different orders cannot be compared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from indextts.config import ConfigError

# ESPnet's _get_best_mcep_params: mel-cepstrum order and frequency-warping alpha per sample rate
# (alpha makes the warped axis approximate the mel scale at that rate).
MCEP_PARAMS: dict[int, tuple[int, float]] = {
    16000: (23, 0.42),
    22050: (34, 0.45),
    24000: (34, 0.46),
    44100: (39, 0.53),
    48000: (39, 0.55),
}

# Where the evaluation driver (indextts.evaluation.scoring.EvalConfig) puts this section, so a
# message names the key a person edits.
_KEY = "eval.acoustic"

# 10 / ln(10) * sqrt(2): the MCD constant applied to a Euclidean distance of mel-cepstra.
_MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


def _world_sptk():
    """pyworld and pysptk, imported late (only this stage needs them) and without the
    pkg_resources deprecation warning both still raise at import."""
    with warnings.catch_warnings():
        # Both import pkg_resources, which warns that it is deprecated (UserWarning) and that
        # namespace packages should be implicit (DeprecationWarning); neither concerns us.
        warnings.filterwarnings("ignore", message=".*pkg_resources.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import pysptk
        import pyworld

    return pyworld, pysptk


@dataclass(frozen=True)
class AcousticConfig:
    """How clips are analysed for the reference measures (the ``eval.acoustic`` config section).

    Raises:
        ConfigError: from ``__post_init__``, naming ``eval.acoustic.<field>``, for every bad value
            at once.
    """

    # Both clips are resampled to this rate before analysis. 16 kHz: speech corpora and the 16 kHz
    # DAC come at it or above, so no clip is upsampled; ESPnet's table has an (order, alpha) for it.
    sample_rate: int = 16000
    # WORLD's own default frame period; DTW then works on 200 frames per second.
    frame_shift_ms: float = 5.0
    # F0 search range (Hz): wide enough for low male and high female/child voices.
    f0_floor: float = 60.0
    f0_ceil: float = 600.0
    # Harvest: ESPnet's choice, and it finds more of the voiced frames (80% of frames voiced on
    # 30 espeak-ng Amharic clips against 71% for DIO + StoneMask), which log-F0 RMSE and the
    # voicing error are made of. It costs about 4x as much: features_of per second of audio,
    # 16 kHz, 5 ms frames, one core of the 2-core dev machine: harvest 0.22-0.28 s, dio 0.057-0.065 s.
    # Real recordings are analysed once per run (FeatureCache), so a stage of 200 five-second
    # samples costs about 4 min of Harvest; choose dio where that matters more than F0.
    f0_method: Literal["dio", "harvest"] = "harvest"
    # Mel-cepstrum order (the result has order + 1 coefficients, c0 first) and all-pass alpha;
    # null takes ESPnet's table for sample_rate.
    mcep_dim: int | None = None
    mcep_alpha: float | None = None
    # The spectral envelope above this share of Nyquist is held at its value there before the
    # mel-cepstrum (0.875: 7 kHz at 16 kHz; null: the full band, exactly as ESPnet). Why: generated
    # and real clips reach the analysis rate through different resamplers, or are native to it,
    # so each has its own band edge just under Nyquist (resamplers roll off from 0.9-0.95 of it),
    # and the log envelope of that edge alone moves MCD by dBs. One espeak-ng clip brought to
    # 16 kHz by scipy's resample_poly and by soxr: 2.5 dB apart on the full band, 0.3 dB with
    # 0.875; the MCD between different utterances moves by 0.1 dB at most.
    band_limit: float | None = 0.875

    def __post_init__(self) -> None:
        k, bad = _KEY, []
        if not _is_int(self.sample_rate) or self.sample_rate <= 0:
            bad.append(f"{k}.sample_rate: expected a positive integer (Hz), got {self.sample_rate!r}")
        elif (self.mcep_dim is None or self.mcep_alpha is None) and self.sample_rate not in MCEP_PARAMS:
            bad.append(
                f"{k}.sample_rate: ESPnet's mel-cepstrum table has no entry for {self.sample_rate} Hz (it has "
                f"{', '.join(map(str, MCEP_PARAMS))}); pick one of those or set {k}.mcep_dim and {k}.mcep_alpha")
        if not _is_number(self.frame_shift_ms) or self.frame_shift_ms <= 0:
            bad.append(f"{k}.frame_shift_ms: expected a positive number (ms), got {self.frame_shift_ms!r}")
        if not _is_number(self.f0_floor) or self.f0_floor <= 0:
            bad.append(f"{k}.f0_floor: expected a positive number (Hz), got {self.f0_floor!r}")
        elif not _is_number(self.f0_ceil) or self.f0_ceil <= self.f0_floor:
            bad.append(f"{k}.f0_ceil: expected a number above {k}.f0_floor ({self.f0_floor:g}), got {self.f0_ceil!r}")
        elif _is_int(self.sample_rate) and self.sample_rate > 0 and self.f0_ceil >= self.sample_rate / 2:
            bad.append(f"{k}.f0_ceil: must be below half of {k}.sample_rate ({self.sample_rate / 2:g} Hz), "
                       f"got {self.f0_ceil!r}")
        if self.f0_method not in ("dio", "harvest"):
            bad.append(f"{k}.f0_method: expected one of 'dio', 'harvest', got {self.f0_method!r}")
        if self.mcep_dim is not None and (not _is_int(self.mcep_dim) or self.mcep_dim < 1):
            bad.append(f"{k}.mcep_dim: expected a positive integer or null, got {self.mcep_dim!r}")
        if self.mcep_alpha is not None and (not _is_number(self.mcep_alpha) or not -1 < self.mcep_alpha < 1):
            bad.append(f"{k}.mcep_alpha: expected a number in (-1, 1) or null, got {self.mcep_alpha!r}")
        if self.band_limit is not None and (not _is_number(self.band_limit) or not 0 < self.band_limit <= 1):
            bad.append(f"{k}.band_limit: expected null or a share of Nyquist in (0, 1], got {self.band_limit!r}")
        if bad:
            raise ConfigError("invalid config:\n  " + "\n  ".join(bad))

    @property
    def mcep_params(self) -> tuple[int, float]:
        """(order, alpha) for ``pysptk.sp2mc``: the configured values, else ESPnet's table."""
        dim, alpha = MCEP_PARAMS.get(self.sample_rate, (None, None))
        return (self.mcep_dim if self.mcep_dim is not None else dim,
                self.mcep_alpha if self.mcep_alpha is not None else alpha)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class AcousticFeatures:
    """WORLD/SPTK features of one clip, frame-synchronous."""

    mcep: np.ndarray  # [T, D+1] float64 mel-cepstrum, c0 (log energy) first
    f0: np.ndarray  # [T] float64 Hz, 0 = unvoiced
    seconds: float  # duration of the analysed audio


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Read an audio file as mono float64 at ``sample_rate``.

    Args:
        path: any file libsndfile reads (wav, flac, ogg ...).
        sample_rate: the rate to return; other rates are resampled with scipy's polyphase filter.

    Returns:
        ``[N]`` float64 samples, the mean of the file's channels.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: libsndfile cannot read it, it holds no samples, or some samples are NaN/inf;
            the message names the file.
    """
    import soundfile as sf
    from scipy.signal import resample_poly

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float64", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise ValueError(f"{path}: cannot read audio ({e}); convert it to wav or flac") from e
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: the audio holds NaN or inf samples")
    x = data.mean(axis=1)  # [N] mono downmix
    if sr != sample_rate:
        g = math.gcd(int(sr), int(sample_rate))
        x = resample_poly(x, int(sample_rate) // g, int(sr) // g)
    return np.ascontiguousarray(x, dtype=np.float64)


def extract(audio: np.ndarray, cfg: AcousticConfig) -> AcousticFeatures:
    """WORLD F0 and spectral envelope, then SPTK mel-cepstra, of one clip.

    Args:
        audio: ``[N]`` samples at ``cfg.sample_rate`` (scale is free: MCD without c0 ignores gain).
        cfg: the analysis settings.

    Returns:
        The clip's features; ``mcep`` has ``cfg.mcep_params[0] + 1`` columns.

    Raises:
        ValueError: the audio is not one-dimensional, is empty or holds NaN/inf.
    """
    pyworld, pysptk = _world_sptk()
    x = np.ascontiguousarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"extract: expected mono audio [N], got shape {x.shape}")
    if x.size == 0:
        raise ValueError("extract: the audio holds no samples")
    if not np.isfinite(x).all():
        raise ValueError("extract: the audio holds NaN or inf samples")
    fs = cfg.sample_rate
    if cfg.f0_method == "harvest":
        # Harvest refines its own F0 estimates; ESPnet uses it without StoneMask.
        f0, t = pyworld.harvest(x, fs, f0_floor=cfg.f0_floor, f0_ceil=cfg.f0_ceil, frame_period=cfg.frame_shift_ms)
    else:
        f0, t = pyworld.dio(x, fs, f0_floor=cfg.f0_floor, f0_ceil=cfg.f0_ceil, frame_period=cfg.frame_shift_ms)
        f0 = pyworld.stonemask(x, f0, t, fs)  # DIO's raw estimates are coarse
    sp = pyworld.cheaptrick(x, f0, t, fs, f0_floor=cfg.f0_floor)  # [T, fft/2+1] power envelope
    if cfg.band_limit is not None:  # hide each clip's own band edge (see AcousticConfig.band_limit)
        k = int(cfg.band_limit * (sp.shape[1] - 1))
        sp[:, k + 1:] = sp[:, k:k + 1]
    order, alpha = cfg.mcep_params
    mcep = pysptk.sp2mc(sp, order, alpha)  # [T, order+1]
    return AcousticFeatures(mcep=np.asarray(mcep, dtype=np.float64), f0=np.asarray(f0, dtype=np.float64),
                            seconds=x.size / fs)


def features_of(path: str | os.PathLike, cfg: AcousticConfig) -> AcousticFeatures:
    """:func:`load_audio` at ``cfg.sample_rate``, then :func:`extract`.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_audio`; errors of :func:`extract` are
            re-raised with the file's name.
    """
    audio = load_audio(path, cfg.sample_rate)
    try:
        return extract(audio, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _align(gen: AcousticFeatures, ref: AcousticFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Exact DTW of the mel-cepstra without c0.

    Returns:
        ``path`` ``[L, 2]`` (gen frame, ref frame) and ``dist`` ``[L]``, the Euclidean distance of
        each aligned pair.
    """
    import librosa
    from scipy.spatial.distance import cdist

    if gen.mcep.shape[1] != ref.mcep.shape[1]:
        raise ValueError(f"mel-cepstra of different orders ({gen.mcep.shape[1] - 1} and {ref.mcep.shape[1] - 1}): "
                         "both clips must be analysed with one AcousticConfig")
    if len(gen.mcep) == 0 or len(ref.mcep) == 0:
        raise ValueError("cannot align a clip with no frames")
    cost = cdist(gen.mcep[:, 1:], ref.mcep[:, 1:], metric="euclidean")  # [Tg, Tr]
    _, path = librosa.sequence.dtw(C=cost, backtrack=True)  # [L, 2], end to start
    path = np.ascontiguousarray(path[::-1])
    return path, cost[path[:, 0], path[:, 1]]


def mcd_dtw(gen: AcousticFeatures, ref: AcousticFeatures) -> float:
    """Mel-cepstral distortion (dB, c0 excluded) after DTW of ``gen`` onto ``ref``.

    Raises:
        ValueError: the features have different mel-cepstrum orders, or one has no frames.
    """
    _, dist = _align(gen, ref)
    return float(_MCD_SCALE * dist.mean())


def compare(gen: AcousticFeatures, ref: AcousticFeatures) -> dict[str, float]:
    """All reference measures of ``gen`` against the real recording ``ref``, on one DTW path.

    Returns:
        ``mcd`` (dB, c0 excluded), ``log_f0_rmse`` (natural-log units, over path frames voiced in
        both; NaN when there is none), ``vuv_error`` (share of path frames whose voiced/unvoiced
        decision differs), ``duration_ratio`` (``gen.seconds / ref.seconds``).

    Raises:
        ValueError: as :func:`mcd_dtw`.
    """
    path, dist = _align(gen, ref)
    f0_g, f0_r = gen.f0[path[:, 0]], ref.f0[path[:, 1]]
    voiced_g, voiced_r = f0_g > 0, f0_r > 0
    both = voiced_g & voiced_r
    log_f0_rmse = (float(np.sqrt(np.mean((np.log(f0_g[both]) - np.log(f0_r[both])) ** 2))) if both.any()
                   else math.nan)
    return {
        "mcd": float(_MCD_SCALE * dist.mean()),
        "log_f0_rmse": log_f0_rmse,
        "vuv_error": float(np.mean(voiced_g != voiced_r)),
        "duration_ratio": gen.seconds / ref.seconds if ref.seconds > 0 else math.nan,
    }


def retrieve(gen: AcousticFeatures, candidates: Sequence[AcousticFeatures], target: int) -> dict:
    """Text retrieval: is the right text's recording the nearest (MCD-DTW) of ``candidates``?

    The candidates are real recordings of the generated clip's speaker, one of the right text
    (``candidates[target]``) and the others of different texts; chance is ``1 / n``.

    Returns:
        ``hit`` (the target is the argmin; ties go to the earlier candidate), ``rank`` (1 = the
        nearest; the target's place in a stable sort of the distances), ``n``, ``mcd_to_target``
        and ``mcd_best_other`` (NaN when there is no other candidate).

    Raises:
        ValueError: no candidates, ``target`` out of range, or as :func:`mcd_dtw`.
    """
    n = len(candidates)
    if n == 0:
        raise ValueError("retrieve: no candidates")
    if not 0 <= target < n:
        raise ValueError(f"retrieve: target {target} is not an index of the {n} candidates")
    mcds = np.array([mcd_dtw(gen, c) for c in candidates])
    order = np.argsort(mcds, kind="stable")
    rank = int(np.flatnonzero(order == target)[0]) + 1
    others = np.delete(mcds, target)
    return {
        "hit": rank == 1,
        "rank": rank,
        "n": n,
        "mcd_to_target": float(mcds[target]),
        "mcd_best_other": float(others.min()) if others.size else math.nan,
    }


class FeatureCache:
    """:func:`features_of` with an in-memory cache, so a real recording that many samples are
    scored against (as reference and as retrieval candidate) is analysed once.

    Keyed by the resolved path and the config; a file changed on disk during one run is not seen.
    Memory: about 40 kB per second of audio at the defaults (24 float64 coefficients and F0 at
    200 frames/s).
    """

    def __init__(self, cfg: AcousticConfig):
        self.cfg = cfg
        self._cache: dict[tuple[Path, AcousticConfig], AcousticFeatures] = {}

    def __call__(self, path: str | os.PathLike) -> AcousticFeatures:
        """The features of ``path`` under this cache's config (see :func:`features_of`)."""
        key = (Path(path).resolve(), self.cfg)
        feats = self._cache.get(key)
        if feats is None:
            feats = self._cache[key] = features_of(path, self.cfg)
        return feats

    def __len__(self) -> int:
        return len(self._cache)

    def save(self, path: str | os.PathLike, keep: Callable[[Path], bool] = lambda p: True) -> Path:
        """Write the cached features of the files ``keep`` accepts to ``path`` (``.npz``, no
        pickles), each with the file's size and mtime, so a later run reuses them (:meth:`load`)
        instead of analysing the same real recordings again."""
        from indextts.files import atomic_path

        entries = [(p, f) for (p, _), f in self._cache.items() if keep(p) and p.is_file()]
        arrays: dict[str, np.ndarray] = {}
        index = []
        for i, (p, f) in enumerate(entries):
            st = p.stat()
            index.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "seconds": f.seconds})
            arrays[f"mcep_{i}"], arrays[f"f0_{i}"] = f.mcep, f.f0
        meta = {"config": dataclasses.asdict(self.cfg), "entries": index}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        return Path(path)

    def load(self, path: str | os.PathLike) -> int:
        """Add the features :meth:`save` wrote to ``path``, when they were computed under this
        cache's config; entries whose file changed (size or mtime) since are left out.

        Returns:
            How many entries were taken (0 when the file's config differs).

        Raises:
            ValueError: ``path`` is not such a file; the message names it.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta["config"] != dataclasses.asdict(self.cfg):
                    return 0
                taken = 0
                for i, e in enumerate(meta["entries"]):
                    p = Path(e["path"])
                    st = p.stat() if p.is_file() else None
                    if st is None or (st.st_size, st.st_mtime_ns) != (e["size"], e["mtime_ns"]):
                        continue
                    self._cache[(p, self.cfg)] = AcousticFeatures(
                        mcep=z[f"mcep_{i}"], f0=z[f"f0_{i}"], seconds=float(e["seconds"]))
                    taken += 1
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a features file written by FeatureCache.save ({e})") from e
        return taken
