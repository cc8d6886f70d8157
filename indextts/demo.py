"""A synthetic Amharic speech corpus made with espeak-ng, for the embedded demo config.

No machine here reaches a model hub or a speech corpus, so the default pipeline runs on speech
that espeak-ng synthesises: hand-written Amharic sentences in Ge'ez script, spoken by several
*speakers* (an espeak-ng voice variant plus a fixed base pitch and speed each) with several
*emotions* (prosody presets: happy is higher and faster, sad lower and slower ...).

On purpose the manifest also holds a small *dirty slice* (a missing file, an empty transcript, a
truncated WAV, a 0.1 s clip, a duplicated row, a malformed line), so the cleaning stage has real
work; ``expected_rejects.json`` lists those rows with the reason the cleaner must give.

Layout under ``out_dir``::

    wavs/<speaker>/<utt_id>.wav   16-bit mono PCM at espeak-ng's native rate (22050 Hz)
    manifest.jsonl                {"id", "audio" (relative to out_dir), "text", "speaker",
                                   "emotion", "language": "am"}
    expected_rejects.json         [{"id", "line" (1-based), "reason"}, ...]

Everything is a function of the config: the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import shutil
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from indextts.config import ConfigError, get_section, load_config_arg
from indextts.files import atomic_path, write_json

LANGUAGE = "am"

# Clean clips must last 1-6 s (the contract). Synthesis aims inside a margin so that a
# later resample (the codec stage) cannot round a clip across either bound.
MIN_SECONDS = 1.0
MAX_SECONDS = 6.0
_TARGET = (MIN_SECONDS + 0.2, MAX_SECONDS - 0.2)
# How many sentences one utterance may try before giving up (each try is one espeak-ng run).
_MAX_TRIES = 12


@dataclass(frozen=True)
class Voice:
    """One demo speaker: an espeak-ng voice variant (``am+<variant>``) at a fixed base pitch
    (espeak-ng ``-p``, 0-99) and speed (``-s``, words per minute)."""

    name: str
    variant: str
    pitch: int
    speed: int


@dataclass(frozen=True)
class Prosody:
    """An emotion preset, applied on top of a speaker's base: pitch offset, speed factor,
    amplitude (``-a``, 100 = espeak-ng's default) and extra gap between words (``-g``, 10 ms)."""

    pitch_offset: int
    speed_factor: float
    amplitude: int
    word_gap: int


# Speakers in the order they are taken: the first six alternate female and male variants, so a
# small n_speakers still gives both. Base pitch/speed spread the voices further apart than the
# variants alone do.
SPEAKERS: tuple[Voice, ...] = (
    Voice("am_f1", "f1", 62, 165),
    Voice("am_m1", "m1", 38, 160),
    Voice("am_f2", "f2", 70, 150),
    Voice("am_m3", "m3", 30, 172),
    Voice("am_f4", "f4", 55, 178),
    Voice("am_m2", "m2", 46, 148),
    Voice("am_f3", "f3", 66, 158),
    Voice("am_m4", "m4", 42, 168),
    Voice("am_f5", "f5", 58, 155),
    Voice("am_m6", "m6", 34, 162),
    Voice("am_m7", "m7", 50, 175),
    Voice("am_m5", "m5", 40, 152),
)

# espeak-ng has no emotion control; these presets move the prosody the way the emotions are
# usually described (happy: higher and faster, sad: lower, slower, softer, angry: louder).
EMOTIONS: dict[str, Prosody] = {
    "neutral": Prosody(0, 1.0, 100, 0),
    "happy": Prosody(14, 1.15, 115, 0),
    "sad": Prosody(-14, 0.8, 75, 3),
    "angry": Prosody(6, 1.1, 135, 0),
}

# Hand-written Amharic, varied in length (roughly 1-5 s when spoken), with Ethiopic punctuation
# and a few Arabic-digit numbers. Ethiopic numerals (፩ ፪ ...) are left out on purpose: espeak-ng
# 1.51 skips them silently, so the audio would not say what the transcript says.
SENTENCES: tuple[str, ...] = (
    "ሰላም ነው፣ እንዴት አደርክ፧",
    "ዛሬ የአየሩ ሁኔታ በጣም ጥሩ ነው።",
    "ቡና ለመጠጣት ወደ ካፌ እንሂድ።",
    "ልጆቹ በትምህርት ቤት ውስጥ ይማራሉ።",
    "አዲስ አበባ የኢትዮጵያ ዋና ከተማ ናት።",
    "እናቴ እንጀራ በወጥ ሠራች።",
    "ነገ ጠዋት በ3 ሰዓት እንገናኝ።",
    "መጽሐፉን አንብበህ ጨረስክ፧",
    "ገበያው ዛሬ በሰዎች ተሞልቷል።",
    "ዝናቡ ከጠዋት ጀምሮ አላቆመም።",
    "እባክህ በሩን ዝጋልኝ።",
    "ወንድሜ በዩኒቨርሲቲ ሕክምና ያጠናል።",
    "ይህ መንገድ ወደ ባሕር ዳር ይወስዳል።",
    "አባቴ በየቀኑ ጋዜጣ ያነባል።",
    "የዓባይ ወንዝ ረጅም ጉዞ ያደርጋል።",
    "ስልክህ ለምን አይሰራም፧",
    "በዓሉ በደስታ እና በሰላም ተከበረ።",
    "ገበሬዎቹ ጤፍ እና ስንዴ ዘሩ።",
    "አውቶቡሱ 20 ደቂቃ ዘግይቶ መጣ።",
    "እህቴ ትናንት ከጎንደር ተመለሰች።",
    "በጣም ጠምቶኛል፣ ውሃ ስጠኝ።",
    "ይህን ዘፈን ሰምተኸው ታውቃለህ፧",
    "ሐኪሙ መድኃኒቱን በቀን 2 ጊዜ ውሰድ አለኝ።",
    "የቤት ሥራዬን ገና አልጨረስኩም።",
    "ከተማው ማታ ላይ በጣም ጸጥ ይላል።",
    "እንኳን ደስ አለህ፣ ፈተናውን አልፈሃል።",
    "ዛሬ ምሳ ምን እንብላ፧",
    "ፀሐይ ከተራራው ጀርባ ጠለቀች።",
    "ሻይ ወይስ ቡና ትፈልጋለህ፧",
    "ጓደኛዬ አዲስ መኪና ገዛ።",
    "በዚህ ዓመት ብዙ ዝናብ ዘንቧል።",
    "ቤተ መጻሕፍቱ እስከ ምሽቱ 2 ሰዓት ክፍት ነው።",
    "ልጅቷ በሩጫ ውድድር አንደኛ ወጣች።",
    "እግር ኳስ መጫወት በጣም እወዳለሁ።",
    "ይቅርታ፣ ሰዓቱ ስንት ነው፧",
    "አያቴ የድሮ ታሪኮችን ትነግረን ነበር።",
    "በገበያው ውስጥ ሙዝ፣ ብርቱካን እና ማንጎ ይሸጣሉ።",
    "ባቡሩ ከአዲስ አበባ ወደ ጅቡቲ ይሄዳል።",
    "እባክሽ ቀስ ብለሽ ተናገሪ።",
    "ትምህርት ቤታችን 500 ተማሪዎች አሉት።",
    "ነገ ቅዳሜ ስለሆነ ሥራ የለም።",
    "የላሊበላ አብያተ ክርስቲያናት ከአለት ተፈልፍለው የተሠሩ ናቸው።",
    "ሰማዩ ደመናማ ስለሆነ ጃንጥላ ያዝ።",
    "ምግቡ በጣም ጣፋጭ ነበር፣ አመሰግናለሁ።",
    "መምህሩ ለተማሪዎቹ አዲስ ትምህርት አስተማረ።",
    "ድመቷ በመስኮቱ አጠገብ ተኝታለች።",
    "ይህ ልብስ ስንት ብር ነው፧",
    "ወደ ሐረር ለመጓዝ አቅደናል።",
    "እሱ ሁልጊዜ በሰዓቱ ይደርሳል።",
    "ቤተሰቦቼ በገጠር ይኖራሉ።",
    "የቡና ሥነ ሥርዓት ለእንግዶች ይደረጋል።",
    "ሬዲዮው ላይ ዜና እየሰማሁ ነው።",
    "በጣም ደክሞኛል፤ ትንሽ ማረፍ እፈልጋለሁ።",
    "ይህን ደብዳቤ ለአለቃህ ስጠው።",
    "ልጁ በ7 ዓመቱ ማንበብ ጀመረ።",
    "አበቦቹ በመስከረም ወር ያብባሉ።",
    "ጉዞአችሁ እንዴት ነበር፧",
    "እዚህ ማጨስ አይፈቀድም።",
    "ኮምፒውተሩ በድንገት ጠፋ።",
    "እባካችሁ ጸጥ በሉ፣ ሕፃኑ ተኝቷል።",
    "በሳምንት 3 ጊዜ ወደ ስፖርት ቤት እሄዳለሁ።",
    "ይህ ቤት በጣም ትልቅ እና ውብ ነው።",
    "ሁሉም ሰው ለምርጫው ተዘጋጅቷል።",
    "ወተት እና ዳቦ ከሱቅ ግዛልኝ።",
    "ስምህ ማን ነው፧",
    "ስሜ አበበ ነው፣ ከደሴ ነው የመጣሁት።",
    "የጤና ጣቢያው ከዚህ ሩቅ አይደለም።",
    "ዛሬ ማታ ፊልም ለማየት እንሄዳለን።",
    "አገራችን ብዙ ቋንቋዎች እና ባህሎች አሏት።",
    "አንበሳው በጫካ ውስጥ አገሳ።",
    "ችግር የለም፣ ነገ እንደገና እንሞክራለን።",
    "በዚህ ዓመት 1000 ዛፎች ተተክለዋል።",
    "ጎረቤቶቻችን በደስታ ተቀበሉን።",
    "ዶሮ ወጥ የበዓል ምግብ ነው።",
    "ማሽኑ እንዴት እንደሚሠራ አሳየኝ።",
    "የዓባይ ግድብ ለአገሪቱ ኤሌክትሪክ ያመነጫል።",
    "መንገዱ ተዘግቷል፤ በሌላ በኩል ሂዱ።",
    "ልደትህ መቼ ነው፧",
    "ሙዚቃው በጣም ያስደስታል።",
    "አትክልቶቹ ትኩስ እና ርካሽ ናቸው።",
    "ወደ ሥራ በእግሬ እሄዳለሁ።",
    "የኢትዮጵያ ሯጮች በዓለም ታዋቂ ናቸው።",
    "ስብሰባው በ10 ሰዓት ይጀምራል።",
    "እንደምን አመሸህ፧",
    "ፈረሶቹ በሜዳው ላይ ይሮጣሉ።",
    "ይህን ቃል እንዴት ትጽፈዋለህ፧",
    "ሐኪሟ ታካሚዎቿን በትዕግሥት ታዳምጣለች።",
    "ከተማችን በየዓመቱ እያደገች ነው።",
    "ወንዙ በክረምት ይሞላል።",
    "ምንም አልገባኝም፣ እባክህ ድገመው።",
    "መልካም አዲስ ዓመት ይሁንላችሁ።",
    "የሰሜን ተራሮች በጣም ውብ ናቸው፤ ብዙ ቱሪስቶች ይጎበኟቸዋል።",
    "እኔ እና እህቴ ትናንት ማታ እስከ 5 ሰዓት ድረስ ስናጠና ቆየን።",
    "አውሮፕላኑ ከ2 ሰዓት በረራ በኋላ በሰላም አረፈ።",
    "በገበያው ያሉት ነጋዴዎች ዛሬ ጠዋት ዋጋ ጨምረዋል።",
    "አሁን ዝናብ ስለሚዘንብ ቤት ውስጥ እንቆይ።",
    "ጤናማ ለመሆን በየቀኑ አትክልት ብላ።",
    "በጣም አመሰግናለሁ።",
    "እሺ፣ እመጣለሁ።",
    "ውሻው ሌሊቱን ሙሉ ሲጮህ አደረ።",
)

# The 0.1 s clip says one short word; its transcript is that word, so the only defect the row
# has is its length.
_SHORT_WORD = "አዎ።"

# Planted defects, in the cleaner's reason vocabulary. Every dirty row has exactly one.
DIRTY_REASONS = ("missing_file", "empty_text", "truncated", "too_short", "duplicate", "malformed")
# The defects whose row points at real audio that this module synthesises.
_WITH_AUDIO = ("empty_text", "truncated", "too_short")


@dataclass(frozen=True)
class DemoConfig:
    """The ``demo`` config section (schemas/config.schema.yaml has the same defaults)."""

    # Off unless a config asks for it: a real-scale config never synthesises a demo corpus.
    enabled: bool = False
    # Clean utterances; the dirty slice comes on top of these.
    n_utterances: int = 360
    n_speakers: int = 6
    emotions: tuple[str, ...] = ("neutral", "happy", "sad")
    seed: int = 1234
    # Plant the dirty slice (one row per defect per 150 clean utterances, at least one each).
    dirty: bool = True
    # espeak-ng processes run at once.
    workers: int = 4
    # The demo's codec (rule make_demo_codec): packaged (the committed trained DAC), train (train
    # it on this corpus in the DAG, codec_steps steps) or random (an untrained tiny DAC: noise).
    codec: str = "packaged"
    codec_steps: int = 5000

    def __post_init__(self) -> None:
        errors = []
        if self.n_utterances < 1:
            errors.append(f"demo.n_utterances: must be at least 1, got {self.n_utterances}")
        if not 1 <= self.n_speakers <= len(SPEAKERS):
            errors.append(f"demo.n_speakers: must be 1 to {len(SPEAKERS)} (one per voice), got {self.n_speakers}")
        if not self.emotions:
            errors.append("demo.emotions: list at least one emotion")
        for e in self.emotions:
            if e not in EMOTIONS:
                errors.append(f"demo.emotions: unknown emotion {e!r} (known: {', '.join(EMOTIONS)})")
        if len(set(self.emotions)) != len(self.emotions):
            errors.append(f"demo.emotions: each emotion may appear once, got {list(self.emotions)}")
        if self.workers < 1:
            errors.append(f"demo.workers: must be at least 1, got {self.workers}")
        if self.codec not in ("packaged", "train", "random"):
            errors.append(f"demo.codec: must be packaged, train or random, got {self.codec!r}")
        if self.codec_steps < 1:
            errors.append(f"demo.codec_steps: must be at least 1, got {self.codec_steps}")
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class DemoCorpus:
    """What :func:`build_demo_corpus` wrote."""

    manifest: Path
    expected_rejects: Path
    n_utterances: int  # clean rows
    n_dirty: int  # planted dirty rows
    speakers: tuple[str, ...]
    emotions: tuple[str, ...]
    seconds: float  # clean audio


@dataclass(frozen=True)
class _Job:
    """One espeak-ng utterance to synthesise: ``candidates`` are sentence indices tried in
    order until one lands inside the duration window."""

    index: int
    utt_id: str
    voice: Voice
    emotion: str
    candidates: tuple[int, ...]
    # "clean", or the planted defect whose audio this job makes.
    kind: str = "clean"


def _espeak_args(voice: Voice, emotion: str) -> list[str]:
    p = EMOTIONS[emotion]
    pitch = int(np.clip(voice.pitch + p.pitch_offset, 0, 99))
    speed = int(np.clip(round(voice.speed * p.speed_factor), 80, 450))
    args = ["-v", f"{LANGUAGE}+{voice.variant}", "-p", str(pitch), "-s", str(speed), "-a", str(p.amplitude)]
    if p.word_gap:
        args += ["-g", str(p.word_gap)]
    return args


def _espeak(exe: str, args: list[str], text: str, tmp_dir: Path, name: str) -> tuple[np.ndarray, int]:
    """Run espeak-ng once; return int16 mono samples and the sample rate."""
    wav = tmp_dir / f"{name}.wav"
    # The text goes through stdin so no sentence can ever be read as an option.
    cmd = [exe, *args, "-w", str(wav), "--stdin"]
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True)
    if proc.returncode != 0 or not wav.exists():
        raise RuntimeError(
            f"espeak-ng failed (exit {proc.returncode}) for {name!r}: {' '.join(cmd)}\n"
            f"{proc.stderr.decode('utf-8', 'replace').strip()}\n"
            "Check that espeak-ng has the Amharic voice (espeak-ng --voices=am)."
        )
    data, sr = sf.read(wav, dtype="int16", always_2d=True)
    wav.unlink()
    # espeak-ng writes mono; fold anything else down so the corpus contract holds regardless.
    if data.shape[1] != 1:
        data = data.mean(axis=1, keepdims=True).astype(np.int16)
    return data[:, 0], sr


