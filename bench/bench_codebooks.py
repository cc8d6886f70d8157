"""How much of the audio each DAC codebook carries: decode with the first 1, 2 ... K codebooks.

    .venv/bin/python bench/bench_codebooks.py --clean results/clean/clean.parquet \
        --codec results/demo/codec/dac_tiny.pth [--limit 120] [--random-16khz 12] [--threads 2]

For every utterance of the clean manifest (the first ``--limit``): encode it with the codec
(``codec.encode_batch``, all codebooks), decode the first q codebooks with
``codec.decode_codes(..., n_codebooks_ok=True)`` for q = 0 .. K (q = 0 decodes an all-zero
latent, the floor of the scale), and compare with the original audio (resampled to the codec's
rate) by log-mel L1: mean absolute difference of natural-log mel spectrograms (80 bands, 1024-point
FFT, 20 ms hop, floor 1e-5). Also the latent error ``||z_q - z|| / ||z||`` of the quantised latent
against the encoder's output, which RVQ shrinks codebook by codebook when its codebooks are
trained. ``--random-16khz N`` adds the full-size 16 kHz DAC architecture (12 codebooks) with random
weights on the first N utterances. Prints a Markdown section.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from indextts.audio.dac import DAC_16KHZ_KWARGS, decode_codes, encode_batch, load_codec, make_demo_codec
from indextts.features import FeatureConfig, load_audio, log_mel

MEL = FeatureConfig(n_mels=80, n_fft=1024, win_length=1024, hop_length=320, f_max=None)


def random_16khz(path: Path) -> Path:
    """The official 16 kHz DAC architecture with random weights, in DAC's file format."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dac

        torch.manual_seed(0)
        model = dac.DAC(**DAC_16KHZ_KWARGS)
    model.save(str(path), package=False)
    return path


def measure(weights: Path, paths: list[str]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, info = load_codec(weights)
    mel_cfg = FeatureConfig(**{**MEL.__dict__, "sample_rate": info.sample_rate})
    K = info.n_q
    l1 = {q: [] for q in range(K + 1)}
    latent = {q: [] for q in range(1, K + 1)}
    seconds = 0.0
    t0 = time.perf_counter()
    for p in paths:
        wave = load_audio(p, info.sample_rate)
        seconds += wave.shape[0] / info.sample_rate
        (codes,) = encode_batch(model, wave[None, None], [wave.shape[0]])  # (K, T)
        with torch.inference_mode():
            x = model.preprocess(wave[None, None], info.sample_rate)
            z = model.encoder(x)  # (1, D, T): what the quantiser approximates
        ref = log_mel(wave, mel_cfg)
        for q in range(K + 1):
            if q == 0:
                with torch.inference_mode():
                    audio = model.decode(torch.zeros_like(z))[0, 0]
            else:
                # the deliberate partial decodes' stderr note; the table says it
                with contextlib.redirect_stderr(io.StringIO()):
                    audio = decode_codes(model, codes[:q], n_codebooks_ok=q < K)
                with torch.inference_mode():
                    z_q, *_ = model.quantizer.from_codes(codes[None, :q])
                latent[q].append(float((z_q - z).norm() / z.norm()))
            got = log_mel(audio[: wave.shape[0]], mel_cfg)
            n = min(got.shape[0], ref.shape[0])
            l1[q].append(float((got[:n] - ref[:n]).abs().mean()))
    return {"info": info, "n": len(paths), "seconds": seconds, "wall": time.perf_counter() - t0, "l1": l1,
            "latent": latent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clean", default="results/clean/clean.parquet")
    ap.add_argument("--codec", default="results/demo/codec/dac_tiny.pth", help="DAC weights (made if missing)")
    ap.add_argument("--limit", type=int, default=120)
    ap.add_argument("--random-16khz", type=int, default=0, help="utterances for the random full-size 16 kHz DAC")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import pyarrow.parquet as pq

    paths = pq.read_table(args.clean, columns=["audio_path"]).column("audio_path").to_pylist()
    codec = Path(args.codec)
    if not codec.exists():
        make_demo_codec(codec)
    runs = [("demo codec (tiny, random weights)", measure(codec, paths[: args.limit]))]
    if args.random_16khz:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(("16 kHz DAC architecture, random weights",
                         measure(random_16khz(Path(tmp) / "dac16.pth"), paths[: args.random_16khz])))
    print("### DAC reconstruction with the first q codebooks\n")
    print(f"`.venv/bin/python bench/bench_codebooks.py --limit {args.limit} --random-16khz {args.random_16khz}` "
          f"({os.cpu_count()} cores, torch {torch.__version__}): demo corpus utterances from `{args.clean}`, "
          "log-mel L1 against the original audio at the codec's rate (80 bands, 1024-point FFT, 20 ms hop, natural "
          "log, floor 1e-5); latent error = ||z_q - z|| / ||z|| of the quantised latent against the encoder output. "
          "q = 0 decodes an all-zero latent.\n")
    print("| codec | utterances (audio) | q codebooks | log-mel L1 mean (stdev) | latent error mean |")
    print("|---|---|---:|---:|---:|")
    for name, r in runs:
        K = r["info"].n_q
        for q in range(K + 1):
            l1 = r["l1"][q]
            lat = f"{statistics.mean(r['latent'][q]):.3f}" if q else "1.000"
            sd = statistics.stdev(l1) if len(l1) > 1 else 0.0
            label = f"{q} of {K}" + (" (all)" if q == K else "")
            print(f"| {name} | {r['n']} ({r['seconds']:.0f} s) | {label} | {statistics.mean(l1):.3f} ({sd:.3f}) | {lat} |")
    print()


if __name__ == "__main__":
    main()
