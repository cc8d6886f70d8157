"""Benchmark: cleaning a 3,000,000-row manifest (trusted durations) + speaker selection, and
audio-header probing throughput.

    .venv/bin/python bench/bench_clean.py [--rows N] [--repeats R] [--baseline REV] [--no-reference] [--no-plain] [--no-write]

1. Generates (seeded, cached under ``bench/out/``) a JSONL manifest of Amharic-like rows with
   realistic dirt at low rates: malformed lines, missing fields, mojibake, empty transcripts,
   duplicate ids and audio files, durations out of bounds, implausible chars/s, rows without a
   duration (probed, and missing on disk).
2. Times ``clean_manifest(trust_durations=True)`` + ``select_speakers`` end to end (median of
   ``--repeats`` runs after a warm-up, the manifest in the page cache) and breaks one run into
   stages.
3. Times, in the same run, two scripts beside it:
   - the *plain script*, the one a user writes first: ``json.loads`` per line, NFC + whitespace
     collapse, the empty/duration/chars-per-second/duplicate checks, a ``Counter`` for the
     top-500 speakers with at least 50 utterances, the kept rows written back as JSONL. It does
     less than the library (no language rules, no rejects table, no Parquet), so its output is
     not the library's; its counts are printed beside the library's.
   - the *mirror*: the library's exact checks written the obvious way (``json.loads`` per line, a
     Python loop, a ``Counter``, pandas to Parquet), asserted to keep and reject exactly the same
     rows for the same reasons, with the same split and speakers.
   ``--baseline REV`` also times the library as it was at a git revision (before/after).
   The library runs with the environment ``indextts clean-manifest`` gives itself
   (``indextts.cli.COMMAND_ENV``), in this process and in the fresh ones; the baseline runs with
   the environment as it was.
4. Times ``probe_many`` over the demo corpus wavs with 1, 4 and 8 threads.
5. Prints a Markdown section and writes it below the ``prepare benchmarks`` anchor of
   BENCHMARKS.md (replacing what an earlier run of this script wrote there). Each timed run
   records the 1-minute load average before and after it: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The library runs here as `indextts clean-manifest` runs it: with that command's environment
# (indextts.cli.COMMAND_ENV), set before polars loads. Runs of other code get the environment as
# it was.
ENV_BEFORE = dict(os.environ)
from indextts.cli import apply_command_env  # noqa: E402

apply_command_env("clean-manifest")

from bench.benchmarks_md import write_section  # noqa: E402
from indextts import manifest as M  # noqa: E402
from indextts.manifest import CleanConfig, DataConfig, clean_manifest, probe_audio, probe_many, stable_fraction  # noqa: E402
from indextts.speakers import SpeakersConfig, select_speakers  # noqa: E402
from indextts.text import TextConfig  # noqa: E402

OUT = ROOT / "bench" / "out"
ANCHOR = "<!-- @@ prepare benchmarks @@ -->"
BEGIN, END = "<!-- bench_clean.py: begin -->", "<!-- bench_clean.py: end -->"
SEED = 20250611
# The speakers every run selects: the plain script keeps the top 500 with >= 50 utterances.
SPEAKERS = SpeakersConfig(top_k=500, min_utterances=50)
GEN_VERSION = 1  # bump when the generator changes, so a stale cached manifest is rebuilt

# --------------------------------------------------------------------------------------------
# Synthetic manifest

# Dirt rates, per row. Low, as in a real corpus, but every check has work to do.
RATES = {
    "malformed": 1e-5,  # cut-off or non-object JSON lines (about 30 in 3M)
    "no_speaker": 2e-4,
    "no_text": 5e-5,
    "mojibake": 2e-4,
    "empty_text": 5e-4,  # blank, or only invisible characters
    "dup_id": 1e-3,  # a row repeated (same id, same file)
    "dup_audio": 3e-4,  # the same file listed under another id
    "no_duration": 2e-5,  # probed; the file is not there
    "cps_mismatch": 1e-3,  # transcript paired with the wrong clip
}


def _geez_syllables() -> np.ndarray:
    return np.array([chr(c) for c in range(0x1200, 0x1358) if unicodedata.category(chr(c)) == "Lo"])


def generate_manifest(path: Path, n_rows: int, n_speakers: int = 20_000, seed: int = SEED) -> dict:
    """Write a seeded synthetic JSONL manifest; returns what was planted."""
    rng = np.random.default_rng(seed)
    syl = _geez_syllables()
    # A vocabulary of words (1-5 syllables), drawn with Zipf-like frequencies, like real text.
    n_words = 30_000
    wlen = rng.integers(1, 6, n_words)
    flat = rng.choice(syl, int(wlen.sum()))
    cuts = np.cumsum(wlen)[:-1]
    words = np.array(["".join(w) for w in np.split(flat, cuts)], dtype=object)
    wp = 1.0 / (np.arange(n_words) + 5.0)
    wp /= wp.sum()
    latin = np.array(["OK", "Addis", "Ababa", "COVID", "Wi-Fi", "3.5", "2024", "UN"], dtype=object)

    # Speakers with Zipf-like sizes: a few with thousands of utterances, a long tail with ~15.
    sp = 1.0 / (np.arange(n_speakers) + 20.0)
    sp /= sp.sum()
    speakers = np.array([f"am_spk{i:05d}" for i in rng.permutation(n_speakers)], dtype=object)
    spk = rng.choice(n_speakers, n_rows, p=sp)
    emotions = np.array(["neutral", "happy", "sad", "angry", "surprised"], dtype=object)
    emo = rng.choice(len(emotions), n_rows, p=[0.6, 0.12, 0.12, 0.08, 0.08])
    emo_null = rng.random(n_rows) < 0.05
    # Durations: log-normal around 5 s; the tails cross the 0.5 s / 30 s bounds now and then.
    duration = np.round(np.exp(rng.normal(1.55, 0.75, n_rows)), 3)
    # Transcript length follows the duration at ~11 chars/s, clipped to 10-120 chars.
    n_chars = np.clip(np.rint(duration * rng.normal(11.0, 2.0, n_rows)), 10, 120).astype(np.int64)
    dirt = {k: rng.random(n_rows) < r for k, r in RATES.items()}
    n_chars[dirt["cps_mismatch"]] = 120
    duration[dirt["cps_mismatch"]] = np.round(rng.uniform(0.6, 3.5, int(dirt["cps_mismatch"].sum())), 3)

    u = rng.random((n_rows, 6))  # per-row dice for cosmetic variation
    word_draws = rng.choice(n_words, (n_rows, 40), p=wp)
    seps = rng.choice(np.array([" ", " ", " ", " ", " ", " ", "\u1361", "  ", " \u1361 ", ", "], dtype=object), (n_rows, 40))
    ends = np.array(["\u1362", "\u1362", "\u1362", ".", "::", "\u1361\u1361", "?", "\u1367", "!", ""], dtype=object)
    end = rng.choice(ends, n_rows)
    planted = Counter()
    seen: list[tuple[str, str]] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_rows):
            s = speakers[spk[i]]
            uid = f"{s}-{i:08d}"
            audio = f"wavs/{s}/{uid}.wav"
            # Build a transcript of about n_chars characters from words and separators.
            target = int(n_chars[i])
            parts: list[str] = []
            length, j = 0, 0
            while length < target and j < 40:
                w = words[word_draws[i, j]]
                if u[i, 0] < 0.02 and j == 2:
                    w = latin[word_draws[i, j] % len(latin)]
                parts.append(w)
                length += len(w)
                if length < target:
                    parts.append(seps[i, j])
                    length += 1
                j += 1
            text = "".join(parts)[:target] + end[i]
            if u[i, 1] < 0.01:
                text = "\u201c" + text + "\u201d"
            if u[i, 2] < 0.005:
                k = len(text) // 2
                text = text[:k] + "\u200b" + text[k:]
            if u[i, 3] < 0.003:
                text = text.replace(" ", "\u00a0", 1)
            if u[i, 4] < 0.002:
                text = " " + text + "\t"
            row: dict = {"id": uid, "audio": audio, "text": text, "speaker": s}
            if not emo_null[i]:
                row["emotion"] = emotions[emo[i]]
            row["duration"] = float(duration[i])
            if dirt["dup_id"][i] and seen:
                pid, paudio = seen[int(u[i, 5] * len(seen))]
                row["id"], row["audio"] = pid, paudio
                planted["dup_id"] += 1
            elif dirt["dup_audio"][i] and seen:
                row["audio"] = seen[int(u[i, 5] * len(seen))][1]
                planted["dup_audio"] += 1
            elif len(seen) < 200_000:
                seen.append((uid, audio))
            if dirt["no_speaker"][i]:
                if u[i, 5] < 0.5:
                    del row["speaker"]
                else:
                    row["speaker"] = " "
                planted["no_speaker"] += 1
            elif dirt["no_text"][i]:
                del row["text"]
                planted["no_text"] += 1
            elif dirt["mojibake"][i]:
                row["text"] = text[:5] + ("\ufffd" if u[i, 5] < 0.5 else "Ã©") + text[5:]
                planted["mojibake"] += 1
            elif dirt["empty_text"][i]:
                row["text"] = ["", "  ", "\u200b", "\u1361", " \u200c "][int(u[i, 5] * 5)]
                planted["empty_text"] += 1
            if dirt["no_duration"][i]:
                del row["duration"]
                planted["no_duration"] += 1
            line = json.dumps(row, ensure_ascii=False)
            if dirt["malformed"][i]:
                line = line[: int(len(line) * u[i, 5])] if u[i, 5] > 0.2 else "[" + json.dumps(uid) + "]"
                planted["malformed"] += 1
            f.write(line + "\n")
            if i == n_rows // 2:
                f.write("\n")  # a blank line is not a row
    return dict(planted)


def ensure_manifest(n_rows: int) -> Path:
    path = OUT / f"manifest-{n_rows}-v{GEN_VERSION}.jsonl"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        planted = generate_manifest(tmp, n_rows)
        tmp.rename(path)
        print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s; planted {planted}", file=sys.stderr)
    return path


# --------------------------------------------------------------------------------------------
# The mirror: the library's exact checks written the obvious way, one row at a time.


def reference_normalizer(cfg: TextConfig):
    """``indextts.text.normalize_array``'s rules applied to one str with ``re`` and str.replace.
    The rules spell RE2's ASCII whitespace class out, so ``re`` reads them as RE2 and Rust do."""
    from indextts.config import pairs
    from indextts.text import _COMMON_MAP, _CONTROL, _INVISIBLE, language_rules

    invisible = re.compile(_INVISIBLE)
    spaces = re.compile("[\t\n\r\u00a0\u2000-\u200a\u202f\u205f\u3000]")
    control = re.compile(_CONTROL)
    rules = [(re.compile(rule.pattern, re.ASCII), rule.replacement) for rule in language_rules(cfg.language)]
    user = list(pairs(cfg.punctuation_map))
    runs = re.compile(" {2,}")
    form = cfg.unicode_form

    def normalize(s: str) -> str:
        s = unicodedata.normalize(form, s)
        s = invisible.sub("", s)
        s = spaces.sub(" ", s)
        s = control.sub("", s)
        for a, b in _COMMON_MAP:
            s = s.replace(a, b)
        for pattern, repl in rules:
            s = pattern.sub(repl, s)
        for a, b in user:
            s = s.replace(a, b)
        if cfg.lowercase:
            s = s.lower()
        return runs.sub(" ", s).strip()

    return normalize