def _write_wav(path: Path, samples: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sr, subtype="PCM_16", format="WAV")


def _synthesise(job: _Job, exe: str, stage: Path, tmp_dir: Path) -> tuple[str, float]:
    """Synthesise ``job`` into ``stage/<speaker>/<utt_id>.wav``; return (text, seconds).

    Tries the job's candidate sentences in order; after a miss, only sentences that move the
    duration the right way (shorter text after a too-long clip, longer after a too-short one)
    are tried.
    """
    args = _espeak_args(job.voice, job.emotion)
    out = stage / job.voice.name / f"{job.utt_id}.wav"
    if job.kind == "too_short":
        samples, sr = _espeak(exe, args, _SHORT_WORD, tmp_dir, job.utt_id)
        n = int(round(0.1 * sr))
        # The loudest 0.1 s, so the clip is speech rather than espeak-ng's leading silence.
        energy = np.convolve(samples.astype(np.float64) ** 2, np.ones(n), mode="valid")
        start = int(np.argmax(energy))
        _write_wav(out, samples[start : start + n], sr)
        return _SHORT_WORD, n / sr
    tried: list[tuple[int, float]] = []
    chars, direction = 0, 0
    for idx in job.candidates:
        text = SENTENCES[idx]
        if direction and (len(text) - chars) * direction <= 0:
            continue
        samples, sr = _espeak(exe, args, text, tmp_dir, job.utt_id)
        seconds = len(samples) / sr
        tried.append((idx, seconds))
        if _TARGET[0] <= seconds <= _TARGET[1]:
            _write_wav(out, samples, sr)
            if job.kind == "truncated":
                # Keep the header (which still claims the full length) and ~60% of the bytes.
                data = out.read_bytes()
                out.write_bytes(data[: int(len(data) * 0.6)])
            return text, seconds
        chars, direction = len(text), (1 if seconds < _TARGET[0] else -1)
        if len(tried) >= _MAX_TRIES:
            break
    raise RuntimeError(
        f"demo utterance {job.utt_id} ({job.voice.name}, {job.emotion}): no sentence lands in "
        f"{_TARGET[0]}-{_TARGET[1]} s (tried {', '.join(f'#{i}={s:.2f}s' for i, s in tried)}). "
        "Add sentences of a fitting length to indextts.demo.SENTENCES or change the voice presets."
    )


