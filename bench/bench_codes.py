"""Benchmark: DAC code extraction throughput, and reading codes back for training.

    .venv/bin/python bench/bench_codes.py [--tiny-seconds S] [--full-seconds S] [--repeats R]
                                          [--read-utts N] [--threads T] [--workers W] [--no-write]

1. Extraction. Generates (seeded, cached under ``bench/out/codes/``) a corpus of 22050 Hz mono
   16-bit WAVs of 1-6 s, like the demo corpus, and its ``clean.parquet``. For the demo's tiny
   codec and for the full-size 16 kHz DAC architecture (random weights, same seed, saved in DAC's
   own format) it times, interleaved, ``--repeats`` times each:

   * the per-file loop over DAC's own API: ``DAC.load``, then per file soundfile read, mono,
     torchaudio resample, ``preprocess``, ``encode``, ``np.save`` of the codes;
   * ``extract_codes`` on the same files as one shard, end to end (manifest, DataLoader,
     resampling, the device's batching policy, atomic Parquet), as the rule runs it; and once
     more with the GPU's batching policy forced onto the CPU (exactness at full size, and cost).

   Reports audio seconds per wall second (median) and checks that both give identical codes.
   On a GPU both run on it as well and the full-size goal (>= 300x real time) is checked.
2. Reading. Writes ``--read-utts`` utterances of 16 kHz-DAC-shaped codes (12 codebooks,
   50 frames/s, 1-12 s) as 4 shards through the real writer, and the same codes as one ``.npy``
   per utterance (the community trainers' layout). With a warm page cache, times
   ``read_shard_codes`` + ``codes(i)`` for every row (metadata DataFrame included) against
   ``np.load`` per file, in utterances per second.
3. Prints a Markdown section and writes it below the ``codes benchmarks`` anchor of
   BENCHMARKS.md (replacing what an earlier run of this script wrote there).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

# What `indextts extract-codes` sets before torch loads (see cli_extract_codes); set here for both
# contenders alike, since they run in this one process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchmarks_md import write_section  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402

from indextts.audio.dac import DAC_16KHZ_KWARGS, _import_dac, make_demo_codec# noqa: E402
from indextts.codes import CodecConfig# noqa: E402
from indextts.codes import (  # noqa: E402
    CodesConfig,
    _write_parquet,
    extract_codes,
    read_shard_codes,
    shard_table,
)

OUT = ROOT / "bench" / "out" / "codes"
ANCHOR = "<!-- @@ codes benchmarks @@ -->"
BEGIN, END = "<!-- bench_codes.py: begin -->", "<!-- bench_codes.py: end -->"
SEED = 20250611
CORPUS_SR = 22050

# --------------------------------------------------------------------------------------------
# Corpus and codecs


def make_corpus(total_seconds: float, name: str) -> Path:
    """Seeded 22050 Hz mono WAVs of 1-6 s adding up to ``total_seconds``, and clean.parquet."""
    root = OUT / name
    manifest = root / "clean.parquet"
    if manifest.exists():
        return manifest
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(SEED)
    rows, seconds, i = [], 0.0, 0
    while seconds < total_seconds:
        dur = float(rng.uniform(1.0, 6.0))
        n = int(dur * CORPUS_SR)
        t = np.arange(n) / CORPUS_SR
        # A voiced-like signal: a gliding harmonic tone under a syllable-rate envelope, plus noise.
        f0 = rng.uniform(90, 260) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
        phase = 2 * np.pi * np.cumsum(f0) / CORPUS_SR
        x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
        x = 0.2 * x + 0.01 * rng.standard_normal(n)
        path = root / "wavs" / f"utt{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, x.astype(np.float32), CORPUS_SR, subtype="PCM_16")
        rows.append(
            {
                "utt_id": f"utt{i:05d}",
                "audio_path": str(path.resolve()),
                "text": "ሰላም",
                "raw_text": "ሰላም",
                "speaker": f"spk{i % 6}",
                "language": "am",
                "emotion": None,
                "duration": n / CORPUS_SR,
                "sample_rate": CORPUS_SR,
                "channels": 1,
                "split": "train",
            }
        )
        seconds += n / CORPUS_SR
        i += 1
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def codec_weights(kind: str) -> Path:
    path = OUT / f"dac_{kind}.pth"
    if kind == "tiny":
        return make_demo_codec(path)
    if not path.exists():
        dac = _import_dac()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = dac.DAC(**DAC_16KHZ_KWARGS)
        buf = io.BytesIO()
        model.save(buf, package=False)
        path.write_bytes(buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------
# Extraction


def per_file_loop(weights: Path, manifest: Path, out_dir: Path, device: str) -> float:
    """DAC's own API one file at a time (load, preprocess, encode, save). Returns wall seconds."""
    dac = _import_dac()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    paths = pq.read_table(manifest, columns=["audio_path"]).column("audio_path").to_pylist()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dac.DAC.load(str(weights)).to(device).eval()
    with torch.inference_mode():
        for p in paths:
            x, sr = sf.read(p, dtype="float32", always_2d=True)
            wave = torch.from_numpy(x.mean(axis=1, dtype=np.float32))
            if sr != model.sample_rate:
                wave = torchaudio.transforms.Resample(sr, model.sample_rate)(wave)
            audio = model.preprocess(wave[None, None].to(device), model.sample_rate)
            _, codes, *_ = model.encode(audio)
            np.save(out_dir / (Path(p).stem + ".npy"), codes[0].to(torch.int16).cpu().numpy())
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ours(
    weights: Path, manifest: Path, out_dir: Path, device: str, threads: int, workers: int | None, batch_cpu: float | None = None
) -> float:
    overrides = {} if workers is None else {"num_workers_cpu": workers, "num_workers": workers}
    if batch_cpu is not None:
        overrides["batch_seconds_cpu"] = batch_cpu
    codes_cfg = CodesConfig(n_shards=1, **overrides)
    start = time.perf_counter()
    extract_codes(
        CodecConfig(weights=str(weights), device=device),
        codes_cfg,
        manifest,
        0,
        out_dir / "shard.parquet",
        out_dir / "rejects.parquet",
        threads=threads,
        progress=False,
    )
    return time.perf_counter() - start