def reference_clean(manifest: Path, text_cfg: TextConfig, clean_cfg: CleanConfig, spk_cfg: SpeakersConfig, out_dir: Path) -> dict:
    """json.loads per line, a loop of checks, a Counter of speakers, pandas to Parquet."""
    import pandas as pd

    normalize = reference_normalizer(text_cfg)
    bad_enc = re.compile("\ufffd|Ã[\u0080-\u00bf]|â€")
    ext = re.compile(r"\.[A-Za-z0-9]+\Z")
    base_dir = str(manifest.resolve().parent)
    keys = ("id", "audio", "text", "speaker", "language", "emotion", "duration")
    kept = {k: [] for k in ("utt_id", "audio_path", "text", "raw_text", "speaker", "language", "emotion", "duration", "split")}
    rej = {k: [] for k in ("manifest", "row", "utt_id", "audio", "text", "speaker", "language", "emotion", "duration", "reason", "detail")}
    seen_ids: set[str] = set()
    seen_paths: set[str] = set()
    n_input = 0
    lo_cps, hi_cps = clean_cfg.min_chars_per_second, clean_cfg.max_chars_per_second

    def reject(row: int, f: dict, uid, reason: str, detail: str) -> None:
        rej["manifest"].append(str(manifest))
        rej["row"].append(row)
        rej["utt_id"].append(uid)
        for k in ("audio", "text", "speaker", "language", "emotion", "duration"):
            rej[k].append(f.get(k))
        rej["reason"].append(reason)
        rej["detail"].append(detail)

    with open(manifest, "rb") as fh:  # bytes: a line cut inside a UTF-8 sequence is one bad row, not a crash
        for row, line in enumerate(fh, 1):
            if not line.strip():
                continue
            n_input += 1
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:
                text = line.rstrip(b"\n").decode("utf-8", errors="replace")
                reject(row, {}, None, "malformed", f"{type(e).__name__}: {e}; line: {text[:200]}")
                continue
            f = {}
            for k in keys:
                v = obj.get(k)
                if k == "duration":
                    try:
                        v = None if v is None or v == "" else float(v)
                    except (TypeError, ValueError):
                        v = None
                elif v is not None and not isinstance(v, str):
                    v = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)
                f[k] = v
            if f["language"] is None:
                f["language"] = text_cfg.language
            audio, raw, speaker, given = f["audio"], f["text"], f["speaker"], f["id"]
            uid = given if given is not None and given.strip() else ext.sub("", audio or "")
            if audio is None or not audio.strip():
                reject(row, f, uid, "missing_field", "no audio (column 'audio')")
                continue
            if raw is None:
                reject(row, f, uid, "missing_field", "no text (column 'text')")
                continue
            if speaker is None or not speaker.strip():
                reject(row, f, uid, "missing_field", "no speaker (column 'speaker')")
                continue
            if bad_enc.search(raw):
                reject(row, f, uid, "bad_encoding", "transcript holds U+FFFD or mojibake; re-export the manifest as UTF-8")
                continue
            text = normalize(raw)
            if not text:
                reject(row, f, uid, "empty_text", "transcript is empty after normalisation")
                continue
            path = audio if audio.startswith("/") else base_dir + "/" + audio
            if clean_cfg.drop_duplicates:
                dup = "utt_id already seen in an earlier row" if uid in seen_ids else "audio file already listed in an earlier row" if path in seen_paths else None
                seen_ids.add(uid)
                seen_paths.add(path)
                if dup:
                    reject(row, f, uid, "duplicate", dup)
                    continue
            d = f["duration"]
            if not clean_cfg.trust_durations or d is None or not math.isfinite(d):
                info = probe_audio(path)
                if info.reason:
                    reject(row, f, uid, info.reason, info.detail)
                    continue
                d = info.frames / info.sample_rate
            if d < clean_cfg.min_duration:
                reject(row, f, uid, "too_short", f"{round(d, 3)} s < clean.min_duration {clean_cfg.min_duration}")
                continue
            if d > clean_cfg.max_duration:
                reject(row, f, uid, "too_long", f"{round(d, 3)} s > clean.max_duration {clean_cfg.max_duration}")
                continue
            cps = len(text.replace(" ", "")) / d if d > 0 else math.nan
            if cps < lo_cps or cps > hi_cps:
                reject(row, f, uid, "chars_per_second", f"{round(cps, 2)} chars/s outside [{lo_cps}, {hi_cps}]")
                continue
            for k, v in (("utt_id", uid), ("audio_path", path), ("text", text), ("raw_text", raw), ("speaker", speaker),
                         ("language", f["language"]), ("emotion", f["emotion"]), ("duration", d)):
                kept[k].append(v)

    # The split uses the library's documented hash (one vectorised call: a pure-Python XXH64 per
    # row would make the reference slower for a reason that has nothing to do with its design).
    is_val = stable_fraction(kept["utt_id"], clean_cfg.split_salt) < clean_cfg.val_fraction
    if clean_cfg.val_fraction > 0 and len(is_val) >= 2 and not is_val.any():
        is_val[np.argmin(stable_fraction(kept["utt_id"], clean_cfg.split_salt))] = True
    kept["split"] = ["val" if v else "train" for v in is_val.tolist()]
    train_speakers = Counter(s for s, v in zip(kept["speaker"], kept["split"]) if v == "train")

    out_dir.mkdir(parents=True, exist_ok=True)
    clean = pd.DataFrame(kept)
    clean.insert(8, "sample_rate", pd.array([None] * len(clean), dtype="Int32"))
    clean.insert(9, "channels", pd.array([None] * len(clean), dtype="Int16"))
    clean.to_parquet(out_dir / "clean.parquet", compression="zstd", index=False)
    rejects = pd.DataFrame(rej)
    rejects.to_parquet(out_dir / "rejects.parquet", compression="zstd", index=False)
    counts = Counter(rej["reason"])
    dur = clean["duration"].to_numpy()
    summary = {
        "input_rows": n_input,
        "kept": len(clean),
        "rejected": len(rejects),
        "reconciled": len(clean) + len(rejects) == n_input,
        "rejected_by_reason": {r: counts.get(r, 0) for r in M.REASONS},
        "hours_kept": round(float(dur.sum()) / 3600, 4),
        "hours_by_split": {"train": round(float(dur[~is_val].sum()) / 3600, 4), "val": round(float(dur[is_val].sum()) / 3600, 4)},
        "utterances_by_split": {"train": int((~is_val).sum()), "val": int(is_val.sum())},
        "speakers": int(clean["speaker"].nunique()),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    ranked = sorted(train_speakers.items(), key=lambda kv: (-kv[1], kv[0]))
    eligible = [(s, n) for s, n in ranked if n >= spk_cfg.min_utterances]
    chosen = eligible[: spk_cfg.top_k]
    total = sum(train_speakers.values())
    doc = {
        "speakers": {s: i for i, (s, _) in enumerate(chosen)},
        "stats": {
            "total_samples": total,
            "unique_speakers": len(ranked),
            "eligible": len(eligible),
            "selected": len(chosen),
            "share_of_samples_covered": round(sum(n for _, n in chosen) / total, 6) if total else 0.0,
        },
    }
    (out_dir / "speakers.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


# --------------------------------------------------------------------------------------------
# The plain script: what a user writes first, before reaching for a library.


def plain_clean(manifest: Path, clean_cfg: CleanConfig, out_dir: Path, top_k: int = 500, min_utterances: int = 50) -> dict:
    """``json.loads`` per line, NFC + whitespace collapse, the empty / duration / chars-per-second
    / duplicate checks, a ``Counter`` for the top-K speakers with at least M utterances, the kept
    rows written back as JSONL. Returns its counts."""
    lo, hi = clean_cfg.min_duration, clean_cfg.max_duration
    lo_cps, hi_cps = clean_cfg.min_chars_per_second, clean_cfg.max_chars_per_second
    seen_ids: set = set()
    seen_audio: set = set()
    speakers: Counter = Counter()
    n_in = kept = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(manifest, encoding="utf-8") as f, open(out_dir / "clean.jsonl", "w", encoding="utf-8") as out:
        for line in f:
            if not line.strip():
                continue
            n_in += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            text = " ".join(unicodedata.normalize("NFC", row.get("text") or "").split())
            if not text or not row.get("audio") or not str(row.get("speaker") or "").strip():
                continue
            duration = row.get("duration")
            if duration is None or not lo <= duration <= hi:
                continue
            if not lo_cps <= len(text.replace(" ", "")) / duration <= hi_cps:
                continue
            if row.get("id") in seen_ids or row["audio"] in seen_audio:
                continue
            seen_ids.add(row.get("id"))
            seen_audio.add(row["audio"])
            row["text"] = text
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            speakers[row["speaker"]] += 1
            kept += 1
    chosen = [s for s, n in speakers.most_common(top_k) if n >= min_utterances]
    (out_dir / "speakers.json").write_text(json.dumps({s: i for i, s in enumerate(chosen)}, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"input_rows": n_in, "kept": kept, "speakers_selected": len(chosen)}


# --------------------------------------------------------------------------------------------
# Timing


def library_run(manifest: Path, text_cfg: TextConfig, clean_cfg: CleanConfig, spk_cfg: SpeakersConfig, out_dir: Path) -> dict:
    out = clean_manifest(DataConfig(manifests=(str(manifest),)), text_cfg, clean_cfg, out_dir, progress=False)
    select_speakers(spk_cfg, out.clean, out_dir / "speakers.json")
    return json.loads(out.summary.read_text())


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@contextlib.contextmanager
def stage_timer(buckets: dict[str, float]):
    """Wrap the library's stage functions with timers (the library itself carries no timing
    code). A bucket's time is the union of its calls' intervals, so work running in threads side
    by side is not counted twice; stages overlap each other (spans are normalised in the pool
    while earlier ones are checked and written). The wall time no wrapped function covers is
    ``rest``."""
    import pyarrow.parquet as pq

    this = sys.modules[__name__]
    targets = [(M, "_read", "read"), (M, "_keys", "keys"), (M, "_normalise", "normalise"), (M._Check, "span", "check"),
               (pq.ParquetWriter, "write_table", "write"), (M, "_summary", "write"),
               (M, "write_json", "write"), (this, "select_speakers", "speakers")]
    intervals: dict[str, list[tuple[float, float]]] = {}
    saved = []

    def wrap(fn, bucket):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                intervals.setdefault(bucket, []).append((t, time.perf_counter()))
        return timed

    for mod, name, bucket in targets:
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, wrap(getattr(mod, name), bucket))
    start = time.perf_counter()
    try:
        yield
    finally:
        total = time.perf_counter() - start
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)
        for bucket, spans in intervals.items():
            buckets[bucket] = _union(spans)
        buckets["rest"] = total - _union([s for spans in intervals.values() for s in spans])


def empty_dir(path: Path) -> None:
    """Remove a run's output folder before the run, untimed, as Snakemake removes a job's outputs
    before it starts: replacing a 1 GB clean.parquet left by the previous run costs the run ~0.4 s
    of the kernel freeing the old file."""
    shutil.rmtree(path, ignore_errors=True)


def timed_runs(fn, repeats: int, out_dir: Path | None = None) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (all threads of this process) of ``repeats`` calls, each into an
    emptied ``out_dir`` when one is given."""
    wall, cpu = [], []
    for _ in range(repeats):
        if out_dir is not None:
            empty_dir(out_dir)
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


def child_run(src: Path, manifest: Path, out_dir: Path, env: dict[str, str]) -> dict:
    """One run of ``clean_manifest`` + ``select_speakers`` from the package under ``src``, in a
    fresh process with environment ``env``: wall, user and system CPU seconds, as the child
    measures them."""
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(src)!r})
try:  # the command's environment, as the CLI sets it (a revision from before COMMAND_ENV has none)
    from indextts.cli import apply_command_env
    apply_command_env("clean-manifest")
except ImportError:
    pass
from indextts.manifest import CleanConfig, DataConfig, clean_manifest
from indextts.speakers import SpeakersConfig, select_speakers
from indextts.text import TextConfig
r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
out = clean_manifest(DataConfig(manifests=({str(manifest)!r},)), TextConfig(), CleanConfig(trust_durations=True), {str(out_dir)!r}, progress=False)
select_speakers(SpeakersConfig(top_k={SPEAKERS.top_k}, min_utterances={SPEAKERS.min_utterances}), out.clean, {str(out_dir / "speakers.json")!r})
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"wall": time.perf_counter() - t, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                  "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                  "summary": json.loads(out.summary.read_text())}}))
"""
    empty_dir(out_dir)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=src, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


def baseline_run(rev: str, manifest: Path, out_dir: Path) -> dict:
    """One run of the library as it was at git revision ``rev`` (the package exported with
    ``git archive``), in a fresh process."""
    import tarfile
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-clean-baseline-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "indextts"], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        return child_run(tmp, manifest, out_dir, ENV_BEFORE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare_outputs(lib_dir: Path, ref_dir: Path, lib_summary: dict, ref_summary: dict) -> None:
    """The reference must keep and reject the same rows for the same reasons, split them the same
    way and pick the same speakers; otherwise the timing comparison means nothing."""
    import pyarrow.parquet as pq

    for key in ("input_rows", "kept", "rejected", "rejected_by_reason", "utterances_by_split", "hours_kept", "speakers"):
        assert lib_summary[key] == ref_summary[key], f"{key}: library {lib_summary[key]} != reference {ref_summary[key]}"
    lib_c, ref_c = (pq.read_table(d / "clean.parquet") for d in (lib_dir, ref_dir))
    for col in ("utt_id", "audio_path", "text", "raw_text", "speaker", "language", "emotion", "duration", "split"):
        assert lib_c.column(col).equals(ref_c.column(col).cast(lib_c.schema.field(col).type)), f"clean.parquet column {col} differs"
    lib_r, ref_r = (pq.read_table(d / "rejects.parquet", columns=["row", "reason", "utt_id"]).to_pydict() for d in (lib_dir, ref_dir))
    assert lib_r == ref_r, "rejects.parquet rows/reasons differ"
    lib_s, ref_s = (json.loads((d / "speakers.json").read_text()) for d in (lib_dir, ref_dir))
    assert lib_s["speakers"] == ref_s["speakers"], "speakers.json differs"


def _evict(paths: list[str]) -> bool:
    """Drop these files (only these) from the page cache, so the next read comes from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def probe_bench(demo_dir: Path, repeats: int = 5) -> dict:
    """Files/s of ``probe_many`` over the demo corpus wavs: cold (evicted from the page cache
    first, one pass) and warm (median of ``repeats`` passes of >= 3000 probes), with 1, 4 and 8
    threads."""
    if not (demo_dir / "manifest.jsonl").exists():
        subprocess.run([str(ROOT / ".venv/bin/indextts"), "demo-corpus", "--config", str(ROOT / "config.yaml"), "--out-dir", str(demo_dir)], check=True, cwd=ROOT)
    wavs = sorted(str(p) for p in (demo_dir / "wavs").rglob("*.wav"))
    res: dict = {"files": len(wavs), "threads": {}}
    for workers in (1, 4, 8):
        cold = None
        if _evict(wavs):
            t = time.perf_counter()
            infos = probe_many(wavs, workers, progress=False)
            cold = len(wavs) / (time.perf_counter() - t)
            res["flagged"] = sum(1 for i in infos if i.reason)  # the corpus plants a few damaged files
        batch = wavs * max(1, -(-3000 // max(1, len(wavs))))  # >= 3000 probes per timing: steadier rates
        warm = len(batch) / statistics.median(timed_runs(lambda: probe_many(batch, workers, progress=False), repeats)[0])
        res["threads"][workers] = {"cold": cold, "warm": warm}
    return res


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 2**20:.0f} GiB"
    return f"`nproc` = {os.cpu_count() if not hasattr(os, 'sched_getaffinity') else len(os.sched_getaffinity(0))}, {model}, {mem} RAM, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) mirror of the library's checks")
    p.add_argument("--no-plain", action="store_true", help="skip the plain script")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--baseline", metavar="REV", help="also time the library as it was at this git revision (one run)")
    p.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    p.add_argument("--profile", type=Path, help="also write a cProfile of one library run here")
    args = p.parse_args(argv)

    manifest = ensure_manifest(args.rows)
    text_cfg = TextConfig()
    clean_cfg = CleanConfig(trust_durations=True)
    lib_dir, ref_dir, plain_dir = OUT / "clean-lib", OUT / "clean-ref", OUT / "clean-plain"
    run_lib = lambda: library_run(manifest, text_cfg, clean_cfg, SPEAKERS, lib_dir)  # noqa: E731
    loads: dict[str, tuple[float, float]] = {}  # 1-min load average before and after each timed run

    def measured(name: str, fn):
        before = os.getloadavg()[0]
        try:
            return fn()
        finally:
            loads[name] = (before, os.getloadavg()[0])

    lib_summary = run_lib()  # warm-up: page cache, imports
    lib_wall, lib_cpu = measured("library", lambda: timed_runs(run_lib, args.repeats, lib_dir))
    plain = None
    if not args.no_plain:
        empty_dir(plain_dir)
        c, t = time.process_time(), time.perf_counter()
        plain = measured("plain", lambda: plain_clean(manifest, clean_cfg, plain_dir, SPEAKERS.top_k, SPEAKERS.min_utterances))
        plain.update(wall=time.perf_counter() - t, cpu=time.process_time() - c)
    stages: dict[str, float] = {}
    empty_dir(lib_dir)
    with stage_timer(stages):
        t = time.perf_counter()
        run_lib()
        stage_total = time.perf_counter() - t
    if args.profile:
        prof = cProfile.Profile()
        empty_dir(lib_dir)
        prof.runcall(run_lib)
        prof.dump_stats(args.profile)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
        print(s.getvalue(), file=sys.stderr)

    base = None
    if args.baseline:
        base = measured("baseline", lambda: baseline_run(args.baseline, manifest, OUT / "clean-baseline"))
        for key in ("input_rows", "kept", "rejected", "rejected_by_reason", "speakers"):
            assert base["summary"][key] == lib_summary[key], f"{key}: {args.baseline} {base['summary'][key]} != now {lib_summary[key]}"

    ref_time = None
    if not args.no_reference:
        empty_dir(ref_dir)
        t = time.perf_counter()
        ref_summary = measured("mirror", lambda: reference_clean(manifest, text_cfg, clean_cfg, SPEAKERS, ref_dir))
        ref_time = time.perf_counter() - t
        compare_outputs(lib_dir, ref_dir, lib_summary, ref_summary)

    fresh = measured("fresh", lambda: [child_run(ROOT, manifest, OUT / "clean-fresh", ENV_BEFORE) for _ in range(3)])
    for r in fresh:
        assert r["summary"] == lib_summary, "a run in a fresh process gave another summary"

    probe = None if args.no_probe else probe_bench(OUT / "demo")

    lib_med = statistics.median(lib_wall)
    n = lib_summary["input_rows"]
    size_mb = manifest.stat().st_size / 1e6
    speakers_lib = len(json.loads((lib_dir / "speakers.json").read_text())["speakers"])

    def load(name: str) -> str:
        a, b = loads[name]
        return f"{a:.1f} → {b:.1f}"

    lines = [
        "### Manifest cleaning + speaker selection (`bench/bench_clean.py`)",
        "",
        "Command: `.venv/bin/python bench/bench_clean.py" + (f" --baseline {args.baseline}" if args.baseline else "") + "`  ",
        f"Machine: {machine()}. Other jobs share the machine: each run's 1-min load average before → after is in the table, "
        "and wall times carry that noise (CPU seconds less so).",
        "",
        f"Input: synthetic JSONL, {n:,} rows ({size_mb:,.0f} MB), ~20k speakers with Zipf-like sizes, seeded and cached "
        f"under `bench/out/`; `clean.trust_durations: true`, everything else default; speakers: top {SPEAKERS.top_k} "
        f"with >= {SPEAKERS.min_utterances} train utterances. "
        f"Kept {lib_summary['kept']:,} ({lib_summary['speakers']:,} speakers, {speakers_lib} selected); rejected "
        + ", ".join(f"{k} {v:,}" for k, v in lib_summary["rejected_by_reason"].items() if v)
        + ".",
        "",
        "| run | wall (s) | CPU (s, all threads) | rows/s | load before → after |",
        "|---|---:|---:|---:|---:|",
        f"| library: `clean_manifest` + `select_speakers`, median of {args.repeats} after a warm-up "
        f"(runs: {', '.join(f'{t:.1f}' for t in lib_wall)}) | {lib_med:.2f} | {statistics.median(lib_cpu):.1f} | {n / lib_med:,.0f} | {load('library')} |",
    ]
    if plain:
        lines.append(f"| plain script: `json.loads` per line, NFC + whitespace collapse, the same bounds and duplicate checks, `Counter`, "
                     f"JSONL out (kept {plain['kept']:,}, {plain['speakers_selected']} speakers selected), 1 run "
                     f"| {plain['wall']:.2f} | {plain['cpu']:.1f} | {n / plain['wall']:,.0f} | {load('plain')} |")
    fresh_runs = ", ".join(f"{r['wall']:.1f}" for r in fresh)
    fresh_wall = statistics.median(r["wall"] for r in fresh)
    lines.append(f"| library in a fresh process each time (`python -c` with the command's environment, as one `indextts clean-manifest` job runs; no warm-up), {len(fresh)} runs "
                 f"({fresh_runs}) | {fresh_wall:.2f} | {statistics.median(r['cpu'] for r in fresh):.1f} | {n / fresh_wall:,.0f} | {load('fresh')} |")
    if base:
        lines.append(f"| the library at `{args.baseline}` (before this rework), 1 run | {base['wall']:.2f} | {base['cpu']:.1f} | {n / base['wall']:,.0f} | {load('baseline')} |")
    if ref_time is not None:
        lines.append(f"| mirror: the library's exact checks as a Python loop (`json.loads`, `re`, `Counter`, pandas → Parquet), 1 run "
                     f"| {ref_time:.2f} | | {n / ref_time:,.0f} | {load('mirror')} |")
    lines.append("")
    if plain and args.rows == 3_000_000:  # the goals are set for this size
        met = lib_med < 15 and plain["wall"] / lib_med >= 3
        lines.append(f"Goals of issue 11 (under 15 s on 2 cores, at least 3× the plain script, side by side): "
                     f"**{'met' if met else 'not met'}** on this run ({lib_med:.1f} s, {plain['wall'] / lib_med:.1f}×).")
    if plain:
        lines.append(f"Library vs the plain script: **{plain['wall'] / lib_med:.1f}×** less wall time, "
                     f"{plain['cpu'] / statistics.median(lib_cpu):.1f}× less CPU. The plain script does less (no language rules, "
                     "no rejects table, no Parquet, no probing), so it keeps a different set of rows.")
    if ref_time is not None:
        lines.append(f"Library vs the mirror: **{ref_time / lib_med:.1f}×**. The script asserts that both keep and reject the "
                     "same rows for the same reasons, with identical clean columns, split and speakers.")
    if base:
        lines.append(f"Library vs `{args.baseline}`: **{base['wall'] / lib_med:.1f}×** (same kept/rejected counts per reason, asserted).")
    lines += ["", f"Library stages (one instrumented run, {stage_total:.2f} s wall; stages overlap: spans are normalised in the "
              "thread pool while earlier spans are checked and written):", "", "| stage | wall (s) |", "|---|---:|"]
    for k, label in (("read", "read: JSONL → Arrow, blocks parsed in parallel, bad lines isolated by bisection"),
                     ("keys", "keys: absolute and resolved audio paths, utt_ids, duplicate groups (in the pool, beside the first spans)"),
                     ("normalise", "normalise: `text.normalize_array` (polars for plain rows) + lengths + mojibake, spans in the pool"),
                     ("check", "check: fields, duplicates, durations, bounds, chars/s, span by span"),
                     ("write", "write: clean.parquet row groups (in a thread of their own; transcripts uncompressed, the rest zstd), rejects.parquet, summary"),
                     ("speakers", "speakers: `select_speakers` (reads clean.parquet)"),
                     ("rest", "rest: what no stage above covers")):
        lines.append(f"| {label} | {stages.get(k, 0.0):.2f} |")
    if probe:
        lines += [
            "",
            f"### Audio header probing (`probe_many` over the demo corpus: {probe['files']} wavs from `indextts demo-corpus`)",
            "",
            "| threads | warm page cache, files/s (median of 5 passes of >= 3000 probes) | cold (files evicted with `posix_fadvise`), files/s |",
            "|---:|---:|---:|",
        ]
        for w, r in probe["threads"].items():
            cold = f"{r['cold']:,.0f}" if r["cold"] else "n/a"
            lines.append(f"| {w} | {r['warm']:,.0f} | {cold} |")
        lines += ["", "Each probe reads the header with libsndfile and checks the WAV data chunk against the file size; "
                  f"{probe.get('flagged', 0)} of the files are the corpus's planted damaged ones and are reported as such."]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write and args.rows == 3_000_000:
        write_section(f"{BEGIN}\n{section.rstrip()}\n{END}", BEGIN, END, anchor=ANCHOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
