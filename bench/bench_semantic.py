"""Benchmark: semantic-code extraction (w2v-BERT 2.0 + the MaskGCT semantic codec), its cost model
at the released sizes, and disk per hour of audio for codes and stored prompt features.

    .venv/bin/python bench/bench_semantic.py [--seconds S] [--repeats R] [--threads T]
                                             [--full-seconds S] [--no-full] [--no-write]

1. Extraction on this CPU with the tiny random models (``make_tiny_semantic``): ``extract_codes``
   end to end on one shard of a seeded corpus of 22050 Hz WAVs of 1-6 s (bench_codes' corpus),
   one utterance at a time (the CPU default), batched, and batched with ``features.store``;
   median of ``--repeats`` interleaved runs, codes checked identical. Then where the time goes,
   stage by stage in one process: read + resample, the w2v-BERT fbank front end (transformers'
   ``SeamlessM4TFeatureExtractor``, numpy), the encoder, the codec.
2. The released sizes. FLOPs per second of audio of w2v-BERT 2.0 run to layer 17 (counted with
   ``torch.utils.flop_counter`` on one and two real conformer layers, scaled to 17) and of the
   codec's encoder + quantizer (counted on the meta device), at 5, 10 and 20 s utterances; what
   the GPU goal (300x real time per H100-class GPU) asks of a GPU and of the fbank workers; and,
   unless ``--no-full``, the wall time of the released-size pair (random weights) on this CPU.
3. Disk per hour of audio: semantic-code shards (the tiny run's, and synthetic shards of 8192
   uniformly random codes, an upper bound), a 12-codebook DAC shard for comparison, and stored
   fp16 1024-dim prompt features (whole utterances, and 6 s crops), all through the real writers.
4. Stored vs computed prompts for training: the GPT step's FLOPs per utterance (indextts2 preset,
   ``indextts.model.flops``) against w2v-BERT's on its prompts, and the time to read one stored
   6 s prompt back at random (``PromptFeatureStore``).

Prints a Markdown section and writes it between this script's markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchmarks_md import write_section  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.bench_codes import machine, make_corpus  # noqa: E402
from indextts.codes import CodecConfig# noqa: E402
from indextts.codes import CodesConfig, _write_parquet, extract_codes, read_audio, read_shard_codes, shard_table  # noqa: E402
from indextts.features import (  # noqa: E402
    PromptFeaturesConfig,
    PromptFeatureStore,
    crop_window,
    features_path_for,
    features_table,
    write_features,
)
from indextts.audio.semantic_codec import SemanticCodec, load_semantic_encoder, make_tiny_semantic# noqa: E402

OUT = ROOT / "bench" / "out" / "semantic"
BEGIN, END = "<!-- bench_semantic.py: begin -->", "<!-- bench_semantic.py: end -->"
ANCHOR = "<!-- bench_codes.py: end -->"
GOAL = 300.0
# Dense peaks of an H100 SXM, FLOP/s: FP32 without tensor cores (what codec.w2v_bert_dtype fp32
# runs, TF32 off), and BF16 tensor cores (w2v_bert_dtype bf16).
H100 = {"fp32": 67e12, "bf16": 989e12}


# --------------------------------------------------------------------------------------------
# 1. Extraction with the tiny models


def extraction(models: dict, manifest: Path, repeats: int, threads: int) -> dict:
    policies = {
        "one at a time (CPU default)": ({"batch_seconds_cpu": 0.0}, None),
        "batched, 30 s per batch": ({"batch_seconds_cpu": 30.0, "max_batch_size": 64}, None),
        "batched + features.store": ({"batch_seconds_cpu": 30.0, "max_batch_size": 64},
                                     PromptFeaturesConfig(store=True, max_ref_seconds=6.0)),
    }
    times = {k: [] for k in policies}
    digests = {}
    for r in range(repeats):
        for k, (name, (codes, feats)) in enumerate(policies.items()):
            out = OUT / "runs" / f"policy{k}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            shard, _ = extract_codes(CodecConfig(**models), CodesConfig(n_shards=1, **codes), manifest, 0,
                                     out / "shard-00000-of-00001.parquet", out / "rejects.parquet",
                                     threads=threads, progress=False, features_cfg=feats)
            times[name].append(time.perf_counter() - t0)
            digests[name] = shard.read_bytes()
            if feats is not None:
                feature_file = features_path_for(shard)
    seconds = float(pq.read_table(manifest, columns=["duration"]).column("duration").to_numpy().sum())
    same = len(set(digests.values())) == 1
    return {"seconds": seconds, "rows": {k: seconds / statistics.median(v) for k, v in times.items()},
            "identical": same, "shard": shard, "features": feature_file}


def stages(models: dict, manifest: Path, limit: float = 120.0) -> dict:
    """Seconds of audio per wall second of each stage, one utterance at a time, in one process."""
    enc = load_semantic_encoder(CodecConfig(**models))
    paths = pq.read_table(manifest, columns=["audio_path"]).column("audio_path").to_pylist()
    t_read = t_fbank = t_w2v = t_codec = 0.0
    audio = 0.0
    resamplers: dict = {}
    for p in paths:
        t0 = time.perf_counter()
        wave = read_audio(p, 16000, resamplers)
        t1 = time.perf_counter()
        batch = enc.prepare([wave])
        t2 = time.perf_counter()
        feats = enc.w2v(torch.from_numpy(batch["input_features"]), torch.from_numpy(batch["attention_mask"]))
        t3 = time.perf_counter()
        enc.codec.quantize(feats, torch.as_tensor(batch["frames"]))
        t4 = time.perf_counter()
        t_read, t_fbank, t_w2v, t_codec = t_read + t1 - t0, t_fbank + t2 - t1, t_w2v + t3 - t2, t_codec + t4 - t3
        audio += len(wave) / 16000
        if audio > limit:
            break
    return {"audio": audio, "read + resample": audio / t_read, "fbank front end": audio / t_fbank,
            "w2v-BERT (tiny)": audio / t_w2v, "codec (tiny)": audio / t_codec}


# --------------------------------------------------------------------------------------------
# 2. Released sizes


def released_flops() -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(0)
    # One and two real layers of w2v-BERT 2.0's size: their difference is a layer, the rest the
    # front end (the full model cannot run on the meta device: its attention calls .item()).
    models = {n: Wav2Vec2BertModel(Wav2Vec2BertConfig(num_hidden_layers=n)).eval() for n in (1, 2)}
    with torch.device("meta"):
        codec = SemanticCodec().eval()
    rows = []
    for secs in (5, 10, 20):
        frames = secs * 50 - 1
        x, mask = torch.randn(1, frames, 160), torch.ones(1, frames, dtype=torch.long)
        total = {}
        for n, m in models.items():
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                m(input_features=x, attention_mask=mask)
            total[n] = fc.get_total_flops()
        layer = total[2] - total[1]
        w2v = (total[1] - layer) + 17 * layer
        with FlopCounterMode(display=False) as fc:
            codec.quantize(torch.zeros(1, frames, 1024, device="meta"))
        rows.append({"seconds": secs, "w2v": w2v / secs, "codec": fc.get_total_flops() / secs})
    return rows


def released_cpu(seconds: float, threads: int) -> dict:
    """Wall time of the released-size w2v-BERT (17 layers) + codec, random weights, on this CPU."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.set_num_threads(threads)
    with torch.device("meta"):
        w2v = Wav2Vec2BertModel(Wav2Vec2BertConfig(num_hidden_layers=17)).eval()
        codec = SemanticCodec().eval()
    for m in (w2v, codec):
        m.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name and p.ndim == 1:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
    frames = int(seconds * 50) - 1
    x, mask = torch.randn(1, frames, 160), torch.ones(1, frames, dtype=torch.long)
    with torch.inference_mode():
        w2v(input_features=x[:, :50], attention_mask=mask[:, :50])  # warm-up
        t0 = time.perf_counter()
        feats = w2v(input_features=x, attention_mask=mask).last_hidden_state
        t1 = time.perf_counter()
        codec.quantize(feats)
        t2 = time.perf_counter()
    return {"seconds": seconds, "w2v_s": t1 - t0, "codec_s": t2 - t1, "threads": threads}