def same_codes(shard: Path, npy_dir: Path) -> tuple[int, int]:
    """(utterances compared, utterances whose codes differ) between the two methods."""
    sc = read_shard_codes(shard)
    differ = 0
    for i, utt in enumerate(sc.meta["utt_id"]):
        if not np.array_equal(sc.codes(i), np.load(npy_dir / f"{utt}.npy")):
            differ += 1
    return len(sc), differ


def bench_extraction(kind: str, seconds: float, device: str, args, batch_cpu: float | None = None) -> dict:
    manifest = make_corpus(seconds, f"corpus-{seconds:g}s")
    audio = float(pq.read_table(manifest, columns=["duration"]).column("duration").to_numpy().sum())
    n_utts = pq.read_metadata(manifest).num_rows
    weights = codec_weights(kind)
    work = OUT / "work" / f"{kind}-{device}{'' if batch_cpu is None else '-batched'}"
    base_t, ours_t = [], []
    for r in range(args.repeats):
        # Interleaved, so load from other processes on the machine hits both alike.
        base_t.append(per_file_loop(weights, manifest, work / "npy", device))
        ours_t.append(ours(weights, manifest, work, device, args.threads, args.workers, batch_cpu))
        print(f"  {kind}/{device} repeat {r}: per-file {audio / base_t[-1]:.1f}x, extract_codes {audio / ours_t[-1]:.1f}x", file=sys.stderr)
    compared, differ = same_codes(work / "shard.parquet", work / "npy")
    return {
        "kind": kind,
        "device": device,
        "batched": batch_cpu is not None,
        "utts": n_utts,
        "audio": audio,
        "base": statistics.median(base_t),
        "ours": statistics.median(ours_t),
        "base_all": base_t,
        "ours_all": ours_t,
        "compared": compared,
        "differ": differ,
    }