def _candidates(seed: int, index: int, first: int) -> tuple[int, ...]:
    # A generator per utterance (not one shared stream), so the result does not depend on the
    # order in which the thread pool finishes jobs.
    rng = np.random.default_rng([seed, index])
    rest = [int(i) for i in rng.permutation(len(SENTENCES)) if i != first]
    return (first, *rest)


def _row(utt_id: str, voice: Voice, text: str, emotion: str) -> dict[str, Any]:
    return {
        "id": utt_id,
        "audio": f"wavs/{voice.name}/{utt_id}.wav",
        "text": text,
        "speaker": voice.name,
        "emotion": emotion,
        "language": LANGUAGE,
    }


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False)


def build_demo_corpus(cfg: DemoConfig, out_dir: Path) -> DemoCorpus:
    """Synthesise the demo corpus into ``out_dir`` (see the module docstring for the layout).

    ``out_dir/wavs`` is replaced as a whole, so no file from an earlier run survives (the planted
    missing file must stay missing). ``manifest.jsonl`` is written last: its existence means the
    corpus is complete.

    Args:
        cfg: the ``demo`` config section.
        out_dir: the corpus folder (created if needed).

    Returns:
        A :class:`DemoCorpus` with the paths written and counts.

    Raises:
        RuntimeError: espeak-ng is missing or fails, or no sentence fits an utterance's window.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng is not on PATH; the demo corpus needs it (apt-get install espeak-ng, which "
            "`make` does), or set demo.enabled: false and point the config at a real corpus."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.jsonl"
    rejects_path = out_dir / "expected_rejects.json"
    # Gone first, so a crash below never leaves a manifest describing half-replaced audio.
    for p in (manifest_path, rejects_path):
        p.unlink(missing_ok=True)

    rng = np.random.default_rng(cfg.seed)
    voices = SPEAKERS[: cfg.n_speakers]
    n = cfg.n_utterances
    # Every (speaker, emotion) pair equally often; the remainder goes to a random subset of pairs.
    pairs = [(v, e) for v in voices for e in cfg.emotions]
    plan = pairs * (n // len(pairs)) + [pairs[int(j)] for j in rng.permutation(len(pairs))[: n % len(pairs)]]
    plan = [plan[int(j)] for j in rng.permutation(n)]
    # Sentences are dealt from shuffled decks, so each is used about equally often.
    decks = math.ceil(n / len(SENTENCES))
    firsts = np.concatenate([rng.permutation(len(SENTENCES)) for _ in range(decks)])[:n]

    # The dirty slice: extra rows with their own ids (continuing the numbering).
    per_kind = max(1, n // 150) if cfg.dirty else 0
    width = max(4, len(str(n + per_kind * len(DIRTY_REASONS))))

    def utt_id(voice: Voice, i: int) -> str:
        return f"{voice.name}_{i:0{width}d}"

    jobs = [
        _Job(i, utt_id(v, i), v, e, _candidates(cfg.seed, i, int(firsts[i])))
        for i, (v, e) in enumerate(plan)
    ]
    dirty: list[tuple[str, _Job]] = []
    for reason in DIRTY_REASONS if cfg.dirty else ():
        if reason == "duplicate":
            continue
        for _ in range(per_kind):
            i = n + len(dirty)
            v = voices[int(rng.integers(len(voices)))]
            e = cfg.emotions[int(rng.integers(len(cfg.emotions)))]
            job = _Job(i, utt_id(v, i), v, e, _candidates(cfg.seed, i, int(rng.integers(len(SENTENCES)))), reason)
            dirty.append((reason, job))
    synth_dirty = [j for r, j in dirty if r in _WITH_AUDIO]

    stage = out_dir / ".wavs.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    with tempfile.TemporaryDirectory(prefix="indextts-espeak-") as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            results = list(pool.map(lambda j: _synthesise(j, exe, stage, Path(tmp)), jobs + synth_dirty))
    synthesised = {j.utt_id: r for j, r in zip(jobs + synth_dirty, results)}
    final_wavs = out_dir / "wavs"
    shutil.rmtree(final_wavs, ignore_errors=True)
    stage.rename(final_wavs)

    # Lines as (sort key, text, expected reject or None); dirty rows get keys spread through the
    # clean rows so the cleaner cannot find them by position.
    lines: list[tuple[float, str, dict[str, Any] | None]] = []
    seconds = 0.0
    for job in jobs:
        text, sec = synthesised[job.utt_id]
        seconds += sec
        lines.append((float(job.index), _line(_row(job.utt_id, job.voice, text, job.emotion)), None))

    def spread() -> float:
        return float(rng.uniform(0.5, max(n - 0.5, 0.75)))

    n_empty = 0
    for reason, job in dirty:
        text = synthesised[job.utt_id][0] if reason in _WITH_AUDIO else SENTENCES[job.candidates[0]]
        if reason == "empty_text":
            # Both kinds of empty: nothing at all, and whitespace only.
            text = "" if n_empty % 2 == 0 else " \t "
            n_empty += 1
        line = _line(_row(job.utt_id, job.voice, text, job.emotion))
        reject: dict[str, Any] = {"id": job.utt_id, "reason": reason}
        if reason == "malformed":
            # Cut mid-row, as a writer killed half-way would leave it; on characters, not bytes,
            # so the file stays valid UTF-8 and the only defect is the JSON.
            line = line[: len(line) // 2]
            reject["id"] = None
        lines.append((spread(), line, reject))
    if per_kind:
        for orig in rng.choice(n, size=min(per_kind, n), replace=False):
            orig = int(orig)
            key = float(rng.uniform(orig + 0.5, max(n - 0.5, orig + 0.75)))
            lines.append((key, lines[orig][1], {"id": jobs[orig].utt_id, "reason": "duplicate"}))

    order = sorted(range(len(lines)), key=lambda j: (lines[j][0], j))
    expected = []
    text_lines = []
    for line_no, j in enumerate(order, start=1):
        _, line, reject = lines[j]
        text_lines.append(line)
        if reject is not None:
            expected.append({"id": reject["id"], "line": line_no, "reason": reject["reason"]})

    write_json(rejects_path, expected)
    with atomic_path(manifest_path) as tmp_manifest:
        tmp_manifest.write_text("\n".join(text_lines) + "\n", encoding="utf-8")
    return DemoCorpus(
        manifest=manifest_path,
        expected_rejects=rejects_path,
        n_utterances=n,
        n_dirty=len(expected),
        speakers=tuple(v.name for v in voices),
        emotions=tuple(cfg.emotions),
        seconds=seconds,
    )


def make_demo_corpus(cfg: DemoConfig, out_dir: Path) -> Path:
    """Synthesise the demo corpus into ``out_dir`` and return the path of its manifest.jsonl.

    See :func:`build_demo_corpus` for the contract.
    """
    return build_demo_corpus(cfg, out_dir).manifest


def is_geez_text(text: str) -> bool:
    """True when every letter in ``text`` is Ethiopic (digits, spaces and punctuation allowed)."""
    return all(
        not unicodedata.category(c).startswith("L") or unicodedata.name(c, "").startswith("ETHIOPIC")
        for c in text
    )


def cli_demo_corpus(argv: list[str]) -> int:
    """``indextts demo-corpus --config CFG --out-dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="indextts demo-corpus",
        description="Synthesise the Amharic demo corpus (espeak-ng) with a planted dirty slice.",
    )
    parser.add_argument("--config", required=True, help="inline JSON or a YAML/JSON file holding a 'demo' section")
    parser.add_argument("--out-dir", required=True, type=Path, help="corpus folder (wavs/, manifest.jsonl ...)")
    args = parser.parse_args(argv)
    cfg = get_section(DemoConfig, load_config_arg(args.config), "demo")
    corpus = build_demo_corpus(cfg, args.out_dir)
    print(
        f"demo corpus: {corpus.n_utterances} utterances, {len(corpus.speakers)} speakers, "
        f"{len(corpus.emotions)} emotions, {corpus.seconds / 3600:.3f} h clean audio, "
        f"{corpus.n_dirty} planted dirty rows -> {corpus.manifest}"
    )
    return 0