# --------------------------------------------------------------------------------------------
# 3. Disk


def disk(tiny_shard: Path, seconds_tiny: float, durations: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    hours = durations.sum() / 3600
    meta_cols = {"speaker": "s", "text": "ሰላም ነው", "language": "am", "emotion": None, "audio_path": "/data/a.wav"}
    ids = [f"utt{i:06d}" for i in range(len(durations))]
    meta = pa.table({"utt_id": ids, **{k: [v] * len(ids) for k, v in meta_cols.items()},
                     "duration": durations.astype(np.float64)})
    out = {}
    for name, n_q, book in (("semantic codes (8192, uniformly random)", 1, 8192), ("DAC 16 kHz (12 x 1024, uniformly random)", 12, 1024)):
        codes = [rng.integers(0, book, size=(n_q, int(d * 50)), dtype=np.int16) for d in durations]
        path = OUT / "disk" / f"{n_q}.parquet"
        _write_parquet(shard_table(meta, codes, {"n_q": n_q, "codebook_size": book}), path)
        out[name] = path.stat().st_size / hours / 1e6
    out["_mean"] = float(durations.mean())
    out["semantic codes (tiny run, 64 codes)"] = tiny_shard.stat().st_size / (seconds_tiny / 3600) / 1e6
    # Normalised features are about unit normal; fp16 of a normal draw is the realistic case for
    # zstd (real features are smoother in time, so this is if anything an upper bound).
    for label, crop in (("prompt features, whole utterances", None), ("prompt features, 6 s crops", 300)):
        feats, starts, totals = [], [], []
        for u, d in zip(ids, durations):
            n = int(d * 50)
            s, k = (0, n) if crop is None else crop_window(u, n, crop)
            feats.append(rng.standard_normal((k, 1024), dtype=np.float32))
            starts.append(s)
            totals.append(n)
        path = write_features(features_table(ids, feats, starts, totals, {"dim": 1024, "frame_rate": 50.0}),
                              OUT / "disk" / f"features-{crop}.parquet")
        out[label] = path.stat().st_size / hours / 1e6
        if crop == 300:
            out["_features_path"] = path
            out["_ids"] = ids
    return out


def read_prompt(path: Path, ids: list[str], n: int = 200) -> float:
    """Milliseconds to read one stored prompt at random (a fresh store, warm page cache)."""
    store = PromptFeatureStore([path])
    order = np.random.default_rng(1).permutation(len(ids))[:n]
    store.get(ids[order[0]])
    t0 = time.perf_counter()
    for k in order:
        store.get(ids[k])
    return (time.perf_counter() - t0) / len(order) * 1e3


# --------------------------------------------------------------------------------------------
# Report


def markdown(args, load0: str, load1: str, ext: dict, st: dict, flops: list[dict], cpu: dict | None, dk: dict,
             read_ms: float) -> str:
    from indextts.model import model_config
    from indextts.model.flops import flops_per_token

    lines = [BEGIN, "## Semantic codes: w2v-BERT 2.0 + MaskGCT codec (`bench/bench_semantic.py`)", ""]
    cmd = "`.venv/bin/python bench/bench_semantic.py" + (f" --seconds {args.seconds:g}" if args.seconds != 300 else "")
    cmd += (f" --repeats {args.repeats}" if args.repeats != 3 else "") + (" --no-full" if args.no_full else "") + "`"
    mem = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
    lines += [f"Command: {cmd}  ", f"Machine: {machine()}, {mem / 2**20:.0f} GiB RAM; OMP_WAIT_POLICY=PASSIVE. "
              f"Load average (1/5/15 min) before the run {load0}, after it {load1}: the machine is shared with other "
              "jobs, and the wall times move with them.", ""]
    lines += ["### Extraction on this CPU, tiny random models (audio seconds per wall second)", "",
              f"`extract_codes` on one shard: {ext['seconds']:.0f} s of 22050 Hz WAVs of 1-6 s (bench_codes' "
              "corpus), model loading included, median of "
              f"{args.repeats} interleaved runs. Tiny w2v-BERT: 32 wide, 3 layers (features of layer 2); tiny codec: 64 codes.", "",
              "| policy | x real time |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f}x |" for k, v in ext["rows"].items()]
    lines += ["", f"Codes identical across the three: {'yes' if ext['identical'] else 'NO'}.", "",
              f"Where the time goes ({st['audio']:.0f} s of audio, one utterance at a time, one process):", "",
              "| stage | x real time |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f}x |" for k, v in st.items() if k != "audio"]
    fb = st["fbank front end"]
    lines += ["", "With tiny models the fbank front end (transformers' numpy `SeamlessM4TFeatureExtractor`, "
              "a Python loop over 10 ms frames) is the bottleneck; at the released sizes the encoder is (below).", ""]

    lines += ["### Released sizes: cost model", "",
              "FLOPs of one forward pass per second of audio (multiply-add = 2 FLOPs), w2v-BERT 2.0 run to layer 17 of 24 "
              "(the layers above are not run) plus the codec's encoder and quantizer (its decoder is not run):", "",
              "| utterance | w2v-BERT to layer 17 | codec | total | for 300x real time |", "|---:|---:|---:|---:|---:|"]
    for r in flops:
        tot = r["w2v"] + r["codec"]
        lines.append(f"| {r['seconds']} s | {r['w2v'] / 1e9:.1f} GFLOP | {r['codec'] / 1e9:.2f} GFLOP | "
                     f"{tot / 1e9:.1f} GFLOP | {GOAL * tot / 1e12:.1f} TFLOP/s |")
    mid = flops[1]["w2v"] + flops[1]["codec"]
    need = GOAL * mid
    lines += ["", f"The GPU goal, {GOAL:.0f}x real time per H100-class GPU, asks for {need / 1e12:.1f} TFLOP/s sustained: "
              f"{100 * need / H100['fp32']:.0f}% of an H100 SXM's {H100['fp32'] / 1e12:.0f} TFLOP/s FP32 peak with "
              f"`codec.w2v_bert_dtype: fp32` (TF32 off, IndexTTS2's own codes exactly), or {100 * need / H100['bf16']:.1f}% of its "
              f"{H100['bf16'] / 1e12:.0f} TFLOP/s BF16 peak with `bf16`. Both are within reach of large batched GEMMs "
              f"(`codes.batch_seconds_cuda: 200`, i.e. 10,000 frames per forward). The CPU side must keep up too: at "
              f"{fb:.0f}x real time per core for the fbank front end, {GOAL / fb:.1f} DataLoader workers "
              f"(`codes.num_workers`) are needed for {GOAL:.0f}x. Not measured here: no GPU on this machine "
              "(this task drew none); on a GPU machine run `extract_codes` on a real shard and read its log's rate.", ""]
    if cpu is not None:
        rt = cpu["seconds"] / (cpu["w2v_s"] + cpu["codec_s"])
        lines += [f"Released-size pair with random weights on this CPU ({cpu['threads']} threads, fp32, one "
                  f"{cpu['seconds']:.0f} s utterance): w2v-BERT {cpu['w2v_s']:.1f} s, codec {cpu['codec_s']:.2f} s, "
                  f"{rt:.2f}x real time. Extraction at the released sizes is a GPU job.", ""]
    lines += ["### Disk per hour of audio", "",
              f"Through the real writers (zstd Parquet), for {len(dk['_ids'])} utterances of 1-20 s (uniform, mean "
              f"{dk['_mean']:.1f} s); the tiny run's shard is the extraction corpus above:", "",
              "| what | MB per hour |", "|---|---:|"]
    lines += [f"| {k} | {v:,.1f} |" for k, v in dk.items() if not k.startswith("_")]
    whole, crops = dk["prompt features, whole utterances"], dk["prompt features, 6 s crops"]
    lines += ["", "Raw sizes: semantic codes are 50 x 2 bytes per second (0.36 MB/h as int16), DAC 16 kHz twelve times that; "
              "prompt features are 50 x 1024 x 2 bytes per second (369 MB/h, fp16) for the part of each utterance that is "
              f"stored, so `features.max_ref_seconds: 6` stores about {whole:.0f} x E[min(L, 6)] / E[L] MB per hour of "
              "utterances of L seconds. Random normal features barely compress; real ones may a little.", ""]

    cfg = model_config("indextts2", number_text_tokens=12000, number_mel_codes=8194)
    text, codes, prefix = 60, 450, cfg.prefix_len  # a 9 s utterance, ~60 BPE tokens
    seq = cfg.seq_len(text, codes)
    step = flops_per_token(cfg, seq) * seq
    prompt = 6 * (flops[0]["w2v"])  # a 6 s prompt, forward only
    lines += ["### Prompt features for training: stored or computed?", "",
              f"A released-size (`indextts2`) training step costs about {step / 1e12:.2f} TFLOP per 9 s utterance "
              f"(6N + 12LdT per GPT position, {seq} positions, `indextts.model.flops`; conditioners not counted). "
              f"Computing its prompts with w2v-BERT instead of reading them costs {prompt / 1e9:.0f} GFLOP per 6 s prompt, "
              f"forward only: {100 * prompt / step:.0f}% more compute for the speaker prompt, {200 * prompt / step:.0f}% with "
              "a separate emotion prompt (`train.emo_prompt: target`), a second 2.3 GB model on every training GPU, and it "
              "cannot keep up in the DataLoader's CPU workers"
              + (f" (one 6 s prompt takes {6 * (cpu['w2v_s'] + cpu['codec_s']) / cpu['seconds']:.1f} s of this CPU's "
                 f"{cpu['threads']} threads)" if cpu else "") + ". "
              f"Reading one stored 6 s prompt back at random takes {read_ms:.1f} ms (`PromptFeatureStore.get`, warm cache). "
              f"So extraction stores them (`features.store: true` in `config/korean.yaml`): {crops:.0f}-{whole:.0f} MB of disk "
              "per hour of audio (6 s crops of 1-20 s utterances, or utterances of at most 6 s kept whole), and nothing "
              "at training time.", "", END]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="audio seconds of the extraction corpus")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per extraction policy")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--full-seconds", type=float, default=10.0, help="utterance length of the released-size CPU run")
    p.add_argument("--no-full", action="store_true", help="skip the released-size CPU run")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    models = make_tiny_semantic(OUT / "models")
    manifest = make_corpus(args.seconds, f"corpus-{args.seconds:g}s")
    ext = extraction(models, manifest, args.repeats, args.threads)
    st = stages(models, manifest)
    flops = released_flops()
    cpu = None if args.no_full else released_cpu(args.full_seconds, args.threads)
    # Disk on longer utterances than the extraction corpus (uniform 1-20 s, mean 10.5 s), where
    # the 6 s crop matters.
    durations = np.round(np.random.default_rng(2).uniform(1.0, 20.0, size=200), 3)
    dk = disk(ext["shard"], ext["seconds"], durations)
    read_ms = read_prompt(dk["_features_path"], dk["_ids"])
    assert len(read_shard_codes(ext["shard"])) == len(pq.read_table(manifest, columns=["utt_id"]))
    load1 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = markdown(args, load0, load1, ext, st, flops, cpu, dk, read_ms)
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END, ANCHOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