# --------------------------------------------------------------------------------------------
# Reading


def make_read_corpus(n_utts: int, n_shards: int = 4) -> tuple[list[Path], list[Path]]:
    root = OUT / f"read-{n_utts}"
    npy_dir = root / "npy"
    shards = [root / f"shard-{i:05d}-of-{n_shards:05d}.parquet" for i in range(n_shards)]
    if not all(s.exists() for s in shards):
        shutil.rmtree(root, ignore_errors=True)
        npy_dir.mkdir(parents=True)
        rng = np.random.default_rng(SEED)
        codec = {"format": 1, "n_q": 12, "sample_rate": 16000, "hop_length": 320, "frame_rate": 50.0,
                 "codebook_size": 1024, "weights_sha256": "0" * 64, "n_shards": n_shards}
        ids = [f"utt{i:06d}" for i in range(n_utts)]
        for s in range(n_shards):
            mine = ids[s::n_shards]
            durs = rng.uniform(1.0, 12.0, len(mine))
            codes = [rng.integers(0, 1024, (12, int(np.ceil(d * 50))), dtype=np.int16) for d in durs]
            meta = pa.table({
                "utt_id": mine, "speaker": [f"spk{i % 50}" for i in range(len(mine))],
                "text": ["ሰላም ነው ዛሬ ጥሩ ቀን ነው"] * len(mine), "language": ["am"] * len(mine),
                "emotion": pa.nulls(len(mine), pa.string()),
                "audio_path": [f"/data/wavs/{u}.wav" for u in mine], "duration": durs,
            })
            _write_parquet(shard_table(meta, codes, {**codec, "shard": s}), shards[s])
            for u, c in zip(mine, codes):
                np.save(npy_dir / f"{u}.npy", c)
    return shards, sorted(npy_dir.glob("*.npy"))


def bench_reading(n_utts: int, repeats: int) -> dict:
    shards, files = make_read_corpus(n_utts)

    def read_shards() -> int:
        total = 0
        for s in shards:
            sc = read_shard_codes(s)
            for i in range(len(sc)):
                total += sc.codes(i).shape[1]
        return total

    def read_npy() -> int:
        total = 0
        for f in files:
            total += np.load(f).shape[1]
        return total

    assert read_shards() == read_npy()  # warm the cache; the same frames either way
    t_shards, t_npy = [], []
    for _ in range(repeats):
        for fn, ts in ((read_shards, t_shards), (read_npy, t_npy)):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return {
        "utts": n_utts,
        "shards": len(shards),
        "shard_mb": sum(s.stat().st_size for s in shards) / 1e6,
        "npy_mb": sum(f.stat().st_size for f in files) / 1e6,
        "shard_rate": n_utts / statistics.median(t_shards),
        "npy_rate": n_utts / statistics.median(t_npy),
    }


# --------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {cpu}, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def markdown(extraction: list[dict], reading: dict, args, load: str) -> str:
    lines = [
        BEGIN,
        "## Codec codes (`bench/bench_codes.py`)",
        "",
        f"Command: `.venv/bin/python bench/bench_codes.py {' '.join(args.argv)}`".rstrip() + "  ",
        f"Machine: {machine()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}."
        f" Load average before the run: {load} (the machine is shared; numbers move with it).",
        "",
        "### Extraction throughput (audio seconds per wall second, median of "
        f"{args.repeats} interleaved runs)",
        "",
        "Same corpus (22050 Hz mono WAVs, 1-6 s), same random weights. *Per-file loop*: `DAC.load`, then",
        "per file soundfile read, mono, torchaudio resample, `preprocess`, `encode`, `np.save`.",
        "*extract_codes*: the rule's job end to end on one shard (manifest, DataLoader (on a CPU with",
        "`num_workers_cpu: 0`, the default: reading in-process), resampling, the device's batching",
        "policy, atomic zstd Parquet). Both include model loading. The last row forces the GPU's",
        "batching policy onto the CPU: exact batching holds at full size, and costs on a CPU.",
        "",
        "| codec | device | utterances | audio | per-file loop | extract_codes | ratio | codes identical |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in extraction:
        base, mine = e["audio"] / e["base"], e["audio"] / e["ours"]
        same = "yes" if e["differ"] == 0 else f"NO ({e['differ']} of {e['compared']} differ)"
        name = "tiny demo DAC" if e["kind"] == "tiny" else "full-size 16 kHz DAC"
        if e["batched"]:
            name += ", batched as on a GPU (200 s)"
        lines.append(
            f"| {name} | {e['device']} | {e['utts']} | {e['audio']:.0f} s | {base:.1f}x | {mine:.1f}x | "
            f"{mine / base:.2f} | {same} ({e['compared']}) |"
        )
    for e in extraction:
        if e["device"] == "cuda":
            rt = e["audio"] / e["ours"]
            lines += ["", f"GPU goal (>= 300x real time, full-size 16 kHz DAC): {rt:.0f}x, {'met' if rt >= 300 else 'NOT met'}."]
    if not any(e["device"] == "cuda" for e in extraction):
        lines += [
            "",
            "No GPU here, so the GPU goal (full-size 16 kHz DAC at >= 300x real time per H100) is not",
            "measured; on a GPU machine this script adds a `cuda` row (`--gpu-seconds` of audio).",
        ]
    lines += [
        "",
        "### Reading codes back (utterances per second, warm page cache, median of "
        f"{args.repeats} runs)",
        "",
        f"{reading['utts']} utterances of 16 kHz-DAC-shaped codes (12 codebooks, 50 frames/s, 1-12 s).",
        "*Shards*: `read_shard_codes` + `codes(i)` for every row, metadata DataFrame included. *npy*:",
        "`np.load` of one file per utterance.",
        "",
        "| layout | files | size | utterances/s |",
        "|---|---:|---:|---:|",
        f"| Parquet shards (`list<int16>`, zstd) | {reading['shards']} | {reading['shard_mb']:.0f} MB | {reading['shard_rate']:,.0f} |",
        f"| one .npy per utterance | {reading['utts']} | {reading['npy_mb']:.0f} MB | {reading['npy_rate']:,.0f} |",
        "",
        f"Shards read {reading['shard_rate'] / reading['npy_rate']:.1f}x as many utterances per second as"
        " per-utterance files (goal: 1.5x).",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny-seconds", type=float, default=300.0, help="audio for the tiny codec (default 300)")
    p.add_argument("--full-seconds", type=float, default=60.0, help="audio for the full-size codec on CPU (default 60)")
    p.add_argument("--gpu-seconds", type=float, default=1800.0, help="audio for the full-size codec on a GPU (default 1800)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-utts", type=int, default=8000, help="utterances for the reading benchmark (default 8000)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="extract_codes threads (the rule's threads)")
    p.add_argument("--workers", type=int, default=None, help="override codes.num_workers_cpu and num_workers")
    p.add_argument("--only", choices=["extract", "read"], default=None)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    args.argv = sys.argv[1:]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    extraction: list[dict] = []
    if args.only != "read":
        extraction.append(bench_extraction("tiny", args.tiny_seconds, "cpu", args))
        extraction.append(bench_extraction("full", args.full_seconds, "cpu", args))
        # The GPU's batching policy on the CPU: shows that exact batching holds at full size
        # (codes identical) and what batching costs on a CPU.
        extraction.append(bench_extraction("full", args.full_seconds, "cpu", args, batch_cpu=200.0))
        if torch.cuda.is_available():
            extraction.append(bench_extraction("full", args.gpu_seconds, "cuda", args))
    reading = bench_reading(args.read_utts, args.repeats) if args.only != "extract" else None
    if reading is None:
        for e in extraction:
            print(e)
        return 0
    text = markdown(extraction, reading, args, load)
    print(text)
    if not args.no_write and args.only is None:
        write_section(text, BEGIN, END, ANCHOR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
